"""The Capsule Protocol (RFC 9297 §3.2) as connect-udp (RFC 9298) uses it, sans-IO.

Wire format: ``Capsule { Type (i), Length (i), Value (..) }`` where ``(i)`` is a QUIC
variable-length integer (RFC 9000 §16): the two high bits of the first byte give the length
(1, 2, 4 or 8 bytes), the rest is the value, big-endian, so values run from 0 to 2**62 - 1.

Rules this codec keeps:

- Varints are encoded in their shortest form; on decoding, longer-than-necessary encodings are
  accepted (RFC 9000 §16: "values do not need to be encoded on the minimum number of bytes").
- A capsule whose Length exceeds ``max_capsule`` is refused as soon as its header is read,
  before its value is buffered (code ``capsule_too_large``).
- Unknown capsule types are surfaced to the caller, not errors: RFC 9297 §3.2 says a receiver
  skips capsules it does not know, and that is the caller's decision.
- DATAGRAM capsules (type 0x00, RFC 9297 §3.5) carry ``Context ID (i)`` + payload (RFC 9298
  §4); context 0 is the UDP payload itself, other ids belong to extensions.
- A stream that ends in the middle of a capsule is malformed (RFC 9297 §3.3): call
  :meth:`CapsuleDecoder.feed_eof`.
- Peer misbehaviour raises :class:`~limen.errors.RemoteProtocolError` and the decoder stops
  (later calls are a :class:`~limen.errors.LocalProtocolError`); our own misuse raises
  LocalProtocolError. Nothing else escapes, and no ``assert`` guards peer data.
- No I/O, no clock, no asyncio.
"""

from __future__ import annotations

from dataclasses import dataclass

from limen.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "DATAGRAM",
    "MAX_CAPSULE",
    "MAX_VARINT",
    "Capsule",
    "CapsuleDecoder",
    "decode_datagram",
    "decode_varint",
    "encode_capsule",
    "encode_datagram",
    "encode_varint",
]

MAX_VARINT = (1 << 62) - 1
DATAGRAM = 0x00  # RFC 9297 §3.5

# A UDP payload is at most 65,535 bytes (the UDP length field; RFC 9298 §5 carries it whole),
# and a DATAGRAM capsule adds a context id varint (at most 8 bytes). 16 bytes of slack cover
# it; anything longer is not a UDP datagram and would only let a peer pin memory per stream.
MAX_CAPSULE = 65_535 + 16


@dataclass(frozen=True, slots=True)
class Capsule:
    """One capsule: its type and its value bytes."""

    type: int
    value: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.type, int) or isinstance(self.type, bool):
            raise LocalProtocolError("capsule type must be an int", code="capsule_bad_type")
        if not 0 <= self.type <= MAX_VARINT:
            raise LocalProtocolError("capsule type out of varint range", code="capsule_bad_type")
        if not isinstance(self.value, bytes):
            raise LocalProtocolError("capsule value must be bytes", code="capsule_bad_value")


def encode_varint(value: int) -> bytes:
    """Encode ``value`` as a QUIC varint in its shortest form (RFC 9000 §16)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_VARINT:
        raise LocalProtocolError(f"varint out of range: {value!r}", code="capsule_bad_varint")
    if value < 1 << 6:
        return value.to_bytes(1, "big")
    if value < 1 << 14:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 1 << 30:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


def decode_varint(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int] | None:
    """Decode a QUIC varint at ``offset``; return ``(value, offset_after)``, or None if ``data``
    ends before the varint does. Non-minimal encodings are accepted (RFC 9000 §16)."""
    if offset >= len(data):
        return None
    first = data[offset]
    size = 1 << (first >> 6)
    end = offset + size
    if end > len(data):
        return None
    value = first & 0x3F
    for i in range(offset + 1, end):
        value = (value << 8) | data[i]
    return value, end


def encode_capsule(capsule_type: int, value: bytes) -> bytes:
    """Frame one capsule: ``Type (i) Length (i) Value``."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise LocalProtocolError("capsule value must be bytes", code="capsule_bad_value")
    return encode_varint(capsule_type) + encode_varint(len(value)) + bytes(value)


def encode_datagram(payload: bytes, context_id: int = 0) -> bytes:
    """Frame a DATAGRAM capsule (RFC 9297 §3.5) carrying ``payload`` with ``context_id``
    (0: a UDP payload, RFC 9298 §4). Refuses a value the peer's default cap would refuse."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        # bytes(5) would silently make five zero bytes.
        raise LocalProtocolError("DATAGRAM payload must be bytes", code="capsule_bad_value")
    value = encode_varint(context_id) + bytes(payload)
    if len(value) > MAX_CAPSULE:
        raise LocalProtocolError("DATAGRAM capsule too large", code="capsule_too_large")
    return encode_capsule(DATAGRAM, value)


def decode_datagram(capsule: Capsule) -> tuple[int, bytes]:
    """Split a DATAGRAM capsule's value into ``(context_id, payload)``.

    LocalProtocolError if ``capsule`` is not a DATAGRAM capsule (the caller checks the type
    first); RemoteProtocolError (``capsule_malformed``) if its value has no complete context id.
    """
    if capsule.type != DATAGRAM:
        raise LocalProtocolError(
            f"capsule type {capsule.type:#x} is not DATAGRAM", code="capsule_bad_type"
        )
    parsed = decode_varint(capsule.value)
    if parsed is None:
        raise RemoteProtocolError("DATAGRAM capsule without a context id", code="capsule_malformed")
    context_id, pos = parsed
    return context_id, capsule.value[pos:]


class CapsuleDecoder:
    """Split a connect-udp stream's bytes into :class:`Capsule` objects.

    Holds at most one incomplete capsule: a header (two varints, at most 16 bytes) and a value
    of at most ``max_capsule`` bytes.
    """

    def __init__(self, max_capsule: int = MAX_CAPSULE) -> None:
        if not isinstance(max_capsule, int) or max_capsule < 0:
            raise LocalProtocolError(
                "max_capsule must be a non-negative int", code="capsule_config"
            )
        self.max_capsule = max_capsule
        self._buf = bytearray()
        self._failed = False

    def feed(self, data: bytes) -> list[Capsule]:
        """Feed bytes read from the stream; return the capsules they complete, in order."""
        if self._failed:
            raise LocalProtocolError("feed() after a protocol error", code="capsule_bad_state")
        self._buf += data
        buf = self._buf
        pos = 0
        capsules: list[Capsule] = []
        while True:
            header = decode_varint(buf, pos)
            if header is None:
                break
            capsule_type, after_type = header
            length_field = decode_varint(buf, after_type)
            if length_field is None:
                break
            length, start = length_field
            if length > self.max_capsule:
                self._failed = True
                self._buf = bytearray()
                raise RemoteProtocolError(
                    f"capsule of {length} bytes exceeds {self.max_capsule}",
                    code="capsule_too_large",
                )
            end = start + length
            if end > len(buf):
                break
            capsules.append(Capsule(capsule_type, bytes(buf[start:end])))
            pos = end
        # One deletion per feed, not one per capsule: many small datagrams stay linear.
        del buf[:pos]
        return capsules

    def feed_eof(self) -> None:
        """The stream ended: raise RemoteProtocolError (``capsule_truncated``) if it ended in
        the middle of a capsule (RFC 9297 §3.3)."""
        if self._failed:
            raise LocalProtocolError("feed_eof() after a protocol error", code="capsule_bad_state")
        if self._buf:
            self._failed = True
            raise RemoteProtocolError("stream ended mid-capsule", code="capsule_truncated")

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete capsule."""
        return len(self._buf)
