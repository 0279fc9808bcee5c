"""Password hashing: Argon2id (RFC 9106) through argon2-cffi.

A failed sign-in must cost the same whether the user exists or not, so callers that find no
user (or a user without a password) still run one verification, against :func:`dummy_hash`.
"""

from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from limen.errors import ConfigError

# argon2-cffi's defaults are RFC 9106's second recommended profile (Argon2id, 64 MiB, t=3,
# p=4): ~50 ms here, slow enough for offline guessing, fast enough for interactive sign-in.
_HASHER = PasswordHasher()

#: Longest password accepted; Argon2 itself takes any length, but a megabyte "password" would
#: only be a way to burn our CPU.
MAX_PASSWORD_BYTES = 1024


def hash_password(password: str) -> str:
    """An Argon2id PHC string (``$argon2id$v=19$m=...``) for ``password``.

    Raises :class:`~limen.errors.ConfigError` for a password that is empty, longer than
    :data:`MAX_PASSWORD_BYTES` or not encodable as UTF-8.
    """
    if not password or not _acceptable(password):
        raise ConfigError(
            f"a password must be 1 to {MAX_PASSWORD_BYTES} bytes of UTF-8", code="invalid_password"
        )
    return _HASHER.hash(password)


def _acceptable(password: str) -> bool:
    try:
        return len(password.encode("utf-8")) <= MAX_PASSWORD_BYTES
    except UnicodeEncodeError:  # lone surrogates
        return False


@functools.cache
def dummy_hash() -> str:
    """A hash of a random password, computed once: the target of verifications for unknown
    users so that their failure path costs what a wrong password costs."""
    import secrets

    return _HASHER.hash(secrets.token_urlsafe(24))


def verify_password(password_hash: str, password: str) -> bool:
    """True when ``password`` matches ``password_hash``.

    An empty or malformed hash (a user without a password) never matches, but is still
    verified against :func:`dummy_hash` so the failure takes the usual time.
    """
    if not _acceptable(password):
        _check(dummy_hash(), "")
        return False
    if not password_hash.startswith("$argon2"):
        _check(dummy_hash(), password)
        return False
    try:
        return _check(password_hash, password)
    except InvalidHashError:
        _check(dummy_hash(), password)
        return False


def _check(password_hash: str, password: str) -> bool:
    try:
        return _HASHER.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when ``password_hash`` was made with weaker parameters than today's (rehash it on
    the next successful sign-in)."""
    try:
        return _HASHER.check_needs_rehash(password_hash)
    except (InvalidHashError, ValueError):
        return True
