"""Control messages on the control stream between the edge and a connector or client, sans-IO.

Wire format (documented in docs/protocol.md): a frame is a 4-byte big-endian length followed by
that many bytes of UTF-8 JSON (RFC 8259) encoding one object with a mandatory string member
``"type"``.

Rules this codec keeps:

- A frame longer than ``max_message`` is refused as soon as its length prefix is read, before
  any of its body is buffered (code ``control_too_large``).
- The body must be strict JSON: valid UTF-8 (RFC 8259 §8.1), no NaN/Infinity (not JSON), no
  duplicate member names (§4 leaves them undefined; two parsers disagreeing on which one wins
  is a classic smuggling bug), a top-level object, a non-empty string ``"type"``. Anything else
  is ``control_malformed``. Empty frames are malformed too.
- Unknown message types are not errors: :func:`parse_control` returns :class:`UnknownControl`
  so an older peer keeps working when a newer one adds messages. Unknown members of known types
  are ignored for the same reason.
- Peer misbehaviour raises :class:`~limen.errors.RemoteProtocolError` and the decoder stops
  (every later :meth:`ControlDecoder.feed` is a :class:`~limen.errors.LocalProtocolError`):
  after a framing error the byte stream has no trustworthy boundary left. Our own misuse
  (encoding a message without a type, or too large) raises LocalProtocolError. Nothing else
  escapes, and no ``assert`` guards peer data.
- No I/O, no clock, no asyncio.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast

from limen.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_CONTROL_MESSAGE",
    "ClaimsChallenge",
    "ControlDecoder",
    "ControlMessage",
    "Drain",
    "Heartbeat",
    "Hello",
    "ProfileUpdate",
    "RenewRefused",
    "RenewRequest",
    "RenewResponse",
    "UnknownControl",
    "encode_control",
    "parse_control",
]

# Control messages are small (a heartbeat is ~150 bytes); the largest is a forwarding profile
# pushed to a client, which for hundreds of segments is tens of KiB. 64 KiB bounds what one peer
# can make us hold per control stream; raise it per decoder if profiles outgrow it.
MAX_CONTROL_MESSAGE = 64 * 1024

_HEADER = struct.Struct("!I")


class ControlDecoder:
    """Split a control stream into JSON objects.

    ``feed(data)`` returns the complete messages the bytes finish, each a ``dict`` with a string
    ``"type"``; pass them to :func:`parse_control` for typed access. Call :meth:`feed_eof` when
    the stream ends, to catch a peer that stopped mid-frame.
    """

    def __init__(self, max_message: int = MAX_CONTROL_MESSAGE) -> None:
        if not isinstance(max_message, int) or max_message < 1:
            raise LocalProtocolError("max_message must be a positive int", code="control_config")
        self.max_message = max_message
        # Holds at most one header plus one body: max_message + 4 bytes (plus one feed's worth
        # of whole frames that are parsed and dropped before feed returns).
        self._buf = bytearray()
        self._failed = False

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Feed bytes read from the stream; return the messages they complete."""
        if self._failed:
            raise LocalProtocolError("feed() after a protocol error", code="control_bad_state")
        self._buf += data
        buf = self._buf
        pos = 0
        messages: list[dict[str, Any]] = []
        try:
            while len(buf) - pos >= _HEADER.size:
                (length,) = _HEADER.unpack_from(buf, pos)
                if length > self.max_message:
                    raise RemoteProtocolError(
                        f"control message of {length} bytes exceeds {self.max_message}",
                        code="control_too_large",
                    )
                end = pos + _HEADER.size + length
                if len(buf) < end:
                    break
                messages.append(_decode_body(bytes(buf[pos + _HEADER.size : end])))
                pos = end
        except RemoteProtocolError:
            self._failed = True
            self._buf = bytearray()
            raise
        # One deletion per feed, not one per message: many small frames stay linear.
        del buf[:pos]
        return messages

    def feed_eof(self) -> None:
        """The stream ended: raise RemoteProtocolError (``control_truncated``) if it ended in
        the middle of a frame."""
        if self._failed:
            raise LocalProtocolError("feed_eof() after a protocol error", code="control_bad_state")
        if self._buf:
            self._failed = True
            raise RemoteProtocolError("control stream ended mid-frame", code="control_truncated")

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # 1e999 is valid JSON syntax but overflows to inf, which is not a JSON value.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate member name")
    return obj


