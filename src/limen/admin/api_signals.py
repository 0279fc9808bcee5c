"""Admin API: signals (continuous access evaluation) and Shared Signals transmitters.

- ``GET /signals``, ``GET /signals/{id}``: the audit of every signal — source, subject,
  event, time received, action, flows cut, time to cut — newest first, with filters.
- ``POST /users/{id}/revoke-sessions``: the admin's "revoke all sessions" signal.
- ``POST /users/{id}/risk``: set a user's risk level (``high`` also revokes).
- ``/transmitters``: add (discovery + stream creation), list, show, delete, read the remote
  stream, set its status, add a subject, request verification.

A transmitter's management token is stored (it must be sent) and never returned; the push
token Limen issues for it is returned once, at creation, and only its hash is kept.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import or_, select

from limen.admin._common import Deps, Json, get_or_404, parse_time, unique
from limen.errors import ConfigError, UpstreamError
from limen.service import ServiceContext
from limen.signals import TRANSMITTERS_CHANGED
from limen.signals.actions import apply_signal, user_exists
from limen.signals.events import EVENT_ACTIONS, RISK_LEVELS, Action, Plan
from limen.signals.receiver import DELIVERY_URNS, POLL, PUSH, StreamClient, check_url
from limen.store.db import token_hash
from limen.store.signal_models import SignalRecord, SsfTransmitter

MAX_SIGNALS = 1000

#: Events Limen asks for by default: every event it acts on.
DEFAULT_EVENTS = sorted(
    e for e, a in EVENT_ACTIONS.items() if a not in (Action.VERIFICATION, Action.STREAM_UPDATED)
)


class TransmitterCreate(BaseModel):
    """Body of ``POST /transmitters``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=255)
    issuer: str = Field(min_length=1, max_length=512)
    delivery: Literal["push", "poll"] = "push"
    #: Bearer token for the transmitter's stream-management API (secret).
    auth_token: str = ""
    #: The ``aud`` required in SETs; empty: the stream's, else Limen's issuer URL.
    audience: str = ""
    events_requested: list[str] | None = None
    #: Base URL the transmitter reaches Limen's API at (push); empty: Limen's issuer URL.
    receiver_url: str = ""
    description: str = ""
    #: False: only discover (the stream is configured out of band).
    create_stream: bool = True
    #: With ``create_stream`` false and poll delivery: the transmitter's poll endpoint.
    endpoint_url: str = ""


class TransmitterStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["enabled", "paused", "disabled"]
    reason: str = ""


