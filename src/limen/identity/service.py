"""The identity service: password sign-in with an optional second factor, sessions, device
registration, rotating refresh tokens, the device authorization grant (RFC 8628) and session
revocation.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from limen.config import Settings
from limen.errors import AuthError, NotFound
from limen.identity.mfa import MfaService, has_totp
from limen.identity.passwords import dummy_hash, hash_password, needs_rehash, verify_password
from limen.identity.tokens import ACR_MFA
from limen.ids import new_id
from limen.store.db import Store, token_hash
from limen.store.models import Device, DeviceCode, RefreshToken, SignInSession, User

log = logging.getLogger(__name__)

#: RFC 8628 §6.1: consonants only (no vowels, so no words), no look-alikes (0/O, 1/I/L).
#: 20 symbols ** 8 = 2.6e10 codes, guarded further by expiry and by the credentials the
#: /device page asks for.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
#: RFC 8628 §3.5: a client that polls too fast has its interval raised by 5 seconds.
SLOW_DOWN_STEP = 5
_BAD_CREDENTIALS = "invalid username or password"
SECOND_FACTOR_REQUIRED = "a second factor is required"
#: Device ids are what the client generates: ``dev_`` and 20 hex digits (``new_id``); any
#: length from 8 to 64 hex digits is accepted for other clients.
DEVICE_ID = re.compile(r"dev_[0-9a-f]{8,64}")
#: Longest device facts accepted: the widths of the ``devices`` columns.
_DEVICE_FACT_LIMITS = {"hostname": 255, "os": 64, "os_version": 64, "client_version": 64}
#: Form parameters that carry device facts → DeviceInfo fields.
DEVICE_PARAMS = {
    "device_hostname": "hostname",
    "device_os": "os",
    "device_os_version": "os_version",
    "client_version": "client_version",
}


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What a client says about the device it runs on. Empty facts are "not told" and leave
    the stored value alone."""

    id: str
    hostname: str = ""
    os: str = ""
    os_version: str = ""
    client_version: str = ""

    def __post_init__(self) -> None:
        if not DEVICE_ID.fullmatch(self.id):
            raise AuthError(
                "device_id must be 'dev_' followed by 8 to 64 lower-case hex digits",
                code="invalid_request",
            )
        for name, limit in _DEVICE_FACT_LIMITS.items():
            value = getattr(self, name)
            if len(value) > limit or any(not ch.isprintable() for ch in value):
                raise AuthError(
                    f"{name}: at most {limit} printable characters", code="invalid_request"
                )

    @classmethod
    def from_params(
        cls, params: dict[str, str], defaults: dict[str, Any] | None = None
    ) -> DeviceInfo | None:
        """The device a token request names (its form ``params``, else the ``defaults`` the
        device authorization request stored), or None when it names none."""
        defaults = defaults or {}
        device_id = params.get("device_id") or str(defaults.get("device_id") or "")
        if not device_id:
            return None
        facts = {
            field: params.get(param) or str(defaults.get(param) or "")
            for param, field in DEVICE_PARAMS.items()
        }
        return cls(device_id, **facts)


@dataclass(frozen=True, slots=True)
class SignInAttempt:
    """What a sign-in (or a refresh) would grant, for a policy to judge before any token is
    issued (design §4: sign-in is an enforcement point)."""

    user: User
    #: ``password``, ``refresh_token`` or the device code grant's URN.
    grant_type: str
    amr: Sequence[str]
    #: The source address of the token request, as the identity service sees it.
    ip_address: str
    device_id: str | None
    client_id: str


#: A sign-in policy check: returns to allow, raises a
#: :class:`~limen.errors.LimenError` (typically :class:`~limen.errors.PolicyDenied`) to block;
#: the error's code and message reach the client unchanged.
SignInCheck = Callable[[SignInAttempt], None]


