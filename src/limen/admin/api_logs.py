"""Admin API: the traffic log (filtered, paginated, exported as JSON lines) and the audit log."""

from __future__ import annotations

import json
from collections.abc import Iterator

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from sqlalchemy import Select, and_, or_, select

from limen.admin import schemas as sc
from limen.admin._common import (
    DEFAULT_PAGE,
    EXPORT_BATCH,
    MAX_PAGE,
    Deps,
    Json,
    decode_cursor,
    encode_cursor,
    older_than,
    parse_time,
    traffic_query,
)
from limen.errors import ConfigError
from limen.service import ServiceContext
from limen.store.models import (
    AuditRecord,
    TrafficRecord,
)


def add_log_routes(router: APIRouter, ctx: ServiceContext) -> None:
    """Add these endpoints to ``router`` (bound to ``ctx``)."""
    deps = Deps(ctx)
    reader = deps.reader

    # --- traffic and audit logs -----------------------------------------------------------

    def _traffic_filters(
        user: str | None, app: str | None, action: str | None, since: str | None, until: str | None
    ) -> Select[TrafficRecord]:
        if action and action not in ("allow", "block", "challenge"):
            raise ConfigError(f"action: {action!r} is not allow, block or challenge")
        return traffic_query(
            user, app, action, parse_time(since, "since"), parse_time(until, "until")
        )

    @router.get("/traffic")
    def list_traffic(
        user: str | None = None,
        app: str | None = None,
        action: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE),
        cursor: str | None = None,
        _: str = reader,
    ) -> Json:
        q = _traffic_filters(user, app, action, since, until)
        if cursor:
            q = older_than(q, *decode_cursor(cursor))
        with ctx.store.session() as s:
            rows = list(s.scalars(q.limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].started_at, rows[-1].flow_id) if more else None
        return {"items": [sc.traffic_json(r) for r in rows], "next_cursor": next_cursor}

    @router.get("/traffic/export")
    def export_traffic(
        user: str | None = None,
        app: str | None = None,
        action: str | None = None,
        since: str | None = None,
        until: str | None = None,
        _: str = reader,
    ) -> StreamingResponse:
        base = _traffic_filters(user, app, action, since, until)

        def lines() -> Iterator[bytes]:
            # One short unit of work per batch: a long export never holds a read
            # transaction open (SQLite WAL checkpoints would stall behind it).
            q = base
            while True:
                with ctx.store.session() as s:
                    rows = list(s.scalars(q.limit(EXPORT_BATCH)))
                for r in rows:
                    yield (json.dumps(sc.traffic_json(r), separators=(",", ":")) + "\n").encode()
                if len(rows) < EXPORT_BATCH:
                    return
                q = older_than(base, rows[-1].started_at, rows[-1].flow_id)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @router.get("/audit")
    def list_audit(
        limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE),
        since: str | None = None,
        cursor: str | None = None,
        _: str = reader,
    ) -> Json:
        q = select(AuditRecord).order_by(AuditRecord.at.desc(), AuditRecord.id.desc())
        start = parse_time(since, "since")
        if start is not None:
            q = q.where(AuditRecord.at >= start)
        if cursor:
            at, ident = decode_cursor(cursor)
            q = q.where(
                or_(AuditRecord.at < at, and_(AuditRecord.at == at, AuditRecord.id < ident))
            )
        with ctx.store.session() as s:
            rows = list(s.scalars(q.limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].at, rows[-1].id) if more else None
        return {"items": [sc.audit_json(r) for r in rows], "next_cursor": next_cursor}
