"""Sign-in policies, the pure half: which policies are compiled for sign-in, and which error
each decision becomes (``sign_in_blocked``, the step-up words, re-authentication)."""

from __future__ import annotations

from typing import Any

import pytest

from limen.errors import AuthError, PolicyDenied
from limen.identity.service import SECOND_FACTOR_REQUIRED, SignInAttempt
from limen.policy.conditional import (
    SIGN_IN,
    EvaluationContext,
    LocationIndex,
    PolicyDecision,
    PolicyEntry,
    parse_policy,
)
from limen.policy.sign_in import SIGN_IN_BLOCKED, compile_sign_in, refusal
from limen.store.models import User

NOW = 1_700_000_000.0
ALICE = User(id="usr_alice", username="alice", risk_level="low")
OFFICE = LocationIndex([("loc_office", ["198.18.1.0/24"], True)])


def entry(pid: str, state: str = "on", **doc: Any) -> PolicyEntry:
    base: dict[str, Any] = {"users": {"include": ["all"]}, "target": "sign_in"}
    base.update(doc)
    base.setdefault("grant", {"block": True})
    return (pid, f"policy {pid}", state, parse_policy(base))


def attempt(
    amr: tuple[str, ...] = ("pwd",), ip: str = "192.0.2.7", grant: str = "password"
) -> SignInAttempt:
    return SignInAttempt(
        user=ALICE,
        grant_type=grant,
        amr=amr,
        ip_address=ip,
        device_id=None,
        client_id="limen-client",
    )


def context(ip: str, amr: frozenset[str] = frozenset({"pwd"})) -> EvaluationContext:
    return EvaluationContext(
        user_id=ALICE.id,
        app_id="",
        app_kind=SIGN_IN,
        source_ip=ip,
        location_ids=OFFICE.match(ip),
        amr=amr,
        auth_time=NOW,
        now=NOW,
    )


def test_only_sign_in_policies_are_compiled() -> None:
    compiled = compile_sign_in(
        [
            entry("pol_signin"),
            entry("pol_app", target={"apps": ["app_wiki"]}),
            entry("pol_all", target="all_private"),
            entry("pol_off", state="off"),
            entry("pol_report", state="report_only"),
        ],
        OFFICE,
        version=7,
    )
    assert compiled.version == 7
    assert compiled.policies.size == 2  # pol_signin and pol_report
    decision = compiled.policies.evaluate(context("192.0.2.7"))
    assert decision.action == "block"
    assert decision.applied == ("pol_signin",)
    assert decision.report_only == (("pol_report", "block"),)
    assert not compiled.needs_groups and not compiled.needs_device


@pytest.mark.parametrize(
    ("doc", "groups", "device"),
    [
        ({"groups": {"include": ["grp_staff"]}, "users": {"include": []}}, True, False),
        ({"groups": {"exclude": ["grp_breakglass"]}}, True, False),
        ({"conditions": {"device_platforms": ["linux"]}}, False, True),
        ({"conditions": {"device_compliance": "not_compliant"}}, False, True),
        ({"grant": {"require": ["compliant_device"]}}, False, True),
        ({"conditions": {"locations": ["loc_office"]}}, False, False),
    ],
)
def test_what_a_compiled_set_needs_per_sign_in(
    doc: dict[str, Any], groups: bool, device: bool
) -> None:
    compiled = compile_sign_in([entry("pol_x", **doc)], OFFICE)
    assert (compiled.needs_groups, compiled.needs_device) == (groups, device)
    # A flow policy that looks at groups never costs a sign-in a membership query.
    flows_only = compile_sign_in([entry("pol_y", target="all_private", **doc)], OFFICE)
    assert (flows_only.needs_groups, flows_only.needs_device) == (False, False)


def test_outside_a_trusted_location_is_blocked_with_the_policy_named() -> None:
    compiled = compile_sign_in(
        [
            entry(
                "pol_outside",
                conditions={"locations": {"include": ["all"], "exclude": ["all_trusted"]}},
            )
        ],
        OFFICE,
    )
    inside = compiled.policies.evaluate(context("198.18.1.2"))
    assert inside.action == "allow" and refusal(inside, attempt(ip="198.18.1.2")) is None

    outside = compiled.policies.evaluate(context("203.0.113.9"))
    error = refusal(outside, attempt(ip="203.0.113.9"))
    assert isinstance(error, PolicyDenied)
    assert error.code == SIGN_IN_BLOCKED
    assert "pol_outside" in error.message and "'policy pol_outside'" in error.message
    assert error.message.startswith("sign-in from 203.0.113.9 refused: blocked by policy")


def test_mfa_required_at_sign_in_is_the_step_up_refusal() -> None:
    compiled = compile_sign_in([entry("pol_mfa", grant={"require": ["mfa"]})], OFFICE)
    without = compiled.policies.evaluate(context("192.0.2.7"))
    assert without.action == "challenge" and without.unmet == ("mfa",)
    error = refusal(without, attempt())
    assert isinstance(error, AuthError) and error.code == "invalid_grant"
    assert error.message.startswith(f"{SECOND_FACTOR_REQUIRED}: policy 'policy pol_mfa'")

    with_mfa = compiled.policies.evaluate(context("192.0.2.7", frozenset({"pwd", "otp", "mfa"})))
    assert with_mfa.action == "allow"
    assert refusal(with_mfa, attempt(amr=("pwd", "otp", "mfa"))) is None


def test_sign_in_frequency_unmet_is_re_authentication() -> None:
    decision = PolicyDecision(
        "challenge",
        ("pol_freq",),
        reason="policy 'freq' (pol_freq) requires sign_in_frequency",
        policy_id="pol_freq",
        unmet=("sign_in_frequency",),
        max_age=3600,
    )
    error = refusal(decision, attempt(amr=("pwd", "mfa"), grant="refresh_token"))
    assert isinstance(error, AuthError) and error.code == "invalid_grant"
    assert error.message.startswith("re-authentication required: policy 'freq'")
    # Both unmet and no factor: the second factor is asked for first (a sign-in with it
    # answers both).
    both = PolicyDecision(
        "challenge", ("pol_freq",), reason="r", unmet=("sign_in_frequency", "mfa")
    )
    error = refusal(both, attempt(grant="refresh_token"))
    assert error is not None and error.message.startswith(SECOND_FACTOR_REQUIRED)


def test_unmet_compliant_device_blocks_sign_in() -> None:
    compiled = compile_sign_in([entry("pol_dev", grant={"require": ["compliant_device"]})], OFFICE)
    decision = compiled.policies.evaluate(context("192.0.2.7"))  # no device: not compliant
    error = refusal(decision, attempt())
    assert isinstance(error, PolicyDenied) and error.code == SIGN_IN_BLOCKED
    assert "compliant_device" in error.message


def test_unknown_address_is_named_as_such() -> None:
    compiled = compile_sign_in([entry("pol_all")], OFFICE)
    error = refusal(compiled.policies.evaluate(context("")), attempt(ip=""))
    assert error is not None
    assert error.message.startswith("sign-in from an unknown address refused")
