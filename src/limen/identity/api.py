"""HTTP face of the identity service: OIDC discovery, JWKS, the token endpoint (RFC 6749 §3.2),
the device authorization endpoint (RFC 8628 §3.1), the page where users approve devices, and
the self-service MFA registration endpoints.

Token endpoint parameters beyond RFC 6749 (all optional):

- ``otp``: a TOTP or recovery code for the password grant. Valid → ``amr`` is
  ``["pwd", "otp", "mfa"]`` and ``acr`` ``urn:limen:acr:mfa``; wrong → ``invalid_grant``;
  absent → ``amr`` ``["pwd"]`` (policies at the edge decide whether that is enough).
- ``acr_values=urn:limen:acr:mfa``: step-up re-authorization (RFC 9470 §4). A password grant
  then fails with ``invalid_grant`` "a second factor is required" unless ``otp`` is valid; a
  refresh grant fails the same way unless the session already has ``mfa``.
- ``max_age`` (seconds, RFC 9470 §4 / OIDC Core §3.1.2.1): a refresh grant whose session
  signed in longer ago fails with ``invalid_grant`` "re-authentication required"; the refresh
  token is not spent.
- ``device_id`` (``dev_`` + hex) with ``device_hostname``, ``device_os``,
  ``device_os_version``, ``client_version``: registers or updates the user's device. Another
  user's device is ``invalid_request``; a disabled one ``invalid_grant`` "device disabled".
  A refresh re-checks the session's device.

A successful response carries ``"mfa_registration_required": true`` when an admin requires MFA
of a user who has not registered it yet: the token is still issued, the client tells the user.

Rules kept here: token-endpoint errors are RFC 6749 §5.2 JSON with the service's stable codes;
responses carrying tokens are ``Cache-Control: no-store`` (§5.1); every parameter appears at
most once (§3.1); store and Argon2 work runs in the thread pool, never on the event loop;
every byte of user input put in HTML goes through :func:`html.escape`.
"""

from __future__ import annotations

import html
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from limen.bus.inprocess import SUBJECT_REVOKED
from limen.errors import AuthError, LimenError, PolicyDenied
from limen.identity import mfa
from limen.identity.mfa import has_totp
from limen.identity.service import (
    DEVICE_PARAMS,
    DeviceInfo,
    IdentityService,
    SignInAttempt,
    SignInCheck,
    normalize_user_code,
    wants_mfa,
)
from limen.identity.tokens import (
    ACR_MFA,
    ACR_PASSWORD,
    EDGE_AUDIENCE,
    AccessClaims,
    AccessTokenIssuer,
    KeySet,
    TokenVerifier,
    jwks,
)
from limen.service import ServiceContext
from limen.store.models import SignInSession, User

log = logging.getLogger(__name__)

#: The one OAuth client Limen knows: its own public client (no secret, RFC 6749 §2.1).
CLIENT_ID = "limen-client"
DEFAULT_SCOPE = "openid profile offline_access"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
GRANT_TYPES = ["password", "refresh_token", DEVICE_CODE_GRANT]
#: Bounds on what a client may declare; longer values are refused, not truncated.
_MAX_PARAM = 4096
_MAX_CAPABILITIES = 16

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_PAGE_HEADERS = {
    **_NO_STORE,
    # The approval page must never be framed (a framed page could be clickjacked into
    # approving an attacker's device) and loads nothing from anywhere.
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}


def _oauth_error(error: LimenError) -> JSONResponse:
    if isinstance(error, AuthError | PolicyDenied):
        # RFC 6749 §5.2: 400, except 401 for a client that failed to authenticate. A sign-in
        # blocked by policy is a 400 too, with the policy's code and reason.
        status = 401 if error.code == "invalid_client" else 400
    else:
        status = error.http_status  # e.g. 503 when the store is unavailable
    return JSONResponse(
        {"error": error.code, "error_description": error.message},
        status_code=status,
        headers=_NO_STORE,
    )


