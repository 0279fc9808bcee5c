"""The relational model. Times are UNIX epoch seconds (float) in columns ending ``_at``.

One schema for SQLite and PostgreSQL; Alembic migrations in ``migrations/`` create it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


# --- identity -----------------------------------------------------------------------------


class User(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    username: Mapped[str] = mapped_column(String(255), unique=True)
    display_name: Mapped[str] = mapped_column(String(255), default="")
    email: Mapped[str] = mapped_column(String(320), default="")
    password_hash: Mapped[str] = mapped_column(Text, default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    #: low | medium | high
    risk_level: Mapped[str] = mapped_column(String(16), default="low")
    mfa_required: Mapped[bool] = mapped_column(Boolean, default=False)
    totp_secret: Mapped[str | None] = mapped_column(String(64), nullable=True)
    totp_confirmed: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Tokens and sessions authenticated before this instant are no longer accepted (CAE).
    revoked_before: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Group(Base):
    __tablename__ = "groups"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)


class GroupMember(Base):
    """A user or a group (nested) inside a group."""

    __tablename__ = "group_members"
    __table_args__ = (UniqueConstraint("group_id", "member_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"), index=True)
    #: ``usr_...`` or ``grp_...``
    member_id: Mapped[str] = mapped_column(String(40), index=True)


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(40), index=True, nullable=True)
    hostname: Mapped[str] = mapped_column(String(255), default="")
    os: Mapped[str] = mapped_column(String(64), default="")
    os_version: Mapped[str] = mapped_column(String(64), default="")
    client_version: Mapped[str] = mapped_column(String(64), default="")
    compliant: Mapped[bool] = mapped_column(Boolean, default=False)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Float)
    last_seen_at: Mapped[float] = mapped_column(Float, default=0.0)


class SignInSession(Base):
    """A sign-in (``sid`` in tokens); refresh-token families hang off it."""

    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(40), index=True)
    device_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    client_id: Mapped[str] = mapped_column(String(128), default="")
    auth_time: Mapped[float] = mapped_column(Float)
    amr: Mapped[list[str]] = mapped_column(JSON, default=list)
    ip_address: Mapped[str] = mapped_column(String(64), default="")
    capabilities: Mapped[list[str]] = mapped_column(JSON, default=list)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class RefreshToken(Base):
    """One refresh token; tokens of a family rotate, and reuse of a used one revokes the
    family (RFC 9700 §4.14). Only a hash of the token is stored."""

    __tablename__ = "refresh_tokens"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    family_id: Mapped[str] = mapped_column(String(40), index=True)
    session_id: Mapped[str] = mapped_column(String(40), index=True)
    user_id: Mapped[str] = mapped_column(String(40), index=True)
    issued_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    family_revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class DeviceCode(Base):
    """A pending device authorization (RFC 8628). Only a hash of the device code is kept."""

    __tablename__ = "device_codes"
    device_code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_code: Mapped[str] = mapped_column(String(16), unique=True)
    client_id: Mapped[str] = mapped_column(String(128))
    scope: Mapped[str] = mapped_column(String(512), default="")
    #: JSON request details the client sent (capabilities, device info).
    request: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: pending | approved | denied | consumed
    status: Mapped[str] = mapped_column(String(16), default="pending")
    user_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    amr: Mapped[list[str]] = mapped_column(JSON, default=list)
    auth_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    interval: Mapped[int] = mapped_column(Integer, default=5)
    last_poll_at: Mapped[float] = mapped_column(Float, default=0.0)
    expires_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)


class SigningKey(Base):
    __tablename__ = "signing_keys"
    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: PEM of the private key. Protect the database as you protect the keys.
    private_pem: Mapped[str] = mapped_column(Text)
    algorithm: Mapped[str] = mapped_column(String(16), default="ES256")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[float] = mapped_column(Float)


class PkiMaterial(Base):
    """The internal CA and the service's server certificate, shared by every node."""

    __tablename__ = "pki"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    cert_pem: Mapped[str] = mapped_column(Text)
    key_pem: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


# --- applications ---------------------------------------------------------------------------


class ConnectorGroup(Base):
    __tablename__ = "connector_groups"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    region: Mapped[str] = mapped_column(String(64), default="")
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)


class Connector(Base):
    __tablename__ = "connectors"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    group_id: Mapped[str] = mapped_column(ForeignKey("connector_groups.id"), index=True)
    cert_serial: Mapped[str] = mapped_column(String(64), default="")
    cert_not_after: Mapped[float] = mapped_column(Float, default=0.0)
    version: Mapped[str] = mapped_column(String(64), default="")
    address: Mapped[str] = mapped_column(String(64), default="")
    #: active | draining | revoked
    state: Mapped[str] = mapped_column(String(16), default="active")
    last_seen_at: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[float] = mapped_column(Float)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("connector_groups.id"))
    name: Mapped[str] = mapped_column(String(255), default="")
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    connector_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class Application(Base):
    __tablename__ = "applications"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    #: enterprise | quick_access
    kind: Mapped[str] = mapped_column(String(16), default="enterprise")
    connector_group_id: Mapped[str] = mapped_column(ForeignKey("connector_groups.id"))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    #: DNS suffixes this application serves for private resolution.
    dns_suffixes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[float] = mapped_column(Float)


