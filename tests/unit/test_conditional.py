"""Conditional access: the evaluator (table-driven and against a brute-force reference),
document validation, named locations and What-If."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limen.errors import ConfigError
from limen.policy.conditional import (
    ACR_MFA,
    ALL_TRUSTED,
    SIGN_IN,
    EvaluationContext,
    LocationIndex,
    PolicyDecision,
    PolicySet,
    PolicySpec,
    decision_json,
    normalize_platform,
    parse_cidrs,
    parse_policy,
    spec_references,
    spec_to_dict,
    what_if,
)

NOW = 1_700_000_000.0

# A small tenant: grp_eng is nested inside grp_staff; the caller resolves nesting, so alice's
# context carries both.
ALICE = EvaluationContext(
    user_id="usr_alice",
    app_id="app_finance",
    app_kind="enterprise",
    group_ids=frozenset({"grp_eng", "grp_staff"}),
    source_ip="10.1.2.3",
    location_ids=frozenset({"loc_office", ALL_TRUSTED}),
    device_platform="linux",
    device_compliant=True,
    user_risk="low",
    amr=frozenset({"pwd", "mfa"}),
    auth_time=NOW - 600,
    now=NOW,
    capabilities=frozenset({"cp1"}),
)


def doc(**kw: Any) -> dict[str, Any]:
    """A policy document: everyone, all private apps, require MFA, unless overridden."""
    base: dict[str, Any] = {
        "users": {"include": ["all"]},
        "target": "all_private",
        "grant": {"require": ["mfa"]},
    }
    base.update(kw)
    return base


def compile_docs(*policies: tuple[str, dict[str, Any]]) -> PolicySet:
    return PolicySet.compile(
        [(f"pol_{i}", f"p{i}", state, parse_policy(d)) for i, (state, d) in enumerate(policies)]
    )


def ctx(**kw: Any) -> EvaluationContext:
    return dataclasses.replace(ALICE, **kw)


NO_MFA = {"amr": frozenset({"pwd"})}
BLOCK = {"grant": {"block": True}}

# (case id, [(state, doc)], context overrides, expected action, expected applied ids)
# fmt: off
CASES: list[tuple[str, list[tuple[str, dict[str, Any]]], dict[str, Any], str, list[str]]] = [
    ("no policies", [], {}, "allow", []),
    ("mfa met", [("on", doc())], {}, "allow", ["pol_0"]),
    ("mfa missing: challenge", [("on", doc())], NO_MFA, "challenge", ["pol_0"]),
    ("off is ignored", [("off", doc(**BLOCK))], {}, "allow", []),
    ("report-only never enforced", [("report_only", doc(**BLOCK))], {}, "allow", []),
    # users and groups
    ("user included by id", [("on", doc(users={"include": ["usr_alice"]}, **BLOCK))], {},
     "block", ["pol_0"]),
    ("other user not included", [("on", doc(users={"include": ["usr_bob"]}, **BLOCK))], {},
     "allow", []),
    ("group included", [("on", doc(users={}, groups={"include": ["grp_eng"]}, **BLOCK))], {},
     "block", ["pol_0"]),
    ("nested group included", [("on", doc(users={}, groups={"include": ["grp_staff"]},
                                          **BLOCK))], {}, "block", ["pol_0"]),
    ("group not held", [("on", doc(users={}, groups={"include": ["grp_hr"]}, **BLOCK))], {},
     "allow", []),
    ("user exclude beats user include",
     [("on", doc(users={"include": ["usr_alice"], "exclude": ["usr_alice"]}, **BLOCK))], {},
     "allow", []),
    ("user exclude beats all", [("on", doc(users={"include": ["all"], "exclude": ["usr_alice"]},
                                          **BLOCK))], {}, "allow", []),
    ("group exclude beats user include",
     [("on", doc(users={"include": ["usr_alice"]}, groups={"exclude": ["grp_eng"]}, **BLOCK))],
     {}, "allow", []),
    ("nested group exclude beats group include",
     [("on", doc(users={}, groups={"include": ["grp_eng"], "exclude": ["grp_staff"]},
                 **BLOCK))], {}, "allow", []),
    # target applications
    ("specific app targeted", [("on", doc(target={"apps": ["app_finance"]}, **BLOCK))], {},
     "block", ["pol_0"]),
    ("other app not targeted", [("on", doc(target={"apps": ["app_wiki"]}, **BLOCK))], {},
     "allow", []),
    ("all_private covers quick access", [("on", doc(**BLOCK))],
     {"app_id": "app_qa", "app_kind": "quick_access"}, "block", ["pol_0"]),
    ("quick_access target skips enterprise apps", [("on", doc(target="quick_access", **BLOCK))],
     {}, "allow", []),
    ("quick_access target hits quick access", [("on", doc(target="quick_access", **BLOCK))],
     {"app_id": "app_qa", "app_kind": "quick_access"}, "block", ["pol_0"]),
    ("sign_in target at sign-in", [("on", doc(target="sign_in", **BLOCK))],
     {"app_id": "", "app_kind": SIGN_IN}, "block", ["pol_0"]),
    ("sign_in target not on flows", [("on", doc(target="sign_in", **BLOCK))], {}, "allow", []),
    ("app policies not at sign-in", [("on", doc(**BLOCK)),
                                     ("on", doc(target={"apps": ["app_finance"]}, **BLOCK))],
     {"app_id": "app_finance", "app_kind": SIGN_IN}, "allow", []),
    # locations
    ("outside trusted: block", [("on", doc(conditions={"locations": {
        "include": ["all"], "exclude": ["all_trusted"]}}, **BLOCK))],
     {"source_ip": "203.0.113.9", "location_ids": frozenset()}, "block", ["pol_0"]),
    ("inside trusted: not applied", [("on", doc(conditions={"locations": {
        "include": ["all"], "exclude": ["all_trusted"]}}, **BLOCK))], {}, "allow", []),
    ("location included by id", [("on", doc(conditions={"locations": ["loc_office"]},
                                            **BLOCK))], {}, "block", ["pol_0"]),
    ("location not matched", [("on", doc(conditions={"locations": ["loc_branch"]}, **BLOCK))],
     {}, "allow", []),
    ("location exclude by id", [("on", doc(conditions={"locations": {
        "include": ["all"], "exclude": ["loc_office"]}}, **BLOCK))], {}, "allow", []),
    ("all_trusted include", [("on", doc(conditions={"locations": ["all_trusted"]}, **BLOCK))],
     {}, "block", ["pol_0"]),
    ("unknown address matches all only",
     [("on", doc(conditions={"locations": ["all_trusted"]}, **BLOCK))],
     {"source_ip": None, "location_ids": frozenset()}, "allow", []),
    # device platform and compliance
    ("platform included", [("on", doc(conditions={"device_platforms": ["linux"]}, **BLOCK))],
     {}, "block", ["pol_0"]),
    ("platform not included", [("on", doc(conditions={"device_platforms": ["windows"]},
                                          **BLOCK))], {}, "allow", []),
    ("platform excluded from all", [("on", doc(conditions={"device_platforms": {
        "include": ["all"], "exclude": ["linux"]}}, **BLOCK))], {}, "allow", []),
    ("unknown platform: only all", [("on", doc(conditions={"device_platforms": ["linux"]},
                                              **BLOCK)),
                                    ("on", doc(conditions={"device_platforms": ["all"]},
                                               grant={"require": ["mfa"]}))],
     {"device_platform": None}, "allow", ["pol_1"]),
    ("not-compliant condition on compliant device",
     [("on", doc(conditions={"device_compliance": "not_compliant"}, **BLOCK))], {}, "allow", []),
    ("not-compliant condition on unknown device",
     [("on", doc(conditions={"device_compliance": "not_compliant"}, **BLOCK))],
     {"device_compliant": None}, "block", ["pol_0"]),
    ("compliant condition", [("on", doc(conditions={"device_compliance": "compliant"},
                                        **BLOCK))], {}, "block", ["pol_0"]),
    # risk and capability
    ("high risk blocked", [("on", doc(conditions={"user_risk": ["high"]}, **BLOCK))],
     {"user_risk": "high"}, "block", ["pol_0"]),
    ("low risk not in scope", [("on", doc(conditions={"user_risk": ["medium", "high"]},
                                          **BLOCK))], {}, "allow", []),
    ("client lacks cp1", [("on", doc(conditions={"client_capabilities": {"lacks": ["cp1"]}},
                                     **BLOCK))], {"capabilities": frozenset()}, "block",
     ["pol_0"]),
    ("client has cp1", [("on", doc(conditions={"client_capabilities": {"lacks": ["cp1"]}},
                                   **BLOCK))], {}, "allow", []),
    ("has-capability condition", [("on", doc(conditions={"client_capabilities": {
        "has": ["cp1"]}}, **BLOCK))], {}, "block", ["pol_0"]),
    # grants
    ("compliant device met", [("on", doc(grant={"require": ["compliant_device"]}))], {},
     "allow", ["pol_0"]),
    ("compliant device unmet: block", [("on", doc(grant={"require": ["compliant_device"]}))],
     {"device_compliant": False}, "block", ["pol_0"]),
    ("unknown device is not compliant", [("on", doc(grant={"require": ["compliant_device"]}))],
     {"device_compliant": None}, "block", ["pol_0"]),
    ("sign-in frequency met", [("on", doc(grant={"require": ["sign_in_frequency"],
                                                 "max_age_minutes": 15}))], {}, "allow",
     ["pol_0"]),
    ("sign-in frequency unmet", [("on", doc(grant={"require": ["sign_in_frequency"],
                                                   "max_age_minutes": 5}))], {}, "challenge",
     ["pol_0"]),
    ("no auth_time fails frequency", [("on", doc(grant={"require": ["sign_in_frequency"],
                                                        "max_age_minutes": 60}))],
     {"auth_time": None}, "challenge", ["pol_0"]),
    ("all: mfa and device, device unmet", [("on", doc(grant={"require": [
        "mfa", "compliant_device"], "operator": "all"}))], {"device_compliant": False},
     "block", ["pol_0"]),
    ("one: mfa or device, device met", [("on", doc(grant={"require": [
        "mfa", "compliant_device"], "operator": "one"}))], {**NO_MFA}, "allow", ["pol_0"]),
    ("one: none met: step up", [("on", doc(grant={"require": [
        "compliant_device", "mfa"], "operator": "one"}))],
     {**NO_MFA, "device_compliant": False}, "challenge", ["pol_0"]),
    ("one: only device, unmet: block", [("on", doc(grant={"require": ["compliant_device"],
                                                          "operator": "one"}))],
     {"device_compliant": False}, "block", ["pol_0"]),
    # combining
    ("block wins over grants", [("on", doc()), ("on", doc(**BLOCK)), ("on", doc())], {},
     "block", ["pol_0", "pol_1", "pol_2"]),
    ("block wins over challenge", [("on", doc()), ("on", doc(**BLOCK))], NO_MFA, "block",
     ["pol_0", "pol_1"]),
    ("all policies' grants must hold", [("on", doc()), ("on", doc(grant={
        "require": ["compliant_device"]}))], {"device_compliant": False}, "block",
     ["pol_0", "pol_1"]),
    ("non-applying block ignored", [("on", doc(users={"include": ["usr_bob"]}, **BLOCK)),
                                    ("on", doc())], {}, "allow", ["pol_1"]),
    ("report-only block beside enforced grant", [("report_only", doc(**BLOCK)), ("on", doc())],
     {}, "allow", ["pol_1"]),
]
# fmt: on


@pytest.mark.parametrize(
    ("policies", "overrides", "action", "applied"),
    [pytest.param(p, o, a, ap, id=name) for name, p, o, a, ap in CASES],
)
def test_evaluator_table(
    policies: list[tuple[str, dict[str, Any]]],
    overrides: dict[str, Any],
    action: str,
    applied: list[str],
) -> None:
    decision = compile_docs(*policies).evaluate(ctx(**overrides))
    assert decision.action == action, decision
    assert list(decision.applied) == applied
    # The reference (every policy, no index) agrees.
    assert _reference(_entries(policies), ctx(**overrides)) == decision


def test_challenge_carries_step_up_parameters() -> None:
    ps = compile_docs(
        ("on", doc(grant={"require": ["mfa"]})),
        ("on", doc(grant={"require": ["sign_in_frequency"], "max_age_minutes": 30})),
        ("on", doc(grant={"require": ["sign_in_frequency"], "max_age_minutes": 5})),
    )
    d = ps.evaluate(ctx(amr=frozenset({"pwd"}), auth_time=NOW - 3600))
    assert d.action == "challenge"
    assert d.acr_values == ACR_MFA
    assert d.max_age == 300  # the strictest frequency wins
    assert d.unmet == ("mfa", "sign_in_frequency")
    assert d.policy_id == "pol_0"
    assert "'p0' (pol_0) requires mfa" in d.reason and "pol_2" in d.reason

    fresh_mfa = ps.evaluate(ctx(amr=frozenset({"pwd"}), auth_time=NOW - 60))
    assert (fresh_mfa.acr_values, fresh_mfa.max_age) == (ACR_MFA, None)
    only_age = ps.evaluate(ctx(auth_time=NOW - 600))
    assert (only_age.action, only_age.acr_values, only_age.max_age) == ("challenge", None, 300)


def test_one_operator_asks_for_the_first_step_up_in_admin_order() -> None:
    ps = compile_docs(("on", doc(grant={"require": ["compliant_device", "sign_in_frequency",
                                                    "mfa"], "operator": "one",
                                        "max_age_minutes": 10})))  # fmt: skip
    d = ps.evaluate(ctx(device_compliant=False, amr=frozenset(), auth_time=NOW - 3600))
    assert (d.action, d.unmet, d.max_age, d.acr_values) == (
        "challenge",
        ("sign_in_frequency",),
        600,
        None,
    )


def test_block_reason_names_policy_and_control() -> None:
    ps = PolicySet.compile(
        [
            (
                "pol_fin",
                "Finance needs compliant devices",
                "on",
                parse_policy(doc(grant={"require": ["compliant_device"]})),
            )
        ]
    )
    d = ps.evaluate(ctx(device_compliant=False))
    assert d.action == "block" and d.policy_id == "pol_fin"
    assert d.reason == (
        "policy 'Finance needs compliant devices' (pol_fin) requires compliant_device (not met)"
    )
    blocked = compile_docs(("on", doc(**BLOCK))).evaluate(ALICE)
    assert blocked.reason == "blocked by policy 'p0' (pol_0)" and blocked.unmet == ("block",)


def test_report_only_results_are_reported() -> None:
    ps = compile_docs(
        ("report_only", doc(**BLOCK)),
        ("report_only", doc()),
        ("report_only", doc(users={"include": ["usr_bob"]})),
        ("on", doc(grant={"require": ["compliant_device"]})),
    )
    d = ps.evaluate(ctx(amr=frozenset()))
    assert d.action == "allow" and d.applied == ("pol_3",)
    assert d.report_only == (("pol_0", "block"), ("pol_1", "challenge"))
    assert decision_json(d)["report_only"] == [
        {"policy_id": "pol_0", "result": "block"},
        {"policy_id": "pol_1", "result": "challenge"},
    ]
    only_report = compile_docs(("report_only", doc(**BLOCK))).evaluate(ALICE)
    assert only_report.reason == "no enforced policy applies"


def test_policy_found_through_user_and_group_is_evaluated_once() -> None:
    ps = compile_docs(
        ("on", doc(users={"include": ["usr_alice"]}, groups={"include": ["grp_eng", "grp_staff"]},
                   **BLOCK)),
        ("on", doc(target={"apps": ["app_finance"]}, users={"include": ["usr_alice"]})),
    )  # fmt: skip
    assert ps.evaluate(ALICE).applied == ("pol_0", "pol_1")
    assert ps.size == 2


def test_compile_refuses_unknown_state() -> None:
    with pytest.raises(ConfigError, match="unknown state 'maybe'"):
        PolicySet.compile([("pol_x", "x", "maybe", parse_policy(doc()))])


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "policy: must be an object"),
        (doc(grant={"require": ["mfa", "mfaa"]}), "grant.require[1]: unknown control 'mfaa'"),
        (doc(conditons={}), "conditons: unknown field"),
        (doc(conditions={"locatons": []}), "conditions.locatons: unknown field"),
        (doc(users={"include": ["alice"]}), "users.include[0]: 'alice' is not a user id"),
        (doc(users={"include": []}), "users.include: the policy includes nobody"),
        (doc(users={"exclude": ["all"]}), "users.exclude[0]: 'all' is not a user id"),
        (doc(users={"include": ["all", "all"]}), "users.include[1]: 'all' is listed twice"),
        (doc(users={"include": "all"}), "users.include: must be a list"),
        (doc(users="all"), "users: must be an object"),
        (doc(users={"include": [1]}), "users.include[0]: must be a string"),
        (doc(groups={"include": ["usr_x"]}), "groups.include[0]: 'usr_x' is not a group id"),
        (doc(groups={"members": []}), "groups.members: unknown field"),
        ({"users": {"include": ["all"]}, "grant": {"block": True}}, "target: missing"),
        (doc(target="everything"), "target: unknown target 'everything'"),
        (doc(target={"apps": []}), "target.apps: empty"),
        (doc(target={"apps": ["grp_x"]}), "target.apps[0]: 'grp_x' is not a application id"),
        (doc(target={"app": ["app_x"]}), "target.app: unknown field"),
        (doc(conditions={"locations": {"include": []}}), "conditions.locations.include: empty"),
        (
            doc(conditions={"locations": {"include": ["all"], "exclude": ["all"]}}),
            "conditions.locations.exclude[0]",
        ),
        (
            doc(conditions={"locations": ["office"]}),
            "conditions.locations.include[0]: 'office' is not a location id",
        ),
        (
            doc(conditions={"device_platforms": ["beos"]}),
            "conditions.device_platforms.include[0]: unknown platform 'beos'",
        ),
        (
            doc(conditions={"device_platforms": {"exclude": ["all"]}}),
            "conditions.device_platforms.exclude[0]: unknown platform 'all'",
        ),
        (doc(conditions={"device_compliance": True}), "conditions.device_compliance: must be"),
        (
            doc(conditions={"user_risk": ["severe"]}),
            "conditions.user_risk[0]: unknown risk level 'severe'",
        ),
        (doc(conditions={"user_risk": []}), "conditions.user_risk: empty"),
        (
            doc(conditions={"client_capabilities": {"has": ["CP 1"]}}),
            "conditions.client_capabilities.has[0]: 'CP 1' is not a capability name",
        ),
        (doc(conditions={"client_capabilities": {}}), "conditions.client_capabilities: empty"),
        (
            doc(conditions={"client_capabilities": {"has": ["cp1"], "lacks": ["cp1"]}}),
            "conditions.client_capabilities: a capability cannot be both",
        ),
        ({"users": {"include": ["all"]}, "target": "all_private"}, "grant: missing"),
        (doc(grant={"block": "yes"}), "grant.block: must be true or false"),
        (doc(grant={"block": True, "require": ["mfa"]}), "grant.require: not allowed with block"),
        (doc(grant={}), "grant.require: missing"),
        (doc(grant={"require": []}), "grant.require: empty"),
        (doc(grant={"require": ["mfa"], "operator": "any"}), "grant.operator: must be 'all'"),
        (doc(grant={"require": ["sign_in_frequency"]}), "grant.max_age_minutes: sign_in_freq"),
        (
            doc(grant={"require": ["sign_in_frequency"], "max_age_minutes": 0}),
            "grant.max_age_minutes",
        ),
        (
            doc(grant={"require": ["sign_in_frequency"], "max_age_minutes": True}),
            "grant.max_age_minutes",
        ),
        (
            doc(grant={"require": ["mfa"], "max_age_minutes": 5}),
            "grant.max_age_minutes: only meaningful",
        ),
        (doc(grant={"require": ["mfa"], "extra": 1}), "grant.extra: unknown field"),
        (doc(description=7), "description: must be a string"),
    ],
)
def test_malformed_policies_name_the_field(document: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(document)
    assert str(info.value).startswith(message), str(info.value)
    assert info.value.code == "invalid_policy" and info.value.http_status == 400


def test_canonical_form_round_trips_and_lists_references() -> None:
    spec = parse_policy(
        doc(
            description="finance",
            users={"include": ["usr_b", "usr_a"], "exclude": ["usr_c"]},
            groups={"include": ["grp_x"], "exclude": ["grp_y"]},
            target={"apps": ["app_f"]},
            conditions={"locations": {"include": ["all"], "exclude": ["loc_o", "all_trusted"]},
                        "device_platforms": ["linux"], "device_compliance": "compliant",
                        "user_risk": ["high"], "client_capabilities": {"lacks": ["cp1"]}},
            grant={"require": ["sign_in_frequency", "mfa"], "operator": "one",
                   "max_age_minutes": 60},
        )
    )  # fmt: skip
    canonical = spec_to_dict(spec)
    assert canonical["users"] == {"include": ["usr_a", "usr_b"], "exclude": ["usr_c"]}
    assert canonical["grant"]["require"] == ["sign_in_frequency", "mfa"]
    assert parse_policy(canonical) == spec
    assert spec_references(spec) == [
        ("users.include", "user", "usr_a"),
        ("users.include", "user", "usr_b"),
        ("users.exclude", "user", "usr_c"),
        ("groups.include", "group", "grp_x"),
        ("groups.exclude", "group", "grp_y"),
        ("target.apps", "application", "app_f"),
        ("conditions.locations.exclude", "location", "loc_o"),
    ]


@pytest.mark.parametrize(
    ("os_name", "platform"),
    [("Linux", "linux"), ("Windows 11", "windows"), ("darwin", "macos"), ("macOS 14", "macos"),
     ("iPadOS", "ios"), ("Android 14", "android"), ("", None), (None, None), ("Plan 9", None)],
)  # fmt: skip
def test_normalize_platform(os_name: str | None, platform: str | None) -> None:
    assert normalize_platform(os_name) == platform


# --- named locations -----------------------------------------------------------------------


def test_location_index_matches_ranges_and_trust() -> None:
    index = LocationIndex(
        [
            ("loc_hq", ["10.0.0.0/8", "2001:db8::/32"], True),
            ("loc_lab", ["10.9.0.0/16", "192.0.2.7/32"], False),
            ("loc_bad", ["not a cidr"], False),
        ]
    )
    assert index.match("10.9.1.1") == {"loc_hq", "loc_lab", ALL_TRUSTED}
    assert index.match("10.1.1.1") == {"loc_hq", ALL_TRUSTED}
    assert index.match("192.0.2.7") == {"loc_lab"}
    assert index.match("::ffff:10.1.1.1") == {"loc_hq", ALL_TRUSTED}
    assert index.match("2001:db8::1") == {"loc_hq", ALL_TRUSTED}
    assert index.match("198.51.100.1") == frozenset()
    assert index.match("garbage") == frozenset()
    assert index.match(None) == frozenset()


def test_parse_cidrs() -> None:
    assert parse_cidrs(["10.0.0.0/8", " 192.0.2.1 ", "10.0.0.0/8"]) == (
        "10.0.0.0/8",
        "192.0.2.1/32",
    )
    for bad, message in [
        ("10.0.0.0/8", "cidrs: must be a list"),
        ([], "cidrs: empty"),
        (["10.0.0.1/8"], "cidrs[0]: '10.0.0.1/8' is not a CIDR"),
        (["ok", 3], "cidrs[0]"),
        (["10.0.0.0/8", 3], "cidrs[1]: must be a string"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_cidrs(bad)
        assert str(info.value).startswith(message)


# --- What-If -------------------------------------------------------------------------------


def test_what_if_explains_each_policy() -> None:
    entries = _entries(
        [
            ("on", doc(target={"apps": ["app_wiki"]}, **BLOCK)),
            ("on", doc(users={"include": ["usr_bob"]})),
            ("on", doc(groups={"exclude": ["grp_staff"]})),
            ("report_only", doc(conditions={"locations": {"include": ["all"],
                                                          "exclude": ["all_trusted"]}})),
            ("on", doc(grant={"require": ["mfa", "compliant_device"]})),
            ("off", doc(**BLOCK)),
        ]
    )  # fmt: skip
    results = what_if(entries, ctx(device_compliant=False))
    why = [r["not_applied_because"] for r in results]
    assert why[0] == "target: application app_finance (enterprise) is not targeted"
    assert why[1].startswith("users.include: usr_alice is neither included")
    assert why[2] == "groups.exclude: usr_alice is a member of excluded group grp_staff"
    assert why[3] == ("conditions.locations.exclude: 10.1.2.3 is in excluded location all_trusted")
    assert results[4] == {
        "id": "pol_4",
        "name": "p4",
        "state": "on",
        "enforced": True,
        "applies": True,
        "not_applied_because": None,
        "result": "block",
        "unmet": ["compliant_device"],
    }
    assert results[5]["applies"] is True and results[5]["enforced"] is False
    assert [r["result"] for r in results[:4]] == ["not_applied"] * 4


# --- properties ----------------------------------------------------------------------------

USERS = ["usr_a", "usr_b", "usr_c"]
GROUPS = ["grp_x", "grp_y", "grp_z"]
APPS = ["app_1", "app_2"]
LOCS = ["loc_1", "loc_2"]


def _sub(items: list[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(items), unique=True, max_size=len(items))


@st.composite
def policy_docs(draw: st.DrawFn) -> dict[str, Any]:
    users_in = draw(st.one_of(st.just(["all"]), _sub(USERS)))
    groups_in = draw(_sub(GROUPS))
    if not users_in and not groups_in:
        users_in = ["all"]
    d: dict[str, Any] = {
        "users": {"include": users_in, "exclude": draw(_sub(USERS))},
        "groups": {"include": groups_in, "exclude": draw(_sub(GROUPS))},
        "target": draw(st.one_of(st.sampled_from(["all_private", "quick_access", "sign_in"]),
                                 st.builds(lambda a: {"apps": a},
                                           st.lists(st.sampled_from(APPS), min_size=1,
                                                    unique=True)))),
    }  # fmt: skip
    cond: dict[str, Any] = {}
    if draw(st.booleans()):
        cond["locations"] = {
            "include": draw(st.lists(st.sampled_from(["all", "all_trusted", *LOCS]),
                                     min_size=1, unique=True)),
            "exclude": draw(_sub(["all_trusted", *LOCS])),
        }  # fmt: skip
    if draw(st.booleans()):
        cond["device_platforms"] = {
            "include": draw(st.lists(st.sampled_from(["all", "linux", "windows"]), min_size=1,
                                     unique=True)),
            "exclude": draw(_sub(["linux", "windows"])),
        }  # fmt: skip
    if draw(st.booleans()):
        cond["device_compliance"] = draw(st.sampled_from(["compliant", "not_compliant"]))
    if draw(st.booleans()):
        cond["user_risk"] = draw(st.lists(st.sampled_from(["low", "medium", "high"]),
                                          min_size=1, unique=True))  # fmt: skip
    if draw(st.booleans()):
        cond["client_capabilities"] = draw(st.sampled_from([{"has": ["cp1"]},
                                                            {"lacks": ["cp1"]}]))  # fmt: skip
    d["conditions"] = cond
    if draw(st.integers(0, 3)) == 0:
        d["grant"] = {"block": True}
    else:
        require = draw(st.lists(st.sampled_from(["mfa", "compliant_device", "sign_in_frequency"]),
                                min_size=1, unique=True))  # fmt: skip
        grant: dict[str, Any] = {"require": require,
                                 "operator": draw(st.sampled_from(["all", "one"]))}  # fmt: skip
        if "sign_in_frequency" in require:
            grant["max_age_minutes"] = draw(st.sampled_from([5, 60]))
        d["grant"] = grant
    return d


contexts = st.builds(
    EvaluationContext,
    user_id=st.sampled_from(USERS),
    app_id=st.sampled_from([*APPS, "app_3"]),
    app_kind=st.sampled_from(["enterprise", "quick_access", SIGN_IN]),
    group_ids=st.frozensets(st.sampled_from(GROUPS)),
    location_ids=st.frozensets(st.sampled_from([ALL_TRUSTED, *LOCS])),
    device_platform=st.sampled_from([None, "linux", "windows", "macos"]),
    device_compliant=st.sampled_from([None, True, False]),
    user_risk=st.sampled_from(["low", "medium", "high"]),
    amr=st.sampled_from([frozenset({"pwd"}), frozenset({"pwd", "mfa"})]),
    auth_time=st.sampled_from([None, NOW - 60, NOW - 1800]),
    now=st.just(NOW),
    capabilities=st.sampled_from([frozenset(), frozenset({"cp1"})]),
)
states = st.sampled_from(["on", "off", "report_only"])
policy_lists = st.lists(st.tuples(states, policy_docs()), max_size=6)


def _entries(
    policies: list[tuple[str, dict[str, Any]]],
) -> list[tuple[str, str, str, PolicySpec]]:
    return [(f"pol_{i}", f"p{i}", s, parse_policy(d)) for i, (s, d) in enumerate(policies)]


def _reference(
    entries: list[tuple[str, str, str, PolicySpec]], context: EvaluationContext
) -> PolicyDecision:
    """Brute force: What-If on every policy, then the combination, without any index."""
    applying = [
        (pid, name, state, spec)
        for (pid, name, state, spec), r in zip(entries, what_if(entries, context), strict=True)
        if r["applies"] and state != "off"
    ]
    return PolicySet.compile(
        [
            (
                pid,
                name,
                state,
                dataclasses.replace(
                    spec,
                    users_include=frozenset({"all"}),
                    users_exclude=frozenset(),
                    groups_exclude=frozenset(),
                    target="all_private" if context.app_kind != SIGN_IN else "sign_in",
                ),
            )
            for pid, name, state, spec in applying
        ]
    ).evaluate(context)


_RANK = {"block": 0, "challenge": 1, "allow": 2}


@settings(max_examples=200, deadline=None)
@given(policy_lists, contexts)
def test_index_agrees_with_brute_force(
    policies: list[tuple[str, dict[str, Any]]], context: EvaluationContext
) -> None:
    entries = _entries(policies)
    assert PolicySet.compile(entries).evaluate(context) == _reference(entries, context)


@settings(max_examples=200, deadline=None)
@given(policy_lists, policy_docs(), st.integers(0, 6), contexts)
def test_adding_report_only_never_changes_the_enforced_decision(
    policies: list[tuple[str, dict[str, Any]]],
    extra: dict[str, Any],
    position: int,
    context: EvaluationContext,
) -> None:
    before = PolicySet.compile(_entries(policies)).evaluate(context)
    with_extra = list(policies)
    with_extra.insert(min(position, len(policies)), ("report_only", extra))
    after = PolicySet.compile(_entries(with_extra)).evaluate(context)
    # The new policy shifts ids after it; compare everything but ids.
    assert after.action == before.action
    assert (after.acr_values, after.max_age, after.unmet) == (
        before.acr_values,
        before.max_age,
        before.unmet,
    )
    assert len(after.applied) == len(before.applied)


@settings(max_examples=200, deadline=None)
@given(policy_lists, st.integers(0, 5), contexts)
def test_an_exclude_never_grants_more_than_removing_the_user(
    policies: list[tuple[str, dict[str, Any]]], which: int, context: EvaluationContext
) -> None:
    if not policies:
        return
    which %= len(policies)
    state, d = policies[which]
    excluded = [*policies]
    d_ex = {**d, "users": {**d["users"], "exclude": sorted({*d["users"]["exclude"],
                                                             context.user_id})}}  # fmt: skip
    excluded[which] = (state, d_ex)
    removed = [p for i, p in enumerate(policies) if i != which]
    with_exclude = PolicySet.compile(_entries(excluded)).evaluate(context)
    without_user = PolicySet.compile(_entries(removed)).evaluate(context)
    assert _RANK[with_exclude.action] <= _RANK[without_user.action]
    # In fact an excluded user is simply out of the policy's scope.
    assert with_exclude.action == without_user.action


@settings(max_examples=200, deadline=None)
@given(policy_lists, policy_docs(), contexts)
def test_adding_an_enforced_policy_never_grants_more(
    policies: list[tuple[str, dict[str, Any]]], extra: dict[str, Any], context: EvaluationContext
) -> None:
    before = PolicySet.compile(_entries(policies)).evaluate(context)
    after = PolicySet.compile(_entries([*policies, ("on", extra)])).evaluate(context)
    assert _RANK[after.action] <= _RANK[before.action]


@settings(max_examples=200, deadline=None)
@given(policy_docs())
def test_canonical_form_round_trips(d: dict[str, Any]) -> None:
    spec = parse_policy(d)
    assert parse_policy(spec_to_dict(spec)) == spec


# One bad value per field, spliced into a valid document: the error names that field.
_BAD_FIELDS: list[tuple[tuple[str, ...], Any, str]] = [
    (("users", "include"), ["bob"], "users.include[0]"),
    (("users", "exclude"), [3], "users.exclude[0]"),
    (("groups", "include"), ["usr_a"], "groups.include[0]"),
    (("groups", "exclude"), "grp_x", "groups.exclude"),
    (("target",), {"apps": ["usr_a"]}, "target.apps[0]"),
    (("target",), "internet", "target"),
    (("conditions", "locations"), {"include": ["office"]}, "conditions.locations.include[0]"),
    (("conditions", "device_platforms"), ["solaris"], "conditions.device_platforms.include[0]"),
    (("conditions", "device_compliance"), "yes", "conditions.device_compliance"),
    (("conditions", "user_risk"), ["extreme"], "conditions.user_risk[0]"),
    (("conditions", "client_capabilities"), {"has": [""]}, "conditions.client_capabilities.has[0]"),
    (("conditions", "mystery"), 1, "conditions.mystery"),
    (("grant",), {"require": ["mfa", "fido"]}, "grant.require[1]"),
    (("grant",), {"require": ["mfa"], "operator": "some"}, "grant.operator"),
    (("grant",), {"require": ["sign_in_frequency"], "max_age_minutes": -1},
     "grant.max_age_minutes"),
]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(policy_docs(), st.sampled_from(_BAD_FIELDS))
def test_malformed_field_is_named(d: dict[str, Any], bad: tuple[tuple[str, ...], Any, str]) -> None:
    path, value, expected = bad
    target: dict[str, Any] = d
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    with pytest.raises(ConfigError) as info:
        parse_policy(d)
    assert str(info.value).startswith(expected + ":") or str(info.value).startswith(
        expected + "["
    ), str(info.value)
