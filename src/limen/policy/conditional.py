"""Conditional access: policy documents, their validation, the per-flow evaluator, What-If.

Pure library: no I/O, no clock (``now`` is part of the :class:`EvaluationContext`). The edge
compiles the stored policies into a :class:`PolicySet` whenever the configuration changes and
calls :meth:`PolicySet.evaluate` on every new flow (and the identity service at sign-in), so a
decision is a few dictionary lookups and set operations, never a database query.

Rules this module keeps (Microsoft Entra Conditional Access semantics)
-----------------------------------------------------------------------
* A policy *applies* when its assignments (users/groups, target applications) and every
  condition it sets match the context. Policies that do not apply are ignored.
* Excludes beat includes: an excluded user, or a member of an excluded group, is out of scope
  even when included by name.
* Any applying, enforced ``block`` wins.
* Otherwise every grant of every applying enforced policy must be met, each policy with its own
  operator (``all``: every listed control; ``one``: at least one).
* An unmet control that signing in again can satisfy (MFA, sign-in frequency) is a *challenge*:
  a step-up per RFC 9470 (``acr_values`` / ``max_age``). An unmet ``compliant_device`` is a
  *block*: no sign-in fixes the device.
* ``off`` policies are ignored; ``report_only`` policies are evaluated and reported, never
  enforced. No applying policy: allow.
* Nested groups are resolved by the caller: :attr:`EvaluationContext.group_ids` is the user's
  full (transitive) group set.

Policy documents are parsed and validated by :mod:`limen.policy.policy_spec` (re-exported
here); the format is described in ``docs/policy.md``.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from limen.errors import ConfigError
from limen.policy.policy_spec import (
    ACR_MFA,
    ALL,
    ALL_TRUSTED,
    CONTROLS,
    PLATFORMS,
    QUICK_ACCESS,
    RISK_LEVELS,
    SIGN_IN,
    STATES,
    STEP_UP_CONTROLS,
    TARGET_KINDS,
    PolicySpec,
    normalize_platform,
    parse_cidrs,
    parse_policy,
    spec_references,
    spec_to_dict,
)

__all__ = [
    "ACR_MFA",
    "ALL",
    "ALL_TRUSTED",
    "CONTROLS",
    "PLATFORMS",
    "QUICK_ACCESS",
    "RISK_LEVELS",
    "SIGN_IN",
    "STATES",
    "TARGET_KINDS",
    "EvaluationContext",
    "LocationIndex",
    "PolicyDecision",
    "PolicyEntry",
    "PolicySet",
    "PolicySpec",
    "decision_json",
    "normalize_platform",
    "parse_cidrs",
    "parse_policy",
    "spec_references",
    "spec_to_dict",
    "what_if",
]


# --- named locations -----------------------------------------------------------------------


def _parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class LocationIndex:
    """Named locations compiled for lookup by source address.

    :meth:`match` costs one dictionary lookup per distinct prefix length in use, whatever the
    number of ranges.
    """

    __slots__ = ("_tables", "_trusted")

    def __init__(self, locations: Iterable[tuple[str, Iterable[str], bool]] = ()) -> None:
        """``locations``: ``(location id, CIDRs, trusted)``, e.g. from ``NamedLocation`` rows.
        Unparseable CIDRs are skipped (the admin API refuses them on the way in)."""
        tables: dict[tuple[int, int], dict[int, set[str]]] = defaultdict(dict)
        trusted: set[str] = set()
        for loc_id, cidrs, is_trusted in locations:
            if is_trusted:
                trusted.add(loc_id)
            for cidr in cidrs:
                try:
                    net = ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    continue
                table = tables[(net.version, net.prefixlen)]
                table.setdefault(int(net.network_address), set()).add(loc_id)
        # Longest prefixes first only for readability of the tables; the result is a union.
        self._tables: tuple[tuple[int, int, dict[int, frozenset[str]]], ...] = tuple(
            (version, _mask(version, plen), {k: frozenset(v) for k, v in table.items()})
            for (version, plen), table in sorted(tables.items(), key=lambda kv: -kv[0][1])
        )
        self._trusted = frozenset(trusted)

    def match(self, ip: str | None) -> frozenset[str]:
        """The ids of the locations containing ``ip``, plus :data:`ALL_TRUSTED` when one of
        them is trusted. Empty for None or an unparseable address."""
        if not ip:
            return frozenset()
        addr = _parse_ip(ip)
        if addr is None:
            return frozenset()
        value = int(addr)
        found: set[str] = set()
        for version, mask, table in self._tables:
            if version == addr.version:
                hit = table.get(value & mask)
                if hit:
                    found.update(hit)
        if not found:
            return frozenset()
        if not self._trusted.isdisjoint(found):
            found.add(ALL_TRUSTED)
        return frozenset(found)


def _mask(version: int, prefixlen: int) -> int:
    bits = 32 if version == 4 else 128
    return ((1 << prefixlen) - 1) << (bits - prefixlen)


# --- evaluation ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EvaluationContext:
    """Everything a decision reads: the token's claims plus live state."""

    user_id: str
    app_id: str
    #: ``enterprise``, ``quick_access`` or :data:`SIGN_IN`.
    app_kind: str = "enterprise"
    #: The user's full group set, nested groups already resolved.
    group_ids: frozenset[str] = frozenset()
    source_ip: str | None = None
    #: From :meth:`LocationIndex.match` (includes :data:`ALL_TRUSTED` when trusted).
    location_ids: frozenset[str] = frozenset()
    device_platform: str | None = None
    #: None: no registered device, or compliance unknown.
    device_compliant: bool | None = None
    user_risk: str = "low"
    amr: frozenset[str] = frozenset()
    auth_time: float | None = None
    now: float = 0.0
    capabilities: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """The outcome of :meth:`PolicySet.evaluate`."""

    #: ``allow``, ``block`` or ``challenge``.
    action: str
    #: Enforced policies whose assignments and conditions matched, in compile order.
    applied: tuple[str, ...] = ()
    #: ``(policy id, what it would have decided)`` for each applying report-only policy.
    report_only: tuple[tuple[str, str], ...] = ()
    reason: str = ""
    #: The policy that decided a block or challenge (the first one, in compile order).
    policy_id: str | None = None
    #: Unmet controls behind a block or challenge (``block`` for a block grant).
    unmet: tuple[str, ...] = ()
    #: RFC 9470 step-up parameters, on a challenge.
    acr_values: str | None = None
    max_age: int | None = None


