"""Security Event Token validation (RFC 8417, as profiled by OpenID SSF 1.0). Pure: no I/O,
no clock (``now`` is passed in); the receiver fetches keys and keeps the replay cache.

Rules this module keeps (each refusal carries an RFC 8935 §2.4 error code):

- A SET is a compact JWS no larger than :data:`MAX_SET_BYTES`; header and payload are JSON
  objects without duplicate names (``invalid_request``).
- ``typ`` is ``secevent+jwt`` (RFC 8417 §2.3; the ``application/`` prefix may be written,
  RFC 7515 §4.1.9) (``invalid_request``).
- ``alg`` is on the allow-list (RS256, ES256): never ``none``, never HMAC, whose "key" would
  be a secret shared with whoever can read the JWKS (RFC 8725 §3.1) (``invalid_key``).
- The key is found by ``kid`` in the transmitter's JWKS; an unknown ``kid`` raises
  :class:`UnknownKey`, so the caller refetches the JWKS once (key rotation) and retries.
  RSA keys are at least 2048 bits (CAEP interoperability profile). The signature is checked
  before the payload is parsed (``invalid_key``).
- ``iss`` equals the configured issuer (``invalid_issuer``); ``aud`` contains Limen's
  audience (``invalid_audience``).
- ``iat`` is not in the future beyond a skew, and not older than a maximum age
  (``invalid_request``); ``jti`` is present; ``exp`` and ``sub`` are absent (SSF §4.1:
  a SET is not a token for access) (``invalid_request``).
- Exactly one event (SSF), whose body is an object. ``sub_id`` at the top level is required
  (SSF), except that the legacy ``subject`` inside the event is accepted (RISC before SSF),
  and the stream-management events (verification, stream-updated) may omit it.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from limen.errors import LimenError
from limen.identity.tokens import b64url_decode

#: A SET larger than this is refused unparsed. Real SETs are well under 4 KiB; 64 KiB leaves
#: room for verbose events while bounding the work a sender can make us do.
MAX_SET_BYTES = 64 * 1024
ALLOWED_ALGORITHMS = frozenset({"RS256", "ES256"})
SET_TYPES = frozenset({"secevent+jwt", "application/secevent+jwt"})
MIN_RSA_BITS = 2048
#: How far in the future ``iat`` may be (clock skew between transmitter and Limen).
DEFAULT_MAX_FUTURE = 300.0
#: The oldest SET accepted; also how long a ``jti`` is remembered against replay.
DEFAULT_MAX_AGE = 24 * 3600.0
#: Events that concern the stream, not a subject: ``sub_id`` may be absent.
STREAM_EVENTS = frozenset(
    {
        "https://schemas.openid.net/secevent/ssf/event-type/verification",
        "https://schemas.openid.net/secevent/ssf/event-type/stream-updated",
    }
)

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class SetError(LimenError):
    """A SET refused; ``code`` is the RFC 8935 error code (``err``)."""

    code = "invalid_request"
    http_status = 400


class ReplayedSet(SetError):
    """A ``(iss, jti)`` already accepted. Poll delivery acknowledges it (the earlier ack was
    lost); push answers ``invalid_request``."""


class UnknownKey(SetError):
    """The SET names a ``kid`` not in the keys given: refetch the JWKS once and retry."""

    code = "invalid_key"


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise SetError(f"{what}: duplicate member {key!r}")
            out[key] = value
        return out

    def no_constants(name: str) -> Any:
        # NaN and Infinity are not JSON (RFC 8259 §6); Python's parser accepts them.
        raise SetError(f"{what}: {name} is not JSON")

    try:
        value = json.loads(data, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError):
        raise SetError(f"{what}: not JSON") from None
    if not isinstance(value, dict):
        raise SetError(f"{what}: not a JSON object")
    return value


def _b64(text: str, what: str) -> bytes:
    if not text or any(ch not in _B64URL for ch in text):
        raise SetError(f"{what}: not base64url")
    try:
        return b64url_decode(text)
    except (binascii.Error, ValueError):
        raise SetError(f"{what}: not base64url") from None


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


# --- keys -------------------------------------------------------------------------------------


def _int(jwk: Mapping[str, Any], name: str) -> int:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise SetError(f"JWK member {name!r} missing", code="invalid_key")
    return int.from_bytes(_b64(value, f"JWK {name}"), "big")


def public_keys_from_jwks(document: Mapping[str, Any]) -> dict[str, tuple[PublicKey, str]]:
    """``kid → (key, alg)`` for every usable signing key of a JWKS (RFC 7517). Keys that are
    not for signatures, of another type, too small or without ``kid`` are skipped (a JWKS may
    hold keys for other uses); ``alg`` is the JWK's own or the one its type implies."""
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise SetError("JWKS: no 'keys' array", code="invalid_key")
    out: dict[str, tuple[PublicKey, str]] = {}
    for jwk in keys:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str):
            continue
        if jwk.get("use", "sig") != "sig":
            continue
        try:
            if jwk.get("kty") == "RSA":
                key: PublicKey = rsa.RSAPublicNumbers(_int(jwk, "e"), _int(jwk, "n")).public_key()
                if key.key_size < MIN_RSA_BITS:
                    continue
                alg = "RS256"
            elif jwk.get("kty") == "EC" and jwk.get("crv") == "P-256":
                key = ec.EllipticCurvePublicNumbers(
                    _int(jwk, "x"), _int(jwk, "y"), ec.SECP256R1()
                ).public_key()
                alg = "ES256"
            else:
                continue
        except (SetError, ValueError):
            continue  # a malformed key is unusable, not fatal for the others
        declared = jwk.get("alg", alg)
        if declared != alg:
            continue
        out[jwk["kid"]] = (key, alg)
    return out


