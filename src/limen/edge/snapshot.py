"""The edge's compiled view of configuration: what every flow decision reads.

Loaded from the store in a worker thread whenever the configuration version changes, then
swapped in atomically; a flow decision never touches the database.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import select

from limen.errors import ConfigError, LimenError
from limen.identity.tokens import KeySet
from limen.policy.conditional import LocationIndex, PolicySet, normalize_platform
from limen.policy.segments import SegmentIndex, SegmentSpec
from limen.store.db import Store
from limen.store.models import (
    Application,
    Assignment,
    Connector,
    ConnectorGroup,
    Device,
    GroupMember,
    Segment,
    User,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AppInfo:
    id: str
    name: str
    kind: str
    connector_group_id: str
    enabled: bool
    dns_suffixes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UserState:
    id: str
    username: str
    enabled: bool
    revoked_before: float
    risk_level: str


@dataclass(frozen=True, slots=True)
class DeviceState:
    id: str
    user_id: str
    #: policy platform (linux, windows, macos, ios, android) or None when unknown
    platform: str | None
    compliant: bool
    enabled: bool


@dataclass(frozen=True, slots=True)
class ConnectorInfo:
    id: str
    name: str
    group_id: str
    state: str


@dataclass(frozen=True)
class Snapshot:
    version: int = 0
    segments: SegmentIndex = field(default_factory=SegmentIndex)
    apps: dict[str, AppInfo] = field(default_factory=dict)
    #: app id → ids of users assigned directly or through (nested) groups
    assigned: dict[str, frozenset[str]] = field(default_factory=dict)
    users: dict[str, UserState] = field(default_factory=dict)
    connectors: dict[str, ConnectorInfo] = field(default_factory=dict)
    connector_groups: dict[str, str] = field(default_factory=dict)
    keys: KeySet = field(default_factory=lambda: KeySet({}))
    #: user id → every group the user is in (nested groups resolved)
    user_groups: dict[str, frozenset[str]] = field(default_factory=dict)
    devices: dict[str, DeviceState] = field(default_factory=dict)
    policies: PolicySet = field(default_factory=lambda: PolicySet.compile([]))
    locations: LocationIndex = field(default_factory=lambda: LocationIndex(()))
    #: source address → matched location ids (filled lazily by admission; per snapshot)
    location_cache: dict[str, frozenset[str]] = field(default_factory=dict, compare=False)


def expand_groups(members: list[tuple[str, str]]) -> dict[str, frozenset[str]]:
    """group id → every user id inside it, through nested groups (cycles are tolerated)."""
    children: dict[str, set[str]] = defaultdict(set)
    for group_id, member_id in members:
        children[group_id].add(member_id)
    resolved: dict[str, frozenset[str]] = {}

    def users_of(group_id: str, seen: frozenset[str]) -> frozenset[str]:
        if group_id in resolved:
            return resolved[group_id]
        out: set[str] = set()
        for member in children.get(group_id, ()):
            if member.startswith("grp_"):
                if member not in seen:
                    out |= users_of(member, seen | {member})
            else:
                out.add(member)
        result = frozenset(out)
        resolved[group_id] = result
        return result

    for group_id in list(children):
        users_of(group_id, frozenset({group_id}))
    return resolved


def load_snapshot(store: Store) -> Snapshot:
    """Read and compile the whole configuration (runs in a worker thread)."""
    version = store.config_version()
    with store.session() as s:
        apps = {
            a.id: AppInfo(
                a.id, a.name, a.kind, a.connector_group_id, a.enabled, tuple(a.dns_suffixes or ())
            )
            for a in s.scalars(select(Application))
        }
        specs: list[SegmentSpec] = []
        for seg in s.scalars(select(Segment)):
            app = apps.get(seg.app_id)
            if app is None:
                continue
            try:
                specs.append(
                    SegmentSpec(
                        id=seg.id,
                        app_id=seg.app_id,
                        app_kind=app.kind,
                        dest_type=seg.dest_type,
                        destination=seg.destination,
                        ports=seg.ports,
                        protocol=seg.protocol,
                    )
                )
            except ConfigError as exc:
                # Stored before a validation rule existed: skip it loudly, serve the rest.
                log.error("segment %s is invalid and ignored: %s", seg.id, exc)
        members = [(m.group_id, m.member_id) for m in s.scalars(select(GroupMember))]
        groups = expand_groups(members)
        assigned: dict[str, set[str]] = defaultdict(set)
        for asg in s.scalars(select(Assignment)):
            if asg.principal_id.startswith("grp_"):
                assigned[asg.app_id] |= groups.get(asg.principal_id, frozenset())
            else:
                assigned[asg.app_id].add(asg.principal_id)
        users = {
            u.id: UserState(u.id, u.username, u.enabled, u.revoked_before, u.risk_level)
            for u in s.scalars(select(User))
        }
        connectors = {
            c.id: ConnectorInfo(c.id, c.name, c.group_id, c.state)
            for c in s.scalars(select(Connector))
        }
        cgroups = {g.id: g.name for g in s.scalars(select(ConnectorGroup))}
        user_groups: dict[str, set[str]] = defaultdict(set)
        for group_id, user_ids in groups.items():
            for user_id in user_ids:
                user_groups[user_id].add(group_id)
        devices = {
            d.id: DeviceState(
                d.id, d.user_id or "", normalize_platform(d.os), d.compliant, d.enabled
            )
            for d in s.scalars(select(Device))
        }
        from limen.admin.api_policies import load_location_index, load_policy_entries

        try:
            policies = PolicySet.compile(load_policy_entries(s))
        except LimenError as exc:
            # A stored policy no longer parses: fail closed for everyone rather than
            # silently dropping the policy (it may be a block).
            log.error("conditional-access policies cannot be compiled: %s", exc)
            raise
        locations = load_location_index(s)
    return Snapshot(
        version=version,
        segments=SegmentIndex.build(specs),
        apps=apps,
        assigned={k: frozenset(v) for k, v in assigned.items()},
        users=users,
        connectors=connectors,
        connector_groups=cgroups,
        keys=KeySet.load(store),
        user_groups={k: frozenset(v) for k, v in user_groups.items()},
        devices=devices,
        policies=policies,
        locations=locations,
    )