@dataclass(frozen=True, slots=True)
class _Compiled:
    order: int
    id: str
    name: str
    enforced: bool
    spec: PolicySpec


@dataclass(frozen=True, slots=True)
class _Bucket:
    """Policies of one target, indexed by who they include."""

    everyone: tuple[_Compiled, ...] = ()
    by_user: Mapping[str, tuple[_Compiled, ...]] = field(default_factory=dict)
    by_group: Mapping[str, tuple[_Compiled, ...]] = field(default_factory=dict)
    group_keys: frozenset[str] = frozenset()

    @staticmethod
    def build(policies: Iterable[_Compiled]) -> _Bucket:
        everyone: list[_Compiled] = []
        by_user: dict[str, list[_Compiled]] = defaultdict(list)
        by_group: dict[str, list[_Compiled]] = defaultdict(list)
        for p in policies:
            if ALL in p.spec.users_include:
                everyone.append(p)
                continue
            for u in p.spec.users_include:
                by_user[u].append(p)
            for g in p.spec.groups_include:
                by_group[g].append(p)
        return _Bucket(
            tuple(everyone),
            {k: tuple(v) for k, v in by_user.items()},
            {k: tuple(v) for k, v in by_group.items()},
            frozenset(by_group),
        )


_EMPTY_BUCKET: Final = _Bucket()


