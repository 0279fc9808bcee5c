"""SET validation (RFC 8417 + SSF) known-answer cases: every refusal with its RFC 8935 code,
key rotation, legacy subjects, and Hypothesis on arbitrary input."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from limen.signals.events import CREDENTIAL_CHANGE, SESSION_REVOKED, VERIFICATION
from limen.signals.set_validation import (
    Expectations,
    SetError,
    UnknownKey,
    public_keys_from_jwks,
    validate_set,
)

ISSUER = "https://idp.example.com"
AUDIENCE = "https://limen.example.com"
NOW = 1_750_000_000.0
EXPECT = Expectations(ISSUER, AUDIENCE)

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _uint(n: int, size: int | None = None) -> str:
    return b64(n.to_bytes(size or (n.bit_length() + 7) // 8, "big"))


def jwk(key: SigningKey, kid: str) -> dict[str, str]:
    """The public JWK of ``key``."""
    if isinstance(key, rsa.RSAPrivateKey):
        nums = key.public_key().public_numbers()
        return {
            "kty": "RSA",
            "kid": kid,
            "use": "sig",
            "alg": "RS256",
            "n": _uint(nums.n),
            "e": _uint(nums.e),
        }
    pub = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "kid": kid,
        "use": "sig",
        "x": _uint(pub.x, 32),
        "y": _uint(pub.y, 32),
    }


def sign_set(
    claims: dict[str, Any],
    key: SigningKey,
    kid: str,
    *,
    alg: str | None = None,
    typ: str = "secevent+jwt",
    header: dict[str, Any] | None = None,
) -> str:
    """A compact JWS of ``claims`` (what a transmitter sends)."""
    alg = alg or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
    head: dict[str, Any] = {"alg": alg, "typ": typ, "kid": kid, **(header or {})}
    signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(claims).encode())}"
    data = signing_input.encode()
    if alg == "none":
        sig = b""
    elif alg == "HS256":
        sig = hmac.new(kid.encode(), data, hashlib.sha256).digest()
    elif isinstance(key, rsa.RSAPrivateKey):
        sig = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input}.{b64(sig)}"


def set_claims(
    event_type: str = SESSION_REVOKED, event: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": NOW - 5,
        "jti": secrets.token_hex(8),
        "sub_id": {"format": "email", "email": "alice@example.com"},
        "events": {event_type: event if event is not None else {"event_timestamp": NOW - 10}},
    }
    claims.update(extra)
    return {k: v for k, v in claims.items() if v is not None}


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
KEYS = public_keys_from_jwks({"keys": [jwk(RSA_KEY, "r1"), jwk(EC_KEY, "e1")]})


def refused(token: str, code: str, keys: Any = KEYS, expect: Expectations = EXPECT) -> SetError:
    with pytest.raises(SetError) as info:
        validate_set(token, keys, expect, NOW)
    assert info.value.code == code, info.value.message
    return info.value


@pytest.mark.parametrize(("key", "kid"), [(RSA_KEY, "r1"), (EC_KEY, "e1")])
def test_valid_set_is_accepted(key: SigningKey, kid: str) -> None:
    claims = set_claims(CREDENTIAL_CHANGE, {"credential_type": "password", "change_type": "update"})
    valid = validate_set(sign_set(claims, key, kid), KEYS, EXPECT, NOW)
    assert valid.iss == ISSUER
    assert valid.jti == claims["jti"]
    assert valid.event_type == CREDENTIAL_CHANGE
    assert valid.event["credential_type"] == "password"
    assert valid.sub_id == {"format": "email", "email": "alice@example.com"}
    assert valid.kid == kid


def test_bad_signature_is_refused() -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused(sign_set(set_claims(), other, "r1"), "invalid_key")
    token = sign_set(set_claims(), RSA_KEY, "r1")
    head, _payload, sig = token.split(".")
    forged = b64(json.dumps({**set_claims(), "jti": "forged"}).encode())
    refused(f"{head}.{forged}.{sig}", "invalid_key")


def test_unknown_kid_then_rotated_jwks() -> None:
    new_key = ec.generate_private_key(ec.SECP256R1())
    token = sign_set(set_claims(), new_key, "e2")
    with pytest.raises(UnknownKey) as info:
        validate_set(token, KEYS, EXPECT, NOW)
    assert info.value.code == "invalid_key"
    rotated = public_keys_from_jwks({"keys": [jwk(new_key, "e2")]})
    assert validate_set(token, rotated, EXPECT, NOW).kid == "e2"


def test_wrong_audience_and_issuer() -> None:
    refused(sign_set(set_claims(aud="https://other.example"), RSA_KEY, "r1"), "invalid_audience")
    refused(sign_set(set_claims(aud=None), RSA_KEY, "r1"), "invalid_audience")
    refused(sign_set(set_claims(aud=42), RSA_KEY, "r1"), "invalid_audience")
    ok = validate_set(sign_set(set_claims(aud=["x", AUDIENCE]), RSA_KEY, "r1"), KEYS, EXPECT, NOW)
    assert ok.aud == ("x", AUDIENCE)
    refused(sign_set(set_claims(iss="https://evil.example"), RSA_KEY, "r1"), "invalid_issuer")
    refused(sign_set(set_claims(iss=None), RSA_KEY, "r1"), "invalid_issuer")


@pytest.mark.parametrize("alg", ["none", "HS256", "RS512", "ES384"])
def test_algorithms_off_the_allow_list(alg: str) -> None:
    err = refused(sign_set(set_claims(), RSA_KEY, "r1", alg=alg), "invalid_key")
    assert "not accepted" in err.message


def test_alg_must_match_the_key() -> None:
    # An ES256 header naming the RSA key: no algorithm confusion.
    refused(sign_set(set_claims(), EC_KEY, "r1"), "invalid_key")


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "", "secevent"])
def test_typ_must_be_secevent(typ: str) -> None:
    refused(sign_set(set_claims(), RSA_KEY, "r1", typ=typ), "invalid_request")


def test_typ_with_media_type_prefix_is_accepted() -> None:
    token = sign_set(set_claims(), RSA_KEY, "r1", typ="application/secevent+jwt")
    assert validate_set(token, KEYS, EXPECT, NOW).iss == ISSUER


@pytest.mark.parametrize(
    ("claims", "needle"),
    [
        (set_claims(exp=NOW + 60), "exp"),
        (set_claims(sub="alice"), "sub"),
        (set_claims(sub_id=None), "sub_id"),
        (set_claims(sub_id="alice"), "sub_id"),
        (set_claims(jti=None), "jti"),
        (set_claims(iat=None), "iat"),
        (set_claims(iat="yesterday"), "iat"),
        (set_claims(iat=NOW + 600), "future"),
        (set_claims(iat=NOW - 2 * 86400), "older"),
        (set_claims(events={}), "events"),
        (set_claims(events=[]), "events"),
        (set_claims(events={SESSION_REVOKED: "x"}), "payload"),
        (
            set_claims(events={SESSION_REVOKED: {}, CREDENTIAL_CHANGE: {}}),
            "exactly one event",
        ),
    ],
)
def test_claim_refusals(claims: dict[str, Any], needle: str) -> None:
    err = refused(sign_set(claims, RSA_KEY, "r1"), "invalid_request")
    assert needle in err.message


def test_legacy_subject_inside_the_event() -> None:
    claims = set_claims(
        sub_id=None, event={"subject": {"subject_type": "iss_sub", "iss": ISSUER, "sub": "42"}}
    )
    valid = validate_set(sign_set(claims, RSA_KEY, "r1"), KEYS, EXPECT, NOW)
    assert valid.sub_id == {"subject_type": "iss_sub", "iss": ISSUER, "sub": "42"}


def test_verification_event_needs_no_subject() -> None:
    claims = set_claims(VERIFICATION, {"state": "abc"}, sub_id=None)
    valid = validate_set(sign_set(claims, EC_KEY, "e1"), KEYS, EXPECT, NOW)
    assert valid.sub_id is None
    assert valid.event == {"state": "abc"}


def test_structure_refusals() -> None:
    token = sign_set(set_claims(), RSA_KEY, "r1")
    refused(token + ".extra.part", "invalid_request")
    refused("not a jws", "invalid_request")
    refused("a" * 70_000, "invalid_request")
    head = b64(b'{"alg":"RS256","alg":"none","typ":"secevent+jwt","kid":"r1"}')
    refused(f"{head}.{token.split('.', 1)[1]}", "invalid_request")
    refused(sign_set(set_claims(), RSA_KEY, "r1", header={"crit": ["x"]}), "invalid_request")
    nokid = sign_set(set_claims(), RSA_KEY, "")
    refused(nokid, "invalid_key")


def test_jwks_skips_unusable_keys() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    enc = {**jwk(RSA_KEY, "enc"), "use": "enc"}
    wrong_alg = {**jwk(EC_KEY, "e9"), "alg": "RS256"}
    keys = public_keys_from_jwks(
        {
            "keys": [
                jwk(small, "small"),
                enc,
                wrong_alg,
                {"kty": "oct", "kid": "h", "k": "AAAA"},
                "junk",
                jwk(EC_KEY, "ok"),
            ]
        }
    )
    assert set(keys) == {"ok"}
    with pytest.raises(SetError):
        public_keys_from_jwks({"nokeys": []})


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400) | st.binary(max_size=400))
def test_arbitrary_input_raises_only_set_error(data: str | bytes) -> None:
    with pytest.raises(SetError):
        validate_set(data, KEYS, EXPECT, NOW)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["iss", "aud", "iat", "jti", "sub_id", "events", "exp", "toe", "txn"]),
        st.none()
        | st.integers()
        | st.text(max_size=20)
        | st.lists(st.text(max_size=5), max_size=3),
    )
)
def test_arbitrary_claims_raise_only_set_error(claims: dict[str, Any]) -> None:
    token = sign_set(claims, EC_KEY, "e1")
    try:
        validate_set(token, KEYS, EXPECT, NOW)
    except SetError:
        pass
