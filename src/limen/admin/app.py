"""The HTTPS application: identity (OIDC), the admin REST API, metrics, health."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from limen import __version__
from limen.admin.api import build_router as admin_router
from limen.admin.api import install_error_handlers
from limen.identity.api import build_router as identity_router
from limen.metrics import REGISTRY
from limen.policy.sign_in import SignInPolicy
from limen.service import ServiceContext
from limen.signals.actions import EnforcementRecorder
from limen.signals.receiver import build_push_router


def create_app(ctx: ServiceContext) -> FastAPI:
    app = FastAPI(
        title="Limen",
        version=__version__,
        description="Zero Trust private access: identity, admin API, metrics.",
    )
    install_error_handlers(app)
    # Sign-in policies (target sign_in) judge every token request before a token is issued.
    app.include_router(identity_router(ctx, sign_in_check=SignInPolicy(ctx.store, audit=ctx.audit)))
    app.include_router(admin_router(ctx))
    # Shared Signals push (RFC 8935), and the audit of signals and of what the edges cut.
    app.include_router(build_push_router(ctx))
    EnforcementRecorder.install(ctx)

    @app.get("/.well-known/limen-client", tags=["client"])
    def client_config() -> dict[str, Any]:
        """What a client or connector needs to find the edge (no secrets)."""
        return {
            "edge": f"{ctx.settings.public_host}:{ctx.settings.edge_port}",
            "issuer": ctx.settings.resolved_issuer,
            "client_id": "limen-client",
            "version": __version__,
        }

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        ctx.store.config_version()  # proves the store answers
        return {"status": "ok"}

    return app