class Segment(Base):
    __tablename__ = "segments"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    app_id: Mapped[str] = mapped_column(
        ForeignKey("applications.id", ondelete="CASCADE"), index=True
    )
    #: ip | ip_range | cidr | fqdn | wildcard | dns_suffix
    dest_type: Mapped[str] = mapped_column(String(16))
    destination: Mapped[str] = mapped_column(String(255))
    #: "22", "80,443", "8000-8100"
    ports: Mapped[str] = mapped_column(String(512))
    #: tcp | udp | tcp,udp
    protocol: Mapped[str] = mapped_column(String(8), default="tcp")
    created_at: Mapped[float] = mapped_column(Float)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("app_id", "principal_id"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    app_id: Mapped[str] = mapped_column(
        ForeignKey("applications.id", ondelete="CASCADE"), index=True
    )
    #: ``usr_...`` or ``grp_...``
    principal_id: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[float] = mapped_column(Float)


# --- logs -----------------------------------------------------------------------------------


class TrafficRecord(Base):
    """One record per flow (design section 6)."""

    __tablename__ = "traffic_log"
    __table_args__ = (
        Index("ix_traffic_started", "started_at"),
        Index("ix_traffic_user", "user_id", "started_at"),
        Index("ix_traffic_app", "app_id", "started_at"),
    )
    flow_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    connection_id: Mapped[str] = mapped_column(String(40), default="")
    session_id: Mapped[str] = mapped_column(String(40), default="")
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    user_id: Mapped[str] = mapped_column(String(40), default="")
    username: Mapped[str] = mapped_column(String(255), default="")
    device_id: Mapped[str] = mapped_column(String(40), default="")
    client_version: Mapped[str] = mapped_column(String(64), default="")
    process_name: Mapped[str] = mapped_column(String(255), default="")
    source_ip: Mapped[str] = mapped_column(String(64), default="")
    source_port: Mapped[int] = mapped_column(Integer, default=0)
    dest_host: Mapped[str] = mapped_column(String(255), default="")
    dest_ip: Mapped[str] = mapped_column(String(64), default="")
    dest_port: Mapped[int] = mapped_column(Integer, default=0)
    #: tcp | udp | dns
    transport: Mapped[str] = mapped_column(String(8), default="tcp")
    app_id: Mapped[str] = mapped_column(String(40), default="")
    segment_id: Mapped[str] = mapped_column(String(40), default="")
    connector_id: Mapped[str] = mapped_column(String(40), default="")
    connector_group_id: Mapped[str] = mapped_column(String(40), default="")
    #: allow | block | challenge
    action: Mapped[str] = mapped_column(String(16))
    #: stable error code of a refusal, or "" when allowed
    code: Mapped[str] = mapped_column(String(64), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    policy_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: 64-bit: a long flow passes 2 GiB, and PostgreSQL's ``integer`` is 32-bit (an overflow
    #: would fail the whole batch insert).
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)
    #: UDP flows: DATAGRAM capsules each way (0 for TCP and DNS)
    datagrams_up: Mapped[int] = mapped_column(Integer, default=0)
    datagrams_down: Mapped[int] = mapped_column(Integer, default=0)
    #: client_closed | target_closed | revoked | policy | error | connector_lost | refused
    close_reason: Mapped[str] = mapped_column(String(32), default="")
    edge_node: Mapped[str] = mapped_column(String(64), default="")


class AuditRecord(Base):
    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_at", "at"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    at: Mapped[float] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255), default="")
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ForwardingProfileSetting(Base):
    """Admin settings of a forwarding profile (``private-access``): on or off, whether users
    may pause the client, what happens when Limen is unreachable, and bypass destinations.
    The rules themselves are computed per user from assignments and segments."""

    __tablename__ = "forwarding_profiles"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    allow_pause: Mapped[bool] = mapped_column(Boolean, default=True)
    #: block | pass
    hardening: Mapped[str] = mapped_column(String(8), default="block")
    #: [{"type", "destination", "ports", "protocol"}]: destinations that never go to Limen
    bypass: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)


class ConfigVersion(Base):
    """A counter bumped by every configuration change, so every edge node (one process or
    many sharing PostgreSQL) notices and recompiles its snapshot."""

    __tablename__ = "config_version"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    changed_at: Mapped[float] = mapped_column(Float, default=0.0)


class AdminToken(Base):
    """An API token for the admin REST API (hash only). Role: admin | operator | reader."""

    __tablename__ = "admin_tokens"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="admin")
    created_at: Mapped[float] = mapped_column(Float)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


# --- the distributed bus ----------------------------------------------------------------------


class BusEventRow(Base):
    """One event of the PostgreSQL bus (:mod:`limen.bus.postgres`), kept for a retention
    window so that a node that was away replays what it missed. Ids grow in commit order
    (publishers serialise on an advisory lock), so "everything after id N" is exact."""

    __tablename__ = "bus_events"
    __table_args__ = (Index("ix_bus_events_created", "created_at"),)
    # BIGSERIAL on PostgreSQL; SQLite autoincrements only an INTEGER primary key.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    topic: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: The publishing process (random per process): a node skips its own events, which it
    #: delivered locally when it published them.
    origin: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[float] = mapped_column(Float)


class BusPosition(Base):
    """The last bus event a node processed, so that a restarted node replays from there."""

    __tablename__ = "bus_positions"
    node: Mapped[str] = mapped_column(String(128), primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)


# Tables defined beside their feature register on the same metadata (imported last: they
# import ``Base`` from here).
from limen.store import identity_models as _identity_models  # noqa: E402, F401
from limen.store import policy_models as _policy_models  # noqa: E402, F401
from limen.store import signal_models as _signal_models  # noqa: E402, F401
