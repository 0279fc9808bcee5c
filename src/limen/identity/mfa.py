"""Second factors: TOTP (RFC 6238) for authenticator apps, and one-time recovery codes.

Rules this module keeps:

- TOTP parameters are the ones every authenticator app implements: HMAC-SHA-1, 6 digits,
  30-second steps from the UNIX epoch (RFC 6238 §4; Google Authenticator ignores other
  algorithms). Secrets are 160 random bits (RFC 4226 §4, R6), base32 without padding.
- A code is accepted for its own step and one step either side (RFC 6238 §5.2 recommends at
  most one step of allowed delay), and never twice: each user's newest accepted step is kept
  in ``totp_usage.last_step`` and only a *later* step is accepted afterwards. Accepting is a
  conditional UPDATE, so two concurrent uses of one code cannot both win.
- Guessing is bounded (RFC 4226 §7.3): :data:`MAX_FAILURES` wrong codes within
  :data:`FAILURE_WINDOW` seconds lock the second factor until the window ends; during the lock
  even a right code is refused (otherwise the lock would only slow a guesser down).
- Recovery codes: :data:`RECOVERY_CODE_COUNT` of them, 50 random bits each, shown once when
  TOTP is confirmed; only ``SHA-256(user id ":" code)`` is stored, and a used code is spent by
  a conditional UPDATE, so it works once.
- Time is passed in (``now``); nothing here reads the clock. Codes and secrets are never
  logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets

import pyotp
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from limen.errors import AuthError, ConfigError, Conflict, NotFound
from limen.store.db import Store
from limen.store.identity_models import RecoveryCode, TotpUsage
from limen.store.models import User

log = logging.getLogger(__name__)

#: The issuer authenticator apps show next to the account name.
ISSUER = "Limen"
STEP_SECONDS = 30
DIGITS = 6
#: Steps accepted either side of the current one (clock drift, typing time).
WINDOW = 1
#: 20 bytes = 160 bits, the HMAC-SHA-1 block-size-friendly length RFC 4226 §4 recommends.
SECRET_BYTES = 20
RECOVERY_CODE_COUNT = 10
#: Crockford's base32 alphabet (no i, l, o, u): 10 symbols = 50 bits per recovery code.
RECOVERY_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
RECOVERY_CODE_LENGTH = 10
#: Wrong codes tolerated per window: 10 guesses at 3 valid codes in a million is a 3e-5
#: chance per window for someone who already has the password.
MAX_FAILURES = 10
FAILURE_WINDOW = 15 * 60.0
#: A code longer than this is not a code; refused before any work.
_MAX_CODE_CHARS = 64

_TOTP_CODE = re.compile(rf"[0-9]{{{DIGITS}}}")


# --- pure functions ---------------------------------------------------------------------------


def new_totp_secret() -> str:
    """A fresh random TOTP secret, base32 without padding (32 characters)."""
    return base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii").rstrip("=")


def otpauth_uri(secret: str, account: str, issuer: str = ISSUER) -> str:
    """The ``otpauth://totp/...`` URI authenticator apps import (as a QR code or pasted)."""
    return pyotp.TOTP(secret).provisioning_uri(name=account, issuer_name=issuer)


def time_step(now: float) -> int:
    """The RFC 6238 time step ``T = floor((now - T0) / X)`` with T0 = 0, X = 30 s."""
    return int(now // STEP_SECONDS)


def totp_code(secret: str, step: int, digits: int = DIGITS) -> str:
    """The HOTP value (RFC 4226) of ``secret`` at time step ``step``, HMAC-SHA-1."""
    return pyotp.TOTP(secret, digits=digits, interval=STEP_SECONDS).generate_otp(step)


def normalize_code(code: str) -> str:
    """What the user typed, without spaces and dashes (``"123 456"`` → ``"123456"``)."""
    return re.sub(r"[\s-]", "", code[:_MAX_CODE_CHARS]).lower()


def is_totp_code(code: str) -> bool:
    """True for a normalized code shaped like a TOTP code (six digits)."""
    return _TOTP_CODE.fullmatch(code) is not None


def match_totp(secret: str, code: str, now: float, window: int = WINDOW) -> int | None:
    """The time step within ``window`` of ``now`` whose code is ``code``, or None.

    The comparison is constant-time per candidate; the caller refuses a step it has already
    accepted (replay).
    """
    code = normalize_code(code)
    if not is_totp_code(code):
        return None
    current = time_step(now)
    found: int | None = None
    # Every candidate is computed and compared, matched or not, so the time taken does not
    # tell which step matched.
    for step in range(current - window, current + window + 1):
        if hmac.compare_digest(totp_code(secret, step), code) and found is None:
            found = step
    return found


def new_recovery_codes(count: int = RECOVERY_CODE_COUNT) -> list[str]:
    """``count`` fresh recovery codes shaped ``xxxxx-xxxxx``."""
    codes = []
    for _ in range(count):
        text = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_CODE_LENGTH))
        half = RECOVERY_CODE_LENGTH // 2
        codes.append(f"{text[:half]}-{text[half:]}")
    return codes