def _not_applied(spec: PolicySpec, ctx: EvaluationContext) -> str | None:
    """None when the policy applies to ``ctx``; else the field that left it out.

    The target is checked by the index (and by :func:`what_if`), not here.
    """
    if not (
        ALL in spec.users_include
        or ctx.user_id in spec.users_include
        or not spec.groups_include.isdisjoint(ctx.group_ids)
    ):
        return "users.include"
    if ctx.user_id in spec.users_exclude:
        return "users.exclude"
    if spec.groups_exclude and not spec.groups_exclude.isdisjoint(ctx.group_ids):
        return "groups.exclude"
    inc = spec.locations_include
    if inc is not None:
        if ALL not in inc and inc.isdisjoint(ctx.location_ids):
            return "conditions.locations.include"
        if spec.locations_exclude and not spec.locations_exclude.isdisjoint(ctx.location_ids):
            return "conditions.locations.exclude"
    plats = spec.platforms_include
    if plats is not None:
        platform = ctx.device_platform
        # An unknown platform matches only "all" (Entra does the same).
        if platform is None:
            if ALL not in plats:
                return "conditions.device_platforms.include"
        elif ALL not in plats and platform not in plats:
            return "conditions.device_platforms.include"
        elif platform in spec.platforms_exclude:
            return "conditions.device_platforms.exclude"
    wanted = spec.device_compliance
    if wanted is not None and (ctx.device_compliant is True) != (wanted == "compliant"):
        return "conditions.device_compliance"
    if spec.user_risk is not None and ctx.user_risk not in spec.user_risk:
        return "conditions.user_risk"
    if spec.capabilities_has and not spec.capabilities_has <= ctx.capabilities:
        return "conditions.client_capabilities.has"
    if spec.capabilities_lacks and not spec.capabilities_lacks.isdisjoint(ctx.capabilities):
        return "conditions.client_capabilities.lacks"
    return None


_ALLOWED: Final = ("allow", ())
_BLOCKED: Final = ("block", ("block",))


def _grant(spec: PolicySpec, ctx: EvaluationContext) -> tuple[str, tuple[str, ...]]:
    """What this one (applying) policy decides: ``(result, unmet controls)``.

    For a challenge, the unmet controls are the ones to ask for.
    """
    if spec.block:
        return _BLOCKED
    # A plain loop, not a helper per control: this runs for every applying policy of every
    # new flow.
    unmet: list[str] = []
    for c in spec.require:
        if c == "mfa":
            met = "mfa" in ctx.amr
        elif c == "compliant_device":
            met = ctx.device_compliant is True
        else:  # sign_in_frequency: the last interactive sign-in is recent enough
            age = spec.max_age_minutes
            met = (
                ctx.auth_time is not None
                and age is not None
                and ctx.now - ctx.auth_time <= age * 60
            )
        if not met:
            unmet.append(c)
    if not unmet:
        return _ALLOWED
    if spec.operator == "one":
        if len(unmet) < len(spec.require):
            return _ALLOWED
        # None met: ask for the first control signing in again can satisfy, in the admin's
        # order; if there is none (only compliant_device), it is a block.
        for c in spec.require:
            if c in STEP_UP_CONTROLS:
                return "challenge", (c,)
        return "block", tuple(unmet)
    if "compliant_device" in unmet:
        return "block", tuple(unmet)
    return "challenge", tuple(unmet)


def _describe(p: _Compiled, result: str, unmet: tuple[str, ...]) -> str:
    who = f"policy {p.name!r} ({p.id})"
    if unmet == ("block",):
        return f"blocked by {who}"
    return f"{who} requires {' and '.join(unmet)}" + (" (not met)" if result == "block" else "")