def _single_params(form: FormData) -> dict[str, str]:
    """The form as a plain dict; refuses repeated or oversized parameters (RFC 6749 §3.1)."""
    params: dict[str, str] = {}
    for key, value in form.multi_items():
        if not isinstance(value, str):
            raise AuthError(f"parameter {key!r} must not be a file", code="invalid_request")
        if key in params:
            raise AuthError(f"parameter {key!r} is repeated", code="invalid_request")
        if len(value) > _MAX_PARAM:
            raise AuthError(f"parameter {key!r} is too long", code="invalid_request")
        params[key] = value
    return params


async def _read_form(request: Request) -> dict[str, str]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise AuthError(
            "the body must be application/x-www-form-urlencoded", code="invalid_request"
        )
    async with request.form() as form:
        return _single_params(form)


def _capabilities(params: dict[str, str]) -> list[str] | None:
    raw = params.get("client_capabilities")
    if raw is None:
        return None
    caps = sorted({c.strip() for c in raw.split(",") if c.strip()})
    if len(caps) > _MAX_CAPABILITIES:
        raise AuthError("too many client capabilities", code="invalid_request")
    return caps


def _require(params: dict[str, str], name: str) -> str:
    value = params.get(name, "")
    if not value:
        raise AuthError(f"missing parameter {name!r}", code="invalid_request")
    return value


def _check_client(params: dict[str, str]) -> str:
    client_id = params.get("client_id", "")
    if client_id != CLIENT_ID:
        raise AuthError("unknown client", code="invalid_client")
    return client_id


def _max_age(params: dict[str, str]) -> float | None:
    raw = params.get("max_age")
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 10:
        raise AuthError("max_age must be a non-negative integer", code="invalid_request")
    return float(raw)


def _client_ip(request: Request) -> str:
    return request.client.host if request.client is not None else ""