def normalize_recovery_code(code: str) -> str:
    """Lower case, no separators, and Crockford's look-alikes folded (o→0, i/l→1)."""
    return normalize_code(code).translate(str.maketrans("oil", "011"))


def recovery_code_hash(user_id: str, code: str) -> str:
    """How a recovery code is stored: SHA-256 of the user id and the normalized code."""
    material = f"{user_id}:{normalize_recovery_code(code)}"
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def has_totp(user: User) -> bool:
    """Whether ``user`` has a confirmed TOTP factor."""
    return bool(user.totp_confirmed and user.totp_secret)


def clear_factors(s: Session, user: User) -> None:
    """Forget ``user``'s TOTP secret, recovery codes and failure count (inside the caller's
    unit of work). Used by the admin reset."""
    user.totp_secret = None
    user.totp_confirmed = False
    s.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
    s.execute(delete(TotpUsage).where(TotpUsage.user_id == user.id))


# --- the store-backed service -----------------------------------------------------------------


def _invalid_code() -> AuthError:
    return AuthError("invalid one-time code", code="invalid_otp")


class MfaService:
    """Enrolment and verification of users' second factors, on the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def _user(s: Session, user: User | str) -> User:
        user_id = user if isinstance(user, str) else user.id
        row = s.get(User, user_id)
        if row is None:
            raise NotFound(f"no user {user_id}")
        return row

    @staticmethod
    def _usage(s: Session, user_id: str, now: float) -> TotpUsage:
        usage = s.get(TotpUsage, user_id)
        if usage is None:
            usage = TotpUsage(
                user_id=user_id, last_step=-1, failures=0, failures_since=now, updated_at=now
            )
            s.add(usage)
            s.flush()
        return usage

    @staticmethod
    def _locked(usage: TotpUsage, now: float) -> bool:
        return usage.failures >= MAX_FAILURES and now - usage.failures_since < FAILURE_WINDOW

    @staticmethod
    def _count_failure(usage: TotpUsage, now: float) -> None:
        if now - usage.failures_since >= FAILURE_WINDOW:
            usage.failures = 0
            usage.failures_since = now
        usage.failures += 1
        usage.updated_at = now

    @staticmethod
    def _accept_step(s: Session, usage: TotpUsage, step: int, now: float) -> bool:
        # Conditional: of two concurrent uses of one code, only one moves last_step forward.
        result = s.execute(
            update(TotpUsage)
            .where(TotpUsage.user_id == usage.user_id, TotpUsage.last_step < step)
            .values(last_step=step, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return getattr(result, "rowcount", 0) == 1

    def begin_totp_enrollment(self, user: User | str, now: float) -> tuple[str, str]:
        """Start (or restart) TOTP enrolment: a new secret and its ``otpauth://`` URI (issuer
        ``Limen``, account = username). The factor counts only once
        :meth:`confirm_totp` has seen a code from it.

        A user whose TOTP is already confirmed gets :class:`~limen.errors.Conflict`
        (``mfa_already_registered``): replacing a factor takes an admin reset, so a stolen
        password-only token cannot swap the victim's authenticator for the thief's.
        """
        with self.store.session() as s:
            row = self._user(s, user)
            if has_totp(row):
                raise Conflict(
                    "a second factor is already registered; an admin must reset it first",
                    code="mfa_already_registered",
                )
            secret = new_totp_secret()
            row.totp_secret = secret
            row.totp_confirmed = False
            row.updated_at = now
            self._usage(s, row.id, now)
            username = row.username
        log.info("TOTP enrolment started for user %s", row.id)
        return secret, otpauth_uri(secret, username)

    def confirm_totp(self, user: User | str, code: str, now: float) -> list[str]:
        """Confirm the enrolment with a current ``code`` from the authenticator; returns the
        new recovery codes (plaintext, shown once; any older codes are discarded).

        Also sets ``user.revoked_before = now``: registering a factor re-evaluates every
        session (the caller publishes ``SUBJECT_REVOKED``), and the user signs in again with
        the new factor. A wrong code raises ``invalid_otp`` and counts as a failure.
        """
        failure: AuthError
        with self.store.session() as s:
            row = self._user(s, user)
            if has_totp(row):
                raise Conflict(
                    "a second factor is already registered", code="mfa_already_registered"
                )
            if not row.totp_secret:
                raise ConfigError(
                    "no TOTP enrolment in progress; begin one first", code="mfa_not_enrolling"
                )
            usage = self._usage(s, row.id, now)
            step = None if self._locked(usage, now) else match_totp(row.totp_secret, code, now)
            if (
                step is not None
                and step > usage.last_step
                and self._accept_step(s, usage, step, now)
            ):
                codes = new_recovery_codes()
                s.execute(delete(RecoveryCode).where(RecoveryCode.user_id == row.id))
                for plain in codes:
                    s.add(
                        RecoveryCode(
                            user_id=row.id,
                            code_hash=recovery_code_hash(row.id, plain),
                            created_at=now,
                            used_at=None,
                        )
                    )
                row.totp_confirmed = True
                row.revoked_before = max(row.revoked_before, now)
                row.updated_at = now
                usage.failures = 0
                log.info("TOTP confirmed for user %s", row.id)
                return codes
            failure = self._failure(usage, now)
        raise failure  # after the unit of work, so the failure count is committed

    def _failure(self, usage: TotpUsage, now: float) -> AuthError:
        if self._locked(usage, now):
            log.warning("second factor locked for user %s: too many wrong codes", usage.user_id)
            return AuthError("too many wrong one-time codes; try again later", code="mfa_locked")
        self._count_failure(usage, now)
        return _invalid_code()

    def verify_second_factor(self, user: User | str, code: str, now: float) -> str:
        """Check a second factor for ``user``: a TOTP code (``"totp"`` is returned) or an
        unused recovery code, which is spent (``"recovery_code"``).

        Raises :class:`~limen.errors.AuthError`: ``mfa_not_registered`` (no confirmed
        TOTP), ``invalid_otp`` (wrong, replayed or spent code), ``mfa_locked`` (too many
        wrong codes lately).
        """
        normalized = normalize_code(code)
        failure: AuthError
        with self.store.session() as s:
            row = self._user(s, user)
            if not has_totp(row) or row.totp_secret is None:
                raise AuthError(
                    "no second factor is registered for this user", code="mfa_not_registered"
                )
            usage = self._usage(s, row.id, now)
            method = ""
            if self._locked(usage, now):
                pass
            elif is_totp_code(normalized):
                step = match_totp(row.totp_secret, normalized, now)
                if step is not None and step <= usage.last_step:
                    log.warning("replayed one-time code refused for user %s", row.id)
                elif step is not None and self._accept_step(s, usage, step, now):
                    method = "totp"
            elif normalized:
                spent = s.execute(
                    update(RecoveryCode)
                    .where(
                        RecoveryCode.user_id == row.id,
                        RecoveryCode.code_hash == recovery_code_hash(row.id, normalized),
                        RecoveryCode.used_at.is_(None),
                    )
                    .values(used_at=now)
                    .execution_options(synchronize_session=False)
                )
                if getattr(spent, "rowcount", 0) >= 1:
                    method = "recovery_code"
                    log.info("recovery code used by user %s", row.id)
            if method:
                usage.failures = 0
                usage.updated_at = now
                return method
            failure = self._failure(usage, now)
        raise failure

    def recovery_codes_left(self, user: User | str) -> int:
        """How many unused recovery codes ``user`` has."""
        with self.store.session() as s:
            row = self._user(s, user)
            count = s.scalar(
                select(func.count())
                .select_from(RecoveryCode)
                .where(RecoveryCode.user_id == row.id, RecoveryCode.used_at.is_(None))
            )
            return int(count or 0)