def wants_mfa(acr_values: str | None) -> bool:
    """Whether an ``acr_values`` request parameter (space-separated, OIDC Core §3.1.2.1) asks
    for multi-factor authentication: the step-up re-authorization of RFC 9470 §4."""
    return ACR_MFA in (acr_values or "").split()


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
        self.mfa = MfaService(store)

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

    def second_factor(self, user: User, otp: str | None, *, step_up: bool, now: float) -> list[str]:
        """The ``amr`` of a sign-in whose password was right, given the one-time code the user
        gave (``otp``; None or empty when none).

        - a valid code (TOTP or recovery code): ``["pwd", "otp", "mfa"]``;
        - a wrong, replayed or spent code: ``invalid_grant`` (never a silent downgrade; with
          ``step_up`` the description starts "a second factor is required");
        - no code: ``["pwd"]``, unless ``step_up`` (the client asked for
          ``acr_values=urn:limen:acr:mfa``), then ``invalid_grant`` "a second factor is
          required". Whether a password alone is enough is for policies to say, at the edge.
        """
        if not otp or not otp.strip():
            if step_up:
                raise AuthError(SECOND_FACTOR_REQUIRED, code="invalid_grant")
            return ["pwd"]
        if not has_totp(user):
            raise AuthError(
                "no second factor is registered for this user; register one first",
                code="invalid_grant",
            )
        try:
            self.mfa.verify_second_factor(user, otp, now)
        except AuthError as exc:
            # The token endpoint speaks RFC 6749 §5.2 codes; the reason stays in the text,
            # after the step-up refusal's fixed words when the client asked for MFA.
            text = f"{SECOND_FACTOR_REQUIRED}: {exc.message}" if step_up else exc.message
            raise AuthError(text, code="invalid_grant") from exc
        return ["pwd", "otp", "mfa"]

    # --- devices ----------------------------------------------------------------------------

    def _touch_device(self, s: Session, user_id: str, device: DeviceInfo, now: float) -> None:
        """Register ``device`` for ``user_id`` or update its facts (inside the caller's unit
        of work). Another user's device is ``invalid_request``; a disabled one
        ``invalid_grant`` "device disabled"."""
        row = s.get(Device, device.id)
        if row is None:
            s.add(
                Device(
                    id=device.id,
                    user_id=user_id,
                    hostname=device.hostname,
                    os=device.os,
                    os_version=device.os_version,
                    client_version=device.client_version,
                    compliant=False,
                    enabled=True,
                    created_at=now,
                    last_seen_at=now,
                )
            )
            log.info("registered device %s for user %s", device.id, user_id)
            return
        if row.user_id is not None and row.user_id != user_id:
            # Deliberately vague: do not confirm whose device it is.
            raise AuthError("this device is registered to another user", code="invalid_request")
        if not row.enabled:
            raise AuthError("device disabled", code="invalid_grant")
        row.user_id = user_id
        for name in _DEVICE_FACT_LIMITS:
            value = getattr(device, name)
            if value:
                setattr(row, name, value)
        row.last_seen_at = now

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
        device: DeviceInfo | None = None,
        now: float,
    ) -> SignInSession:
        """Record a sign-in (the ``sid`` of the tokens that follow). A ``device`` is
        registered or updated in the same unit of work (see :meth:`_touch_device`), and
        its id becomes the session's."""
        if device is not None:
            device_id = device.id
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
            if device is not None:
                self._touch_device(s, user.id, device, now)
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

    def rotate_refresh_token(
        self,
        token: str,
        now: float,
        *,
        max_age: float | None = None,
        require_mfa: bool = False,
        device: DeviceInfo | None = None,
        check: SignInCheck | None = None,
        ip_address: str = "",
    ) -> tuple[User, SignInSession, str]:
        """Spend ``token`` and return its user, its session and the next token of its family.

        Reuse of a spent token means it was stolen (or the client is broken): the whole family
        and its session are revoked (RFC 9700 §4.14.2).

        Refused *before* the token is spent (so a client that cannot re-authenticate keeps
        it): a session whose ``auth_time`` is more than ``max_age`` seconds old
        (``invalid_grant`` "re-authentication required", OIDC Core §3.1.2.1, RFC 9470 §4);
        with ``require_mfa``, a session without ``mfa`` in its amr (a refresh never adds a
        factor); a ``device`` that is disabled, another user's, or not the session's own;
        whatever ``check`` (the sign-in policy) refuses for a request from ``ip_address``.
        The session's device, if any, is re-checked even when ``device`` is None, so
        disabling a device ends its refreshes.
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
                if max_age is not None and now - session.auth_time > max_age:
                    raise AuthError("re-authentication required", code="invalid_grant")
                if require_mfa and "mfa" not in (session.amr or []):
                    raise AuthError(SECOND_FACTOR_REQUIRED, code="invalid_grant")
                self._check_session_device(s, user, session, device, now)
                if check is not None:
                    check(
                        SignInAttempt(
                            user=user,
                            grant_type="refresh_token",
                            amr=tuple(session.amr or []),
                            ip_address=ip_address,
                            device_id=session.device_id,
                            client_id=session.client_id,
                        )
                    )
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

    def _check_session_device(
        self,
        s: Session,
        user: User,
        session: SignInSession,
        device: DeviceInfo | None,
        now: float,
    ) -> None:
        if device is not None:
            if session.device_id and session.device_id != device.id:
                # A session stays bound to the device it signed in on.
                raise AuthError(
                    "device_id is not the device this session signed in on",
                    code="invalid_request",
                )
            self._touch_device(s, user.id, device, now)
            session.device_id = device.id
        elif session.device_id:
            row = s.get(Device, session.device_id)
            if row is not None and not row.enabled:
                raise AuthError("device disabled", code="invalid_grant")

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

    def device_code_request(self, user_code: str, now: float) -> dict[str, Any]:
        """What the device showing ``user_code`` asked for (capabilities, device, acr_values),
        so the approval page can apply the same second-factor rules as the token endpoint."""
        with self.store.session() as s:
            return dict(self._pending_code(s, user_code, now).request or {})

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
