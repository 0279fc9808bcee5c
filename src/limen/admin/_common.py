"""What the admin API's route modules share: role dependencies, lookups, the audit and
config-change step, time and cursor parsing."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import time
from typing import Any

from fastapi import Depends
from sqlalchemy import Select, and_, delete, or_, select, update
from sqlalchemy.orm import Session

from limen.admin.auth import require_role
from limen.bus.inprocess import SUBJECT_REVOKED
from limen.errors import ConfigError, Conflict, NotFound
from limen.ids import kind_of, new_id
from limen.policy.segments import SegmentSpec
from limen.service import ServiceContext
from limen.store.db import bump_config_version
from limen.store.models import (
    Application,
    Assignment,
    ConnectorGroup,
    Group,
    GroupMember,
    RefreshToken,
    Segment,
    SignInSession,
    TrafficRecord,
    User,
)

MAX_PAGE = 1000
DEFAULT_PAGE = 100
#: Rows fetched per database round trip while exporting the traffic log.
EXPORT_BATCH = 1000
ENROLLMENT_PREFIX = "enr_"

Json = dict[str, Any]


class Deps:
    """Per-router shared pieces: the role dependencies and the after-commit steps."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.reader: Any = Depends(require_role(ctx.store, "reader"))
        self.operator: Any = Depends(require_role(ctx.store, "operator"))
        self.admin: Any = Depends(require_role(ctx.store, "admin"))

    def changed(self, actor: str, action: str, target: str, details: Json | None = None) -> None:
        """After a committed configuration change: audit, then wake the edges."""
        self.ctx.audit(actor, action, target, details)
        self.ctx.config_changed(action)

    def revoked(self, user_id: str, reason: str, at: float) -> None:
        """After a committed revocation: tell every edge to cut the user's live flows."""
        self.ctx.bus.publish(SUBJECT_REVOKED, user_id=user_id, reason=reason, at=at)


def unique(s: Session, model: type[Any], column: Any, value: str, what: str) -> None:
    """Refuse a duplicate name with 409 ``name_taken`` (rather than a database error)."""
    if s.scalar(select(model).where(column == value)) is not None:
        raise Conflict(f"a {what} named {value!r} already exists", code="name_taken")


# --- lookups and shared steps ------------------------------------------------------------------


def get_or_404(s: Session, model: type[Any], ident: str, what: str) -> Any:
    row = s.get(model, ident)
    if row is None:
        raise NotFound(f"no {what} {ident!r}")
    return row


def ensure_default_connector_group(session: Session) -> ConnectorGroup:
    """The default connector group, created (named ``Default``) on first use."""
    row = session.scalar(select(ConnectorGroup).where(ConnectorGroup.is_default.is_(True)))
    if row is not None:
        return row
    row = session.scalar(select(ConnectorGroup).where(ConnectorGroup.name == "Default"))
    if row is None:
        row = ConnectorGroup(
            id=new_id("connector_group"), name="Default", region="", created_at=time.time()
        )
        session.add(row)
    row.is_default = True
    session.flush()
    return row


def resolve_connector_group(s: Session, ref: str | None) -> ConnectorGroup:
    """A connector group by id or name (body references: unknown is a 400)."""
    if not ref:
        return ensure_default_connector_group(s)
    row = s.get(ConnectorGroup, ref) or s.scalar(
        select(ConnectorGroup).where(ConnectorGroup.name == ref)
    )
    if row is None:
        raise ConfigError(f"unknown connector group {ref!r}", code="unknown_connector_group")
    return row


def resolve_principal(s: Session, ref: str) -> User | Group:
    """A user or group by id, or else by username / group name."""
    kind = kind_of(ref)
    row: User | Group | None = None
    if kind == "user":
        row = s.get(User, ref)
    elif kind == "group":
        row = s.get(Group, ref)
    if row is None:
        row = s.scalar(select(User).where(User.username == ref)) or s.scalar(
            select(Group).where(Group.name == ref)
        )
    if row is None:
        raise ConfigError(f"unknown user or group {ref!r}", code="unknown_principal")
    return row


def revoke_user(s: Session, user: User, now: float) -> None:
    """Tokens issued before now are void; sessions and refresh families are revoked. The
    config version is bumped too: an edge in another process learns of the revocation from
    its next snapshot and cuts the user's live flows."""
    user.revoked_before = max(user.revoked_before, now)
    user.updated_at = now
    bump_config_version(s)
    s.execute(
        update(SignInSession)
        .where(SignInSession.user_id == user.id, SignInSession.revoked_at.is_(None))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    s.execute(
        update(RefreshToken)
        .where(RefreshToken.user_id == user.id)
        .values(family_revoked=True)
        .execution_options(synchronize_session=False)
    )


def forget_principal(s: Session, principal_id: str) -> None:
    s.execute(delete(GroupMember).where(GroupMember.member_id == principal_id))
    s.execute(delete(Assignment).where(Assignment.principal_id == principal_id))


def group_descendants(s: Session, group_id: str) -> set[str]:
    """Every group nested (transitively) inside ``group_id``, itself included."""
    seen = {group_id}
    frontier = [group_id]
    while frontier:
        rows = s.scalars(
            select(GroupMember.member_id).where(
                GroupMember.group_id.in_(frontier), GroupMember.member_id.like("grp\\_%", "\\")
            )
        ).all()
        frontier = [m for m in rows if m not in seen]
        seen.update(frontier)
    return seen


def segment_specs(rows: list[tuple[Segment, Application]]) -> list[SegmentSpec]:
    return [
        SegmentSpec(
            seg.id, app.id, app.kind, seg.dest_type, seg.destination, seg.ports, seg.protocol
        )
        for seg, app in rows
    ]


def parse_time(text: str | None, what: str) -> float | None:
    """Epoch seconds or ISO 8601 (naive means UTC)."""
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is neither epoch seconds nor ISO 8601") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def encode_cursor(at: float, ident: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([at, ident]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, ident = json.loads(raw)
        return float(at), str(ident)
    except (binascii.Error, ValueError, TypeError):
        raise ConfigError("cursor: not a cursor returned by this API") from None


def traffic_query(
    user: str | None,
    app: str | None,
    action: str | None,
    since: float | None,
    until: float | None,
) -> Select[TrafficRecord]:
    q = select(TrafficRecord)
    if user:
        q = q.where(or_(TrafficRecord.user_id == user, TrafficRecord.username == user))
    if app:
        q = q.where(TrafficRecord.app_id == app)
    if action:
        q = q.where(TrafficRecord.action == action)
    if since is not None:
        q = q.where(TrafficRecord.started_at >= since)
    if until is not None:
        q = q.where(TrafficRecord.started_at < until)
    return q.order_by(TrafficRecord.started_at.desc(), TrafficRecord.flow_id.desc())


def older_than(q: Select[TrafficRecord], at: float, flow_id: str) -> Select[TrafficRecord]:
    # Keyset pagination, newest first: strictly older than the last row shown.
    return q.where(
        or_(
            TrafficRecord.started_at < at,
            and_(TrafficRecord.started_at == at, TrafficRecord.flow_id < flow_id),
        )
    )
