"""Forwarding profiles: the per-user private-access profile the client fetches, and the admin
settings of the profile.

* ``GET /api/v1/me/forwarding-profile[?known_version=N]`` — authenticated by the **user's**
  access token (``Authorization: Bearer``, audience ``urn:limen:edge``, the token the client
  already holds for flows). Computes the private-access profile from the applications the user
  is assigned to (directly or through nested groups): one ``tunnel`` rule per segment of an
  enabled application, plus the admin's ``bypass`` destinations, each with a priority (bypass
  first, then most specific first: :func:`limen.client.forwarding.assign_priorities`), its
  protocol, ports and hardening. ``version`` is the configuration version; when the caller's
  ``known_version`` equals it the answer is ``304 Not Modified`` with no body, so a client
  polling every 2 s costs one token check and one integer read.
* ``GET /api/v1/forwarding-profiles``, ``GET|PUT /api/v1/forwarding-profiles/private-access``
  — the admin settings: ``enabled``, ``allow_pause``, ``hardening`` (``block`` | ``pass``) and
  ``bypass`` destinations. A change bumps the configuration version, so every client sees it
  at its next poll.
* ``GET /api/v1/users/{user}/forwarding-profile`` — what a user's client would receive
  (for support; reader role).

Why polling and not a push: the edge has no client control stream yet (protocol.md §2); the
``profile_update`` control message is defined for when it has. A 2 s poll with a version check
gives "within seconds" with no new connection state on the edge.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Header, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from limen.admin._common import Deps, Json, resolve_principal
from limen.client.forwarding import (
    PRIVATE_ACCESS,
    Action,
    ForwardingRule,
    assign_priorities,
    build_profile,
)
from limen.edge.snapshot import expand_groups
from limen.errors import AuthError, ConfigError, NotFound
from limen.identity.tokens import EDGE_AUDIENCE, AccessClaims, KeySet, TokenVerifier
from limen.policy.segments import validate_segment
from limen.service import ServiceContext
from limen.store.models import (
    Application,
    Assignment,
    ConfigVersion,
    ForwardingProfileSetting,
    GroupMember,
    Segment,
    SignInSession,
    User,
)

#: Bypass destinations per profile: each is a rule every client evaluates per new flow.
MAX_BYPASS = 1000


class BypassEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    type: str = Field(min_length=1, max_length=16)
    destination: str = Field(min_length=1, max_length=255)
    ports: str = Field(default="1-65535", min_length=1, max_length=512)
    protocol: str = Field(default="tcp,udp", max_length=16)


class ProfileSettingsUpdate(BaseModel):
    """Members left out keep their value."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    enabled: bool | None = None
    allow_pause: bool | None = None
    hardening: Literal["block", "pass"] | None = None
    bypass: list[BypassEntry] | None = Field(default=None, max_length=MAX_BYPASS)


def settings_json(row: ForwardingProfileSetting) -> Json:
    return {
        "name": row.name,
        "enabled": row.enabled,
        "allow_pause": row.allow_pause,
        "hardening": row.hardening,
        "bypass": list(row.bypass or []),
        "updated_at": row.updated_at,
    }


def profile_settings(s: Session, name: str = PRIVATE_ACCESS) -> ForwardingProfileSetting:
    """The settings row, created with the defaults (on, pausable, block) on first use."""
    row = s.get(ForwardingProfileSetting, name)
    if row is None:
        row = ForwardingProfileSetting(
            name=name, enabled=True, allow_pause=True, hardening="block", bypass=[], updated_at=0.0
        )
        s.add(row)
        s.flush()
    return row


def _config_version(s: Session) -> int:
    return int(s.scalar(select(ConfigVersion.version).where(ConfigVersion.id == 1)) or 0)


def compute_profile(s: Session, user: User) -> Json:
    """The private-access profile of ``user`` as JSON (see the module docstring).

    The version is read before the rules: the rules are then at least as new as the version
    they are served with, so a client never keeps stale rules under a current version."""
    version = _config_version(s)
    settings = profile_settings(s)
    members = [(m.group_id, m.member_id) for m in s.scalars(select(GroupMember))]
    principals = {user.id} | {g for g, users in expand_groups(members).items() if user.id in users}
    app_ids = set(
        s.scalars(select(Assignment.app_id).where(Assignment.principal_id.in_(sorted(principals))))
    )
    apps = {
        a.id: a
        for a in s.scalars(select(Application).where(Application.id.in_(sorted(app_ids))))
        if a.enabled
    }
    items: list[tuple[dict[str, Any], Action]] = []
    for seg in s.scalars(
        select(Segment).where(Segment.app_id.in_(sorted(apps))).order_by(Segment.id)
    ):
        app = apps[seg.app_id]
        items.append(
            (
                {
                    "id": seg.id,
                    "dest_type": seg.dest_type,
                    "destination": seg.destination,
                    "ports": seg.ports,
                    "protocol": seg.protocol,
                    "app_id": app.id,
                    "app_name": app.name,
                },
                Action.TUNNEL,
            )
        )
    for n, entry in enumerate(settings.bypass or []):
        items.append(
            (
                {
                    "id": f"bypass-{n + 1}",
                    "dest_type": entry.get("type", ""),
                    "destination": entry.get("destination", ""),
                    "ports": entry.get("ports", "1-65535"),
                    "protocol": entry.get("protocol", "tcp,udp"),
                },
                Action.BYPASS,
            )
        )
    parsed: list[tuple[dict[str, Any], Action, Any]] = []
    for item, action in items:
        try:
            dest = validate_segment(
                item["dest_type"], item["destination"], item["ports"], item["protocol"]
            )
        except ConfigError:
            continue  # stored before a validation rule existed; the edge skips it too
        parsed.append((item, action, dest))
    priorities = assign_priorities((dest, action) for _, action, dest in parsed)
    rules = [
        ForwardingRule(
            priority=priority,
            action=action,
            hardening=settings.hardening,
            **item,
        )
        for (item, action, _), priority in zip(parsed, priorities, strict=True)
    ]
    suffixes = sorted({x for a in apps.values() for x in (a.dns_suffixes or [])})
    profile = build_profile(
        rules if settings.enabled else [],
        name=PRIVATE_ACCESS,
        version=version,
        enabled=settings.enabled,
        allow_pause=settings.allow_pause,
        hardening=settings.hardening,
        dns_suffixes=tuple(suffixes) if settings.enabled else (),
    )
    out = profile.to_json()
    out["user_id"] = user.id
    out["username"] = user.username
    return out


