"""Admin API: connector groups, connectors and their enrollment, applications with their
segments and assignments."""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Response
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from limen.admin import schemas as sc
from limen.admin._common import (
    ENROLLMENT_PREFIX,
    Deps,
    Json,
    ensure_default_connector_group,
    get_or_404,
    resolve_connector_group,
    resolve_principal,
    segment_specs,
    unique,
)
from limen.edge.health import BOARD, Health
from limen.errors import AuthError, Conflict, NotFound
from limen.ids import new_id
from limen.policy.segments import SegmentSpec, find_conflicts, normalize_name
from limen.service import ServiceContext
from limen.store.db import token_hash
from limen.store.models import (
    Application,
    Assignment,
    Connector,
    ConnectorGroup,
    EnrollmentToken,
    Segment,
)


def add_app_routes(router: APIRouter, ctx: ServiceContext) -> None:
    """Add these endpoints to ``router`` (bound to ``ctx``)."""
    deps = Deps(ctx)
    reader, operator, changed = deps.reader, deps.operator, deps.changed

    # --- connector groups and connectors --------------------------------------------------

    @router.post("/connector-groups", status_code=201)
    def create_connector_group(body: sc.ConnectorGroupCreate, actor: str = operator) -> Json:
        with ctx.store.session() as s:
            ensure_default_connector_group(s)
            unique(s, ConnectorGroup, ConnectorGroup.name, body.name, "connector group")
            group = ConnectorGroup(
                id=new_id("connector_group"),
                name=body.name,
                region=body.region,
                is_default=False,
                created_at=time.time(),
            )
            s.add(group)
            ctx.store.bump_config_version(s)
            out = sc.connector_group_json(group)
        changed(actor, "connector_group.create", group.id, {"name": group.name})
        return out

    @router.get("/connector-groups")
    def list_connector_groups(_: str = reader) -> list[Json]:
        with ctx.store.session() as s:
            ensure_default_connector_group(s)
            counts: dict[str, int] = {
                gid: n
                for gid, n in s.execute(
                    select(Connector.group_id, func.count())
                    .where(Connector.state != "revoked")
                    .group_by(Connector.group_id)
                )
            }
            out = []
            for g in s.scalars(select(ConnectorGroup).order_by(ConnectorGroup.name)):
                item = sc.connector_group_json(g)
                item["connectors"] = counts.get(g.id, 0)
                out.append(item)
            return out

    @router.get("/connector-groups/{group_id}")
    def get_connector_group(group_id: str, _: str = reader) -> Json:
        with ctx.store.session() as s:
            group = get_or_404(s, ConnectorGroup, group_id, "connector group")
            out = sc.connector_group_json(group)
            out["connectors"] = [
                connector_out(c, group)
                for c in s.scalars(select(Connector).where(Connector.group_id == group_id))
            ]
            out["apps"] = list(
                s.scalars(select(Application.id).where(Application.connector_group_id == group_id))
            )
            return out

    @router.delete("/connector-groups/{group_id}", status_code=204)
    def delete_connector_group(group_id: str, actor: str = operator) -> Response:
        with ctx.store.session() as s:
            group = get_or_404(s, ConnectorGroup, group_id, "connector group")
            if group.is_default:
                raise Conflict("the default connector group cannot be deleted", code="in_use")
            apps = s.scalars(
                select(Application.name).where(Application.connector_group_id == group_id)
            ).all()
            if apps:
                raise Conflict(
                    f"connector group {group.name!r} is used by applications: "
                    f"{', '.join(sorted(apps))}",
                    code="in_use",
                )
            live = s.scalars(
                select(Connector.id).where(
                    Connector.group_id == group_id, Connector.state != "revoked"
                )
            ).all()
            if live:
                raise Conflict(
                    f"connector group {group.name!r} still has connectors: "
                    f"{', '.join(sorted(live))}",
                    code="in_use",
                )
            # Revoked connectors and enrollment tokens only reference the group.
            s.execute(delete(Connector).where(Connector.group_id == group_id))
            s.execute(delete(EnrollmentToken).where(EnrollmentToken.group_id == group_id))
            name = group.name
            s.delete(group)
            ctx.store.bump_config_version(s)
        changed(actor, "connector_group.delete", group_id, {"name": name})
        return Response(status_code=204)

    @router.get("/connectors")
    def list_connectors(group_id: str | None = None, _: str = reader) -> list[Json]:
        with ctx.store.session() as s:
            q = select(Connector).order_by(Connector.name, Connector.id)
            if group_id:
                q = q.where(Connector.group_id == group_id)
            groups = {g.id: g for g in s.scalars(select(ConnectorGroup))}
            return [connector_out(c, groups.get(c.group_id)) for c in s.scalars(q)]

    @router.get("/connectors/{connector_id}")
    def get_connector(connector_id: str, _: str = reader) -> Json:
        with ctx.store.session() as s:
            connector = get_or_404(s, Connector, connector_id, "connector")
            return connector_out(connector, s.get(ConnectorGroup, connector.group_id))

    def set_state(connector_id: str, actor: str, action: str, state: str) -> Json:
        with ctx.store.session() as s:
            connector = get_or_404(s, Connector, connector_id, "connector")
            previous = connector.state
            if previous == "revoked" and state != "revoked":
                raise Conflict("the connector was revoked; enroll a new one", code="revoked")
            connector.state = state
            if previous != state:
                ctx.store.bump_config_version(s)
            out = connector_out(connector, s.get(ConnectorGroup, connector.group_id))
            serial = connector.cert_serial
        changed(actor, action, connector_id, {"from": previous, "cert_serial": serial})
        return out

    @router.delete("/connectors/{connector_id}", status_code=204)
    def revoke_connector(connector_id: str, actor: str = operator) -> Response:
        set_state(connector_id, actor, "connector.revoke", "revoked")
        return Response(status_code=204)

    @router.post("/connectors/{connector_id}/revoke")
    def revoke_connector_post(connector_id: str, actor: str = operator) -> Json:
        """Revoke: the edge refuses its certificate and closes its links at once."""
        return set_state(connector_id, actor, "connector.revoke", "revoked")

    @router.post("/connectors/{connector_id}/drain")
    def drain_connector(connector_id: str, actor: str = operator) -> Json:
        """No new flows go to the connector; its flows finish (for upgrades)."""
        return set_state(connector_id, actor, "connector.drain", "draining")

    @router.post("/connectors/{connector_id}/resume")
    def resume_connector(connector_id: str, actor: str = operator) -> Json:
        """Undo a drain: the connector receives new flows again."""
        return set_state(connector_id, actor, "connector.resume", "active")

    @router.post("/connectors/{connector_id}/move")
    def move_connector(connector_id: str, body: sc.ConnectorMove, actor: str = operator) -> Json:
        with ctx.store.session() as s:
            connector = get_or_404(s, Connector, connector_id, "connector")
            group = resolve_connector_group(s, body.group_id)
            previous = connector.group_id
            connector.group_id = group.id
            ctx.store.bump_config_version(s)
            out = connector_out(connector, group)
        changed(actor, "connector.move", connector_id, {"from": previous, "to": group.id})
        return out

    # --- enrollment -----------------------------------------------------------------------

    @router.post("/connector-groups/{group_id}/enrollment-tokens", status_code=201)
    def create_enrollment_token(
        group_id: str, body: sc.EnrollmentTokenCreate | None = None, actor: str = operator
    ) -> Json:
        body = body or sc.EnrollmentTokenCreate()
        token = ENROLLMENT_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        with ctx.store.session() as s:
            group = get_or_404(s, ConnectorGroup, group_id, "connector group")
            row = EnrollmentToken(
                id=new_id("enrollment"),
                token_hash=token_hash(token),
                group_id=group.id,
                name=body.name,
                expires_at=now + body.ttl_seconds,
                used_at=None,
                connector_id=None,
                created_at=now,
            )
            s.add(row)
        ctx.audit(
            actor,
            "enrollment_token.create",
            group_id,
            {"token_id": row.id, "ttl_seconds": body.ttl_seconds},
        )
        return {"id": row.id, "token": token, "group_id": group_id, "expires_at": row.expires_at}

    @router.post("/connectors/enroll", status_code=201)
    def enroll_connector(body: sc.EnrollRequest) -> Json:
        if not body.token.startswith(ENROLLMENT_PREFIX):
            raise AuthError(
                "unknown, used or expired enrollment token", code="invalid_enrollment_token"
            )
        digest = token_hash(body.token)
        now = time.time()
        with ctx.store.session() as s:
            row = s.scalar(select(EnrollmentToken).where(EnrollmentToken.token_hash == digest))
        if row is None or row.used_at is not None or row.expires_at <= now:
            raise AuthError(
                "unknown, used or expired enrollment token", code="invalid_enrollment_token"
            )
        connector_id = new_id("connector")
        # Sign before consuming the token: a malformed CSR is a 400 that leaves the token
        # usable for a corrected retry.
        issued = ctx.pki.issue_connector_cert(
            body.csr_pem, connector_id, ctx.settings.connector_cert_ttl
        )
        with ctx.store.session() as s:
            # Consume atomically: of two concurrent enrollments, one updates the row.
            result = s.execute(
                update(EnrollmentToken)
                .where(
                    EnrollmentToken.id == row.id,
                    EnrollmentToken.used_at.is_(None),
                    EnrollmentToken.expires_at > now,
                )
                .values(used_at=now, connector_id=connector_id)
                .execution_options(synchronize_session=False)
            )
            if getattr(result, "rowcount", 0) != 1:
                raise AuthError(
                    "unknown, used or expired enrollment token", code="invalid_enrollment_token"
                )
            name = body.name or row.name or f"connector-{connector_id[-6:]}"
            s.add(
                Connector(
                    id=connector_id,
                    name=name,
                    group_id=row.group_id,
                    cert_serial=issued.serial,
                    cert_not_after=issued.not_after,
                    version=body.version,
                    address="",
                    state="active",
                    last_seen_at=0.0,
                    created_at=now,
                )
            )
            ctx.store.bump_config_version(s)
        changed(
            f"enrollment:{row.id}",
            "connector.enroll",
            connector_id,
            {"group_id": row.group_id, "name": name, "cert_serial": issued.serial},
        )
        return {
            "connector_id": connector_id,
            "cert_pem": issued.cert_pem,
            "ca_pem": ctx.pki.ca_pem,
            "group_id": row.group_id,
            "not_after": issued.not_after,
        }

    # --- applications ---------------------------------------------------------------------

    def _app_detail(s: Session, app: Application) -> Json:
        out = sc.app_json(app)
        out["segments"] = [
            sc.segment_json(x)
            for x in s.scalars(
                select(Segment)
                .where(Segment.app_id == app.id)
                .order_by(Segment.created_at, Segment.id)
            )
        ]
        out["assignments"] = [
            sc.assignment_json(x)
            for x in s.scalars(
                select(Assignment)
                .where(Assignment.app_id == app.id)
                .order_by(Assignment.created_at, Assignment.id)
            )
        ]
        return out

    @router.post("/apps", status_code=201)
    def create_app(body: sc.AppCreate, actor: str = operator) -> Json:
        suffixes = sorted({normalize_name(x, "dns_suffixes") for x in body.dns_suffixes})
        with ctx.store.session() as s:
            unique(s, Application, Application.name, body.name, "application")
            group = resolve_connector_group(s, body.connector_group_id)
            app = Application(
                id=new_id("application"),
                name=body.name,
                kind=body.kind,
                connector_group_id=group.id,
                enabled=True,
                dns_suffixes=suffixes,
                created_at=time.time(),
            )
            s.add(app)
            ctx.store.bump_config_version(s)
            out = _app_detail(s, app)
        changed(
            actor,
            "app.create",
            app.id,
            {"name": app.name, "kind": app.kind, "connector_group_id": group.id},
        )
        return out

    @router.get("/apps")
    def list_apps(_: str = reader) -> list[Json]:
        with ctx.store.session() as s:
            return [
                _app_detail(s, a) for a in s.scalars(select(Application).order_by(Application.name))
            ]

    @router.get("/apps/{app_id}")
    def get_app(app_id: str, _: str = reader) -> Json:
        with ctx.store.session() as s:
            return _app_detail(s, get_or_404(s, Application, app_id, "application"))

    @router.delete("/apps/{app_id}", status_code=204)
    def delete_app(app_id: str, actor: str = operator) -> Response:
        with ctx.store.session() as s:
            app = get_or_404(s, Application, app_id, "application")
            name = app.name
            s.execute(delete(Segment).where(Segment.app_id == app_id))
            s.execute(delete(Assignment).where(Assignment.app_id == app_id))
            s.delete(app)
            ctx.store.bump_config_version(s)
        changed(actor, "app.delete", app_id, {"name": name})
        return Response(status_code=204)

    @router.post("/apps/{app_id}/segments", status_code=201)
    def add_segment(app_id: str, body: sc.SegmentCreate, actor: str = operator) -> Json:
        with ctx.store.session() as s:
            app = get_or_404(s, Application, app_id, "application")
            spec = SegmentSpec(
                new_id("segment"),
                app.id,
                app.kind,
                body.type,
                body.destination,
                str(body.ports),
                body.protocol,
            )
            existing: list[tuple[Segment, Application]] = [
                (seg, owner)
                for seg, owner in s.execute(
                    select(Segment, Application).join(Application, Segment.app_id == Application.id)
                )
            ]
            for seg, _app in existing:
                if seg.app_id == app.id and (
                    seg.dest_type,
                    seg.destination,
                    seg.ports,
                    seg.protocol,
                ) == (spec.dest_type, spec.destination, spec.ports, spec.protocol):
                    raise Conflict(
                        f"application {app.name!r} already has this segment ({seg.id})",
                        code="duplicate_segment",
                    )
            conflicts = find_conflicts(spec, segment_specs(list(existing)))
            if conflicts:
                other = conflicts[0]
                names = {a.id: a.name for _seg, a in existing}
                raise Conflict(
                    f"segment {spec.dest_type} {spec.destination} ports {spec.ports} "
                    f"{spec.protocol} overlaps segment {other.id} ({other.dest_type} "
                    f"{other.destination} ports {other.ports} {other.protocol}) of application "
                    f"{names.get(other.app_id, '?')!r} ({other.app_id})",
                    code="segment_overlap",
                )
            seg = Segment(
                id=spec.id,
                app_id=app.id,
                dest_type=spec.dest_type,
                destination=spec.destination,
                ports=spec.ports,
                protocol=spec.protocol,
                created_at=time.time(),
            )
            s.add(seg)
            ctx.store.bump_config_version(s)
            out = sc.segment_json(seg)
        changed(
            actor,
            "segment.create",
            seg.id,
            {
                "app_id": app_id,
                "type": seg.dest_type,
                "destination": seg.destination,
                "ports": seg.ports,
                "protocol": seg.protocol,
            },
        )
        return out

    @router.delete("/apps/{app_id}/segments/{segment_id}", status_code=204)
    def delete_segment(app_id: str, segment_id: str, actor: str = operator) -> Response:
        with ctx.store.session() as s:
            seg = get_or_404(s, Segment, segment_id, "segment")
            if seg.app_id != app_id:
                raise NotFound(f"no segment {segment_id!r} in application {app_id!r}")
            s.delete(seg)
            ctx.store.bump_config_version(s)
        changed(actor, "segment.delete", segment_id, {"app_id": app_id})
        return Response(status_code=204)

    @router.post("/apps/{app_id}/assignments", status_code=201)
    def assign(app_id: str, body: sc.AssignmentCreate, actor: str = operator) -> Json:
        with ctx.store.session() as s:
            app = get_or_404(s, Application, app_id, "application")
            principal = resolve_principal(s, body.principal_id)
            dup = s.scalar(
                select(Assignment).where(
                    Assignment.app_id == app.id, Assignment.principal_id == principal.id
                )
            )
            if dup is not None:
                raise Conflict(
                    f"{principal.id} is already assigned to {app.name!r}", code="already_assigned"
                )
            row = Assignment(
                id=new_id("assignment"),
                app_id=app.id,
                principal_id=principal.id,
                created_at=time.time(),
            )
            s.add(row)
            ctx.store.bump_config_version(s)
            out = sc.assignment_json(row)
        changed(actor, "assignment.create", app_id, {"principal_id": principal.id})
        return out

    @router.delete("/apps/{app_id}/assignments/{principal_id}", status_code=204)
    def unassign(app_id: str, principal_id: str, actor: str = operator) -> Response:
        with ctx.store.session() as s:
            get_or_404(s, Application, app_id, "application")
            result = s.execute(
                delete(Assignment).where(
                    Assignment.app_id == app_id, Assignment.principal_id == principal_id
                )
            )
            if not getattr(result, "rowcount", 0):
                raise NotFound(f"{principal_id!r} is not assigned to {app_id}")
            ctx.store.bump_config_version(s)
        changed(actor, "assignment.delete", app_id, {"principal_id": principal_id})
        return Response(status_code=204)