def build_router(ctx: ServiceContext, *, sign_in_check: SignInCheck | None = None) -> APIRouter:
    """The identity endpoints, bound to ``ctx``.

    ``sign_in_check`` is the sign-in policy: called for every sign-in and refresh before a
    token is issued (and before the refresh token is spent); it blocks by raising.
    """
    settings = ctx.settings
    service = IdentityService(ctx.store, settings)
    issuer = AccessTokenIssuer(ctx.store, settings)
    router = APIRouter(tags=["identity"])

    def tokens_for(
        user: User,
        session: SignInSession,
        *,
        refresh_token: str,
        capabilities: list[str],
        device_id: str | None,
        ip_address: str,
        scope: str,
        now: float,
    ) -> dict[str, Any]:
        access, expires_in = issuer.issue(
            user,
            session,
            client_id=session.client_id,
            capabilities=capabilities,
            device_id=device_id,
            ip_address=ip_address,
            now=now,
            scope=scope,
        )
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": expires_in,
            "refresh_token": refresh_token,
            "scope": scope,
        }
        if user.mfa_required and not has_totp(user):
            body["mfa_registration_required"] = True
        return body

    def new_sign_in(
        user: User,
        *,
        grant_type: str,
        amr: list[str],
        params: dict[str, str],
        defaults: dict[str, Any],
        ip_address: str,
        now: float,
    ) -> dict[str, Any]:
        caps = _capabilities(params)
        if caps is None:
            caps = [str(c) for c in defaults.get("capabilities", [])]
        device = DeviceInfo.from_params(params, defaults)
        scope = params.get("scope") or defaults.get("scope") or DEFAULT_SCOPE
        if sign_in_check is not None:
            sign_in_check(
                SignInAttempt(
                    user=user,
                    grant_type=grant_type,
                    amr=tuple(amr),
                    ip_address=ip_address,
                    device_id=device.id if device is not None else None,
                    client_id=CLIENT_ID,
                )
            )
        session = service.start_session(
            user,
            client_id=CLIENT_ID,
            amr=amr,
            ip_address=ip_address,
            capabilities=caps,
            device=device,
            now=now,
        )
        return tokens_for(
            user,
            session,
            refresh_token=service.issue_refresh_token(session, now),
            capabilities=caps,
            device_id=session.device_id,
            ip_address=ip_address,
            scope=scope,
            now=now,
        )

    def token_grant(params: dict[str, str], ip_address: str) -> dict[str, Any]:
        now = time.time()
        client_id = _check_client(params)
        grant_type = _require(params, "grant_type")
        if grant_type == "password":
            username = _require(params, "username")
            # Checked before the password so a malformed device id costs no Argon2 run.
            DeviceInfo.from_params(params)
            user = service.authenticate_password(username, _require(params, "password"))
            amr = service.second_factor(
                user, params.get("otp"), step_up=wants_mfa(params.get("acr_values")), now=now
            )
            return new_sign_in(
                user,
                grant_type=grant_type,
                amr=amr,
                params=params,
                defaults={},
                ip_address=ip_address,
                now=now,
            )
        if grant_type == "refresh_token":
            user, session, refresh = service.rotate_refresh_token(
                _require(params, "refresh_token"),
                now,
                max_age=_max_age(params),
                require_mfa=wants_mfa(params.get("acr_values")),
                device=DeviceInfo.from_params(params),
                check=sign_in_check,
                ip_address=ip_address,
            )
            caps = _capabilities(params)
            return tokens_for(
                user,
                session,
                refresh_token=refresh,
                capabilities=list(session.capabilities or []) if caps is None else caps,
                device_id=session.device_id,
                # The address of this token request: a client whose address changed refreshes,
                # and its new tokens carry the new address (design §5, network change).
                ip_address=ip_address,
                scope=params.get("scope") or DEFAULT_SCOPE,
                now=now,
            )
        if grant_type == DEVICE_CODE_GRANT:
            user, amr, request = service.poll_device_code(
                _require(params, "device_code"), client_id, now
            )
            return new_sign_in(
                user,
                grant_type=grant_type,
                amr=amr,
                params=params,
                defaults=request,
                ip_address=ip_address,
                now=now,
            )
        raise AuthError(
            f"grant type {grant_type!r} is not supported", code="unsupported_grant_type"
        )

    @router.get("/.well-known/openid-configuration")
    def openid_configuration() -> dict[str, Any]:
        """OpenID Connect Discovery 1.0 §3."""
        base = settings.resolved_issuer
        return {
            "issuer": base,
            "authorization_endpoint": f"{base}/oauth2/authorize",
            "token_endpoint": f"{base}/oauth2/token",
            "device_authorization_endpoint": f"{base}/oauth2/device_authorization",
            "jwks_uri": f"{base}/oauth2/jwks",
            "grant_types_supported": GRANT_TYPES,
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "scopes_supported": ["openid", "profile", "offline_access"],
            "claims_parameter_supported": True,
            # RFC 9470 step-up: what acr_values may ask for.
            "acr_values_supported": [ACR_PASSWORD, ACR_MFA],
        }

    @router.get("/oauth2/jwks")
    async def get_jwks() -> Response:
        document = await run_in_threadpool(jwks, ctx.store)
        # Short cache: verifiers pick up a rotation within minutes without hammering us.
        return JSONResponse(document, headers={"Cache-Control": "public, max-age=300"})

    @router.get("/oauth2/authorize")
    def authorize() -> JSONResponse:
        return _oauth_error(
            AuthError(
                "the authorization code flow is not available; use the device code grant",
                code="unsupported_response_type",
            )
        )

    @router.post("/oauth2/token")
    async def token(request: Request) -> JSONResponse:
        params: dict[str, str] = {}
        try:
            params = await _read_form(request)
            body = await run_in_threadpool(token_grant, params, _client_ip(request))
        except LimenError as exc:
            # The grant type is not secret; the other parameters may be.
            grant = params.get("grant_type", "?")[:64]
            log.info("token request refused (grant %r): %s", grant, exc.code)
            return _oauth_error(exc)
        return JSONResponse(body, headers=_NO_STORE)

    @router.post("/oauth2/device_authorization")
    async def device_authorization(request: Request) -> JSONResponse:
        try:
            params = await _read_form(request)
            _check_client(params)
            caps = _capabilities(params) or []
            details: dict[str, Any] = {"capabilities": caps}
            device = DeviceInfo.from_params(params)
            if device is not None:
                details["device_id"] = device.id
                details.update({p: params[p] for p in DEVICE_PARAMS if params.get(p)})
            if params.get("acr_values"):
                # Kept so the approval page can insist on a second factor (step-up).
                details["acr_values"] = params["acr_values"]
            scope = params.get("scope") or DEFAULT_SCOPE
            details["scope"] = scope
            body = await run_in_threadpool(
                service.start_device_authorization, CLIENT_ID, scope, details, time.time()
            )
        except LimenError as exc:
            return _oauth_error(exc)
        return JSONResponse(body, headers=_NO_STORE)

    @router.get("/device")
    def device_page(user_code: str = "") -> HTMLResponse:
        return _device_form(normalize_user_code(user_code[:64]))

    @router.post("/device")
    async def device_submit(request: Request) -> HTMLResponse:
        try:
            params = await _read_form(request)
        except LimenError as exc:
            return _device_form("", error=exc.message, status=400)
        user_code = normalize_user_code(params.get("user_code", "")[:64])
        action = params.get("action", "approve")
        if action not in {"approve", "deny"}:
            return _device_form(user_code, error="Choose Approve or Deny.", status=400)

        def decide() -> str:
            now = time.time()
            user = service.authenticate_password(
                params.get("username", ""), params.get("password", "")
            )
            try:
                if action == "deny":
                    service.deny_device_code(user_code, now)
                    return "You denied the request. The device will not be signed in."
                request_details = service.device_code_request(user_code, now)
            except AuthError as exc:
                raise _CodeProblem(exc.message) from exc
            # Same rules as the password grant's otp (wrong code: 401 below).
            amr = service.second_factor(
                user,
                params.get("otp"),
                step_up=wants_mfa(str(request_details.get("acr_values") or "")),
                now=now,
            )
            try:
                service.approve_device_code(user_code, user, amr, now)
            except AuthError as exc:
                # Credentials were right: the code is the problem (400, not 401).
                raise _CodeProblem(exc.message) from exc
            log.info("device code approved by user %s", user.id)
            return (
                f"Signed in as {user.username}. You can close this page and return to your device."
            )

        try:
            message = await run_in_threadpool(decide)
        except _CodeProblem as exc:
            return _device_form(user_code, error=str(exc), status=400)
        except AuthError as exc:
            return _device_form(user_code, error=exc.message, status=401)
        return _page("Device signed in", f"<p class=ok>{html.escape(message)}</p>", 200)

    # --- self-service MFA registration ------------------------------------------------------

    def bearer_user(authorization: str | None, now: float) -> User:
        """The user whose live access token (RFC 6750 §2.1) authorizes this request."""
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise AuthError("an access token is required (Authorization: Bearer ...)")
        # Keys are loaded per request: these calls are rare, and a rotation is then seen at
        # once without a cache to invalidate.
        verifier = TokenVerifier(
            KeySet.load(ctx.store), issuer=settings.resolved_issuer, audience=EDGE_AUDIENCE
        )
        claims: AccessClaims = verifier.verify(credentials.strip(), now)
        with ctx.store.session() as s:
            user = s.get(User, claims.sub)
            if user is None or not user.enabled:
                raise AuthError("the token's user is unknown or disabled")
            if claims.auth_time < user.revoked_before:
                raise AuthError("the token has been revoked; sign in again")
            signed_in = s.get(SignInSession, claims.sid) if claims.sid else None
            if signed_in is None or signed_in.revoked_at is not None:
                raise AuthError("the token's session has been revoked; sign in again")
            return user

    def begin_totp(authorization: str | None) -> dict[str, Any]:
        now = time.time()
        user = bearer_user(authorization, now)
        secret, uri = service.mfa.begin_totp_enrollment(user, now)
        ctx.audit(f"user:{user.username}", "user.mfa_begin", user.id)
        return {
            "secret": secret,
            "otpauth_uri": uri,
            "algorithm": "SHA1",
            "digits": mfa.DIGITS,
            "period": mfa.STEP_SECONDS,
        }

    def confirm_totp(authorization: str | None, code: str) -> dict[str, Any]:
        now = time.time()
        user = bearer_user(authorization, now)
        codes = service.mfa.confirm_totp(user, code, now)
        # Registering a factor re-evaluates every session (design §5): confirm_totp set
        # revoked_before; the edges now cut the user's flows, and the client signs in again
        # with the new factor.
        ctx.bus.publish(SUBJECT_REVOKED, user_id=user.id, reason="mfa_registered", at=now)
        ctx.audit(f"user:{user.username}", "user.mfa_register", user.id)
        return {"recovery_codes": codes}

    @router.post("/oauth2/mfa/totp")
    async def mfa_totp_begin(request: Request) -> JSONResponse:
        """Begin TOTP enrolment: ``{secret, otpauth_uri}`` for an authenticator app."""
        try:
            body = await run_in_threadpool(begin_totp, request.headers.get("authorization"))
        except LimenError as exc:
            return _bearer_error(exc)
        return JSONResponse(body, headers=_NO_STORE)

    @router.post("/oauth2/mfa/totp/confirm")
    async def mfa_totp_confirm(request: Request) -> JSONResponse:
        """Confirm enrolment with ``{"code": "123456"}``: ``{recovery_codes}``, shown once."""
        try:
            code = await _read_code(request)
            body = await run_in_threadpool(confirm_totp, request.headers.get("authorization"), code)
        except LimenError as exc:
            return _bearer_error(exc)
        return JSONResponse(body, headers=_NO_STORE)

    return router


