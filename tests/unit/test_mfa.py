"""TOTP (RFC 6238) and recovery codes: known answers, the window, replay, single use, and the
guessing limit, on a real SQLite store."""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from limen.errors import AuthError, ConfigError, Conflict, LimenError
from limen.identity import mfa
from limen.identity.mfa import (
    FAILURE_WINDOW,
    MAX_FAILURES,
    MfaService,
    clear_factors,
    match_totp,
    new_recovery_codes,
    new_totp_secret,
    normalize_recovery_code,
    otpauth_uri,
    recovery_code_hash,
    time_step,
    totp_code,
)
from limen.store.db import Store
from limen.store.identity_models import RecoveryCode, TotpUsage
from limen.store.models import User

#: RFC 6238 Appendix B: the SHA-1 seed is the ASCII string "12345678901234567890".
RFC6238_SECRET = base64.b32encode(b"12345678901234567890").decode()
#: (T in seconds, 8-digit TOTP) for SHA-1, from the table in RFC 6238 Appendix B.
RFC6238_SHA1 = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]
NOW = 1_700_000_000.0  # a fixed instant, at the start of a 30-second step (1700000000 / 30)


# --- pure functions ---------------------------------------------------------------------------


@pytest.mark.parametrize(("t", "expected"), RFC6238_SHA1)
def test_rfc6238_sha1_vectors(t: int, expected: str) -> None:
    step = time_step(t)
    assert totp_code(RFC6238_SECRET, step, digits=8) == expected
    # The 6-digit code is the same HOTP value modulo 10^6 (RFC 4226 §5.3).
    assert totp_code(RFC6238_SECRET, step) == expected[-6:]
    assert match_totp(RFC6238_SECRET, expected[-6:], float(t)) == step


def test_time_step_boundaries() -> None:
    assert time_step(0) == 0
    assert time_step(29.999) == 0
    assert time_step(30) == 1
    assert time_step(59) == 1
    assert time_step(60) == 2


def test_window_is_one_step_either_side() -> None:
    secret = new_totp_secret()
    step = time_step(NOW)
    for offset in (-1, 0, 1):
        assert match_totp(secret, totp_code(secret, step + offset), NOW) == step + offset
    for offset in (-3, -2, 2, 3):
        assert match_totp(secret, totp_code(secret, step + offset), NOW) is None


def test_codes_are_normalized_and_malformed_codes_refused() -> None:
    secret = new_totp_secret()
    code = totp_code(secret, time_step(NOW))
    assert match_totp(secret, f" {code[:3]} {code[3:]} ", NOW) == time_step(NOW)
    assert match_totp(secret, f"{code[:3]}-{code[3:]}", NOW) == time_step(NOW)
    for bad in (
        "",
        "12345",
        "1234567",
        "abcdef",
        code + "0",
        "\uff11\uff12\uff13\uff14\uff15\uff16",
    ):
        assert match_totp(secret, bad, NOW) is None


@given(step=st.integers(min_value=1, max_value=10**9), into=st.floats(0, 29.999))
def test_property_a_code_matches_its_own_step(step: int, into: float) -> None:
    now = step * 30 + into
    assert match_totp(RFC6238_SECRET, totp_code(RFC6238_SECRET, step), now) == step


@given(st.text(max_size=200))
def test_property_arbitrary_input_never_raises(text: str) -> None:
    result = match_totp(RFC6238_SECRET, text, NOW)
    assert result is None or abs(result - time_step(NOW)) <= 1
    assert isinstance(normalize_recovery_code(text), str)


def test_secret_and_otpauth_uri() -> None:
    secret = new_totp_secret()
    assert re.fullmatch(r"[A-Z2-7]{32}", secret)
    assert len(base64.b32decode(secret)) == 20
    assert new_totp_secret() != secret
    uri = urlsplit(otpauth_uri(secret, "alice"))
    assert (uri.scheme, uri.netloc) == ("otpauth", "totp")
    assert unquote(uri.path) == "/Limen:alice"
    query = parse_qs(uri.query)
    assert query["secret"] == [secret]
    assert query["issuer"] == ["Limen"]
    # The defaults every app assumes (SHA1, 6 digits, 30 s) need not be spelled out, but if
    # present they must be the defaults.
    assert query.get("algorithm", ["SHA1"]) == ["SHA1"]
    assert query.get("digits", ["6"]) == ["6"]
    assert query.get("period", ["30"]) == ["30"]