#: A connector seen by some edge within this many seconds counts as connected when no edge
#: in this process reports on it (the edge persists last-seen every 10 s at most).
SEEN_RECENTLY = 30.0


def connector_out(c: Connector, group: ConnectorGroup | None) -> Json:
    """A connector as the API shows it: the stored row, its group, and live status from an
    edge in this process (health, active flows, bytes, last heartbeat) when there is one."""
    out = sc.connector_json(c)
    out["group_name"] = group.name if group is not None else ""
    out["region"] = group.region if group is not None else ""
    live = BOARD.get(c.id)
    if c.state == "revoked":
        health = "revoked"
    elif live is not None:
        health = live.health
    elif c.last_seen_at and time.time() - c.last_seen_at < SEEN_RECENTLY:
        health = Health.UNKNOWN.value
    else:
        health = Health.OFFLINE.value
    out.update(
        health=health,
        connections=live.connections if live else 0,
        active_flows=live.active_flows if live else 0,
        bytes_up=live.bytes_up if live else 0,
        bytes_down=live.bytes_down if live else 0,
        last_heartbeat=live.last_heartbeat if live else 0.0,
        last_failure=live.last_failure if live else "",
    )
    if live is not None:
        out["version"] = live.version or c.version
        out["address"] = live.address or c.address
        out["last_seen_at"] = max(c.last_seen_at, live.last_heartbeat)
    return out
