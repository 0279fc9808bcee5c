"""The admin REST API (``/api/v1``): users, groups, connector groups, connectors and their
enrollment, applications with segments and assignments, the traffic log and the audit log.

Rules every endpoint keeps:

* Sync ``def`` endpoints: each is a short unit of work on the store; FastAPI runs them in its
  thread pool.
* Every mutation writes an audit record (no secrets in it). Configuration changes bump the
  config version inside the same unit of work, then call ``ctx.config_changed`` after the
  commit so edges in this process recompile at once (others see the version bump).
* Actions that must cut a user off (disable, delete, password change) set
  ``user.revoked_before``, revoke their sessions and refresh-token families, and publish
  ``SUBJECT_REVOKED`` on the bus after the commit: edges close the user's live flows.
* Errors are :class:`~limen.errors.LimenError` rendered as ``{"error": code, "message": ...}``
  by :func:`install_error_handlers`.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from limen.admin._common import ensure_default_connector_group
from limen.admin.api_apps import add_app_routes
from limen.admin.api_identity import add_identity_routes
from limen.admin.api_logs import add_log_routes
from limen.admin.api_mfa import add_mfa_routes
from limen.admin.api_policies import add_policy_routes
from limen.admin.api_profiles import add_profile_routes
from limen.admin.api_signals import add_signal_routes
from limen.errors import LimenError
from limen.service import ServiceContext


def build_router(ctx: ServiceContext) -> APIRouter:
    """Every admin endpoint under ``/api/v1``, bound to ``ctx``."""
    router = APIRouter(prefix="/api/v1")
    add_identity_routes(router, ctx)
    add_app_routes(router, ctx)
    add_log_routes(router, ctx)
    add_mfa_routes(router, ctx)
    add_policy_routes(router, ctx)
    add_profile_routes(router, ctx)
    add_signal_routes(router, ctx)
    return router


# --- error handling ---------------------------------------------------------------------------


def install_error_handlers(app: FastAPI) -> None:
    """Render Limen errors, validation errors and HTTP errors as ``{"error", "message"}``."""

    async def limen_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LimenError)  # registered for LimenError only
        headers = {"WWW-Authenticate": "Bearer"} if exc.code == "invalid_token" else None
        return JSONResponse(
            {"error": exc.code, "message": exc.message},
            status_code=exc.http_status,
            headers=headers,
        )

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse(
            {"error": "invalid_request", "message": describe_validation(exc)}, status_code=400
        )

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        return JSONResponse(
            {"error": codes.get(exc.status_code, "http_error"), "message": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    app.add_exception_handler(LimenError, limen_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def describe_validation(exc: RequestValidationError) -> str:
    """``"ttl_seconds: Input should be greater than or equal to 60"``: the field first."""
    parts = []
    for err in exc.errors()[:3]:
        loc = [str(x) for x in err.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:] or [loc[0]]
        if err.get("type") == "json_invalid":
            parts.append("body: not valid JSON")
            continue
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


__all__ = [
    "build_router",
    "describe_validation",
    "ensure_default_connector_group",
    "install_error_handlers",
]