def _combine(
    hits: Iterable[tuple[_Compiled, str, tuple[str, ...]]],
) -> PolicyDecision:
    """Entra's combination of the applying policies' individual results."""
    applied: list[str] = []
    report: list[tuple[str, str]] = []
    blocks: list[tuple[_Compiled, tuple[str, ...]]] = []
    challenges: list[tuple[_Compiled, tuple[str, ...]]] = []
    for p, result, unmet in hits:
        if not p.enforced:
            report.append((p.id, result))
            continue
        applied.append(p.id)
        if result == "block":
            blocks.append((p, unmet))
        elif result == "challenge":
            challenges.append((p, unmet))
    if blocks:
        first, unmet = blocks[0]
        return PolicyDecision(
            "block",
            tuple(applied),
            tuple(report),
            "; ".join(_describe(p, "block", u) for p, u in blocks),
            first.id,
            unmet,
        )
    if challenges:
        needs: list[str] = []
        max_age: int | None = None
        for p, unmet in challenges:
            for c in unmet:
                if c not in needs:
                    needs.append(c)
                if c == "sign_in_frequency" and p.spec.max_age_minutes is not None:
                    seconds = p.spec.max_age_minutes * 60
                    max_age = seconds if max_age is None else min(max_age, seconds)
        return PolicyDecision(
            "challenge",
            tuple(applied),
            tuple(report),
            "; ".join(_describe(p, "challenge", u) for p, u in challenges),
            challenges[0][0].id,
            tuple(needs),
            ACR_MFA if "mfa" in needs else None,
            max_age,
        )
    if applied:
        reason = "granted: every applying policy is satisfied (" + ", ".join(applied) + ")"
    else:
        reason = "no enforced policy applies"
    return PolicyDecision("allow", tuple(applied), tuple(report), reason)


_NO_POLICY: Final = PolicyDecision("allow", reason="no policy applies")

PolicyEntry = tuple[str, str, str, PolicySpec]


class PolicySet:
    """Policies compiled into per-target, per-principal indexes. Immutable; build a new one
    when the configuration changes."""

    __slots__ = ("_all_private", "_by_app", "_by_kind", "size")

    def __init__(
        self,
        by_app: Mapping[str, _Bucket],
        by_kind: Mapping[str, _Bucket],
        all_private: _Bucket,
        size: int,
    ) -> None:
        self._by_app = by_app
        self._by_kind = by_kind
        self._all_private = all_private
        #: Number of compiled (on or report-only) policies.
        self.size = size

    @classmethod
    def compile(cls, policies: Iterable[PolicyEntry]) -> PolicySet:
        """``policies``: ``(id, name, state, spec)``; ``off`` policies are dropped."""
        per_app: dict[str, list[_Compiled]] = defaultdict(list)
        per_kind: dict[str, list[_Compiled]] = defaultdict(list)
        all_private: list[_Compiled] = []
        size = 0
        for order, (pid, name, state, spec) in enumerate(policies):
            if state not in STATES:
                raise ConfigError(f"policy {pid}: unknown state {state!r}", code="invalid_policy")
            if state == "off":
                continue
            p = _Compiled(order, pid, name, state == "on", spec)
            size += 1
            if spec.target == "apps":
                for app_id in spec.target_apps:
                    per_app[app_id].append(p)
            elif spec.target == "all_private":
                all_private.append(p)
            else:
                per_kind[spec.target].append(p)
        return cls(
            {k: _Bucket.build(v) for k, v in per_app.items()},
            {k: _Bucket.build(v) for k, v in per_kind.items()},
            _Bucket.build(all_private),
            size,
        )

    def _candidates(self, ctx: EvaluationContext) -> Sequence[_Compiled]:
        parts: list[tuple[_Compiled, ...]] = []
        kind = ctx.app_kind
        for bucket in (
            self._by_app.get(ctx.app_id, _EMPTY_BUCKET) if kind != SIGN_IN else _EMPTY_BUCKET,
            self._by_kind.get(kind, _EMPTY_BUCKET),
            self._all_private if kind != SIGN_IN else _EMPTY_BUCKET,
        ):
            if bucket.everyone:
                parts.append(bucket.everyone)
            hit = bucket.by_user.get(ctx.user_id)
            if hit:
                parts.append(hit)
            if bucket.group_keys:
                for g in bucket.group_keys & ctx.group_ids:
                    parts.append(bucket.by_group[g])
        if not parts:
            return ()
        if len(parts) == 1:
            return parts[0]
        # One policy can sit in several parts (a user and their group both included).
        merged = {p.order: p for part in parts for p in part}
        return [merged[k] for k in sorted(merged)]

    def evaluate(self, ctx: EvaluationContext) -> PolicyDecision:
        """The decision for one new flow (or sign-in, with ``app_kind=SIGN_IN``)."""
        candidates = self._candidates(ctx)
        if not candidates:
            return _NO_POLICY
        hits = []
        for p in candidates:
            if _not_applied(p.spec, ctx) is None:
                result, unmet = _grant(p.spec, ctx)
                hits.append((p, result, unmet))
        if not hits:
            return _NO_POLICY
        return _combine(hits)