def _verify_signature(key: PublicKey, alg: str, signing_input: bytes, signature: bytes) -> None:
    try:
        if alg == "RS256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
            return
        if alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey):
            # JWS carries raw r || s, 32 bytes each (RFC 7518 §3.4); cryptography wants DER.
            if len(signature) != 64:
                raise InvalidSignature
            r = int.from_bytes(signature[:32], "big")
            s = int.from_bytes(signature[32:], "big")
            key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
            return
    except InvalidSignature:
        raise SetError("the SET's signature does not verify", code="invalid_key") from None
    raise SetError(f"key {alg} mismatch: the key's type does not match alg", code="invalid_key")


# --- the SET ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Expectations:
    """What a transmitter's SETs must satisfy."""

    issuer: str
    audience: str
    max_age: float = DEFAULT_MAX_AGE
    max_future: float = DEFAULT_MAX_FUTURE


@dataclass(frozen=True, slots=True)
class ValidatedSet:
    """A SET that passed every check (but not yet the replay cache)."""

    iss: str
    jti: str
    iat: float
    aud: tuple[str, ...]
    event_type: str
    event: dict[str, Any]
    #: The top-level ``sub_id``, else the legacy ``subject`` of the event, else None (stream
    #: events only).
    sub_id: dict[str, Any] | None
    kid: str
    alg: str
    txn: str | None = None
    #: RFC 8417 ``toe``: time of the event, if the transmitter sent it.
    toe: float | None = None
    claims: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JwsParts:
    header: dict[str, Any]
    signing_input: bytes
    payload_b64: str
    signature: bytes

    @property
    def kid(self) -> str:
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) else ""


