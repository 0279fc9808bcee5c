"""Applying a signal: resolve its subject to a Limen user (device, session), change the
store in one unit of work together with the signal's audit row, then publish
``SUBJECT_REVOKED`` so every edge cuts the user's live flows; edges report back on
:data:`limen.signals.SIGNAL_ENFORCED` and :class:`EnforcementRecorder` stores how many flows
were cut and how long it took.

The revocation rule: ``users.revoked_before = max(current, event time)`` — not "now" — and
only sessions authenticated before the event time are revoked (with their refresh-token
families), so a late event leaves a sign-in made after the event alone.

Subject resolution (documented in docs/signals.md by the lead):

- ``email`` → the user whose email (case-insensitive) or username equals it;
- ``iss_sub`` → an :class:`~limen.store.signal_models.ExternalIdentity` row for
  ``(iss, sub)``; else ``sub`` matched against user id, username, then email;
- ``opaque`` → an ``ExternalIdentity`` row for ``(transmitter issuer, id)``; else user id or
  username;
- a complex subject's ``device`` (opaque ``dev_…``) and ``session`` (opaque ``ses_…``) name
  Limen devices and sessions; a subject with only those acts on their user.

A subject that resolves to nobody is recorded (action ``ignored: subject not found``) and
acknowledged: the transmitter did its job, there is nothing for Limen to cut.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from limen.bus.inprocess import SUBJECT_REVOKED, BusEvent, EventBus
from limen.errors import NotFound
from limen.ids import new_id
from limen.service import ServiceContext
from limen.signals import SIGNAL_ENFORCED
from limen.signals.events import Action, Plan, Subject, SubjectRef
from limen.store.models import Device, RefreshToken, SignInSession, User
from limen.store.signal_models import ExternalIdentity, SignalRecord

log = logging.getLogger(__name__)

NOT_FOUND = "ignored: subject not found"
#: Actions after which the user's live flows must be cut.
_CUTTING = {Action.REVOKE_SESSIONS, Action.DISABLE_USER, Action.DEVICE_NONCOMPLIANT}


@dataclass(frozen=True, slots=True)
class Resolved:
    user_id: str | None = None
    device_id: str | None = None
    session_id: str | None = None


def _user_by_name(s: Session, value: str, *, email_first: bool) -> User | None:
    by_email = select(User).where(func.lower(User.email) == value.lower(), User.email != "")
    by_username = select(User).where(User.username == value)
    first, second = (by_email, by_username) if email_first else (by_username, by_email)
    return s.scalar(first.limit(1)) or s.scalar(second.limit(1))


def _resolve_user(s: Session, subject: Subject, issuer: str) -> User | None:
    f = subject.fields
    if subject.format == "email":
        return _user_by_name(s, f["email"], email_first=True)
    if subject.format in ("iss_sub", "opaque"):
        iss = f.get("iss", issuer) if subject.format == "iss_sub" else issuer
        sub = f["sub"] if subject.format == "iss_sub" else f["id"]
        mapped = s.scalar(
            select(ExternalIdentity.user_id).where(
                ExternalIdentity.issuer == iss, ExternalIdentity.subject == sub
            )
        )
        if mapped is not None:
            return s.get(User, mapped)
        return s.get(User, sub) or _user_by_name(s, sub, email_first=False)
    if subject.format == "account":
        uri = f.get("uri", "")
        return _user_by_name(s, uri.removeprefix("acct:"), email_first=True) if uri else None
    return None


def resolve(s: Session, ref: SubjectRef, issuer: str = "") -> Resolved:
    """The Limen user, device and session a subject names (any may be None)."""
    user = _resolve_user(s, ref.user, issuer) if ref.user is not None else None
    device: Device | None = None
    session: SignInSession | None = None
    if ref.device is not None:
        ident = ref.device.fields.get("id") or ref.device.fields.get("sub", "")
        device = s.get(Device, ident) if ident else None
    if ref.session is not None:
        ident = ref.session.fields.get("id") or ref.session.fields.get("sub", "")
        session = s.get(SignInSession, ident) if ident else None
    user_id = user.id if user is not None else None
    if user_id is None:
        user_id = (device.user_id if device is not None else None) or (
            session.user_id if session is not None else None
        )
    return Resolved(
        user_id=user_id,
        device_id=device.id if device is not None else None,
        session_id=session.id if session is not None else None,
    )


def revoke_before(s: Session, user: User, when: float, now: float) -> int:
    """Void what ``user`` authenticated before ``when``: tokens (``revoked_before``), and
    the sessions (with their refresh-token families) that started before it. Returns how
    many sessions were revoked."""
    user.revoked_before = max(user.revoked_before, when)
    user.updated_at = now
    sessions = list(
        s.scalars(
            select(SignInSession.id).where(
                SignInSession.user_id == user.id,
                SignInSession.revoked_at.is_(None),
                SignInSession.auth_time < when,
            )
        )
    )
    if sessions:
        s.execute(
            update(SignInSession)
            .where(SignInSession.id.in_(sessions))
            .values(revoked_at=now)
            .execution_options(synchronize_session=False)
        )
        s.execute(
            update(RefreshToken)
            .where(RefreshToken.session_id.in_(sessions))
            .values(family_revoked=True)
            .execution_options(synchronize_session=False)
        )
    return len(sessions)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a signal did."""

    signal_id: str
    action: str
    user_id: str | None
    device_id: str | None = None
    #: The revocation time published to the edges (None when nothing was cut).
    revoked_at: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def apply_signal(
    ctx: ServiceContext,
    *,
    source: str,
    subject: str,
    event_type: str,
    plan: Plan,
    ref: SubjectRef | None = None,
    user_id: str | None = None,
    issuer: str = "",
    jti: str = "",
    received_at: float | None = None,
    detail: dict[str, Any] | None = None,
) -> Outcome:
    """Resolve the subject (``ref``, or an already known ``user_id``), apply ``plan``,
    write the :class:`SignalRecord` in the same unit of work, then publish
    ``SUBJECT_REVOKED`` when live flows must be cut. Stream events (verification,
    stream-updated) are recorded by the receiver, not here."""
    now = time.time() if received_at is None else received_at
    signal_id = new_id("signal")
    info: dict[str, Any] = dict(plan.detail)
    info.update(detail or {})
    action = plan.action.value if not plan.ignored else f"ignored: {plan.ignored}"
    revoked_at: float | None = None
    with ctx.store.session() as s:
        found = Resolved(user_id=user_id) if user_id else Resolved()
        if ref is not None and not user_id:
            found = resolve(s, ref, issuer)
        user = s.get(User, found.user_id) if found.user_id else None
        if plan.action is Action.IGNORE:
            pass
        elif user is None:
            action = NOT_FOUND
        else:
            action, revoked_at = _apply(ctx, s, user, found, plan, now, info)
        s.add(
            SignalRecord(
                id=signal_id,
                source=source[:600],
                subject=subject,
                user_id=user.id if user is not None else "",
                device_id=found.device_id or "",
                event_type=event_type[:255],
                jti=jti,
                received_at=now,
                event_timestamp=plan.event_timestamp,
                action=action[:255],
                flows_cut=None,
                time_to_cut_ms=None,
                detail=info,
            )
        )
    if revoked_at is not None and user is not None:
        payload: dict[str, Any] = {
            "user_id": user.id,
            "reason": plan.reason,
            "at": revoked_at,
            "signal_id": signal_id,
            "accepted_at": now,
        }
        if plan.action is Action.DEVICE_NONCOMPLIANT and found.device_id:
            payload["device_id"] = found.device_id
        ctx.bus.publish(SUBJECT_REVOKED, **payload)
    if plan.action is not Action.IGNORE and user is not None:
        ctx.config_changed(f"signal.{plan.action.value}")
    log.info("signal %s from %s: %s for %s -> %s", signal_id, source, event_type, subject, action)
    return Outcome(
        signal_id=signal_id,
        action=action,
        user_id=user.id if user is not None else None,
        device_id=found.device_id,
        revoked_at=revoked_at,
        detail=info,
    )


