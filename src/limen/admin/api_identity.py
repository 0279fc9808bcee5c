"""Admin API: users, groups and admin API tokens."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response
from sqlalchemy import delete, select

from limen.admin import schemas as sc
from limen.admin._common import (
    Deps,
    Json,
    forget_principal,
    get_or_404,
    group_descendants,
    resolve_principal,
    revoke_user,
    unique,
)
from limen.errors import ConfigError, Conflict, NotFound
from limen.ids import new_id
from limen.service import ServiceContext
from limen.store.db import token_hash
from limen.store.models import (
    AdminToken,
    Group,
    GroupMember,
    User,
)


def add_identity_routes(router: APIRouter, ctx: ServiceContext) -> None:
    """Add these endpoints to ``router`` (bound to ``ctx``)."""
    deps = Deps(ctx)
    reader, admin = deps.reader, deps.admin
    changed, revoked = deps.changed, deps.revoked

    # --- users ----------------------------------------------------------------------------

    @router.post("/users", status_code=201)
    def create_user(body: sc.UserCreate, actor: str = admin) -> Json:
        if any(ch.isspace() for ch in body.username):
            raise ConfigError("username: must not contain whitespace")
        password_hash = ""
        if body.password:
            from limen.identity.passwords import hash_password

            password_hash = hash_password(body.password)
        now = time.time()
        with ctx.store.session() as s:
            unique(s, User, User.username, body.username, "user")
            user = User(
                id=new_id("user"),
                username=body.username,
                display_name=body.display_name,
                email=body.email,
                password_hash=password_hash,
                enabled=True,
                risk_level="low",
                mfa_required=False,
                totp_confirmed=False,
                revoked_before=0.0,
                created_at=now,
                updated_at=now,
            )
            s.add(user)
            ctx.store.bump_config_version(s)
            out = sc.user_json(user)
        changed(actor, "user.create", user.id, {"username": user.username})
        return out

    @router.get("/users")
    def list_users(_: str = reader) -> list[Json]:
        with ctx.store.session() as s:
            return [sc.user_json(u) for u in s.scalars(select(User).order_by(User.username))]

    @router.get("/users/{user_id}")
    def get_user(user_id: str, _: str = reader) -> Json:
        with ctx.store.session() as s:
            user = get_or_404(s, User, user_id, "user")
            out = sc.user_json(user)
            out["groups"] = list(
                s.scalars(select(GroupMember.group_id).where(GroupMember.member_id == user_id))
            )
            return out

    @router.delete("/users/{user_id}", status_code=204)
    def delete_user(user_id: str, actor: str = admin) -> Response:
        now = time.time()
        with ctx.store.session() as s:
            user = get_or_404(s, User, user_id, "user")
            revoke_user(s, user, now)
            forget_principal(s, user_id)
            username = user.username
            s.delete(user)
            ctx.store.bump_config_version(s)
        revoked(user_id, "user_deleted", now)
        changed(actor, "user.delete", user_id, {"username": username})
        return Response(status_code=204)

    def _set_enabled(user_id: str, enabled: bool, actor: str) -> Json:
        now = time.time()
        with ctx.store.session() as s:
            user = get_or_404(s, User, user_id, "user")
            user.enabled = enabled
            user.updated_at = now
            if not enabled:
                revoke_user(s, user, now)
            ctx.store.bump_config_version(s)
            out = sc.user_json(user)
        if not enabled:
            revoked(user_id, "user_disabled", now)
        changed(actor, "user.enable" if enabled else "user.disable", user_id)
        return out

    @router.post("/users/{user_id}/disable")
    def disable_user(user_id: str, actor: str = admin) -> Json:
        return _set_enabled(user_id, False, actor)

    @router.post("/users/{user_id}/enable")
    def enable_user(user_id: str, actor: str = admin) -> Json:
        return _set_enabled(user_id, True, actor)

    @router.put("/users/{user_id}/password")
    def set_password(user_id: str, body: sc.PasswordSet, actor: str = admin) -> Json:
        from limen.identity.passwords import hash_password

        password_hash = hash_password(body.password)
        now = time.time()
        with ctx.store.session() as s:
            user = get_or_404(s, User, user_id, "user")
            user.password_hash = password_hash
            revoke_user(s, user, now)
            out = sc.user_json(user)
        revoked(user_id, "password_changed", now)
        ctx.audit(actor, "user.set_password", user_id)
        return out

    # --- groups ---------------------------------------------------------------------------

    @router.post("/groups", status_code=201)
    def create_group(body: sc.GroupCreate, actor: str = admin) -> Json:
        with ctx.store.session() as s:
            unique(s, Group, Group.name, body.name, "group")
            group = Group(
                id=new_id("group"),
                name=body.name,
                description=body.description,
                created_at=time.time(),
            )
            s.add(group)
            ctx.store.bump_config_version(s)
            out = sc.group_json(group, [])
        changed(actor, "group.create", group.id, {"name": group.name})
        return out

    @router.get("/groups")
    def list_groups(_: str = reader) -> list[Json]:
        with ctx.store.session() as s:
            members: dict[str, list[str]] = {}
            for gid, mid in s.execute(select(GroupMember.group_id, GroupMember.member_id)):
                members.setdefault(gid, []).append(mid)
            return [
                sc.group_json(g, members.get(g.id, []))
                for g in s.scalars(select(Group).order_by(Group.name))
            ]

    @router.get("/groups/{group_id}")
    def get_group(group_id: str, _: str = reader) -> Json:
        with ctx.store.session() as s:
            group = get_or_404(s, Group, group_id, "group")
            members = list(
                s.scalars(select(GroupMember.member_id).where(GroupMember.group_id == group_id))
            )
            return sc.group_json(group, members)

    @router.delete("/groups/{group_id}", status_code=204)
    def delete_group(group_id: str, actor: str = admin) -> Response:
        with ctx.store.session() as s:
            group = get_or_404(s, Group, group_id, "group")
            name = group.name
            s.execute(delete(GroupMember).where(GroupMember.group_id == group_id))
            forget_principal(s, group_id)
            s.delete(group)
            ctx.store.bump_config_version(s)
        changed(actor, "group.delete", group_id, {"name": name})
        return Response(status_code=204)

    @router.post("/groups/{group_id}/members", status_code=201)
    def add_member(group_id: str, body: sc.MemberAdd, actor: str = admin) -> Json:
        with ctx.store.session() as s:
            group = get_or_404(s, Group, group_id, "group")
            member = resolve_principal(s, body.member_id)
            if isinstance(member, Group) and group.id in group_descendants(s, member.id):
                raise Conflict(
                    f"adding group {member.name!r} to {group.name!r} would make a cycle",
                    code="group_cycle",
                )
            exists = s.scalar(
                select(GroupMember).where(
                    GroupMember.group_id == group.id, GroupMember.member_id == member.id
                )
            )
            if exists is not None:
                raise Conflict(
                    f"{member.id} is already a member of {group.name!r}", code="already_member"
                )
            s.add(GroupMember(group_id=group.id, member_id=member.id))
            ctx.store.bump_config_version(s)
            members = list(
                s.scalars(select(GroupMember.member_id).where(GroupMember.group_id == group.id))
            )
            out = sc.group_json(group, members)
        changed(actor, "group.add_member", group_id, {"member_id": member.id})
        return out

    @router.delete("/groups/{group_id}/members/{member_id}", status_code=204)
    def remove_member(group_id: str, member_id: str, actor: str = admin) -> Response:
        with ctx.store.session() as s:
            get_or_404(s, Group, group_id, "group")
            result = s.execute(
                delete(GroupMember).where(
                    GroupMember.group_id == group_id, GroupMember.member_id == member_id
                )
            )
            if not getattr(result, "rowcount", 0):
                raise NotFound(f"{member_id!r} is not a member of {group_id}")
            ctx.store.bump_config_version(s)
        changed(actor, "group.remove_member", group_id, {"member_id": member_id})
        return Response(status_code=204)

    # --- admin tokens ---------------------------------------------------------------------

    @router.post("/admin-tokens", status_code=201)
    def create_token(body: sc.AdminTokenCreate, actor: str = admin) -> Json:
        from limen.admin.auth import create_admin_token

        token = create_admin_token(ctx.store, body.name, body.role)
        with ctx.store.session() as s:
            row = s.scalar(select(AdminToken).where(AdminToken.token_hash == token_hash(token)))
            assert row is not None  # just created
            out = sc.admin_token_json(row)
        ctx.audit(actor, "admin_token.create", out["id"], {"name": body.name, "role": body.role})
        return {**out, "token": token}

    @router.get("/admin-tokens")
    def list_tokens(_: str = admin) -> list[Json]:
        with ctx.store.session() as s:
            return [
                sc.admin_token_json(t)
                for t in s.scalars(select(AdminToken).order_by(AdminToken.created_at))
            ]

    @router.delete("/admin-tokens/{token_id}", status_code=204)
    def revoke_token(token_id: str, actor: str = admin) -> Response:
        with ctx.store.session() as s:
            get_or_404(s, AdminToken, token_id, "admin token").revoked = True
        ctx.audit(actor, "admin_token.revoke", token_id)
        return Response(status_code=204)
