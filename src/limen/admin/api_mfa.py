"""Admin API: users' second factors (reset, require registration) and devices (list, show,
mark compliant or not, disable, enable).

Cutting a user or a device off follows the admin API's rule (see :mod:`limen.admin.api`):
commit, then publish ``SUBJECT_REVOKED`` so every edge closes the live flows. An MFA reset
revokes the user like a password change does (``revoked_before``, sessions, refresh
families). A device marked non-compliant or disabled publishes ``SUBJECT_REVOKED`` with the
owner's ``user_id`` and the ``device_id``, without revoking the user's other devices; device
changes bump the config version, because the edge reads device state from its snapshot, and a
disabled device can no longer refresh or sign in (the token endpoint refuses it).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from limen.admin._common import Deps, Json, get_or_404, revoke_user
from limen.bus.inprocess import SUBJECT_REVOKED
from limen.errors import ConfigError
from limen.identity.mfa import MfaService, clear_factors, has_totp
from limen.ids import kind_of
from limen.service import ServiceContext
from limen.store.models import Device, User


class MfaRequire(BaseModel):
    """Body of ``POST /users/{id}/mfa/require``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    required: bool


class DeviceCompliance(BaseModel):
    """Body of ``POST /devices/{id}/compliance``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    compliant: bool


def device_json(d: Device) -> dict[str, Any]:
    """A device as the admin API shows it."""
    return {
        "id": d.id,
        "user_id": d.user_id,
        "hostname": d.hostname,
        "os": d.os,
        "os_version": d.os_version,
        "client_version": d.client_version,
        "compliant": d.compliant,
        "enabled": d.enabled,
        "created_at": d.created_at,
        "last_seen_at": d.last_seen_at,
    }


def mfa_json(u: User, recovery_codes_left: int) -> dict[str, Any]:
    """A user's second-factor state (never the secret)."""
    return {
        "user_id": u.id,
        "mfa_required": u.mfa_required,
        "mfa_registered": has_totp(u),
        "enrolment_pending": bool(u.totp_secret) and not u.totp_confirmed,
        "recovery_codes_left": recovery_codes_left,
    }


def add_mfa_routes(router: APIRouter, ctx: ServiceContext) -> None:
    """Add these endpoints to ``router`` (bound to ``ctx``)."""
    deps = Deps(ctx)
    reader, admin = deps.reader, deps.admin
    mfa = MfaService(ctx.store)

    # --- second factors ---------------------------------------------------------------------

    @router.get("/users/{user_id}/mfa")
    def get_mfa(user_id: str, _: str = reader) -> Json:
        with ctx.store.session() as s:
            user = get_or_404(s, User, user_id, "user")
        return mfa_json(user, mfa.recovery_codes_left(user_id))

    @router.post("/users/{user_id}/mfa/reset")
    def reset_mfa(user_id: str, actor: str = admin) -> Json:
        """Forget the user's TOTP and recovery codes; they must register again. Revokes the
        user's sessions: a reset usually means the factor was lost or stolen."""
        now = time.time()
        with ctx.store.session() as s:
            user = get_or_404(s, User, user_id, "user")
            clear_factors(s, user)
            revoke_user(s, user, now)
            out = mfa_json(user, 0)
        deps.revoked(user_id, "mfa_reset", now)
        ctx.audit(actor, "user.mfa_reset", user_id)
        return out

    @router.post("/users/{user_id}/mfa/require")
    def require_mfa(user_id: str, body: MfaRequire, actor: str = admin) -> Json:
        """Require (or stop requiring) MFA registration: sign-ins of a user who has not
        registered get ``mfa_registration_required`` in the token response."""
        with ctx.store.session() as s:
            user = get_or_404(s, User, user_id, "user")
            user.mfa_required = body.required
            user.updated_at = time.time()
        out = mfa_json(user, mfa.recovery_codes_left(user_id))
        ctx.audit(actor, "user.mfa_require", user_id, {"required": body.required})
        return out

    # --- devices ----------------------------------------------------------------------------

    @router.get("/devices")
    def list_devices(user: str | None = None, _: str = reader) -> list[Json]:
        """Every device, or those of ``user`` (a user id or username)."""
        with ctx.store.session() as s:
            q = select(Device).order_by(Device.created_at, Device.id)
            if user:
                user_id = user if kind_of(user) == "user" else None
                if user_id is None:
                    user_id = s.scalar(select(User.id).where(User.username == user))
                    if user_id is None:
                        raise ConfigError(f"user: unknown user {user!r}", code="unknown_principal")
                q = q.where(Device.user_id == user_id)
            return [device_json(d) for d in s.scalars(q)]

    @router.get("/devices/{device_id}")
    def get_device(device_id: str, _: str = reader) -> Json:
        with ctx.store.session() as s:
            return device_json(get_or_404(s, Device, device_id, "device"))

    def _update_device(
        device_id: str, actor: str, action: str, *, compliant: bool | None, enabled: bool | None
    ) -> Json:
        now = time.time()
        with ctx.store.session() as s:
            device = get_or_404(s, Device, device_id, "device")
            if compliant is not None:
                device.compliant = compliant
            if enabled is not None:
                device.enabled = enabled
            ctx.store.bump_config_version(s)
            out = device_json(device)
            owner = device.user_id
        if owner and (compliant is False or enabled is False):
            reason = "device_disabled" if enabled is False else "device_noncompliant"
            ctx.bus.publish(
                SUBJECT_REVOKED, user_id=owner, device_id=device_id, reason=reason, at=now
            )
        details: Json = {"user_id": owner}
        if compliant is not None:
            details["compliant"] = compliant
        deps.changed(actor, action, device_id, details)
        return out

    @router.post("/devices/{device_id}/compliance")
    def set_compliance(device_id: str, body: DeviceCompliance, actor: str = admin) -> Json:
        return _update_device(
            device_id, actor, "device.compliance", compliant=body.compliant, enabled=None
        )

    @router.post("/devices/{device_id}/disable")
    def disable_device(device_id: str, actor: str = admin) -> Json:
        return _update_device(device_id, actor, "device.disable", compliant=None, enabled=False)

    @router.post("/devices/{device_id}/enable")
    def enable_device(device_id: str, actor: str = admin) -> Json:
        return _update_device(device_id, actor, "device.enable", compliant=None, enabled=True)