def _apply(
    ctx: ServiceContext,
    s: Session,
    user: User,
    found: Resolved,
    plan: Plan,
    now: float,
    info: dict[str, Any],
) -> tuple[str, float | None]:
    """Change the store for ``plan``; the action recorded and the revocation time."""
    when = plan.event_timestamp
    action = plan.action
    cut = action in _CUTTING
    if action is Action.DISABLE_USER:
        user.enabled = False
    elif action is Action.ENABLE_USER:
        user.enabled = True
        user.updated_at = now
    elif action is Action.SET_RISK:
        assert plan.risk_level is not None  # set by plan_event for SET_RISK
        info["previous_risk"] = user.risk_level
        user.risk_level = plan.risk_level
        user.updated_at = now
        cut = plan.revoke
    elif action in (Action.DEVICE_NONCOMPLIANT, Action.DEVICE_COMPLIANT):
        device = s.get(Device, found.device_id) if found.device_id else None
        if device is None:
            return "ignored: device not found", None
        device.compliant = action is Action.DEVICE_COMPLIANT
    ctx.store.bump_config_version(s)
    if not cut:
        return action.value, None
    if action is Action.DEVICE_NONCOMPLIANT:
        # The device's flows are cut (the edge refuses the non-compliant device by policy);
        # the user's other devices keep their sessions.
        return action.value, when
    info["sessions_revoked"] = revoke_before(s, user, when, now)
    return action.value, when


