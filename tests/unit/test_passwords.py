from __future__ import annotations

import pytest
from argon2 import PasswordHasher

from limen.errors import ConfigError
from limen.identity.passwords import (
    MAX_PASSWORD_BYTES,
    dummy_hash,
    hash_password,
    needs_rehash,
    verify_password,
)


def test_hash_is_argon2id_and_verifies() -> None:
    h = hash_password("correct horse")
    assert h.startswith("$argon2id$")
    assert verify_password(h, "correct horse")
    assert not verify_password(h, "correct horsE")
    assert not needs_rehash(h)


def test_same_password_hashes_differently() -> None:
    assert hash_password("pw") != hash_password("pw")


@pytest.mark.parametrize("bad_hash", ["", "plaintext", "$argon2id$garbage", "$2b$12$abc"])
def test_malformed_or_missing_hash_never_matches(bad_hash: str) -> None:
    assert not verify_password(bad_hash, "plaintext")
    assert not verify_password(bad_hash, "")


def test_dummy_hash_is_stable_and_matches_nothing_guessable() -> None:
    assert dummy_hash() == dummy_hash()
    assert not verify_password(dummy_hash(), "")
    assert not verify_password(dummy_hash(), "password")


def test_oversized_and_unencodable_passwords() -> None:
    h = hash_password("x")
    assert not verify_password(h, "x" * (MAX_PASSWORD_BYTES + 1))
    assert not verify_password(h, "\ud800")
    with pytest.raises(ConfigError):
        hash_password("x" * (MAX_PASSWORD_BYTES + 1))
    with pytest.raises(ConfigError):
        hash_password("")


def test_weaker_parameters_need_rehash() -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash("pw")
    assert verify_password(weak, "pw")
    assert needs_rehash(weak)
    assert needs_rehash("not a hash")