def split_set(token: str | bytes) -> JwsParts:
    """Check a SET's structure and header (typ, alg); the payload stays unparsed."""
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise SetError("the SET is not ASCII") from None
    token = token.strip()
    if len(token) > MAX_SET_BYTES:
        raise SetError(f"the SET is larger than {MAX_SET_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        # Five parts would be JWE; SSF SETs are signed, not encrypted.
        raise SetError("the SET is not a compact JWS (three dot-separated parts)")
    header = _json_object(_b64(parts[0], "JWS header"), "JWS header")
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in SET_TYPES:
        raise SetError(f"typ must be secevent+jwt, not {typ!r}")
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise SetError(f"alg {alg!r} is not accepted (RS256, ES256)", code="invalid_key")
    if "crit" in header:
        raise SetError("crit header parameters are not supported")
    if not isinstance(header.get("kid"), str) or not header["kid"]:
        raise SetError("the SET's header names no kid", code="invalid_key")
    signature = _b64(parts[2], "JWS signature")
    return JwsParts(header, f"{parts[0]}.{parts[1]}".encode("ascii"), parts[1], signature)


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SetError(f"{name} must be a NumericDate")
    return float(value)


def validate_set(
    token: str | bytes,
    keys: Mapping[str, tuple[PublicKey, str]],
    expect: Expectations,
    now: float,
) -> ValidatedSet:
    """Validate ``token`` against a transmitter's ``keys`` (:func:`public_keys_from_jwks`)
    and ``expect``. Raises :class:`UnknownKey` when the ``kid`` is not in ``keys``, and
    :class:`SetError` (with the RFC 8935 code) on any other failure."""
    parts = split_set(token)
    entry = keys.get(parts.kid)
    if entry is None:
        raise UnknownKey(f"unknown kid {parts.kid!r}")
    key, key_alg = entry
    alg = str(parts.header["alg"])
    if alg != key_alg:
        raise SetError(
            f"alg {alg} does not match key {parts.kid!r} ({key_alg})", code="invalid_key"
        )
    _verify_signature(key, alg, parts.signing_input, parts.signature)
    claims = _json_object(_b64(parts.payload_b64, "JWS payload"), "SET claims")
    return check_claims(claims, expect, now, kid=parts.kid, alg=alg)


def check_claims(
    claims: dict[str, Any], expect: Expectations, now: float, *, kid: str = "", alg: str = ""
) -> ValidatedSet:
    """The claim checks of :func:`validate_set`, on a verified payload."""
    iss = claims.get("iss")
    if not isinstance(iss, str) or not iss:
        raise SetError("iss is missing", code="invalid_issuer")
    if iss != expect.issuer:
        raise SetError(f"iss {iss!r} is not the transmitter's issuer", code="invalid_issuer")
    aud_claim = claims.get("aud")
    if isinstance(aud_claim, str):
        aud: tuple[str, ...] = (aud_claim,)
    elif isinstance(aud_claim, list) and all(isinstance(a, str) for a in aud_claim):
        aud = tuple(aud_claim)
    elif aud_claim is None:
        aud = ()
    else:
        raise SetError("aud must be a string or an array of strings", code="invalid_audience")
    if expect.audience and expect.audience not in aud:
        raise SetError(f"aud does not contain {expect.audience!r}", code="invalid_audience")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > 255:
        raise SetError("jti is missing or too long")
    iat = _number(claims, "iat")
    if iat is None:
        raise SetError("iat is missing")
    if iat > now + expect.max_future:
        raise SetError("iat is in the future")
    if iat < now - expect.max_age:
        raise SetError(f"the SET is older than {int(expect.max_age)} s")
    if "exp" in claims:
        raise SetError("exp must not be present in a SET (SSF)")
    if "sub" in claims:
        raise SetError("sub must not be present in a SET; SSF uses sub_id")
    events = claims.get("events")
    if not isinstance(events, dict) or not events:
        raise SetError("events is missing or not an object")
    if len(events) != 1:
        raise SetError(f"a SET carries exactly one event (SSF), not {len(events)}")
    ((event_type, event),) = events.items()
    if not isinstance(event, dict):
        raise SetError("the event's payload is not an object")
    sub_id = claims.get("sub_id")
    if sub_id is None:
        sub_id = event.get("subject")
    if sub_id is not None and not isinstance(sub_id, dict):
        raise SetError("sub_id is not an object")
    if sub_id is None and event_type not in STREAM_EVENTS:
        raise SetError("sub_id is missing")
    txn = claims.get("txn")
    return ValidatedSet(
        iss=iss,
        jti=jti,
        iat=iat,
        aud=aud,
        event_type=event_type,
        event=event,
        sub_id=sub_id,
        kid=kid,
        alg=alg,
        txn=txn if isinstance(txn, str) else None,
        toe=_number(claims, "toe"),
        claims=claims,
    )
