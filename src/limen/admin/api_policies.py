"""Admin API: conditional-access policies (versioned), named locations, and What-If.

Policy documents are validated by :func:`limen.policy.conditional.parse_policy`; a bad one is
a 400 ``invalid_policy`` whose message starts with the field that is wrong. In a document,
users, groups, applications and locations may be named by id or by name; names are resolved
to ids before the document is stored, and ids that do not exist are refused. When a
referenced object is deleted later, the policy is not changed: ``GET`` and What-If report it
under ``problems`` (``"groups.include: grp_x does not exist"``) instead of silently ignoring it.

Every change bumps the policy's ``version``, records an :class:`AccessPolicyVersion`, is
audited and bumps the configuration version so edges recompile.
"""

from __future__ import annotations

import ipaddress
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Literal

from fastapi import APIRouter, Body, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from limen.admin._common import Deps, Json, get_or_404, unique
from limen.errors import ConfigError
from limen.ids import new_id
from limen.policy.conditional import (
    ALL,
    ALL_TRUSTED,
    RISK_LEVELS,
    SIGN_IN,
    STATES,
    EvaluationContext,
    LocationIndex,
    PolicyEntry,
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
from limen.policy.policy_spec import MAX_CIDRS
from limen.service import ServiceContext
from limen.store.models import Application, Device, Group, GroupMember, User
from limen.store.policy_models import AccessPolicy, AccessPolicyVersion, NamedLocation

#: Keys of a policy as the API shows it that a client may send back unchanged (so the output
#: of GET can be edited and PUT back); they are ignored.
READ_ONLY_KEYS = frozenset({"id", "version", "created_at", "updated_at", "problems"})
#: Location names that would shadow the location keywords of a policy document.
RESERVED_LOCATION_NAMES = frozenset({ALL, ALL_TRUSTED})
#: Where a policy document names objects: (path, kind, model, name column).
_NAMED: tuple[tuple[tuple[str, ...], str, type[Any], Any], ...] = (
    (("users",), "user", User, User.username),
    (("groups",), "group", Group, Group.name),
    (("target",), "application", Application, Application.name),
    (("conditions", "locations"), "location", NamedLocation, NamedLocation.name),
)
_MODELS: dict[str, type[Any]] = {kind: model for _p, kind, model, _c in _NAMED}
_PREFIX = {"user": "usr_", "group": "grp_", "application": "app_", "location": "loc_"}


class LocationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    name: str = Field(min_length=1, max_length=255)
    cidrs: list[str] = Field(max_length=MAX_CIDRS)
    trusted: bool = False


class LocationUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    name: str | None = Field(default=None, min_length=1, max_length=255)
    cidrs: list[str] | None = Field(default=None, max_length=MAX_CIDRS)
    trusted: bool | None = None


class PolicyPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    name: str | None = Field(default=None, min_length=1, max_length=255)
    state: str | None = None


class WhatIfDevice(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    #: A registered device: its platform and compliance are read from the store, unless
    #: ``platform`` / ``compliant`` are given too.
    id: str | None = Field(default=None, max_length=64)
    platform: str | None = Field(default=None, max_length=64)
    compliant: bool | None = None


class WhatIfRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    user_id: str = Field(min_length=1, max_length=255)
    #: An application id or name, or ``sign_in`` for the sign-in itself.
    app_id: str = Field(min_length=1, max_length=255)
    device: WhatIfDevice | None = None
    ip: str | None = Field(default=None, max_length=64)
    mfa: bool = False
    #: Minutes since the user last signed in interactively (default 0: just now).
    auth_age_minutes: float = Field(default=0.0, ge=0, le=10 * 365 * 24 * 60)
    #: Defaults to the user's stored risk level.
    risk: Literal["low", "medium", "high"] | None = None
    capabilities: list[str] = Field(default_factory=list, max_length=16)


# --- loading (also what an edge snapshot needs) -------------------------------------------------


def normalize_state(value: object) -> str:
    """``on`` / ``off`` / ``report_only`` (``report-only`` accepted)."""
    state = value.replace("-", "_") if isinstance(value, str) else value
    if state not in STATES:
        raise ConfigError(
            f"state: must be one of on, off, report_only, not {value!r}", code="invalid_policy"
        )
    return str(state)


def user_group_ids(s: Session, user_id: str) -> frozenset[str]:
    """Every group ``user_id`` belongs to, directly or through nested groups."""
    seen: set[str] = set()
    frontier = [user_id]
    while frontier:
        parents = s.scalars(
            select(GroupMember.group_id).where(GroupMember.member_id.in_(frontier))
        ).all()
        frontier = [g for g in set(parents) if g not in seen]
        seen.update(frontier)
    return frozenset(seen)


def load_policy_entries(s: Session) -> list[PolicyEntry]:
    """Every stored policy as ``(id, name, state, spec)`` in creation order, ready for
    :meth:`PolicySet.compile` and :func:`what_if`."""
    rows = s.scalars(select(AccessPolicy).order_by(AccessPolicy.created_at, AccessPolicy.id))
    return [(p.id, p.name, p.state, parse_policy(p.spec)) for p in rows]


def load_location_index(s: Session) -> LocationIndex:
    """Named locations compiled for :meth:`LocationIndex.match`."""
    rows = s.execute(select(NamedLocation.id, NamedLocation.cidrs, NamedLocation.trusted))
    return LocationIndex((lid, list(cidrs or []), bool(trusted)) for lid, cidrs, trusted in rows)


def find_problems(s: Session, specs: Iterable[PolicySpec]) -> list[list[str]]:
    """For each spec, its references to objects that do not exist (one query per kind)."""
    specs = list(specs)
    refs = [spec_references(spec) for spec in specs]
    wanted: dict[str, set[str]] = defaultdict(set)
    for spec_refs in refs:
        for _field, kind, ident in spec_refs:
            wanted[kind].add(ident)
    existing: set[str] = set()
    for kind, ids in wanted.items():
        model = _MODELS[kind]
        existing.update(s.scalars(select(model.id).where(model.id.in_(sorted(ids)))))
    return [
        [
            f"{path}: {ident} does not exist"
            for path, _kind, ident in spec_refs
            if ident not in existing
        ]
        for spec_refs in refs
    ]


# --- documents in and out -----------------------------------------------------------------------


def _resolve_names(s: Session, doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``doc`` with names replaced by ids where ids are expected. Shapes that are
    wrong are left alone for :func:`parse_policy` to report."""
    out = dict(doc)
    for path, kind, model, column in _NAMED:
        parent: Any = out
        for key in path[:-1]:
            child = parent.get(key) if isinstance(parent, dict) else None
            if not isinstance(child, dict):
                parent = None
                break
            parent = dict(child)
            out[key] = parent  # copy on the way down: the caller's document is not changed
        if not isinstance(parent, dict):
            continue
        leaf = path[-1]
        node = parent.get(leaf)
        dotted = ".".join(path)
        if isinstance(node, list) and kind != "application":
            parent[leaf] = _resolve_list(s, node, f"{dotted}.include", kind, model, column)
        elif isinstance(node, dict):
            node = dict(node)
            for sub in ("include", "exclude", "apps"):
                if isinstance(node.get(sub), list):
                    node[sub] = _resolve_list(s, node[sub], f"{dotted}.{sub}", kind, model, column)
            parent[leaf] = node
    return out


def _resolve_list(
    s: Session, items: list[Any], path: str, kind: str, model: type[Any], column: Any
) -> list[Any]:
    out: list[Any] = []
    for i, item in enumerate(items):
        if (
            isinstance(item, str)
            and item not in (ALL, ALL_TRUSTED)
            and not item.startswith(_PREFIX[kind])
        ):
            ident = s.scalar(select(model.id).where(column == item))
            if ident is None:
                raise ConfigError(f"{path}[{i}]: no {kind} named {item!r}", code="invalid_policy")
            item = ident
        out.append(item)
    return out


def _split(body: dict[str, Any]) -> tuple[str | None, str | None, dict[str, Any]]:
    """``(name, state, policy document)`` from a request body; None when not given."""
    doc = {k: v for k, v in body.items() if k not in READ_ONLY_KEYS}
    name = doc.pop("name", None)
    state = doc.pop("state", None)
    if name is not None and (
        not isinstance(name, str) or not name.strip() or len(name.strip()) > 255
    ):
        raise ConfigError("name: must be 1-255 characters", code="invalid_policy")
    return (
        name.strip() if isinstance(name, str) else None,
        normalize_state(state) if state is not None else None,
        doc,
    )


def _validated(s: Session, doc: dict[str, Any]) -> PolicySpec:
    spec = parse_policy(_resolve_names(s, doc))
    missing = find_problems(s, [spec])[0]
    if missing:
        raise ConfigError(missing[0], code="invalid_policy")
    return spec


def policy_json(p: AccessPolicy, problems: list[str]) -> Json:
    """A policy as the API shows it: its document flattened beside id, name, state..."""
    return {
        "id": p.id,
        "name": p.name,
        "state": p.state,
        "version": p.version,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
        "problems": problems,
        **p.spec,
    }


def _record_version(s: Session, p: AccessPolicy, actor: str, now: float) -> None:
    s.add(
        AccessPolicyVersion(
            policy_id=p.id,
            version=p.version,
            name=p.name,
            state=p.state,
            spec=p.spec,
            changed_at=now,
            actor=actor,
        )
    )


def location_json(loc: NamedLocation) -> Json:
    return {
        "id": loc.id,
        "name": loc.name,
        "cidrs": list(loc.cidrs or []),
        "trusted": loc.trusted,
        "created_at": loc.created_at,
    }


def _check_location_name(name: str) -> None:
    if name in RESERVED_LOCATION_NAMES:
        raise ConfigError(f"name: {name!r} is reserved in policy documents")


# --- routes -----------------------------------------------------------------------------------


def add_policy_routes(router: APIRouter, ctx: ServiceContext) -> None:
    """Add these endpoints to ``router`` (bound to ``ctx``)."""
    deps = Deps(ctx)
    reader, operator, changed = deps.reader, deps.operator, deps.changed

    def _detail(s: Session, p: AccessPolicy) -> Json:
        return policy_json(p, find_problems(s, [parse_policy(p.spec)])[0])

    # --- named locations ------------------------------------------------------------------

    @router.post("/locations", status_code=201)
    def create_location(body: LocationCreate, actor: str = operator) -> Json:
        _check_location_name(body.name)
        cidrs = list(parse_cidrs(body.cidrs))
        with ctx.store.session() as s:
            unique(s, NamedLocation, NamedLocation.name, body.name, "named location")
            loc = NamedLocation(
                id=new_id("location"),
                name=body.name,
                cidrs=cidrs,
                trusted=body.trusted,
                created_at=time.time(),
            )
            s.add(loc)
            ctx.store.bump_config_version(s)
            out = location_json(loc)
        changed(
            actor,
            "location.create",
            loc.id,
            {"name": loc.name, "cidrs": cidrs, "trusted": loc.trusted},
        )
        return out

    @router.get("/locations")
    def list_locations(_: str = reader) -> list[Json]:
        with ctx.store.session() as s:
            rows = s.scalars(select(NamedLocation).order_by(NamedLocation.name))
            return [location_json(x) for x in rows]

    @router.get("/locations/{location_id}")
    def get_location(location_id: str, _: str = reader) -> Json:
        with ctx.store.session() as s:
            return location_json(get_or_404(s, NamedLocation, location_id, "named location"))

    @router.put("/locations/{location_id}")
    def update_location(location_id: str, body: LocationUpdate, actor: str = operator) -> Json:
        cidrs = list(parse_cidrs(body.cidrs)) if body.cidrs is not None else None
        with ctx.store.session() as s:
            loc = get_or_404(s, NamedLocation, location_id, "named location")
            if body.name is not None and body.name != loc.name:
                _check_location_name(body.name)
                unique(s, NamedLocation, NamedLocation.name, body.name, "named location")
                loc.name = body.name
            if cidrs is not None:
                loc.cidrs = cidrs
            if body.trusted is not None:
                loc.trusted = body.trusted
            ctx.store.bump_config_version(s)
            out = location_json(loc)
        changed(
            actor, "location.update", location_id, {k: out[k] for k in ("name", "cidrs", "trusted")}
        )
        return out

    @router.delete("/locations/{location_id}", status_code=204)
    def delete_location(location_id: str, actor: str = operator) -> Response:
        with ctx.store.session() as s:
            loc = get_or_404(s, NamedLocation, location_id, "named location")
            name = loc.name
            s.delete(loc)
            ctx.store.bump_config_version(s)
        changed(actor, "location.delete", location_id, {"name": name})
        return Response(status_code=204)

    # --- What-If (before /policies/{policy_id}) ------------------------------------------

    @router.post("/policies/what-if")
    def policy_what_if(body: WhatIfRequest, _: str = reader) -> Json:
        now = time.time()
        with ctx.store.session() as s:
            user = s.get(User, body.user_id) or s.scalar(
                select(User).where(User.username == body.user_id)
            )
            if user is None:
                raise ConfigError(f"user_id: no user {body.user_id!r}", code="unknown_user")
            if body.app_id == SIGN_IN:
                app_id, app_kind = "", SIGN_IN
            else:
                app = s.get(Application, body.app_id) or s.scalar(
                    select(Application).where(Application.name == body.app_id)
                )
                if app is None:
                    raise ConfigError(
                        f"app_id: no application {body.app_id!r}", code="unknown_application"
                    )
                app_id, app_kind = app.id, app.kind
            platform: str | None = None
            compliant: bool | None = None
            if body.device is not None:
                if body.device.id:
                    device = get_or_404(s, Device, body.device.id, "device")
                    platform, compliant = normalize_platform(device.os), bool(device.compliant)
                if body.device.platform is not None:
                    platform = normalize_platform(body.device.platform)
                    if platform is None:
                        raise ConfigError(
                            f"device.platform: unknown platform {body.device.platform!r}"
                        )
                if body.device.compliant is not None:
                    compliant = body.device.compliant
            locations: frozenset[str] = frozenset()
            if body.ip is not None:
                locations = load_location_index(s).match(body.ip)
                if not locations and not _is_ip(body.ip):
                    raise ConfigError(f"ip: {body.ip!r} is not an IP address")
            risk = body.risk or (user.risk_level if user.risk_level in RISK_LEVELS else "low")
            context = EvaluationContext(
                user_id=user.id,
                app_id=app_id,
                app_kind=app_kind,
                group_ids=user_group_ids(s, user.id),
                source_ip=body.ip,
                location_ids=locations,
                device_platform=platform,
                device_compliant=compliant,
                user_risk=risk,
                amr=frozenset({"pwd", "mfa"} if body.mfa else {"pwd"}),
                auth_time=now - body.auth_age_minutes * 60,
                now=now,
                capabilities=frozenset(body.capabilities),
            )
            entries = load_policy_entries(s)
            problems = find_problems(s, [spec for *_rest, spec in entries])
        results = what_if(entries, context)
        for result, found in zip(results, problems, strict=True):
            result["problems"] = found
        decision = PolicySet.compile(entries).evaluate(context)
        return {
            "context": {
                "user_id": context.user_id,
                "app_id": context.app_id,
                "app_kind": context.app_kind,
                "group_ids": sorted(context.group_ids),
                "ip": context.source_ip,
                "location_ids": sorted(context.location_ids),
                "device_platform": context.device_platform,
                "device_compliant": context.device_compliant,
                "user_risk": context.user_risk,
                "amr": sorted(context.amr),
                "auth_age_minutes": body.auth_age_minutes,
                "capabilities": sorted(context.capabilities),
            },
            "policies": results,
            "decision": decision_json(decision),
        }

    # --- policies ---------------------------------------------------------------------------

    @router.post("/policies", status_code=201)
    def create_policy(body: dict[str, Any] = Body(...), actor: str = operator) -> Json:
        name, state, doc = _split(body)
        if name is None:
            raise ConfigError("name: missing", code="invalid_policy")
        now = time.time()
        with ctx.store.session() as s:
            spec = _validated(s, doc)
            unique(s, AccessPolicy, AccessPolicy.name, name, "policy")
            p = AccessPolicy(
                id=new_id("policy"),
                name=name,
                state=state or "on",
                version=1,
                spec=spec_to_dict(spec),
                created_at=now,
                updated_at=now,
            )
            s.add(p)
            _record_version(s, p, actor, now)
            ctx.store.bump_config_version(s)
            out = policy_json(p, [])
        changed(
            actor,
            "policy.create",
            p.id,
            {"name": p.name, "state": p.state, "version": 1, "spec": p.spec},
        )
        return out

    @router.get("/policies")
    def list_policies(_: str = reader) -> list[Json]:
        with ctx.store.session() as s:
            rows = list(s.scalars(select(AccessPolicy).order_by(AccessPolicy.name)))
            problems = find_problems(s, [parse_policy(p.spec) for p in rows])
            return [policy_json(p, found) for p, found in zip(rows, problems, strict=True)]

    @router.get("/policies/{policy_id}")
    def get_policy(policy_id: str, _: str = reader) -> Json:
        with ctx.store.session() as s:
            return _detail(s, get_or_404(s, AccessPolicy, policy_id, "policy"))

    @router.put("/policies/{policy_id}")
    def replace_policy(
        policy_id: str, body: dict[str, Any] = Body(...), actor: str = operator
    ) -> Json:
        name, state, doc = _split(body)
        now = time.time()
        with ctx.store.session() as s:
            p = get_or_404(s, AccessPolicy, policy_id, "policy")
            spec = _validated(s, doc)
            if name is not None and name != p.name:
                unique(s, AccessPolicy, AccessPolicy.name, name, "policy")
                p.name = name
            if state is not None:
                p.state = state
            p.spec = spec_to_dict(spec)
            p.version += 1
            p.updated_at = now
            _record_version(s, p, actor, now)
            ctx.store.bump_config_version(s)
            out = policy_json(p, [])
        changed(
            actor,
            "policy.update",
            policy_id,
            {"name": p.name, "state": p.state, "version": p.version, "spec": p.spec},
        )
        return out

    @router.patch("/policies/{policy_id}")
    def patch_policy(policy_id: str, body: PolicyPatch, actor: str = operator) -> Json:
        state = normalize_state(body.state) if body.state is not None else None
        now = time.time()
        with ctx.store.session() as s:
            p = get_or_404(s, AccessPolicy, policy_id, "policy")
            previous = p.state
            if body.name is not None and body.name != p.name:
                unique(s, AccessPolicy, AccessPolicy.name, body.name, "policy")
                p.name = body.name
            if state is not None:
                p.state = state
            p.version += 1
            p.updated_at = now
            _record_version(s, p, actor, now)
            ctx.store.bump_config_version(s)
            out = _detail(s, p)
        changed(
            actor,
            "policy.update",
            policy_id,
            {"name": p.name, "state": p.state, "previous_state": previous, "version": p.version},
        )
        return out

    @router.delete("/policies/{policy_id}", status_code=204)
    def delete_policy(policy_id: str, actor: str = operator) -> Response:
        with ctx.store.session() as s:
            p = get_or_404(s, AccessPolicy, policy_id, "policy")
            details = {"name": p.name, "state": p.state, "version": p.version, "spec": p.spec}
            s.execute(delete(AccessPolicyVersion).where(AccessPolicyVersion.policy_id == p.id))
            s.delete(p)
            ctx.store.bump_config_version(s)
        changed(actor, "policy.delete", policy_id, details)
        return Response(status_code=204)

    @router.get("/policies/{policy_id}/versions")
    def policy_versions(policy_id: str, _: str = reader) -> list[Json]:
        with ctx.store.session() as s:
            get_or_404(s, AccessPolicy, policy_id, "policy")
            rows = s.scalars(
                select(AccessPolicyVersion)
                .where(AccessPolicyVersion.policy_id == policy_id)
                .order_by(AccessPolicyVersion.version.desc())
            )
            return [
                {
                    "policy_id": v.policy_id,
                    "version": v.version,
                    "name": v.name,
                    "state": v.state,
                    "changed_at": v.changed_at,
                    "actor": v.actor,
                    "spec": v.spec,
                }
                for v in rows
            ]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return False
    return True


__all__ = [
    "add_policy_routes",
    "find_problems",
    "load_location_index",
    "load_policy_entries",
    "location_json",
    "normalize_state",
    "policy_json",
    "user_group_ids",
]