def test_recovery_codes_shape_and_hash() -> None:
    codes = new_recovery_codes()
    assert len(codes) == 10
    assert len(set(codes)) == 10
    for code in codes:
        assert re.fullmatch(r"[0-9a-hjkmnp-tv-z]{5}-[0-9a-hjkmnp-tv-z]{5}", code)
    code = codes[0]
    digest = recovery_code_hash("usr_a", code)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert recovery_code_hash("usr_a", code.upper().replace("-", " ")) == digest
    assert recovery_code_hash("usr_b", code) != digest  # salted with the user
    assert normalize_recovery_code("O1L-i0") == "01110"


# --- the store-backed service -----------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    db = Store(f"sqlite:///{tmp_path}/t.db")
    db.create_all_for_tests()
    yield db
    db.dispose()


@pytest.fixture
def alice(store: Store) -> User:
    user = User(id="usr_alice", username="alice", created_at=0.0, updated_at=0.0)
    with store.session() as s:
        s.add(user)
    return user


def enrolled(service: MfaService, user: User) -> tuple[str, list[str]]:
    """Enrol and confirm TOTP at NOW; returns the secret and the recovery codes."""
    secret, _uri = service.begin_totp_enrollment(user, NOW)
    codes = service.confirm_totp(user, totp_code(secret, time_step(NOW)), NOW)
    return secret, codes


def load_user(store: Store, user_id: str) -> User:
    with store.session() as s:
        row = s.get(User, user_id)
        assert row is not None
        return row


def test_enrolment_confirms_and_returns_recovery_codes(store: Store, alice: User) -> None:
    service = MfaService(store)
    secret, uri = service.begin_totp_enrollment(alice, NOW)
    assert f"secret={secret}" in uri
    pending = load_user(store, alice.id)
    assert pending.totp_secret == secret and not pending.totp_confirmed

    right = totp_code(secret, time_step(NOW))
    with pytest.raises(AuthError) as wrong:
        service.confirm_totp(alice, f"{(int(right) + 1) % 1_000_000:06d}", NOW)
    assert wrong.value.code == "invalid_otp"
    assert not load_user(store, alice.id).totp_confirmed

    codes = service.confirm_totp(alice, right, NOW)
    assert len(codes) == 10
    user = load_user(store, alice.id)
    assert user.totp_confirmed and user.totp_secret == secret
    assert user.revoked_before == NOW  # registering re-evaluates every session
    assert service.recovery_codes_left(alice) == 10
    with store.session() as s:
        stored = set(s.scalars(select(RecoveryCode.code_hash)))
    assert stored == {recovery_code_hash(alice.id, c) for c in codes}
    assert not stored & set(codes)  # only hashes are kept


def test_begin_refused_once_registered(store: Store, alice: User) -> None:
    service = MfaService(store)
    enrolled(service, alice)
    with pytest.raises(Conflict) as exc:
        service.begin_totp_enrollment(alice, NOW)
    assert exc.value.code == "mfa_already_registered"


def test_confirm_without_enrolment_refused(store: Store, alice: User) -> None:
    with pytest.raises(ConfigError) as exc:
        MfaService(store).confirm_totp(alice, "123456", NOW)
    assert exc.value.code == "mfa_not_enrolling"


def test_verify_without_totp_refused(store: Store, alice: User) -> None:
    with pytest.raises(AuthError) as exc:
        MfaService(store).verify_second_factor(alice, "123456", NOW)
    assert exc.value.code == "mfa_not_registered"


def test_code_cannot_be_replayed(store: Store, alice: User) -> None:
    service = MfaService(store)
    secret, _ = enrolled(service, alice)  # step(NOW) spent by the confirmation
    step = time_step(NOW)
    with pytest.raises(AuthError) as replay:
        service.verify_second_factor(alice, totp_code(secret, step), NOW)
    assert replay.value.code == "invalid_otp"

    later = NOW + 30
    assert service.verify_second_factor(alice, totp_code(secret, step + 1), later) == "totp"
    # Same code again, still inside its window: refused.
    with pytest.raises(AuthError):
        service.verify_second_factor(alice, totp_code(secret, step + 1), later + 5)
    # An older step's code, though still in the window, comes after a newer one: refused.
    with pytest.raises(AuthError):
        service.verify_second_factor(alice, totp_code(secret, step), later)
    # The next step's code (clock of the phone a bit ahead) is fine.
    assert service.verify_second_factor(alice, totp_code(secret, step + 2), later) == "totp"


