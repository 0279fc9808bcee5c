"""The identity service: password sign-in, sessions, rotating refresh tokens, the device
authorization grant (RFC 8628) and session revocation.

Synchronous on purpose: every method is a short unit of work on the store, and the HTTP layer
runs it in a thread pool. Time is passed in (``now``) so tests control it.

Errors are :class:`~limen.errors.AuthError` whose ``code`` is the OAuth error code the token
endpoint returns unchanged (RFC 6749 §5.2, RFC 8628 §3.5). State changes that go with an error
(a reused refresh token revoking its family, a too-fast poll raising the interval) are committed
*before* the error is raised: the store rolls back a unit of work that raises.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any
from urllib.parse import quote

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from limen.config import Settings
from limen.errors import AuthError, NotFound
from limen.identity.passwords import dummy_hash, hash_password, needs_rehash, verify_password
from limen.ids import new_id
from limen.store.db import Store, token_hash
from limen.store.models import DeviceCode, RefreshToken, SignInSession, User

log = logging.getLogger(__name__)

#: RFC 8628 §6.1: consonants only (no vowels, so no words), no look-alikes (0/O, 1/I/L).
#: 20 symbols ** 8 = 2.6e10 codes, guarded further by expiry and by the credentials the
#: /device page asks for.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
#: RFC 8628 §3.5: a client that polls too fast has its interval raised by 5 seconds.
SLOW_DOWN_STEP = 5
_BAD_CREDENTIALS = "invalid username or password"


def normalize_user_code(text: str) -> str:
    """``"bcdf ghjk"`` → ``"BCDF-GHJK"``: users type codes loosely (RFC 8628 §6.1)."""
    letters = re.sub(r"[^A-Z]", "", text.upper())
    return f"{letters[:4]}-{letters[4:]}" if len(letters) == USER_CODE_LENGTH else letters


def _new_user_code() -> str:
    letters = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
    return f"{letters[:4]}-{letters[4:]}"


class IdentityService:
    """Users' sign-ins and the credentials that follow from them."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    # --- passwords --------------------------------------------------------------------------

    def authenticate_password(self, username: str, password: str) -> User:
        """The user whose name and password these are.

        Unknown user and wrong password fail alike (code ``invalid_grant``, same message, same
        cost); a disabled user with the right password gets ``user_disabled``.
        """
        with self.store.session() as s:
            user = s.scalars(select(User).where(User.username == username)).first()
            if user is None:
                verify_password(dummy_hash(), password)
                raise AuthError(_BAD_CREDENTIALS, code="invalid_grant")
            if not verify_password(user.password_hash, password):
                raise AuthError(_BAD_CREDENTIALS, code="invalid_grant")
            if not user.enabled:
                raise AuthError("this user is disabled", code="user_disabled")
            if needs_rehash(user.password_hash):
                user.password_hash = hash_password(password)
            return user

    # --- sessions ---------------------------------------------------------------------------

    def start_session(
        self,
        user: User,
        *,
        client_id: str,
        amr: list[str],
        ip_address: str,
        capabilities: list[str],
        device_id: str | None = None,
        now: float,
    ) -> SignInSession:
        """Record a sign-in (the ``sid`` of the tokens that follow)."""
        session = SignInSession(
            id=new_id("session"),
            user_id=user.id,
            device_id=device_id,
            client_id=client_id,
            auth_time=now,
            amr=list(amr),
            ip_address=ip_address,
            capabilities=list(capabilities),
            revoked_at=None,
            created_at=now,
        )
        with self.store.session() as s:
            s.add(session)
        return session

    # --- refresh tokens ---------------------------------------------------------------------

    def _add_refresh(self, s: Session, session: SignInSession, family_id: str, now: float) -> str:
        token = secrets.token_urlsafe(32)
        s.add(
            RefreshToken(
                token_hash=token_hash(token),
                family_id=family_id,
                session_id=session.id,
                user_id=session.user_id,
                issued_at=now,
                expires_at=now + self.settings.refresh_token_ttl,
                used_at=None,
                family_revoked=False,
            )
        )
        return token

    def issue_refresh_token(self, session: SignInSession, now: float) -> str:
        """The first refresh token of a new family for ``session``."""
        with self.store.session() as s:
            return self._add_refresh(s, session, new_id("refresh_family"), now)

    def rotate_refresh_token(self, token: str, now: float) -> tuple[User, SignInSession, str]:
        """Spend ``token`` and return its user, its session and the next token of its family.

        Reuse of a spent token means it was stolen (or the client is broken): the whole family
        and its session are revoked (RFC 9700 §4.14.2).
        """
        reused = False
        with self.store.session() as s:
            row = s.get(RefreshToken, token_hash(token))
            if row is None:
                raise AuthError("unknown refresh token", code="invalid_grant")
            if row.family_revoked:
                raise AuthError("refresh token has been revoked", code="invalid_grant")
            user = s.get(User, row.user_id)
            session = s.get(SignInSession, row.session_id)
            if user is None or session is None:
                raise AuthError("refresh token has been revoked", code="invalid_grant")
            if row.used_at is not None:
                reused = True
            else:
                if row.expires_at <= now:
                    raise AuthError("refresh token has expired", code="invalid_grant")
                if not user.enabled:
                    raise AuthError("this user is disabled", code="invalid_grant")
                if session.revoked_at is not None or session.auth_time < user.revoked_before:
                    raise AuthError("the session has been revoked", code="invalid_grant")
                # Spend it with a conditional update so two concurrent uses cannot both win.
                spent = s.execute(
                    update(RefreshToken)
                    .where(
                        RefreshToken.token_hash == row.token_hash, RefreshToken.used_at.is_(None)
                    )
                    .values(used_at=now)
                    .execution_options(synchronize_session=False)
                )
                reused = getattr(spent, "rowcount", 0) != 1
            if not reused:
                return user, session, self._add_refresh(s, session, row.family_id, now)
            self._revoke_family(s, row.family_id, session, now)
            log.warning(
                "refresh token reuse detected: family %s of session %s (user %s) revoked",
                row.family_id,
                session.id,
                user.id,
            )
        # Raised after the unit of work so that the revocation is committed.
        raise AuthError(
            "refresh token reuse detected; the session has been revoked", code="invalid_grant"
        )

    def _revoke_family(
        self, s: Session, family_id: str, session: SignInSession, now: float
    ) -> None:
        s.execute(
            update(RefreshToken)
            .where(RefreshToken.family_id == family_id)
            .values(family_revoked=True)
            .execution_options(synchronize_session=False)
        )
        if session.revoked_at is None:
            session.revoked_at = now

    def revoke_user_sessions(self, user_id: str, now: float) -> int:
        """Revoke everything ``user_id`` signed in with before ``now``: sessions, refresh
        families, and (through ``revoked_before``) access tokens. Returns how many sessions
        were live."""
        with self.store.session() as s:
            user = s.get(User, user_id)
            if user is None:
                raise NotFound(f"no user {user_id}")
            user.revoked_before = max(user.revoked_before, now)
            user.updated_at = now
            result = s.execute(
                update(SignInSession)
                .where(SignInSession.user_id == user_id, SignInSession.revoked_at.is_(None))
                .values(revoked_at=now)
                .execution_options(synchronize_session=False)
            )
            s.execute(
                update(RefreshToken)
                .where(RefreshToken.user_id == user_id)
                .values(family_revoked=True)
                .execution_options(synchronize_session=False)
            )
            revoked = int(getattr(result, "rowcount", 0) or 0)
        log.info("revoked %d session(s) of user %s", revoked, user_id)
        return revoked

    # --- device authorization grant (RFC 8628) ---------------------------------------------

    def start_device_authorization(
        self, client_id: str, scope: str, request: dict[str, Any], now: float
    ) -> dict[str, Any]:
        """A new device authorization: the RFC 8628 §3.2 response."""
        device_code = secrets.token_urlsafe(32)
        with self.store.session() as s:
            # Expired codes are useless; dropping them also keeps user codes free for reuse.
            s.execute(delete(DeviceCode).where(DeviceCode.expires_at < now))
            user_code = _new_user_code()
            while s.scalars(select(DeviceCode).where(DeviceCode.user_code == user_code)).first():
                user_code = _new_user_code()
            s.add(
                DeviceCode(
                    device_code_hash=token_hash(device_code),
                    user_code=user_code,
                    client_id=client_id,
                    scope=scope,
                    request=dict(request),
                    status="pending",
                    user_id=None,
                    amr=[],
                    auth_time=None,
                    interval=self.settings.device_code_interval,
                    last_poll_at=0.0,
                    expires_at=now + self.settings.device_code_ttl,
                    created_at=now,
                )
            )
        verification_uri = f"{self.settings.resolved_issuer}/device"
        return {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": verification_uri,
            "verification_uri_complete": f"{verification_uri}?user_code={quote(user_code)}",
            "expires_in": self.settings.device_code_ttl,
            "interval": self.settings.device_code_interval,
        }

    def _pending_code(self, s: Session, user_code: str, now: float) -> DeviceCode:
        row = s.scalars(
            select(DeviceCode).where(DeviceCode.user_code == normalize_user_code(user_code))
        ).first()
        if row is None or row.expires_at <= now:
            raise AuthError("unknown or expired code", code="invalid_grant")
        if row.status != "pending":
            raise AuthError("this code has already been used", code="invalid_grant")
        return row

    def approve_device_code(self, user_code: str, user: User, amr: list[str], now: float) -> None:
        """The signed-in ``user`` approves the device showing ``user_code``."""
        with self.store.session() as s:
            row = self._pending_code(s, user_code, now)
            row.status = "approved"
            row.user_id = user.id
            row.amr = list(amr)
            row.auth_time = now

    def deny_device_code(self, user_code: str, now: float | None = None) -> None:
        """The user refuses the request of the device showing ``user_code``."""
        with self.store.session() as s:
            row = self._pending_code(s, user_code, now if now is not None else 0.0)
            row.status = "denied"

    def poll_device_code(
        self, device_code: str, client_id: str, now: float
    ) -> tuple[User, list[str], dict[str, Any]]:
        """The device's token request (RFC 8628 §3.4): the approving user, the methods they
        authenticated with and the device's original request, once; else the §3.5 error."""
        failure: AuthError
        with self.store.session() as s:
            row = s.get(DeviceCode, token_hash(device_code))
            if row is None or row.client_id != client_id:
                raise AuthError("unknown device code", code="invalid_grant")
            if row.expires_at <= now:
                raise AuthError("the device code has expired", code="expired_token")
            if row.status == "denied":
                raise AuthError("the user denied the request", code="access_denied")
            if row.status == "consumed":
                raise AuthError("the device code has already been used", code="invalid_grant")
            if row.status == "approved":
                user = s.get(User, row.user_id) if row.user_id else None
                if user is None:
                    raise AuthError("unknown device code", code="invalid_grant")
                if not user.enabled:
                    raise AuthError("this user is disabled", code="user_disabled")
                row.status = "consumed"
                return user, list(row.amr or []), dict(row.request or {})
            if row.last_poll_at and now - row.last_poll_at < row.interval:
                row.interval += SLOW_DOWN_STEP
                failure = AuthError(
                    f"polling too fast; wait {row.interval} s between requests",
                    code="slow_down",
                )
            else:
                failure = AuthError("the user has not answered yet", code="authorization_pending")
            row.last_poll_at = now
        raise failure