class SubjectAdd(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject: dict[str, Any]


class RiskSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    level: str


class RevokeSessions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = ""


def transmitter_json(t: SsfTransmitter) -> Json:
    """A transmitter as the API shows it (never its tokens)."""
    return {
        "id": t.id,
        "name": t.name,
        "issuer": t.issuer,
        "jwks_uri": t.jwks_uri,
        "configuration_endpoint": t.configuration_endpoint,
        "delivery": t.delivery_method,
        "endpoint_url": t.endpoint_url,
        "audience": t.audience,
        "stream_id": t.stream_id,
        "events_requested": list(t.events_requested or []),
        "events_delivered": list(t.events_delivered or []),
        "status": t.status,
        "status_reason": t.status_reason,
        "has_auth_token": bool(t.auth_token),
        "verification_requested_at": t.verification_requested_at,
        "verified_at": t.verified_at,
        "verified": t.verified_at >= t.verification_requested_at > 0,
        "last_event_at": t.last_event_at,
        "created_at": t.created_at,
    }


def signal_json(r: SignalRecord) -> Json:
    return {
        "id": r.id,
        "source": r.source,
        "subject": r.subject,
        "user_id": r.user_id,
        "device_id": r.device_id,
        "event_type": r.event_type,
        "jti": r.jti,
        "received_at": r.received_at,
        "event_timestamp": r.event_timestamp,
        "action": r.action,
        "flows_cut": r.flows_cut,
        "time_to_cut_ms": r.time_to_cut_ms,
        "detail": r.detail or {},
    }


def _audience_of(stream: dict[str, Any]) -> str:
    aud = stream.get("aud")
    if isinstance(aud, str):
        return aud
    if isinstance(aud, list) and aud and isinstance(aud[0], str):
        return aud[0]
    return ""


def add_signal_routes(router: APIRouter, ctx: ServiceContext) -> None:
    """Add these endpoints to ``router`` (bound to ``ctx``)."""
    deps = Deps(ctx)
    reader, admin = deps.reader, deps.admin

    # --- signals ----------------------------------------------------------------------------

    @router.get("/signals")
    def list_signals(
        user: str | None = None,
        source: str | None = None,
        event: str | None = None,
        action: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
        _: str = reader,
    ) -> list[Json]:
        """Signals, newest first. ``source`` matches a prefix (``ssf:`` for every
        transmitter); ``event`` matches the end of the event type (``credential-change``)."""
        q = select(SignalRecord)
        if user:
            q = q.where(or_(SignalRecord.user_id == user, SignalRecord.subject.contains(user)))
        if source:
            q = q.where(SignalRecord.source.startswith(source, autoescape=True))
        if event:
            q = q.where(SignalRecord.event_type.endswith(event, autoescape=True))
        if action:
            q = q.where(SignalRecord.action.startswith(action, autoescape=True))
        start, end = parse_time(since, "since"), parse_time(until, "until")
        if start is not None:
            q = q.where(SignalRecord.received_at >= start)
        if end is not None:
            q = q.where(SignalRecord.received_at < end)
        q = q.order_by(SignalRecord.received_at.desc(), SignalRecord.id.desc())
        q = q.limit(max(1, min(limit, MAX_SIGNALS)))
        with ctx.store.session() as s:
            return [signal_json(r) for r in s.scalars(q)]

    @router.get("/signals/{signal_id}")
    def get_signal(signal_id: str, _: str = reader) -> Json:
        with ctx.store.session() as s:
            return signal_json(get_or_404(s, SignalRecord, signal_id, "signal"))

    @router.post("/users/{user_id}/revoke-sessions")
    def revoke_sessions(
        user_id: str, body: RevokeSessions | None = None, actor: str = admin
    ) -> Json:
        """Revoke every session and token of the user now, and cut their live flows."""
        user_exists(ctx, user_id)
        now = time.time()
        plan = Plan(Action.REVOKE_SESSIONS, now, "admin_revoke_sessions")
        outcome = apply_signal(
            ctx,
            source="admin",
            subject=f"user:{user_id}",
            event_type="admin:revoke-sessions",
            plan=plan,
            user_id=user_id,
            received_at=now,
            detail={"actor": actor, "reason": (body.reason if body else "")[:500]},
        )
        ctx.audit(actor, "user.revoke_sessions", user_id, {"signal_id": outcome.signal_id})
        return {"signal_id": outcome.signal_id, "action": outcome.action, "revoked_before": now}

    @router.post("/users/{user_id}/risk")
    def set_risk(user_id: str, body: RiskSet, actor: str = admin) -> Json:
        """Set the user's risk level (low, medium, high); high revokes their sessions."""
        level = body.level.lower()
        if level not in RISK_LEVELS:
            raise ConfigError("level: must be low, medium or high")
        user_exists(ctx, user_id)
        now = time.time()
        plan = Plan(Action.SET_RISK, now, f"risk_{level}", revoke=level == "high", risk_level=level)
        outcome = apply_signal(
            ctx,
            source="admin",
            subject=f"user:{user_id}",
            event_type="admin:risk-level-change",
            plan=plan,
            user_id=user_id,
            received_at=now,
            detail={"actor": actor, "current_level": level},
        )
        ctx.audit(actor, "user.set_risk", user_id, {"level": level, "signal_id": outcome.signal_id})
        return {"signal_id": outcome.signal_id, "action": outcome.action, "risk_level": level}

    # --- transmitters -----------------------------------------------------------------------

    def _client(t: SsfTransmitter) -> StreamClient:
        return StreamClient(t.auth_token)

    def _endpoint(t: SsfTransmitter, name: str) -> str:
        url = (t.metadata_doc or {}).get(name)
        if not isinstance(url, str) or not url:
            raise ConfigError(f"the transmitter advertises no {name}", code="unsupported")
        return url

    def _changed(actor: str, action: str, target: str, details: Json | None = None) -> None:
        ctx.audit(actor, action, target, details)
        ctx.bus.publish(TRANSMITTERS_CHANGED, transmitter_id=target)

    @router.post("/transmitters", status_code=201)
    def add_transmitter(body: TransmitterCreate, actor: str = admin) -> Json:
        """Discover the transmitter, create Limen's stream with it, and store both. For push
        delivery the answer carries ``push_token`` once: the bearer token the transmitter
        presents (already given to it in the stream's ``authorization_header``)."""
        issuer = check_url(body.issuer.rstrip("/"), "issuer")
        with ctx.store.session() as s:
            unique(s, SsfTransmitter, SsfTransmitter.name, body.name, "transmitter")
        client = StreamClient(body.auth_token)
        meta = client.discover(issuer)
        methods = meta.get("delivery_methods_supported")
        if isinstance(methods, list) and DELIVERY_URNS[body.delivery] not in methods:
            raise ConfigError(
                f"the transmitter does not offer {body.delivery} delivery", code="unsupported"
            )
        transmitter_id = f"ssf_{secrets.token_hex(10)}"
        now = time.time()
        push_token = secrets.token_urlsafe(32) if body.delivery == "push" else ""
        receiver = (body.receiver_url or ctx.settings.resolved_issuer).rstrip("/")
        endpoint_url = body.endpoint_url
        if body.delivery == "push":
            endpoint_url = f"{receiver}/ssf/push/{transmitter_id}"
        events = body.events_requested if body.events_requested is not None else DEFAULT_EVENTS
        stream: dict[str, Any] = {}
        config_endpoint = str(meta.get("configuration_endpoint") or "")
        if body.create_stream:
            if not config_endpoint:
                raise ConfigError(
                    "the transmitter advertises no configuration_endpoint", code="unsupported"
                )
            delivery: dict[str, Any] = {"method": DELIVERY_URNS[body.delivery]}
            if body.delivery == "push":
                delivery["endpoint_url"] = endpoint_url
                delivery["authorization_header"] = f"Bearer {push_token}"
            config = {
                "delivery": delivery,
                "events_requested": events,
                "description": body.description or f"Limen {ctx.settings.resolved_issuer}",
            }
            stream = client.create_stream(config_endpoint, config)
            if body.delivery == "poll":
                got = (stream.get("delivery") or {}).get("endpoint_url")
                if not isinstance(got, str) or not got:
                    raise UpstreamError(
                        "create stream: no poll endpoint_url in the answer",
                        code="ssf_transmitter_error",
                    )
                endpoint_url = got
        if body.delivery == "poll":
            check_url(endpoint_url, "poll endpoint")
        row = SsfTransmitter(
            id=transmitter_id,
            name=body.name,
            issuer=issuer,
            jwks_uri=check_url(str(meta["jwks_uri"]), "jwks_uri"),
            metadata_doc=meta,
            configuration_endpoint=config_endpoint,
            delivery_method=body.delivery,
            endpoint_url=endpoint_url,
            auth_token=body.auth_token,
            push_token_hash=token_hash(push_token) if push_token else "",
            audience=body.audience or _audience_of(stream) or ctx.settings.resolved_issuer,
            stream_id=str(stream.get("stream_id", "")),
            events_requested=list(events),
            events_delivered=[e for e in stream.get("events_delivered", []) if isinstance(e, str)],
            status="enabled",
            status_reason="",
            verification_state="",
            verification_requested_at=0.0,
            verified_at=0.0,
            last_event_at=0.0,
            created_at=now,
            updated_at=now,
        )
        with ctx.store.session() as s:
            s.add(row)
            out = transmitter_json(row)
        _changed(
            actor, "transmitter.add", transmitter_id, {"issuer": issuer, "delivery": body.delivery}
        )
        if push_token:
            out["push_token"] = push_token
        return out

    @router.get("/transmitters")
    def list_transmitters(_: str = reader) -> list[Json]:
        with ctx.store.session() as s:
            return [
                transmitter_json(t)
                for t in s.scalars(select(SsfTransmitter).order_by(SsfTransmitter.name))
            ]

    @router.get("/transmitters/{transmitter_id}")
    def get_transmitter(transmitter_id: str, _: str = reader) -> Json:
        with ctx.store.session() as s:
            return transmitter_json(get_or_404(s, SsfTransmitter, transmitter_id, "transmitter"))

    @router.get("/transmitters/{transmitter_id}/stream")
    def get_stream(transmitter_id: str, _: str = reader) -> Json:
        """The stream's configuration as the transmitter has it now."""
        with ctx.store.session() as s:
            t = get_or_404(s, SsfTransmitter, transmitter_id, "transmitter")
        return _client(t).get_stream(_endpoint(t, "configuration_endpoint"), t.stream_id or None)

    @router.delete("/transmitters/{transmitter_id}", status_code=204)
    def delete_transmitter(
        transmitter_id: str, keep_stream: bool = False, actor: str = admin
    ) -> Response:
        """Delete the stream at the transmitter (unless ``keep_stream``), then forget it. A
        transmitter that cannot be reached does not keep Limen from forgetting it."""
        with ctx.store.session() as s:
            t = get_or_404(s, SsfTransmitter, transmitter_id, "transmitter")
        remote = "kept"
        if not keep_stream and t.stream_id and t.configuration_endpoint:
            try:
                _client(t).delete_stream(t.configuration_endpoint, t.stream_id)
                remote = "deleted"
            except (UpstreamError, ConfigError) as exc:
                remote = f"not deleted: {exc.code}"
        with ctx.store.session() as s:
            row = s.get(SsfTransmitter, transmitter_id)
            if row is not None:
                s.delete(row)
        _changed(actor, "transmitter.delete", transmitter_id, {"stream": remote})
        return Response(status_code=204)

    @router.post("/transmitters/{transmitter_id}/status")
    def set_status(transmitter_id: str, body: TransmitterStatus, actor: str = admin) -> Json:
        """Set the stream's status at the transmitter (SSF §8.1.2.2) and in Limen."""
        with ctx.store.session() as s:
            t = get_or_404(s, SsfTransmitter, transmitter_id, "transmitter")
        if t.stream_id and (t.metadata_doc or {}).get("status_endpoint"):
            _client(t).set_status(
                _endpoint(t, "status_endpoint"), t.stream_id, body.status, body.reason
            )
        with ctx.store.session() as s:
            row = get_or_404(s, SsfTransmitter, transmitter_id, "transmitter")
            row.status = body.status
            row.status_reason = body.reason
            row.updated_at = time.time()
            out = transmitter_json(row)
        _changed(actor, "transmitter.status", transmitter_id, {"status": body.status})
        return out

    @router.post("/transmitters/{transmitter_id}/subjects", status_code=204)
    def add_subject(transmitter_id: str, body: SubjectAdd, actor: str = admin) -> Response:
        with ctx.store.session() as s:
            t = get_or_404(s, SsfTransmitter, transmitter_id, "transmitter")
        _client(t).add_subject(_endpoint(t, "add_subject_endpoint"), t.stream_id, body.subject)
        ctx.audit(actor, "transmitter.add_subject", transmitter_id)
        return Response(status_code=204)

    @router.post("/transmitters/{transmitter_id}/verify")
    def verify(transmitter_id: str, actor: str = admin) -> Json:
        """Ask the transmitter for a verification event (SSF §8.1.4). Its arrival sets
        ``verified_at`` on the transmitter (poll ``GET /transmitters/{id}``)."""
        state = secrets.token_urlsafe(16)
        now = time.time()
        with ctx.store.session() as s:
            row = get_or_404(s, SsfTransmitter, transmitter_id, "transmitter")
            endpoint = _endpoint(row, "verification_endpoint")
            row.verification_state = state
            row.verification_requested_at = now
            client, stream_id = _client(row), row.stream_id
        client.verify(endpoint, stream_id, state)
        ctx.audit(actor, "transmitter.verify", transmitter_id)
        return {"state": state, "requested_at": now}


__all__ = ["DEFAULT_EVENTS", "POLL", "PUSH", "add_signal_routes", "signal_json", "transmitter_json"]
