"""Forwarding profiles: what the client captures and what it does with it. Pure: no I/O.

The edge computes a user's *private-access* profile from the applications the user is assigned
to (``GET /api/v1/me/forwarding-profile``, :mod:`limen.admin.api_profiles`) and the client
fetches it. This module is the client's model of that document and the one place that decides,
for a destination, which rule applies and what happens to the traffic.

Rules this module keeps:

* A profile is peer data: :func:`parse_profile` validates every member and raises
  :class:`~limen.errors.RemoteProtocolError` (code ``bad_profile``) naming the bad part; it never
  trusts a shape. Destinations are validated with the same code as segments
  (:func:`limen.policy.segments.validate_segment`), so a destination the edge would store is one
  the client parses.
* Matching is by **priority**, lowest number first; the first rule whose destination, port and
  protocol match wins. The edge assigns priorities so that bypass rules come before tunnel
  rules and, among each, the most specific destination comes first — the same order the edge
  uses to pick an application, so the client's view agrees with the edge's.
* An IP flow only matches IP rules, a name flow only name rules (the segment rule).
* Outcome (:func:`decide`): ``tunnel`` through the edge; ``direct`` (bypass rule, no rule, the
  profile off, the client paused, or a ``pass`` rule with the edge unreachable); ``block`` (a
  ``block`` rule with the edge unreachable: fail fast rather than leak to the local network).
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from limen.errors import ConfigError, LimenError, RemoteProtocolError
from limen.policy.segments import (
    IP_TYPES,
    NAME_TYPES,
    Destination,
    normalize_name,
    validate_segment,
)

PRIVATE_ACCESS: Final = "private-access"
ACTIONS: Final = ("tunnel", "bypass")
HARDENING: Final = ("block", "pass")
#: A profile is a few hundred rules at most; the cap bounds the work on a hostile document.
MAX_RULES: Final = 10_000


class Action(enum.StrEnum):
    """What a rule says to do with matching traffic."""

    TUNNEL = "tunnel"
    BYPASS = "bypass"


class Outcome(enum.StrEnum):
    """What actually happens to a flow, given the rule and the client's state."""

    TUNNEL = "tunnel"
    DIRECT = "direct"
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class ForwardingRule:
    """One rule of a forwarding profile (validated on construction)."""

    id: str
    priority: int
    dest_type: str
    destination: str
    ports: str
    protocol: str
    action: Action
    hardening: str = "block"
    app_id: str = ""
    app_name: str = ""
    parsed: Destination = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.hardening not in HARDENING:
            raise ConfigError(f"hardening: {self.hardening!r} is not 'block' or 'pass'")
        parsed = validate_segment(self.dest_type, self.destination, self.ports, self.protocol)
        object.__setattr__(self, "parsed", parsed)
        object.__setattr__(self, "destination", parsed.destination)
        object.__setattr__(self, "ports", parsed.ports)
        object.__setattr__(self, "protocol", parsed.protocol)

    @property
    def is_ip(self) -> bool:
        return self.dest_type in IP_TYPES

    def matches(self, host: IPAddress | str, port: int, protocol: str) -> bool:
        """Whether a flow to ``host`` (a parsed address or a normalised name) matches."""
        d = self.parsed
        if protocol not in d.protocols or not any(lo <= port <= hi for lo, hi in d.port_ranges):
            return False
        if isinstance(host, str):
            if d.dest_type == "fqdn":
                return host == d.name
            under = host.endswith("." + d.name)
            return under if d.dest_type == "wildcard" else under or host == d.name
        if d.dest_type not in IP_TYPES or host.version != d.ip_version:
            return False
        return d.ip_first <= int(host) <= d.ip_last

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "priority": self.priority,
            "destination": {"type": self.dest_type, "value": self.destination},
            "protocol": self.protocol,
            "ports": self.ports,
            "action": self.action.value,
            "hardening": self.hardening,
            "app_id": self.app_id,
            "app_name": self.app_name,
        }


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Match:
    """The rule a destination matched (``None``: none did)."""

    rule: ForwardingRule | None

    @property
    def action(self) -> Action | None:
        return self.rule.action if self.rule is not None else None