def test_window_on_verification(store: Store, alice: User) -> None:
    service = MfaService(store)
    secret, _ = enrolled(service, alice)
    now = NOW + 300
    step = time_step(now)
    with pytest.raises(AuthError):
        service.verify_second_factor(alice, totp_code(secret, step - 2), now)
    assert service.verify_second_factor(alice, totp_code(secret, step - 1), now) == "totp"
    with pytest.raises(AuthError):
        service.verify_second_factor(alice, totp_code(secret, step + 2), now)


def test_recovery_codes_are_single_use(store: Store, alice: User) -> None:
    service = MfaService(store)
    _, codes = enrolled(service, alice)
    typed = codes[3].upper().replace("-", " ")  # users type codes loosely
    assert service.verify_second_factor(alice, typed, NOW + 60) == "recovery_code"
    assert service.recovery_codes_left(alice) == 9
    with pytest.raises(AuthError) as again:
        service.verify_second_factor(alice, codes[3], NOW + 61)
    assert again.value.code == "invalid_otp"
    with pytest.raises(AuthError):
        service.verify_second_factor(alice, "zzzzz-zzzzz", NOW + 62)
    assert service.verify_second_factor(alice, codes[4], NOW + 63) == "recovery_code"
    assert service.recovery_codes_left(alice) == 8


def test_another_users_recovery_code_is_refused(store: Store, alice: User) -> None:
    bob = User(id="usr_bob", username="bob", created_at=0.0, updated_at=0.0)
    with store.session() as s:
        s.add(bob)
    service = MfaService(store)
    _, alice_codes = enrolled(service, alice)
    enrolled(service, bob)
    with pytest.raises(AuthError):
        service.verify_second_factor(bob, alice_codes[0], NOW + 60)
    assert service.recovery_codes_left(alice) == 10


def test_guessing_is_bounded(store: Store, alice: User) -> None:
    service = MfaService(store)
    secret, _ = enrolled(service, alice)
    now = NOW + 600
    right = totp_code(secret, time_step(now))
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    for _ in range(MAX_FAILURES):
        with pytest.raises(AuthError) as exc:
            service.verify_second_factor(alice, wrong, now)
        assert exc.value.code == "invalid_otp"
    with pytest.raises(AuthError) as locked:
        service.verify_second_factor(alice, right, now)
    assert locked.value.code == "mfa_locked"
    # Once the window has passed, the right code works again and the count restarts.
    after = now + FAILURE_WINDOW
    fresh = totp_code(secret, time_step(after))
    assert service.verify_second_factor(alice, fresh, after) == "totp"
    with store.session() as s:
        usage = s.get(TotpUsage, alice.id)
        assert usage is not None and usage.failures == 0


def test_concurrent_use_of_one_code_wins_once(store: Store, alice: User) -> None:
    service = MfaService(store)
    secret, _ = enrolled(service, alice)
    now = NOW + 30
    code = totp_code(secret, time_step(now))
    barrier = threading.Barrier(2)
    results: list[str] = []

    def attempt() -> None:
        barrier.wait(timeout=5)
        try:
            results.append(service.verify_second_factor(alice, code, now))
        except LimenError as exc:  # the loser: replay refused, or the store's busy error
            results.append(exc.code)

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(results).count("totp") == 1
    assert len(results) == 2


def test_clear_factors(store: Store, alice: User) -> None:
    service = MfaService(store)
    enrolled(service, alice)
    with store.session() as s:
        row = s.get(User, alice.id)
        assert row is not None
        clear_factors(s, row)
    user = load_user(store, alice.id)
    assert user.totp_secret is None and not user.totp_confirmed
    assert service.recovery_codes_left(alice) == 0
    with store.session() as s:
        assert s.get(TotpUsage, alice.id) is None
    # A fresh enrolment is possible again.
    secret, _ = service.begin_totp_enrollment(alice, NOW + 60)
    assert service.confirm_totp(alice, totp_code(secret, time_step(NOW + 60)), NOW + 60)


def test_deleting_a_user_deletes_its_factors(store: Store, alice: User) -> None:
    service = MfaService(store)
    enrolled(service, alice)
    with store.session() as s:
        row = s.get(User, alice.id)
        s.delete(row)
    with store.session() as s:
        assert s.scalars(select(RecoveryCode)).first() is None
        assert s.get(TotpUsage, alice.id) is None


def test_module_constants_match_authenticator_defaults() -> None:
    assert (mfa.DIGITS, mfa.STEP_SECONDS, mfa.WINDOW, mfa.ISSUER) == (6, 30, 1, "Limen")