def user_exists(ctx: ServiceContext, user_id: str) -> None:
    """Raise :class:`NotFound` unless ``user_id`` names a user."""
    with ctx.store.session() as s:
        if s.get(User, user_id) is None:
            raise NotFound(f"no user {user_id!r}")


# --- enforcement reports ----------------------------------------------------------------------

#: Edge reports kept while their signal's row is not written yet (admin signals are
#: recorded by a bus handler that may run after the edge's).
_PENDING_CAP = 1024
_installed: weakref.WeakSet[EventBus] = weakref.WeakSet()
_install_lock = threading.Lock()


class EnforcementRecorder:
    """Records, as :class:`SignalRecord` rows, the ``SUBJECT_REVOKED`` events published
    without a signal (admin disable, password change, MFA reset, device changes), and
    stores each edge's :data:`SIGNAL_ENFORCED` report (flows cut, time to cut) on its
    signal's row.

    Bus handlers run on the publisher's thread, the edge's event loop among them: the
    database work goes to one worker thread, in order, so the data plane never waits."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="signal-recorder")
        self._pending: OrderedDict[tuple[str, float], list[dict[str, Any]]] = OrderedDict()
        self.unsubscribe = ctx.bus.subscribe(self._on_bus)

    @classmethod
    def install(cls, ctx: ServiceContext) -> EnforcementRecorder | None:
        """One recorder per bus; None when one is already installed."""
        with _install_lock:
            if ctx.bus in _installed:
                return None
            _installed.add(ctx.bus)
        return cls(ctx)

    def close(self) -> None:
        self.unsubscribe()
        self._pool.shutdown(wait=True)
        with _install_lock:
            _installed.discard(self.ctx.bus)

    def flush(self) -> None:
        """Wait until every report received so far is written (tests, shutdown)."""
        self._pool.submit(lambda: None).result(timeout=30)

    def _on_bus(self, event: BusEvent) -> None:
        if event.topic == SUBJECT_REVOKED and not event.payload.get("signal_id"):
            self._pool.submit(self._record_admin, dict(event.payload), time.time())
        elif event.topic == SIGNAL_ENFORCED:
            self._pool.submit(self._record_enforced, dict(event.payload))

    def _record_admin(self, payload: dict[str, Any], received_at: float) -> None:
        user_id = str(payload.get("user_id", ""))
        at = float(payload.get("at", received_at))
        reason = str(payload.get("reason", "revoked"))
        row = SignalRecord(
            id=new_id("signal"),
            source=str(payload.get("source", "admin")),
            subject=f"user:{user_id}",
            user_id=user_id,
            device_id=str(payload.get("device_id", "")),
            event_type=f"admin:{reason}",
            jti="",
            received_at=at,
            event_timestamp=at,
            action="revoke_sessions",
            flows_cut=None,
            time_to_cut_ms=None,
            detail={"reason": reason},
        )
        for report in self._pending.pop((user_id, at), []):
            _add_report(row, report)
        try:
            with self.ctx.store.session() as s:
                s.add(row)
        except Exception:
            log.exception("could not record the admin signal for %s", user_id)

    def _record_enforced(self, payload: dict[str, Any]) -> None:
        signal_id = str(payload.get("signal_id") or "")
        user_id = str(payload.get("user_id", ""))
        try:
            at = float(payload.get("at", 0.0))
        except (TypeError, ValueError):
            at = 0.0
        try:
            with self.ctx.store.session() as s:
                row: SignalRecord | None = None
                if signal_id:
                    row = s.get(SignalRecord, signal_id)
                else:
                    row = s.scalar(
                        select(SignalRecord)
                        .where(
                            SignalRecord.user_id == user_id,
                            SignalRecord.event_timestamp == at,
                            or_(SignalRecord.jti == "", SignalRecord.jti.is_(None)),
                        )
                        .order_by(SignalRecord.received_at.desc())
                        .limit(1)
                    )
                if row is None:
                    self._pending.setdefault((user_id, at), []).append(payload)
                    while len(self._pending) > _PENDING_CAP:
                        self._pending.popitem(last=False)
                    return
                _add_report(row, payload)
        except Exception:
            log.exception("could not record the enforcement of signal %s", signal_id or user_id)


def _add_report(row: SignalRecord, report: dict[str, Any]) -> None:
    """Sum the flows every edge cut; the time to cut is the slowest edge's."""
    try:
        flows = int(report.get("flows_cut", 0))
        done_at = float(report.get("done_at", row.received_at))
    except (TypeError, ValueError):
        return
    row.flows_cut = (row.flows_cut or 0) + flows
    elapsed = max(0.0, (done_at - row.received_at) * 1000.0)
    row.time_to_cut_ms = max(row.time_to_cut_ms or 0.0, elapsed)
    edges = list(row.detail.get("edges", []))
    edges.append({"node": str(report.get("node", "")), "flows_cut": flows})
    row.detail = {**row.detail, "edges": edges}
