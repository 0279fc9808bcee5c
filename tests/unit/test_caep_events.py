"""CAEP/RISC event → action mapping (standards.md "Signal → action") and subject identifier
parsing (RFC 9493 + SSF, with RISC's ``subject_type``)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limen.signals import events as ev
from limen.signals.events import Action, EventError, parse_subject, plan_event

NOW = 1_750_000_000.0
IAT = NOW - 30


def plan(event_type: str, body: dict[str, Any] | None = None, toe: float | None = None) -> ev.Plan:
    return plan_event(event_type, body or {}, iat=IAT, toe=toe, received_at=NOW)


@pytest.mark.parametrize(
    ("event_type", "body", "action", "reason"),
    [
        (ev.SESSION_REVOKED, {}, Action.REVOKE_SESSIONS, "session_revoked"),
        (ev.SESSIONS_REVOKED, {}, Action.REVOKE_SESSIONS, "sessions_revoked"),
        (
            ev.CREDENTIAL_CHANGE,
            {"credential_type": "password", "change_type": "update"},
            Action.REVOKE_SESSIONS,
            "credential_change:password:update",
        ),
        (
            ev.CREDENTIAL_CHANGE,
            {"credential_type": "fido2-roaming", "change_type": "create"},
            Action.REVOKE_SESSIONS,
            "credential_change:fido2-roaming:create",
        ),
        (
            ev.ASSURANCE_LEVEL_CHANGE,
            {"namespace": "NIST-AAL", "current_level": "nist-aal2", "change_direction": "increase"},
            Action.REVOKE_SESSIONS,
            "assurance_level_change",
        ),
        (
            ev.TOKEN_CLAIMS_CHANGE,
            {"claims": {"role": "ro"}},
            Action.REVOKE_SESSIONS,
            "token_claims_change",
        ),
        (
            ev.ACCOUNT_CREDENTIAL_CHANGE_REQUIRED,
            {},
            Action.REVOKE_SESSIONS,
            "account_credential_change_required",
        ),
        (
            ev.CREDENTIAL_COMPROMISE,
            {"credential_type": "password"},
            Action.REVOKE_SESSIONS,
            "credential_compromise",
        ),
        (ev.ACCOUNT_DISABLED, {"reason": "hijacking"}, Action.DISABLE_USER, "account_disabled"),
        (ev.ACCOUNT_PURGED, {}, Action.DISABLE_USER, "account_purged"),
        (ev.ACCOUNT_ENABLED, {}, Action.ENABLE_USER, "account_enabled"),
        (
            ev.RISK_LEVEL_CHANGE,
            {"current_level": "MEDIUM", "principal": "USER"},
            Action.SET_RISK,
            "risk_medium",
        ),
        (
            ev.DEVICE_COMPLIANCE_CHANGE,
            {"current_status": "not-compliant", "previous_status": "compliant"},
            Action.DEVICE_NONCOMPLIANT,
            "device_noncompliant",
        ),
        (
            ev.DEVICE_COMPLIANCE_CHANGE,
            {"current_status": "compliant", "previous_status": "not-compliant"},
            Action.DEVICE_COMPLIANT,
            "device_compliant",
        ),
        (ev.VERIFICATION, {"state": "s"}, Action.VERIFICATION, "verification"),
        (ev.STREAM_UPDATED, {"status": "paused"}, Action.STREAM_UPDATED, "stream_updated"),
        (ev.CAEP + "session-established", {}, Action.IGNORE, "session_established"),
        (ev.RISC + "identifier-changed", {}, Action.IGNORE, "identifier_changed"),
        ("https://example.com/event/made-up", {}, Action.IGNORE, "made_up"),
    ],
)
def test_event_mapping(event_type: str, body: dict[str, Any], action: Action, reason: str) -> None:
    p = plan(event_type, body)
    assert p.action is action
    assert p.reason == reason
    assert bool(p.ignored) == (action is Action.IGNORE)


def test_high_risk_also_revokes() -> None:
    high = plan(ev.RISK_LEVEL_CHANGE, {"current_level": "HIGH", "risk_reason": "leaked"})
    assert (high.action, high.revoke, high.risk_level) == (Action.SET_RISK, True, "high")
    assert high.detail["risk_reason"] == "leaked"
    low = plan(ev.RISK_LEVEL_CHANGE, {"current_level": "low"})
    assert (low.revoke, low.risk_level) == (False, "low")


@pytest.mark.parametrize(
    ("event_type", "body"),
    [
        (ev.RISK_LEVEL_CHANGE, {}),
        (ev.RISK_LEVEL_CHANGE, {"current_level": "EXTREME"}),
        (ev.DEVICE_COMPLIANCE_CHANGE, {"current_status": "meh"}),
        (ev.CREDENTIAL_CHANGE, {"credential_type": "password"}),
    ],
)
def test_nonconforming_bodies(event_type: str, body: dict[str, Any]) -> None:
    with pytest.raises(EventError):
        plan(event_type, body)


def test_event_time_rule() -> None:
    # event_timestamp first, then toe, then iat; never after reception.
    assert plan(ev.SESSION_REVOKED, {"event_timestamp": NOW - 100}).event_timestamp == NOW - 100
    assert plan(ev.SESSION_REVOKED, {}, toe=NOW - 50).event_timestamp == NOW - 50
    assert plan(ev.SESSION_REVOKED, {}).event_timestamp == IAT
    assert plan(ev.SESSION_REVOKED, {"event_timestamp": NOW + 3600}).event_timestamp == NOW
    assert plan(ev.SESSION_REVOKED, {"event_timestamp": "soon"}).event_timestamp == IAT


@pytest.mark.parametrize(
    ("sub_id", "display"),
    [
        ({"format": "email", "email": "alice@example.com"}, "email:alice@example.com"),
        ({"subject_type": "email", "email": "alice@example.com"}, "email:alice@example.com"),
        ({"format": "iss_sub", "iss": "https://idp", "sub": "42"}, "iss_sub:https://idp|42"),
        ({"subject_type": "iss-sub", "iss": "https://idp", "sub": "42"}, "iss_sub:https://idp|42"),
        ({"format": "opaque", "id": "usr_1"}, "opaque:usr_1"),
        ({"format": "phone_number", "phone_number": "+1"}, "phone_number:+1"),
    ],
)
def test_simple_subjects(sub_id: dict[str, Any], display: str) -> None:
    ref = parse_subject(sub_id)
    assert ref.user is not None
    assert ref.device is None and ref.session is None
    assert ref.display() == display


def test_complex_subject() -> None:
    ref = parse_subject(
        {
            "format": "complex",
            "user": {"format": "email", "email": "bob@example.com"},
            "device": {"format": "opaque", "id": "dev_1"},
            "session": {"format": "opaque", "id": "ses_1"},
            "tenant": {"format": "opaque", "id": "t1"},
        }
    )
    assert ref.user is not None and ref.user.fields["email"] == "bob@example.com"
    assert ref.device is not None and ref.device.fields["id"] == "dev_1"
    assert ref.session is not None and ref.session.fields["id"] == "ses_1"
    assert set(ref.others) == {"tenant"}
    assert ref.display().startswith("complex:user=email:bob@example.com;device=opaque:dev_1")
    # A complex subject without "format" (older drafts) is recognised by its members.
    legacy = parse_subject({"device": {"format": "opaque", "id": "dev_2"}})
    assert legacy.user is None and legacy.device is not None


@pytest.mark.parametrize(
    "sub_id",
    [
        "alice",
        {},
        {"format": ""},
        {"format": "email"},
        {"format": "iss_sub", "sub": "42"},
        {"format": "opaque"},
        {"format": "complex"},
        {"format": "complex", "user": "alice"},
    ],
)
def test_bad_subjects(sub_id: Any) -> None:
    with pytest.raises(EventError):
        parse_subject(sub_id)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.text(max_size=8) | st.integers(),
        lambda c: st.dictionaries(st.text(max_size=8), c, max_size=4) | st.lists(c, max_size=3),
        max_leaves=12,
    )
)
def test_arbitrary_subjects_raise_only_event_error(value: Any) -> None:
    try:
        parse_subject(value)
    except EventError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(ev.EVENT_ACTIONS)),
    st.dictionaries(
        st.sampled_from(
            ["current_level", "current_status", "credential_type", "change_type", "event_timestamp"]
        ),
        st.none() | st.text(max_size=12) | st.floats(allow_nan=False),
    ),
)
def test_arbitrary_bodies_raise_only_event_error(event_type: str, body: dict[str, Any]) -> None:
    try:
        p = plan(event_type, body)
    except EventError:
        return
    assert p.event_timestamp <= NOW