def add_profile_routes(router: APIRouter, ctx: ServiceContext) -> None:
    """Add these endpoints to ``router`` (bound to ``ctx``)."""
    deps = Deps(ctx)
    reader, operator, changed = deps.reader, deps.operator, deps.changed
    verifiers: list[TokenVerifier] = []

    def verify(token: str, now: float) -> AccessClaims:
        # One verifier (its cache saves a signature check per poll); keys are reloaded when a
        # token names a key we do not know yet (rotation).
        if not verifiers:
            verifiers.append(
                TokenVerifier(
                    KeySet.load(ctx.store),
                    issuer=ctx.settings.resolved_issuer,
                    audience=EDGE_AUDIENCE,
                )
            )
        try:
            return verifiers[0].verify(token, now)
        except AuthError as exc:
            if "unknown key" not in exc.message:
                raise
            verifiers[0].replace_keys(KeySet.load(ctx.store))
            return verifiers[0].verify(token, now)

    def bearer_user(s: Session, authorization: str | None, now: float) -> User:
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise AuthError("an access token is required (Authorization: Bearer ...)")
        claims = verify(credentials.strip(), now)
        user = s.get(User, claims.sub)
        if user is None or not user.enabled:
            raise AuthError("the token's user is unknown or disabled", code="user_disabled")
        if claims.auth_time < user.revoked_before:
            raise AuthError("the token has been revoked; sign in again", code="session_revoked")
        signed_in = s.get(SignInSession, claims.sid) if claims.sid else None
        if signed_in is None or signed_in.revoked_at is not None:
            raise AuthError("the token's session has been revoked", code="session_revoked")
        return user

    @router.get("/me/forwarding-profile", tags=["client"], response_model=None)
    def my_profile(
        response: Response,
        known_version: int | None = None,
        authorization: str | None = Header(default=None),
    ) -> Json | Response:
        """The caller's private-access forwarding profile (304 when ``known_version`` is
        current)."""
        with ctx.store.session() as s:
            user = bearer_user(s, authorization, time.time())
            version = _config_version(s)
            etag = f'"v{version}"'
            if known_version is not None and known_version == version:
                return Response(status_code=304, headers={"ETag": etag})
            out = compute_profile(s, user)
        response.headers["ETag"] = f'"v{out["version"]}"'
        response.headers["Cache-Control"] = "no-store"
        return out

    @router.get("/forwarding-profiles")
    def list_profiles(_: str = reader) -> list[Json]:
        with ctx.store.session() as s:
            return [settings_json(profile_settings(s))]

    @router.get("/forwarding-profiles/{name}")
    def get_profile_settings(name: str, _: str = reader) -> Json:
        if name != PRIVATE_ACCESS:
            raise NotFound(f"no forwarding profile {name!r} (only {PRIVATE_ACCESS!r} exists)")
        with ctx.store.session() as s:
            return settings_json(profile_settings(s))

    @router.put("/forwarding-profiles/{name}")
    def set_profile_settings(name: str, body: ProfileSettingsUpdate, actor: str = operator) -> Json:
        if name != PRIVATE_ACCESS:
            raise NotFound(f"no forwarding profile {name!r} (only {PRIVATE_ACCESS!r} exists)")
        bypass: list[dict[str, Any]] | None = None
        if body.bypass is not None:
            bypass = []
            for n, entry in enumerate(body.bypass):
                try:
                    dest = validate_segment(
                        entry.type, entry.destination, entry.ports, entry.protocol
                    )
                except ConfigError as exc:
                    raise ConfigError(f"bypass[{n}]: {exc.message}") from None
                bypass.append(
                    {
                        "type": dest.dest_type,
                        "destination": dest.destination,
                        "ports": dest.ports,
                        "protocol": dest.protocol,
                    }
                )
        with ctx.store.session() as s:
            row = profile_settings(s, name)
            if body.enabled is not None:
                row.enabled = body.enabled
            if body.allow_pause is not None:
                row.allow_pause = body.allow_pause
            if body.hardening is not None:
                row.hardening = body.hardening
            if bypass is not None:
                row.bypass = bypass
            row.updated_at = time.time()
            ctx.store.bump_config_version(s)
            out = settings_json(row)
        details = {k: v for k, v in out.items() if k != "updated_at"}
        changed(actor, "forwarding_profile.update", name, details)
        return out

    @router.get("/users/{user_ref}/forwarding-profile")
    def user_profile(user_ref: str, _: str = reader) -> Json:
        """What ``user_ref``'s client receives (support view)."""
        with ctx.store.session() as s:
            try:
                principal = resolve_principal(s, user_ref)
            except ConfigError:
                raise NotFound(f"no user {user_ref!r}") from None
            if not isinstance(principal, User):
                raise NotFound(f"{user_ref!r} is a group, not a user")
            return compute_profile(s, principal)


__all__ = ["add_profile_routes", "compute_profile", "profile_settings"]
