"""Access tokens: JWTs per RFC 9068, signed with ES256 (RFC 7518 §3.4).

Rules this module keeps:

- Signing keys are P-256 keys in the ``signing_keys`` table; ``kid`` is the key's RFC 7638
  thumbprint. The issuer signs with the *oldest* active key, so two nodes that race to create
  the first key still agree, and a rotation is "add a key, publish it, deactivate the old one".
- Verification (:class:`TokenVerifier`) pins ``alg`` to ES256 and ``typ`` to ``at+jwt``
  (RFC 9068 §4, RFC 8725 §3.1), checks the signature *before* it parses the payload, then
  checks every claim explicitly: ``iss``, ``aud``, ``exp``, ``iat``, ``nbf``, ``sub``,
  ``jti``, ``client_id`` (RFC 9068 §2.2). Only :class:`~limen.errors.AuthError` escapes it.
- Verification runs on every new flow at the edge, so a verified token is remembered in a
  bounded LRU keyed by the token string; a repeat costs a dict lookup plus the time checks.
- ``iat`` and ``auth_time`` carry millisecond precision (RFC 7519 §2 allows non-integer
  NumericDate) so that a sign-in just after a revocation is not mistaken for an older one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from sqlalchemy import select

from limen.config import Settings
from limen.errors import AuthError, ConfigError
from limen.store.db import Store
from limen.store.models import GroupMember, SigningKey, SignInSession, User

log = logging.getLogger(__name__)

#: The audience of every access token: Limen's edge (the resource server).
EDGE_AUDIENCE = "urn:limen:edge"
ACR_MFA = "urn:limen:acr:mfa"
ACR_PASSWORD = "urn:limen:acr:pwd"
#: The client capability that declares support for claims challenges (CAE).
CAE_CAPABILITY = "cp1"
ALGORITHM = "ES256"
TOKEN_TYPE = "at+jwt"
#: A token larger than this is refused before any parsing. Ours are ~1 KiB; 8 KiB leaves room
#: for many groups while bounding the work an attacker can make us do per flow.
MAX_TOKEN_BYTES = 8 * 1024
#: Verified tokens remembered by a verifier (one per signed-in client, typically). Each
#: entry is about a token's size, so ~16 MiB at most.
CACHE_SIZE = 16_384
#: How long an issuer keeps its signing key before re-reading the table (key rotation).
_KEY_RELOAD_SECONDS = 60.0
#: P-256 coordinates and ES256 signature halves are 32 bytes (RFC 7518 §3.4, §6.2.1.2).
_COORD = 32

_JWS_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


# --- base64url and JSON -----------------------------------------------------------------------


def b64url_encode(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding; :class:`ValueError` on anything else."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 7515 §5.2: reject duplicate member names rather than guess which one the signer meant.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate member {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_object(data: bytes) -> dict[str, Any]:
    value = json.loads(
        data.decode("utf-8"),
        object_pairs_hook=_no_duplicates,
        parse_constant=_reject_constant,
    )
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _compact_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --- keys -----------------------------------------------------------------------------------


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The RFC 7517 JWK members of a P-256 public key (no kid)."""
    numbers = key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url_encode(numbers.x.to_bytes(_COORD, "big")),
        "y": b64url_encode(numbers.y.to_bytes(_COORD, "big")),
    }


def thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256): the required members, sorted, no whitespace."""
    jwk = public_jwk(key)
    canonical = json.dumps(
        {k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True
    )
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


def _load_private(pem: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError("signing key is not a P-256 private key")
    return key


def create_signing_key(store: Store, now: float | None = None) -> str:
    """Add a new active ES256 key to the store and return its kid (used for rotation)."""
    key = ec.generate_private_key(ec.SECP256R1())
    kid = thumbprint(key.public_key())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    with store.session() as s:
        s.add(
            SigningKey(
                kid=kid,
                private_pem=pem,
                algorithm=ALGORITHM,
                active=True,
                created_at=time.time() if now is None else now,
            )
        )
    log.info("created signing key %s", kid)
    return kid


def signing_key(store: Store, now: float | None = None) -> tuple[str, ec.EllipticCurvePrivateKey]:
    """The key tokens are signed with: the oldest active ES256 key, created on first use."""
    for _attempt in range(2):
        with store.session() as s:
            row = s.scalars(
                select(SigningKey)
                .where(SigningKey.active.is_(True), SigningKey.algorithm == ALGORITHM)
                .order_by(SigningKey.created_at, SigningKey.kid)
                .limit(1)
            ).first()
            if row is not None:
                return row.kid, _load_private(row.private_pem)
        create_signing_key(store, now)
    raise ConfigError("no signing key could be created")  # pragma: no cover - store refused


def _public_keys(store: Store) -> dict[str, ec.EllipticCurvePublicKey]:
    signing_key(store)  # so that a verifier started before any issuer still has the key
    with store.session() as s:
        rows = s.scalars(select(SigningKey).where(SigningKey.algorithm == ALGORITHM)).all()
        return {row.kid: _load_private(row.private_pem).public_key() for row in rows}


def jwks(store: Store) -> dict[str, Any]:
    """The JWK Set (RFC 7517 §5) of every stored key: public parts only.

    Inactive keys stay published so tokens they signed verify until they expire; delete a
    key's row to retire it for good.
    """
    keys = []
    for kid, key in sorted(_public_keys(store).items()):
        keys.append({**public_jwk(key), "kid": kid, "use": "sig", "alg": ALGORITHM})
    return {"keys": keys}


class KeySet:
    """Public keys by kid, as a verifier needs them."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, ec.EllipticCurvePublicKey]) -> None:
        self._keys = dict(keys)

    @classmethod
    def load(cls, store: Store) -> KeySet:
        """Every key in the store (creating the first one if there is none)."""
        return cls(_public_keys(store))

    @classmethod
    def from_jwks(cls, document: Mapping[str, Any]) -> KeySet:
        """Keys from a JWK Set document. Keys that are not ES256 signature keys are skipped;
        a malformed P-256 key raises :class:`~limen.errors.ConfigError`."""
        raw_keys = document.get("keys") if isinstance(document, Mapping) else None
        if not isinstance(raw_keys, list):
            raise ConfigError("a JWK Set needs a 'keys' array")
        keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for jwk in raw_keys:
            if not isinstance(jwk, Mapping):
                raise ConfigError("a JWK must be an object")
            if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
                continue
            if jwk.get("alg", ALGORITHM) != ALGORITHM or jwk.get("use", "sig") != "sig":
                continue
            kid, x, y = jwk.get("kid"), jwk.get("x"), jwk.get("y")
            if not isinstance(kid, str) or not isinstance(x, str) or not isinstance(y, str):
                raise ConfigError("an EC JWK needs string kid, x and y")
            try:
                xb, yb = b64url_decode(x), b64url_decode(y)
                if len(xb) != _COORD or len(yb) != _COORD:
                    raise ValueError("P-256 coordinates are 32 bytes")
                # from_encoded_point checks that the point is on the curve.
                key = ec.EllipticCurvePublicKey.from_encoded_point(
                    ec.SECP256R1(), b"\x04" + xb + yb
                )
            except ValueError as exc:
                raise ConfigError(f"JWK {kid!r} is not a valid P-256 key: {exc}") from exc
            keys[kid] = key
        return cls(keys)

    def get(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        return self._keys.get(kid)

    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


# --- issuing --------------------------------------------------------------------------------


def _ceil_ms(t: float) -> float:
    return math.ceil(t * 1000) / 1000


def user_groups(store: Store, user_id: str) -> list[str]:
    """Ids of every group ``user_id`` belongs to, nested groups resolved transitively."""
    found: set[str] = set()
    frontier = {user_id}
    with store.session() as s:
        while frontier:
            rows = s.scalars(
                select(GroupMember.group_id).where(GroupMember.member_id.in_(sorted(frontier)))
            ).all()
            # Already-seen groups are dropped, so a membership cycle ends the walk.
            frontier = set(rows) - found
            found |= frontier
    return sorted(found)


class AccessTokenIssuer:
    """Signs access tokens for the edge audience."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._key: tuple[str, ec.EllipticCurvePrivateKey] | None = None
        self._key_loaded_at = -math.inf

    def _signing_key(self, now: float) -> tuple[str, ec.EllipticCurvePrivateKey]:
        if self._key is None or abs(now - self._key_loaded_at) > _KEY_RELOAD_SECONDS:
            self._key = signing_key(self.store, now)
            self._key_loaded_at = now
        return self._key

    def cae_capable(self, capabilities: Iterable[str]) -> bool:
        """Whether a client with ``capabilities`` gets CAE tokens: it declared ``cp1`` and
        the tenant has not turned CAE off (``cae_enabled``)."""
        return self.settings.cae_enabled and CAE_CAPABILITY in capabilities

    def lifetime(self, capabilities: Iterable[str]) -> int:
        """Seconds a new token lives: long for CAE-capable clients, whose tokens are revoked
        by events; otherwise random in the configured range, so that a fleet's tokens do not
        all expire (and refresh) at once."""
        if self.cae_capable(capabilities):
            return self.settings.cae_token_ttl
        low = self.settings.access_token_min_ttl
        high = max(low, self.settings.access_token_max_ttl)
        return low + secrets.randbelow(high - low + 1)

    def issue(
        self,
        user: User,
        session: SignInSession,
        *,
        client_id: str,
        capabilities: list[str],
        device_id: str | None,
        ip_address: str,
        now: float,
        scope: str = "",
    ) -> tuple[str, int]:
        """A signed access token for ``user`` in ``session`` and its lifetime in seconds."""
        kid, key = self._signing_key(now)
        expires_in = self.lifetime(capabilities)
        amr = list(session.amr or [])
        claims: dict[str, Any] = {
            "iss": self.settings.resolved_issuer,
            "aud": EDGE_AUDIENCE,
            "sub": user.id,
            "exp": int(now) + expires_in,
            "iat": _ceil_ms(now),
            "nbf": int(now),
            "jti": secrets.token_urlsafe(16),
            "client_id": client_id,
            "sid": session.id,
            "auth_time": _ceil_ms(session.auth_time),
            "amr": amr,
            "acr": ACR_MFA if "mfa" in amr else ACR_PASSWORD,
            "groups": user_groups(self.store, user.id),
            "preferred_username": user.username,
            "ipaddr": ip_address,
        }
        device = device_id or session.device_id
        if device:
            claims["device_id"] = device
        if scope:
            claims["scope"] = scope
        if self.cae_capable(capabilities):
            claims["xms_cc"] = [CAE_CAPABILITY]
        header = {"alg": ALGORITHM, "typ": TOKEN_TYPE, "kid": kid}
        signing_input = (
            f"{b64url_encode(_compact_json(header))}.{b64url_encode(_compact_json(claims))}"
        )
        der = key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        # JWS wants the raw r || s form, not DER (RFC 7518 §3.4).
        signature = r.to_bytes(_COORD, "big") + s.to_bytes(_COORD, "big")
        return f"{signing_input}.{b64url_encode(signature)}", expires_in


# --- verifying ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """The verified claims of an access token."""

    sub: str
    sid: str
    jti: str
    client_id: str
    iat: float
    exp: float
    auth_time: float
    amr: tuple[str, ...]
    acr: str
    groups: tuple[str, ...]
    username: str
    device_id: str | None
    ipaddr: str
    capabilities: tuple[str, ...]
    nbf: float | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)


def _invalid(message: str) -> AuthError:
    return AuthError(message, code="invalid_token")


def _number(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise _invalid(f"token has no {name!r} claim")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(f"claim {name!r} is not a number")
    try:
        number = float(value)
    except OverflowError as exc:
        raise _invalid(f"claim {name!r} is out of range") from exc
    if not math.isfinite(number):
        raise _invalid(f"claim {name!r} is out of range")
    return number


def _required_number(claims: Mapping[str, Any], name: str) -> float:
    value = _number(claims, name, required=True)
    if value is None:  # pragma: no cover - _number raised already
        raise _invalid(f"token has no {name!r} claim")
    return value


def _string(claims: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise _invalid(f"token has no {name!r} claim")
        return None
    if not isinstance(value, str) or (required and not value):
        raise _invalid(f"claim {name!r} is not a non-empty string")
    return value


def _strings(claims: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(f"claim {name!r} is not an array of strings")
    return tuple(value)


class TokenVerifier:
    """Verifies access tokens at the edge. Thread-safe enough for the edge's use: the cache is
    an LRU whose operations tolerate concurrent eviction."""

    def __init__(
        self,
        keys: KeySet,
        *,
        issuer: str,
        audience: str,
        leeway: float = 30,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self._cache_size = cache_size
        self._cache: OrderedDict[str, AccessClaims] = OrderedDict()

    def replace_keys(self, keys: KeySet) -> None:
        """Use a new key set (rotation); forgets every remembered token."""
        self.keys = keys
        self._cache.clear()

    def verify(self, token: str, now: float) -> AccessClaims:
        """The claims of ``token`` if it is valid at ``now``; otherwise
        :class:`~limen.errors.AuthError` (code ``token_expired`` or ``invalid_token``)."""
        if not isinstance(token, str):
            raise _invalid("token is not a string")
        # Checked before the cache lookup too: hashing a huge string is work as well.
        if len(token) > MAX_TOKEN_BYTES:
            raise _invalid("token is too large")
        cached = self._cache.get(token)
        if cached is not None:
            self._check_times(cached, now)
            try:
                self._cache.move_to_end(token)
            except KeyError:  # evicted meanwhile by another thread: harmless
                pass
            return cached
        claims = self._verify_uncached(token, now)
        self._cache[token] = claims
        while len(self._cache) > self._cache_size:
            try:
                self._cache.popitem(last=False)
            except KeyError:
                break
        return claims

    def _check_times(self, claims: AccessClaims, now: float) -> None:
        if now >= claims.exp + self.leeway:
            raise AuthError("token has expired", code="token_expired")
        if claims.nbf is not None and now + self.leeway < claims.nbf:
            raise _invalid("token is not yet valid (nbf)")
        if now + self.leeway < claims.iat:
            raise _invalid("token is issued in the future (iat)")

    def _verify_uncached(self, token: str, now: float) -> AccessClaims:
        if not _JWS_COMPACT.fullmatch(token):
            raise _invalid("token is not a compact JWS")
        header_b64, payload_b64, signature_b64 = token.split(".")
        try:
            header = _json_object(b64url_decode(header_b64))
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise _invalid("token header is not a JSON object") from exc
        if header.get("alg") != ALGORITHM:
            raise _invalid(f"token algorithm must be {ALGORITHM}")
        typ = header.get("typ")
        # RFC 9068 §4: "at+jwt", or its full media type "application/at+jwt" (RFC 7515 §4.1.9).
        if not isinstance(typ, str) or typ.lower() not in {TOKEN_TYPE, "application/at+jwt"}:
            raise _invalid("token type must be at+jwt")
        if "crit" in header:
            # RFC 7515 §4.1.11: we understand no extension, so any critical one is fatal.
            raise _invalid("token has critical header parameters")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise _invalid("token header has no kid")
        key = self.keys.get(kid)
        if key is None:
            raise _invalid("token is signed by an unknown key")
        try:
            signature = b64url_decode(signature_b64)
        except ValueError as exc:
            raise _invalid("token signature is not base64url") from exc
        if len(signature) != 2 * _COORD:
            raise _invalid("token signature is malformed")
        der = encode_dss_signature(
            int.from_bytes(signature[:_COORD], "big"), int.from_bytes(signature[_COORD:], "big")
        )
        try:
            key.verify(
                der, f"{header_b64}.{payload_b64}".encode("ascii"), ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature as exc:
            raise _invalid("token signature is invalid") from exc
        try:
            payload = _json_object(b64url_decode(payload_b64))
        except ValueError as exc:
            raise _invalid("token payload is not a JSON object") from exc
        return self._check_claims(payload, now)

    def _check_claims(self, payload: dict[str, Any], now: float) -> AccessClaims:
        if _string(payload, "iss", required=True) != self.issuer:
            raise _invalid("token issuer is wrong")
        aud = payload.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            raise _invalid("token has no valid 'aud' claim")
        if self.audience not in audiences:
            raise _invalid("token audience is wrong")
        exp = _required_number(payload, "exp")
        iat = _required_number(payload, "iat")
        nbf = _number(payload, "nbf", required=False)
        auth_time = _number(payload, "auth_time", required=False)
        claims = AccessClaims(
            sub=_string(payload, "sub", required=True) or "",
            sid=_string(payload, "sid", required=False) or "",
            jti=_string(payload, "jti", required=True) or "",
            client_id=_string(payload, "client_id", required=True) or "",
            iat=iat,
            exp=exp,
            # A token without auth_time counts as authenticated at the epoch: any revocation
            # then applies to it (fail closed).
            auth_time=auth_time if auth_time is not None else 0.0,
            amr=_strings(payload, "amr"),
            acr=_string(payload, "acr", required=False) or "",
            groups=_strings(payload, "groups"),
            username=_string(payload, "preferred_username", required=False) or "",
            device_id=_string(payload, "device_id", required=False),
            ipaddr=_string(payload, "ipaddr", required=False) or "",
            capabilities=_strings(payload, "xms_cc"),
            nbf=nbf,
            raw=MappingProxyType(payload),
        )
        self._check_times(claims, now)
        return claims