async def _read_code(request: Request) -> str:
    raw = await request.body()
    if len(raw) > _MAX_PARAM:
        raise AuthError("the body is too large", code="invalid_request")
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    code = body.get("code") if isinstance(body, dict) else None
    if not isinstance(code, str) or not code.strip():
        raise AuthError('the body must be a JSON object {"code": "..."}', code="invalid_request")
    return code


def _bearer_error(error: LimenError) -> JSONResponse:
    """Errors of the bearer-authenticated endpoints: RFC 6750 §3.1 for a bad token."""
    if isinstance(error, AuthError) and error.code in {"invalid_token", "token_expired"}:
        return JSONResponse(
            {"error": "invalid_token", "error_description": error.message},
            status_code=401,
            headers={**_NO_STORE, "WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    status = 400 if isinstance(error, AuthError) else error.http_status
    return JSONResponse(
        {"error": error.code, "error_description": error.message},
        status_code=status,
        headers=_NO_STORE,
    )


class _CodeProblem(Exception):
    """The user code was wrong, used or expired (the credentials were fine)."""


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:26rem;margin:3rem auto;padding:0 1rem;color:#222}
label{display:block;margin-top:.8rem}input{width:100%;padding:.4rem;box-sizing:border-box}
button{margin-top:1rem;padding:.5rem 1rem}.err{color:#a00}.ok{color:#060}
"""


def _page(title: str, body: str, status: int) -> HTMLResponse:
    document = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(document, status_code=status, headers=_PAGE_HEADERS)


def _device_form(user_code: str, *, error: str = "", status: int = 200) -> HTMLResponse:
    notice = f"<p class=err role=alert>{html.escape(error)}</p>" if error else ""
    body = (
        f"{notice}<p>Enter the code shown on your device, then sign in to approve it.</p>"
        '<form method=post action="device">'
        "<label>Code <input name=user_code autocomplete=off required "
        f'value="{html.escape(user_code, quote=True)}"></label>'
        "<label>Username <input name=username autocomplete=username required></label>"
        "<label>Password <input name=password type=password "
        "autocomplete=current-password required></label>"
        "<label>One-time code (if you use an authenticator app) <input name=otp "
        "inputmode=numeric autocomplete=one-time-code></label>"
        "<button name=action value=approve>Approve</button> "
        "<button name=action value=deny>Deny</button>"
        "</form>"
    )
    return _page("Sign in a device", body, status)
