"""CAEP and RISC events mapped to Limen's actions, and subject identifiers (RFC 9493 + SSF).
Pure: no I/O, no clock.

The mapping (``docs/../shared/reference/standards.md``, "Signal → action"):

================================================  ============================================
event                                             action
================================================  ============================================
CAEP session-revoked, RISC sessions-revoked       revoke_sessions
CAEP credential-change (any type, any change)     revoke_sessions (a new password, and a new
                                                  factor alike, need a fresh sign-in)
CAEP assurance-level-change, token-claims-change  revoke_sessions (tokens carry stale claims)
CAEP risk-level-change                            set_risk (HIGH also revokes)
CAEP device-compliance-change                     device_noncompliant / device_compliant
RISC account-disabled, account-purged             disable_user (purged: Limen keeps the user,
                                                  disabled, for the audit trail)
RISC account-enabled                              enable_user
RISC account-credential-change-required,          revoke_sessions
credential-compromise
SSF verification / stream-updated                 verification / stream_updated
anything else (session-established, ...)          ignore (acknowledged and recorded)
================================================  ============================================

The enforcement rule: an action cuts only what was authenticated before the event's time
(``event_timestamp``, else the SET's ``toe``, else its ``iat``), never after the moment Limen
received it, so a late event does not kill a fresh sign-in.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
RISC = "https://schemas.openid.net/secevent/risc/event-type/"
SSF = "https://schemas.openid.net/secevent/ssf/event-type/"

SESSION_REVOKED = CAEP + "session-revoked"
CREDENTIAL_CHANGE = CAEP + "credential-change"
ASSURANCE_LEVEL_CHANGE = CAEP + "assurance-level-change"
TOKEN_CLAIMS_CHANGE = CAEP + "token-claims-change"
DEVICE_COMPLIANCE_CHANGE = CAEP + "device-compliance-change"
RISK_LEVEL_CHANGE = CAEP + "risk-level-change"
ACCOUNT_DISABLED = RISC + "account-disabled"
ACCOUNT_PURGED = RISC + "account-purged"
ACCOUNT_ENABLED = RISC + "account-enabled"
ACCOUNT_CREDENTIAL_CHANGE_REQUIRED = RISC + "account-credential-change-required"
CREDENTIAL_COMPROMISE = RISC + "credential-compromise"
SESSIONS_REVOKED = RISC + "sessions-revoked"
VERIFICATION = SSF + "verification"
STREAM_UPDATED = SSF + "stream-updated"


class Action(enum.StrEnum):
    """What Limen does about a signal."""

    REVOKE_SESSIONS = "revoke_sessions"
    DISABLE_USER = "disable_user"
    ENABLE_USER = "enable_user"
    SET_RISK = "set_risk"
    DEVICE_NONCOMPLIANT = "device_noncompliant"
    DEVICE_COMPLIANT = "device_compliant"
    VERIFICATION = "verification"
    STREAM_UPDATED = "stream_updated"
    IGNORE = "ignore"


#: Event types Limen acts on, with the action (risk and device events depend on the body).
EVENT_ACTIONS: Mapping[str, Action] = {
    SESSION_REVOKED: Action.REVOKE_SESSIONS,
    SESSIONS_REVOKED: Action.REVOKE_SESSIONS,
    CREDENTIAL_CHANGE: Action.REVOKE_SESSIONS,
    ASSURANCE_LEVEL_CHANGE: Action.REVOKE_SESSIONS,
    TOKEN_CLAIMS_CHANGE: Action.REVOKE_SESSIONS,
    ACCOUNT_CREDENTIAL_CHANGE_REQUIRED: Action.REVOKE_SESSIONS,
    CREDENTIAL_COMPROMISE: Action.REVOKE_SESSIONS,
    ACCOUNT_DISABLED: Action.DISABLE_USER,
    ACCOUNT_PURGED: Action.DISABLE_USER,
    ACCOUNT_ENABLED: Action.ENABLE_USER,
    RISK_LEVEL_CHANGE: Action.SET_RISK,
    DEVICE_COMPLIANCE_CHANGE: Action.DEVICE_NONCOMPLIANT,
    VERIFICATION: Action.VERIFICATION,
    STREAM_UPDATED: Action.STREAM_UPDATED,
}

RISK_LEVELS = ("low", "medium", "high")


class EventError(ValueError):
    """An event body or subject that does not conform (RFC 8935 ``invalid_request``)."""


# --- subjects ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subject:
    """A simple subject identifier (RFC 9493): its format and members."""

    format: str
    fields: Mapping[str, str]

    def display(self) -> str:
        """``email:alice@example.com``, ``iss_sub:https://idp|248289761001``..."""
        f = self.fields
        if self.format == "email":
            return f"email:{f.get('email', '')}"
        if self.format == "iss_sub":
            return f"iss_sub:{f.get('iss', '')}|{f.get('sub', '')}"
        if self.format in ("opaque", "jwt_id", "saml_assertion_id"):
            return f"{self.format}:{f.get('id', f.get('jti', f.get('assertion_id', '')))}"
        if self.format == "phone_number":
            return f"phone_number:{f.get('phone_number', '')}"
        values = ",".join(f"{k}={v}" for k, v in sorted(f.items()) if k != "format")
        return f"{self.format}:{values}"


@dataclass(frozen=True, slots=True)
class SubjectRef:
    """A signal's subject: a simple one, or the parts of a complex one (SSF §3.2)."""

    user: Subject | None = None
    device: Subject | None = None
    session: Subject | None = None
    #: Other members of a complex subject (application, tenant, group...), unused by Limen.
    others: Mapping[str, Subject] = field(default_factory=dict)

    def display(self) -> str:
        parts = [
            f"{name}={s.display()}"
            for name, s in (("user", self.user), ("device", self.device), ("session", self.session))
            if s is not None
        ]
        parts += [f"{k}={v.display()}" for k, v in sorted(self.others.items())]
        if len(parts) == 1 and self.user is not None:
            return self.user.display()
        return "complex:" + ";".join(parts) if parts else "-"