def _decode_body(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
        obj = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_no_duplicates,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, our hooks, and int() digit limits; RecursionError
        # a deeply nested array or object.
        raise RemoteProtocolError(
            f"control message is not valid JSON: {type(exc).__name__}", code="control_malformed"
        ) from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("control message is not a JSON object", code="control_malformed")
    kind = obj.get("type")
    if not isinstance(kind, str) or not kind:
        raise RemoteProtocolError('control message has no string "type"', code="control_malformed")
    return cast(dict[str, Any], obj)


def encode_control(
    message: dict[str, Any] | ControlMessage, *, max_message: int = MAX_CONTROL_MESSAGE
) -> bytes:
    """Frame one message (a dict with a string ``"type"``, or a typed message) for the wire.

    Raises LocalProtocolError if the message has no type, is not JSON-serialisable (NaN
    included), or would exceed ``max_message`` bytes: the peer would refuse it anyway.
    """
    obj = message if isinstance(message, dict) else message.to_dict()
    kind = obj.get("type")
    if not isinstance(kind, str) or not kind:
        raise LocalProtocolError('control message needs a string "type"', code="control_no_type")
    try:
        body = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise LocalProtocolError(
            f"control message is not JSON-serialisable: {exc}", code="control_unserialisable"
        ) from None
    try:
        raw = body.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates in a str
        raise LocalProtocolError(
            "control message has text that is not valid Unicode", code="control_unserialisable"
        ) from None
    if len(raw) > max_message:
        raise LocalProtocolError(
            f"control message of {len(raw)} bytes exceeds {max_message}", code="control_too_large"
        )
    return _HEADER.pack(len(raw)) + raw


# --- typed messages -----------------------------------------------------------------------------
#
# Each typed message validates itself in __post_init__ and raises LocalProtocolError: building
# a bad one is our bug. from_dict() turns the same checks on peer data into RemoteProtocolError.


def _bad(message: str) -> LocalProtocolError:
    return LocalProtocolError(message, code="control_malformed")


def _check_str(name: str, value: object, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise _bad(f"{name} must be a {'' if allow_empty else 'non-empty '}string")


def _check_count(name: str, value: object) -> None:
    # bool is an int subclass in Python; JSON true must not pass for a counter.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(f"{name} must be a non-negative integer")


def _from_peer(build: Callable[[], ControlMessage]) -> ControlMessage:
    try:
        return build()
    except LocalProtocolError as exc:
        raise RemoteProtocolError(exc.message, code="control_malformed") from None


@dataclass(frozen=True, slots=True)
class Hello:
    """First message on a control stream, both directions: who is speaking, which version."""

    TYPE: ClassVar[str] = "hello"
    role: Literal["connector", "client"]
    node_id: str
    version: str

    def __post_init__(self) -> None:
        if self.role not in ("connector", "client"):
            raise _bad('role must be "connector" or "client"')
        _check_str("node_id", self.node_id)
        _check_str("version", self.version)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "role": self.role,
            "node_id": self.node_id,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Hello:
        return cls(raw.get("role"), raw.get("node_id"), raw.get("version"))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Connector → edge, periodically: load and health. ``now`` is the sender's Unix time, for
    clock-skew diagnostics only (never trusted for decisions)."""

    TYPE: ClassVar[str] = "heartbeat"
    active_flows: int
    bytes_up: int
    bytes_down: int
    dials_failed: int
    now: float

    def __post_init__(self) -> None:
        for name in ("active_flows", "bytes_up", "bytes_down", "dials_failed"):
            _check_count(name, getattr(self, name))
        now: object = self.now
        if isinstance(now, int) and not isinstance(now, bool):
            # JSON has one number type: 1700000000 may arrive without a fraction.
            try:
                now = float(now)
            except OverflowError:
                raise _bad("now must be a finite number") from None
            object.__setattr__(self, "now", now)
        if not isinstance(now, float) or not math.isfinite(now):
            raise _bad("now must be a finite number")

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "active_flows": self.active_flows,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "dials_failed": self.dials_failed,
            "now": self.now,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Heartbeat:
        return cls(
            raw.get("active_flows"),  # type: ignore[arg-type]
            raw.get("bytes_up"),  # type: ignore[arg-type]
            raw.get("bytes_down"),  # type: ignore[arg-type]
            raw.get("dials_failed"),  # type: ignore[arg-type]
            raw.get("now"),  # type: ignore[arg-type]
        )


@dataclass(frozen=True, slots=True)
class Drain:
    """Edge → connector or client: finish current flows, open no new ones here, reconnect.
    Connector → edge: the connector is shutting down; send it no new flows, let its flows
    finish."""

    TYPE: ClassVar[str] = "drain"
    reason: str

    def __post_init__(self) -> None:
        _check_str("reason", self.reason, allow_empty=True)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "reason": self.reason}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Drain:
        return cls(raw.get("reason", ""))


@dataclass(frozen=True, slots=True)
class ClaimsChallenge:
    """Edge → client: re-authenticate. ``www_authenticate`` is the full Bearer challenge, e.g.
    ``Bearer error="insufficient_claims", claims="<base64>"`` (CAE, section 5 of the design)."""

    TYPE: ClassVar[str] = "claims_challenge"
    www_authenticate: str
    reason: str

    def __post_init__(self) -> None:
        _check_str("www_authenticate", self.www_authenticate)
        _check_str("reason", self.reason, allow_empty=True)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "www_authenticate": self.www_authenticate, "reason": self.reason}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ClaimsChallenge:
        return cls(raw.get("www_authenticate"), raw.get("reason", ""))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ProfileUpdate:
    """Edge → client: a new forwarding profile. ``version`` grows monotonically (the config
    version), so a client can ignore a stale push; ``profile``'s schema belongs to the client
    package, this codec only checks that it is an object."""

    TYPE: ClassVar[str] = "profile_update"
    version: int
    profile: dict[str, Any] = field(hash=False)

    def __post_init__(self) -> None:
        _check_count("version", self.version)
        if not isinstance(self.profile, dict):
            raise _bad("profile must be an object")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "version": self.version, "profile": self.profile}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ProfileUpdate:
        return cls(raw.get("version"), raw.get("profile"))  # type: ignore[arg-type]


#: A PEM CSR or certificate for an EC P-256 key is under 1 KiB; 16 KiB leaves room for RSA
#: keys and a chain while keeping a renewal far below MAX_CONTROL_MESSAGE.
MAX_PEM = 16 * 1024


def _check_pem(name: str, value: object, label: str) -> None:
    _check_str(name, value)
    text = cast(str, value)
    if len(text) > MAX_PEM:
        raise _bad(f"{name} is longer than {MAX_PEM} characters")
    if f"-----BEGIN {label}-----" not in text:
        raise _bad(f"{name} is not a PEM {label.lower()}")


@dataclass(frozen=True, slots=True)
class RenewRequest:
    """Connector → edge: a certificate signing request for a fresh key, sent before the
    current certificate expires. The edge signs it for the connector the TLS certificate of
    this link names, whatever the CSR's subject says."""

    TYPE: ClassVar[str] = "renew_request"
    csr_pem: str

    def __post_init__(self) -> None:
        _check_pem("csr_pem", self.csr_pem, "CERTIFICATE REQUEST")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "csr_pem": self.csr_pem}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RenewRequest:
        return cls(raw.get("csr_pem"))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class RenewResponse:
    """Edge → connector: the new certificate and its expiry (Unix time)."""

    TYPE: ClassVar[str] = "renew_response"
    cert_pem: str
    not_after: float

    def __post_init__(self) -> None:
        _check_pem("cert_pem", self.cert_pem, "CERTIFICATE")
        not_after: object = self.not_after
        if isinstance(not_after, int) and not isinstance(not_after, bool):
            try:
                not_after = float(not_after)
            except OverflowError:
                raise _bad("not_after must be a finite number") from None
            object.__setattr__(self, "not_after", not_after)
        if not isinstance(not_after, float) or not math.isfinite(not_after) or not_after < 0:
            raise _bad("not_after must be a finite non-negative number")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "cert_pem": self.cert_pem, "not_after": self.not_after}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RenewResponse:
        return cls(raw.get("cert_pem"), raw.get("not_after"))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class RenewRefused:
    """Edge → connector: the renewal was refused; ``code`` is a stable error code. The
    connector keeps its current certificate and tries again later."""

    TYPE: ClassVar[str] = "renew_refused"
    code: str
    message: str

    def __post_init__(self) -> None:
        _check_str("code", self.code)
        _check_str("message", self.message, allow_empty=True)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "code": self.code, "message": self.message}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RenewRefused:
        return cls(raw.get("code"), raw.get("message", ""))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class UnknownControl:
    """A message whose type this version does not know; kept whole so it can be logged or
    forwarded. Receivers ignore it (forward compatibility), they do not fail."""

    type: str
    raw: dict[str, Any] = field(hash=False)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)