@dataclass(frozen=True)
class ForwardingProfile:
    """A forwarding profile as the client holds it. ``rules`` are in priority order."""

    name: str = PRIVATE_ACCESS
    version: int = 0
    enabled: bool = False
    allow_pause: bool = True
    hardening: str = "block"
    rules: tuple[ForwardingRule, ...] = ()
    dns_suffixes: tuple[str, ...] = ()

    def match(self, host: str, port: int, protocol: str = "tcp") -> Match:
        """The first rule (by priority) matching ``host:port`` over ``protocol``."""
        target = parse_host(host)
        if target is None or not self.enabled:
            return Match(None)
        for rule in self.rules:
            if rule.matches(target, port, protocol):
                return Match(rule)
        return Match(None)

    def ip_rules(self, protocol: str = "tcp") -> list[ForwardingRule]:
        """The rules the packet filter can enforce (IP destinations), in priority order."""
        if not self.enabled:
            return []
        return [r for r in self.rules if r.is_ip and protocol in r.parsed.protocols]

    def name_rules(self) -> list[ForwardingRule]:
        """The rules that need the DNS stub (name destinations), in priority order."""
        if not self.enabled:
            return []
        return [r for r in self.rules if r.dest_type in NAME_TYPES]

    def name_rule_for(self, name: str) -> ForwardingRule | None:
        """The first name rule (by priority) covering ``name`` on any port over TCP, or None.

        A bypass rule can win: the caller decides what a bypassed name gets."""
        target = parse_host(name)
        if not isinstance(target, str) or not self.enabled:
            return None
        for rule in self.name_rules():
            if "tcp" not in rule.parsed.protocols:
                continue
            lo = rule.parsed.port_ranges[0][0]
            if rule.matches(target, lo, "tcp"):
                return rule
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.name,
            "version": self.version,
            "enabled": self.enabled,
            "allow_pause": self.allow_pause,
            "hardening": self.hardening,
            "rules": [r.to_json() for r in self.rules],
            "dns_suffixes": list(self.dns_suffixes),
        }