def _targets(spec: PolicySpec, ctx: EvaluationContext) -> bool:
    if spec.target == "apps":
        return ctx.app_kind != SIGN_IN and ctx.app_id in spec.target_apps
    if spec.target == "all_private":
        return ctx.app_kind != SIGN_IN
    return ctx.app_kind == spec.target


def _explain(field_name: str, spec: PolicySpec, ctx: EvaluationContext) -> str:
    if field_name == "target":
        if ctx.app_kind == SIGN_IN:
            return "target: the policy does not target sign-in"
        return f"target: application {ctx.app_id} ({ctx.app_kind}) is not targeted"
    if field_name == "users.include":
        return f"users.include: {ctx.user_id} is neither included nor in an included group"
    if field_name == "users.exclude":
        return f"users.exclude: {ctx.user_id} is excluded"
    if field_name == "groups.exclude":
        hit = ", ".join(sorted(spec.groups_exclude & ctx.group_ids))
        return f"groups.exclude: {ctx.user_id} is a member of excluded group {hit}"
    if field_name.startswith("conditions.locations"):
        where = ctx.source_ip or "an unknown address"
        if field_name.endswith("include"):
            return f"{field_name}: {where} is not in an included location"
        hit = ", ".join(sorted(spec.locations_exclude & ctx.location_ids))
        return f"{field_name}: {where} is in excluded location {hit}"
    if field_name.startswith("conditions.device_platforms"):
        what = ctx.device_platform or "unknown"
        verb = "is not included" if field_name.endswith("include") else "is excluded"
        return f"{field_name}: device platform {what} {verb}"
    if field_name == "conditions.device_compliance":
        state = {True: "compliant", False: "not compliant", None: "unknown"}[ctx.device_compliant]
        return f"{field_name}: the device is {state}; the policy is for {spec.device_compliance}"
    if field_name == "conditions.user_risk":
        return f"{field_name}: user risk {ctx.user_risk} is not listed"
    if field_name.endswith(".has"):
        return f"{field_name}: the client lacks a listed capability"
    return f"{field_name}: the client has a listed capability"


def what_if(policies: Iterable[PolicyEntry], ctx: EvaluationContext) -> list[dict[str, Any]]:
    """For each policy (in order, ``off`` ones included): does it apply, and if not which
    assignment or condition left it out; if so what it decides and which controls are unmet.

    Each entry: ``id``, ``name``, ``state``, ``applies``, ``not_applied_because`` (field and
    explanation, or None), ``result`` (``allow``/``block``/``challenge``, or ``not_applied``),
    ``unmet`` and ``enforced`` (True only for ``on`` policies).
    """
    out: list[dict[str, Any]] = []
    for pid, name, state, spec in policies:
        reason_field = None if _targets(spec, ctx) else "target"
        if reason_field is None:
            reason_field = _not_applied(spec, ctx)
        entry: dict[str, Any] = {
            "id": pid,
            "name": name,
            "state": state,
            "enforced": state == "on",
            "applies": reason_field is None,
            "not_applied_because": None,
            "result": "not_applied",
            "unmet": [],
        }
        if reason_field is not None:
            entry["not_applied_because"] = _explain(reason_field, spec, ctx)
        else:
            result, unmet = _grant(spec, ctx)
            entry["result"] = result
            entry["unmet"] = list(unmet)
        out.append(entry)
    return out


def decision_json(decision: PolicyDecision) -> dict[str, Any]:
    """A decision as JSON (What-If responses, logs)."""
    return {
        "action": decision.action,
        "applied": list(decision.applied),
        "report_only": [{"policy_id": p, "result": r} for p, r in decision.report_only],
        "reason": decision.reason,
        "policy_id": decision.policy_id,
        "unmet": list(decision.unmet),
        "acr_values": decision.acr_values,
        "max_age": decision.max_age,
    }