_Typed = (
    Hello
    | Heartbeat
    | Drain
    | ClaimsChallenge
    | ProfileUpdate
    | RenewRequest
    | RenewResponse
    | RenewRefused
)
ControlMessage = _Typed | UnknownControl

_KNOWN: dict[str, type[_Typed]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Heartbeat,
        Drain,
        ClaimsChallenge,
        ProfileUpdate,
        RenewRequest,
        RenewResponse,
        RenewRefused,
    )
}


def parse_control(message: dict[str, Any]) -> ControlMessage:
    """Turn a decoded message into its typed form, or :class:`UnknownControl` for a type this
    version does not know. A known type with bad fields raises RemoteProtocolError
    (``control_malformed``): the message came from the peer."""
    if not isinstance(message, dict):
        raise RemoteProtocolError("control message is not an object", code="control_malformed")
    kind = message.get("type")
    if not isinstance(kind, str) or not kind:
        raise RemoteProtocolError('control message has no string "type"', code="control_malformed")
    cls = _KNOWN.get(kind)
    if cls is None:
        return UnknownControl(kind, message)
    return _from_peer(lambda: cls.from_dict(message))


class ControlReader:
    """A control stream's receive side: bytes in, typed messages out.

    :meth:`feed` raises RemoteProtocolError when the framing breaks (the stream is unusable
    and the caller closes it). A well-framed message whose fields do not parse is skipped
    and returned as ``(type, error)`` for the caller to count and log: one bad message
    from a newer or buggy peer does not end the stream."""

    def __init__(self, max_message: int = MAX_CONTROL_MESSAGE) -> None:
        self._decoder = ControlDecoder(max_message)

    def feed(
        self, data: bytes | bytearray | memoryview
    ) -> tuple[list[ControlMessage], list[tuple[str, RemoteProtocolError]]]:
        """The messages ``data`` completes, and the ones skipped as malformed."""
        messages: list[ControlMessage] = []
        rejected: list[tuple[str, RemoteProtocolError]] = []
        for raw in self._decoder.feed(bytes(data)):
            try:
                messages.append(parse_control(raw))
            except RemoteProtocolError as exc:
                rejected.append((str(raw.get("type")), exc))
        return messages, rejected