def parse_host(host: str) -> IPAddress | str | None:
    """An IP address (IPv4-mapped IPv6 unmapped), a normalised DNS name, or None."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        addr = ipaddress.ip_address(h)
    except ValueError:
        try:
            return normalize_name(h)
        except ConfigError:
            return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def decide(match: Match, *, edge_up: bool, paused: bool) -> Outcome:
    """What happens to a flow: see the module docstring."""
    rule = match.rule
    if paused or rule is None or rule.action is Action.BYPASS:
        return Outcome.DIRECT
    if edge_up:
        return Outcome.TUNNEL
    return Outcome.DIRECT if rule.hardening == "pass" else Outcome.BLOCK


def explain(match: Match, outcome: Outcome, *, edge_up: bool, paused: bool) -> str:
    """One sentence for people (``test-destination``, ``traffic``)."""
    rule = match.rule
    if paused:
        return "Limen is paused: traffic goes directly to the destination"
    if rule is None:
        return "no rule of the forwarding profile matches: traffic goes directly"
    where = f"rule {rule.id} (priority {rule.priority}"
    where += f", app {rule.app_name})" if rule.app_name else ")"
    if rule.action is Action.BYPASS:
        return f"{where} bypasses Limen: traffic goes directly"
    if outcome is Outcome.TUNNEL:
        return f"{where}: tunneled through the edge"
    if outcome is Outcome.BLOCK:
        return f"{where}: the edge is unreachable and hardening is 'block': refused at once"
    return f"{where}: the edge is unreachable and hardening is 'pass': goes directly"


# --- synthetic addresses ------------------------------------------------------------------------

#: Default range of synthetic addresses: a /16 inside the shared address space (RFC 6598,
#: 100.64.0.0/10), which no private application uses as a real destination.
DEFAULT_SYNTHETIC_RANGE: Final = "100.80.0.0/16"
#: A name keeps its address this long after its last use (answer or flow): well past the
#: answer's TTL, so an application that caches the answer still finds the name behind it.
DEFAULT_SYNTHETIC_TTL: Final = 600.0
#: Upper bound on live mappings whatever the range size (bounds memory on a /8).
DEFAULT_SYNTHETIC_ENTRIES: Final = 65_536


class SyntheticExhausted(LimenError):
    """Every synthetic address is bound to a name used within its TTL."""

    code = "synthetic_exhausted"
    http_status = 503


class SyntheticMap:
    """Private names ↔ synthetic IPv4 addresses handed out by the DNS stub. Pure: the clock
    is passed in.

    * An address is allocated per name on first use and kept while the name is used (every
      :meth:`address_for` and :meth:`name_for` refreshes it); a name not used for ``ttl``
      seconds may lose its address to another name, never sooner.
    * Fresh addresses are handed out in order from a cursor, so a released address is reused
      as late as possible (a late connection to an old answer then fails rather than reaching
      a different name).
    * At most ``max_entries`` mappings (and never more than the range holds, without its
      network and broadcast addresses). When all are in use and the least recently used has
      not expired, :class:`SyntheticExhausted`: failing one lookup is better than sending a
      live flow to the wrong name.
    """

    def __init__(
        self,
        network: str = DEFAULT_SYNTHETIC_RANGE,
        *,
        ttl: float = DEFAULT_SYNTHETIC_TTL,
        max_entries: int = DEFAULT_SYNTHETIC_ENTRIES,
    ) -> None:
        try:
            net = ipaddress.IPv4Network(network, strict=True)
        except ValueError as exc:
            raise ConfigError(f"synthetic range {network!r}: {exc}") from None
        if net.num_addresses < 4:
            raise ConfigError(f"synthetic range {network!r} is too small (at least a /30)")
        if ttl <= 0 or max_entries < 1:
            raise ConfigError("synthetic map: ttl and max_entries must be positive")
        self.network = net
        self.ttl = ttl
        self._first = int(net.network_address) + 1
        self._size = min(net.num_addresses - 2, max_entries)
        self._cursor = 0
        #: name → (address as int, last use); ordered by last use, oldest first.
        self._by_name: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._by_addr: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, address: object) -> bool:
        """Whether ``address`` (text or parsed) lies in the synthetic range."""
        try:
            addr = ipaddress.ip_address(str(address))
        except ValueError:
            return False
        return addr.version == 4 and addr in self.network

    def address_for(self, name: str, now: float) -> str:
        """The synthetic address of ``name`` (normalised), allocating one if needed."""
        key = normalize_name(name)
        entry = self._by_name.get(key)
        if entry is not None:
            self._touch(key, entry[0], now)
            return str(ipaddress.IPv4Address(entry[0]))
        if len(self._by_name) < self._size:
            addr = self._next_free()
        else:
            oldest, (addr, used) = next(iter(self._by_name.items()))
            if now - used < self.ttl:
                raise SyntheticExhausted(
                    f"all {self._size} synthetic addresses of {self.network} are in use"
                )
            del self._by_name[oldest]
            del self._by_addr[addr]
        self._by_addr[addr] = key
        self._touch(key, addr, now)
        return str(ipaddress.IPv4Address(addr))

    def name_for(self, address: str, now: float) -> str | None:
        """The name behind a synthetic ``address``, or None (not synthetic, or expired)."""
        try:
            value = int(ipaddress.IPv4Address(address))
        except ValueError:
            return None
        name = self._by_addr.get(value)
        if name is None:
            return None
        _, used = self._by_name[name]
        if now - used >= self.ttl:
            # Expired: forget it now, so the answer is the same whether or not the address
            # was reallocated in the meantime.
            del self._by_name[name]
            del self._by_addr[value]
            return None
        self._touch(name, value, now)
        return name

    def _touch(self, name: str, addr: int, now: float) -> None:
        self._by_name[name] = (addr, now)
        self._by_name.move_to_end(name)

    def _next_free(self) -> int:
        # Only called with a free slot, so the scan ends within one turn of the range.
        for _ in range(self._size):
            addr = self._first + self._cursor
            self._cursor = (self._cursor + 1) % self._size
            if addr not in self._by_addr:
                return addr
        raise SyntheticExhausted(f"no free synthetic address in {self.network}")


# --- parsing ------------------------------------------------------------------------------------


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"forwarding profile: {message}", code="bad_profile")


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = obj.get(key, default)
    # bool is an int subclass: an integer member must not accept true/false.
    if isinstance(value, bool) and kind is int:
        raise _bad(f"{key} must be an integer")
    if not isinstance(value, kind):
        raise _bad(f"{key} has the wrong type")
    return value


def parse_rule(raw: Any) -> ForwardingRule:
    """One rule from its JSON form (see :meth:`ForwardingRule.to_json`)."""
    if not isinstance(raw, dict):
        raise _bad("a rule is not an object")
    dest = raw.get("destination")
    if not isinstance(dest, dict):
        raise _bad("a rule has no destination object")
    try:
        action = Action(_get(raw, "action", str, ""))
    except ValueError:
        raise _bad(f"rule action must be one of {', '.join(ACTIONS)}") from None
    try:
        return ForwardingRule(
            id=_get(raw, "id", str, ""),
            priority=_get(raw, "priority", int, 0),
            dest_type=_get(dest, "type", str, ""),
            destination=_get(dest, "value", str, ""),
            ports=_get(raw, "ports", str, ""),
            protocol=_get(raw, "protocol", str, "tcp"),
            action=action,
            hardening=_get(raw, "hardening", str, "block"),
            app_id=_get(raw, "app_id", str, ""),
            app_name=_get(raw, "app_name", str, ""),
        )
    except ConfigError as exc:
        raise _bad(f"rule {raw.get('id')!r}: {exc.message}") from None


def parse_profile(raw: Any) -> ForwardingProfile:
    """A profile document as served by the edge; :class:`RemoteProtocolError` if malformed."""
    if not isinstance(raw, dict):
        raise _bad("not an object")
    rules_raw = _get(raw, "rules", list, [])
    if len(rules_raw) > MAX_RULES:
        raise _bad(f"more than {MAX_RULES} rules")
    hardening = _get(raw, "hardening", str, "block")
    if hardening not in HARDENING:
        raise _bad("hardening must be 'block' or 'pass'")
    suffixes = _get(raw, "dns_suffixes", list, [])
    if not all(isinstance(s, str) for s in suffixes):
        raise _bad("dns_suffixes must be strings")
    return build_profile(
        (parse_rule(r) for r in rules_raw),
        name=_get(raw, "profile", str, PRIVATE_ACCESS),
        version=_get(raw, "version", int, 0),
        enabled=_get(raw, "enabled", bool, False),
        allow_pause=_get(raw, "allow_pause", bool, True),
        hardening=hardening,
        dns_suffixes=tuple(suffixes),
    )


def build_profile(rules: Iterable[ForwardingRule], **kw: Any) -> ForwardingProfile:
    """A profile with ``rules`` sorted by priority (then id, so the order is deterministic)."""
    ordered = tuple(sorted(rules, key=lambda r: (r.priority, r.id)))
    return ForwardingProfile(rules=ordered, **kw)


# --- the edge's ordering ------------------------------------------------------------------------


def specificity(dest: Destination) -> tuple[int, int, int]:
    """Sort key of a destination, most specific first, the way the edge picks a segment: an
    exact IP, then smaller ranges; an exact name, then longer suffixes, a wildcard before a
    suffix of the same name."""
    if dest.dest_type in IP_TYPES:
        return (0, dest.size, dest.ip_first)
    labels = dest.name.count(".") + 1
    if dest.dest_type == "fqdn":
        return (1, 0, 0)
    return (2, -labels, 0 if dest.dest_type == "wildcard" else 1)


def assign_priorities(
    rules: Iterable[tuple[Destination, Action]], *, start: int = 100, step: int = 10
) -> list[int]:
    """Priorities for ``rules`` in their given order: bypass rules first, then by
    :func:`specificity`. Returns one number per rule, in the input order."""
    items = list(rules)
    order = sorted(
        range(len(items)),
        key=lambda i: (items[i][1] is not Action.BYPASS, specificity(items[i][0]), i),
    )
    out = [0] * len(items)
    for rank, i in enumerate(order):
        out[i] = start + rank * step
    return out


__all__ = [
    "DEFAULT_SYNTHETIC_RANGE",
    "HARDENING",
    "PRIVATE_ACCESS",
    "Action",
    "ForwardingProfile",
    "ForwardingRule",
    "Match",
    "Outcome",
    "SyntheticExhausted",
    "SyntheticMap",
    "assign_priorities",
    "build_profile",
    "decide",
    "explain",
    "parse_host",
    "parse_profile",
    "parse_rule",
    "specificity",
]