def parse_simple(value: Any) -> Subject:
    """A simple subject; ``format`` or the older ``subject_type`` (RISC) names its kind."""
    if not isinstance(value, dict):
        raise EventError("a subject identifier must be an object")
    kind = value.get("format", value.get("subject_type"))
    if not isinstance(kind, str) or not kind:
        raise EventError("a subject identifier has no format")
    fields = {k: v for k, v in value.items() if isinstance(v, str) and k not in ("format",)}
    fields.pop("subject_type", None)
    kind = kind.replace("-", "_") if kind in ("iss-sub", "phone-number") else kind
    required = {"email": "email", "iss_sub": "sub", "opaque": "id"}
    member = required.get(kind)
    if member is not None and not fields.get(member):
        raise EventError(f"a {kind} subject has no {member!r}")
    if kind == "iss_sub" and not fields.get("iss"):
        raise EventError("an iss_sub subject has no 'iss'")
    return Subject(kind, fields)


def parse_subject(value: Any) -> SubjectRef:
    """A ``sub_id`` (or legacy ``subject``). A simple subject that names a user (email,
    iss_sub, opaque, phone_number, account...) becomes ``user``; a complex one is split by
    member."""
    if not isinstance(value, dict):
        raise EventError("sub_id must be an object")
    kind = value.get("format", value.get("subject_type"))
    if kind != "complex" and not any(k in value for k in ("user", "device", "session")):
        return SubjectRef(user=parse_simple(value))
    parts: dict[str, Subject] = {}
    for name, member in value.items():
        if name in ("format", "subject_type"):
            continue
        parts[name] = parse_simple(member)
    if not parts:
        raise EventError("a complex subject has no members")
    return SubjectRef(
        user=parts.pop("user", None),
        device=parts.pop("device", None),
        session=parts.pop("session", None),
        others=parts,
    )


# --- events → plans ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do about one event."""

    action: Action
    #: When the event happened: only sessions authenticated before it are cut.
    event_timestamp: float
    #: A short reason for logs, bus events and the signal record (``credential_change``...).
    reason: str
    #: Also revoke (set_risk HIGH).
    revoke: bool = False
    risk_level: str | None = None
    #: The event body's interesting members (no secrets exist in CAEP/RISC events).
    detail: Mapping[str, Any] = field(default_factory=dict)
    #: Why the event is ignored, if it is.
    ignored: str = ""


def short_name(event_type: str) -> str:
    """``credential-change`` from its URI (the last path segment)."""
    return event_type.rstrip("/").rsplit("/", 1)[-1] or event_type


def event_time(
    event: Mapping[str, Any], *, iat: float, toe: float | None, received_at: float
) -> float:
    """When the event happened: ``event_timestamp`` (CAEP), else ``toe`` (RFC 8417), else
    ``iat``; never later than when Limen received it, so a transmitter's clock running ahead
    cannot revoke sign-ins that come after the signal."""
    when: float = iat
    stamp = event.get("event_timestamp")
    if isinstance(stamp, int | float) and not isinstance(stamp, bool):
        when = float(stamp)
    elif toe is not None:
        when = toe
    return min(when, received_at)


_DETAIL_KEYS = (
    "credential_type",
    "change_type",
    "current_level",
    "previous_level",
    "change_direction",
    "namespace",
    "current_status",
    "previous_status",
    "principal",
    "risk_reason",
    "reason",
    "reason_admin",
    "reason_user",
    "initiating_entity",
    "state",
    "status",
    "claims",
)


def plan_event(
    event_type: str,
    event: Mapping[str, Any],
    *,
    iat: float,
    toe: float | None = None,
    received_at: float,
) -> Plan:
    """Map one event to a :class:`Plan`. Raises :class:`EventError` when a known event's
    body does not conform (RFC 8935 ``invalid_request``)."""
    when = event_time(event, iat=iat, toe=toe, received_at=received_at)
    detail = {k: event[k] for k in _DETAIL_KEYS if k in event}
    name = short_name(event_type).replace("-", "_")
    action = EVENT_ACTIONS.get(event_type)
    if action is None:
        return Plan(Action.IGNORE, when, name, detail=detail, ignored="unsupported event type")
    if action is Action.SET_RISK:
        level = event.get("current_level")
        if not isinstance(level, str) or level.lower() not in RISK_LEVELS:
            raise EventError("risk-level-change: current_level must be LOW, MEDIUM or HIGH")
        level = level.lower()
        return Plan(action, when, f"risk_{level}", revoke=level == "high", risk_level=level,
                    detail=detail)  # fmt: skip
    if action is Action.DEVICE_NONCOMPLIANT:
        status = event.get("current_status")
        if status == "compliant":
            return Plan(Action.DEVICE_COMPLIANT, when, "device_compliant", detail=detail)
        if status != "not-compliant":
            raise EventError(
                "device-compliance-change: current_status must be compliant or not-compliant"
            )
        return Plan(action, when, "device_noncompliant", detail=detail)
    if event_type == CREDENTIAL_CHANGE:
        kind = event.get("credential_type")
        change = event.get("change_type")
        if not isinstance(kind, str) or not isinstance(change, str):
            raise EventError("credential-change: credential_type and change_type are required")
        return Plan(action, when, f"credential_change:{kind}:{change}", detail=detail)
    return Plan(action, when, name, detail=detail)
