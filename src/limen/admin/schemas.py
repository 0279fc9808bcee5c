"""Request bodies of the admin REST API, and how store rows are shown in responses.

Bodies refuse unknown fields (``extra="forbid"``): a typo such as ``"pasword"`` is an error
naming the field, not a silently ignored key. Responses never carry secrets: no password
hashes, TOTP secrets, token hashes or plaintext tokens except the one response that creates a
token.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from limen.store.models import (
    AdminToken,
    Application,
    Assignment,
    AuditRecord,
    Connector,
    ConnectorGroup,
    Group,
    Segment,
    TrafficRecord,
    User,
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class UserCreate(_Body):
    username: str = Field(min_length=1, max_length=255)
    password: str | None = Field(default=None, max_length=1024)
    display_name: str = Field(default="", max_length=255)
    email: str = Field(default="", max_length=320)


class PasswordSet(_Body):
    password: str = Field(min_length=1, max_length=1024)


class GroupCreate(_Body):
    name: str = Field(min_length=1, max_length=255)
    description: str = Field(default="", max_length=4096)


class MemberAdd(_Body):
    member_id: str = Field(min_length=1, max_length=255)


class ConnectorGroupCreate(_Body):
    name: str = Field(min_length=1, max_length=255)
    region: str = Field(default="", max_length=64)


class ConnectorMove(_Body):
    group_id: str = Field(min_length=1, max_length=255)


class EnrollmentTokenCreate(_Body):
    #: One minute to thirty days: long enough to install a connector, short enough that a
    #: leaked token is soon useless.
    ttl_seconds: int = Field(default=3600, ge=60, le=30 * 24 * 3600)
    name: str = Field(default="", max_length=255)


class EnrollRequest(_Body):
    token: str = Field(min_length=1, max_length=256)
    csr_pem: str = Field(min_length=1, max_length=16384)
    name: str = Field(default="", max_length=255)
    version: str = Field(default="", max_length=64)


class AppCreate(_Body):
    name: str = Field(min_length=1, max_length=255)
    connector_group_id: str | None = Field(default=None, max_length=255)
    kind: Literal["enterprise", "quick_access"] = "enterprise"
    dns_suffixes: list[str] = Field(default_factory=list, max_length=64)


class SegmentCreate(_Body):
    type: str = Field(min_length=1, max_length=16)
    destination: str = Field(min_length=1, max_length=255)
    #: ``"22"``, ``"80,443"``, ``"8000-8100"``; a bare number is accepted too.
    ports: str | int
    protocol: str = Field(default="tcp", max_length=16)


class AssignmentCreate(_Body):
    principal_id: str = Field(min_length=1, max_length=255)


class AdminTokenCreate(_Body):
    name: str = Field(min_length=1, max_length=255)
    role: Literal["admin", "operator", "reader"] = "reader"


# --- rows as JSON -----------------------------------------------------------------------------


def user_json(u: User) -> dict[str, Any]:
    return {
        "id": u.id,
        "username": u.username,
        "display_name": u.display_name,
        "email": u.email,
        "enabled": u.enabled,
        "has_password": bool(u.password_hash),
        "risk_level": u.risk_level,
        "mfa_required": u.mfa_required,
        "mfa_registered": u.totp_confirmed,
        "revoked_before": u.revoked_before,
        "created_at": u.created_at,
        "updated_at": u.updated_at,
    }


def group_json(g: Group, members: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": g.id,
        "name": g.name,
        "description": g.description,
        "created_at": g.created_at,
    }
    if members is not None:
        out["members"] = members
    return out


def connector_group_json(g: ConnectorGroup) -> dict[str, Any]:
    return {
        "id": g.id,
        "name": g.name,
        "region": g.region,
        "is_default": g.is_default,
        "created_at": g.created_at,
    }


def connector_json(c: Connector) -> dict[str, Any]:
    return {
        "id": c.id,
        "name": c.name,
        "group_id": c.group_id,
        "state": c.state,
        "version": c.version,
        "address": c.address,
        "cert_serial": c.cert_serial,
        "cert_not_after": c.cert_not_after,
        "last_seen_at": c.last_seen_at,
        "created_at": c.created_at,
    }


def segment_json(s: Segment) -> dict[str, Any]:
    return {
        "id": s.id,
        "app_id": s.app_id,
        "type": s.dest_type,
        "destination": s.destination,
        "ports": s.ports,
        "protocol": s.protocol,
        "created_at": s.created_at,
    }


def assignment_json(a: Assignment) -> dict[str, Any]:
    return {"id": a.id, "principal_id": a.principal_id, "created_at": a.created_at}


def app_json(a: Application) -> dict[str, Any]:
    return {
        "id": a.id,
        "name": a.name,
        "kind": a.kind,
        "connector_group_id": a.connector_group_id,
        "enabled": a.enabled,
        "dns_suffixes": list(a.dns_suffixes or []),
        "created_at": a.created_at,
    }


_TRAFFIC_FIELDS = [c.key for c in TrafficRecord.__table__.columns]


def traffic_json(r: TrafficRecord) -> dict[str, Any]:
    return {name: getattr(r, name) for name in _TRAFFIC_FIELDS}


def audit_json(r: AuditRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "at": r.at,
        "actor": r.actor,
        "action": r.action,
        "target": r.target,
        "details": r.details,
    }


def admin_token_json(t: AdminToken) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "role": t.role,
        "revoked": t.revoked,
        "created_at": t.created_at,
    }
