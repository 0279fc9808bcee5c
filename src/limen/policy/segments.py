"""Application segments: parsing, validation, overlap rules and the per-flow matcher.

Pure library: no I/O, no clock. The edge builds a :class:`SegmentIndex` from the configuration
snapshot and calls :meth:`SegmentIndex.match` for every new flow, so matching is a handful of
dict lookups, never a scan over all segments.

Destination types and what they match
-------------------------------------
``ip``          one address, IPv4 or IPv6 (IPv4-mapped IPv6 is normalised to IPv4).
``ip_range``    ``first-last`` inclusive, same family, first <= last.
``cidr``        a network such as ``10.0.0.0/16``; host bits set is an error.
``fqdn``        exactly one DNS name.
``wildcard``    ``*.corp.example`` matches every name *strictly under* ``corp.example``, one or
                more labels deep (``a.corp.example``, ``a.b.corp.example``) but NOT the apex
                ``corp.example``: a TLS / Entra wildcard, extended to several labels.
``dns_suffix``  ``corp.example`` matches the apex ``corp.example`` and every name under it.

Names are lower-cased, lose a trailing dot and are stored as IDNA A-labels (``xn--...``).
An IP flow only ever matches IP segments and a name flow only name segments: the edge does not
resolve names to decide which application a flow belongs to.

Which segment wins (most specific first)
----------------------------------------
Among the segments whose destination, port and protocol all match a flow:

* IP host: an exact ``ip`` segment, then the ``ip_range``/``cidr`` with the fewest addresses.
* Name host: an exact ``fqdn``; then the pattern with the longest matching suffix (counted in
  labels), a ``dns_suffix`` equal to the host itself being the longest possible; at the same
  suffix a ``wildcard`` beats a ``dns_suffix`` (its set is the smaller one, it lacks the apex).
  Ordering patterns by suffix length rather than "every wildcard before every suffix" keeps the
  rule "a proper subset wins": ``dns_suffix hr.corp.example`` is reachable even when another
  application owns ``*.corp.example``.
* At equal specificity an ``enterprise`` application beats a ``quick_access`` one; remaining
  ties go to the smaller first address (IP), then the smaller segment id, so the result is
  deterministic.

Overlap rule (enforced at configuration time)
---------------------------------------------
:func:`overlaps` is true when two segments can match the same (destination, port, protocol)
AND neither destination set is a proper subset of the other. Consequences:

* identical destinations (same set of addresses or names: ``10.0.0.0/24`` and
  ``10.0.0.0-10.0.0.255`` count as identical) with intersecting ports and protocols overlap;
* an exact IP inside another segment's CIDR or range, a CIDR nested inside a larger one, an
  FQDN under a wildcard or suffix, ``*.a.corp`` under ``*.corp`` do NOT overlap: the most
  specific wins at match time and the admin's intent is clear;
* partially intersecting IP ranges (neither contains the other) overlap.

:func:`overlaps` looks at destinations, ports and protocols only; :func:`find_conflicts` applies
it the way the admin API does: only between segments of two *different enterprise*
applications (Quick Access is the catch-all that per-app segments are carved out of).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from limen.errors import ConfigError

PortRange = tuple[int, int]

DEST_TYPES: Final = ("ip", "ip_range", "cidr", "fqdn", "wildcard", "dns_suffix")
IP_TYPES: Final = frozenset({"ip", "ip_range", "cidr"})
NAME_TYPES: Final = frozenset({"fqdn", "wildcard", "dns_suffix"})
APP_KINDS: Final = ("enterprise", "quick_access")
PROTOCOLS: Final = ("tcp", "udp")

#: A ports string longer than the column (512) cannot be stored; refusing early also bounds
#: the work done on junk input.
MAX_PORTS_TEXT = 512
#: RFC 1035 §2.3.4: 253 characters in presentation form, 63 per label.
MAX_NAME = 253
MAX_LABEL = 63

# [0-9], not \d: \d also matches other scripts' digits, which int() would accept.
_PORT_TOKEN = re.compile(r"\s*([0-9]{1,6})\s*(?:-\s*([0-9]{1,6})\s*)?")
# Letters, digits, hyphen (RFC 952/1123) and underscore, which private DNS really has
# (``_ldap._tcp``, Windows host names).
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


# --- ports and protocols --------------------------------------------------------------------


def parse_ports(text: str) -> tuple[PortRange, ...]:
    """Parse ``"22"``, ``"80, 443"``, ``"8000-8100"`` into sorted, merged inclusive ranges.

    Raises :class:`ConfigError` naming the bad part for an empty list, port 0, a port above
    65535, a reversed range or anything that is not a number.
    """
    if not isinstance(text, str):
        raise ConfigError("ports must be a string such as '22', '80,443' or '8000-8100'")
    if len(text) > MAX_PORTS_TEXT:
        raise ConfigError(f"ports: longer than {MAX_PORTS_TEXT} characters")
    if not text.strip():
        raise ConfigError("ports: empty; give ports such as '22', '80,443' or '8000-8100'")
    ranges: list[PortRange] = []
    for part in text.split(","):
        m = _PORT_TOKEN.fullmatch(part)
        if m is None:
            raise ConfigError(
                f"ports: {part.strip()!r} is not a port or a range such as '8000-8100'"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        for port in (lo, hi):
            if not 1 <= port <= 65535:
                raise ConfigError(f"ports: {port} in {part.strip()!r} is outside 1-65535")
        if lo > hi:
            raise ConfigError(f"ports: range {part.strip()!r} is reversed")
        ranges.append((lo, hi))
    ranges.sort()
    merged: list[PortRange] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def format_ports(ranges: Iterable[PortRange]) -> str:
    """The canonical text of parsed ports: ``"22,80,8000-8100"``."""
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def parse_protocol(text: str) -> frozenset[str]:
    """``"tcp"``, ``"udp"`` or ``"tcp,udp"`` (any order, any case)."""
    if not isinstance(text, str):
        raise ConfigError("protocol must be 'tcp', 'udp' or 'tcp,udp'")
    parts = [p.strip().lower() for p in text.split(",")]
    if not parts or any(p not in PROTOCOLS for p in parts):
        raise ConfigError(f"protocol: {text!r} is not 'tcp', 'udp' or 'tcp,udp'")
    return frozenset(parts)


def format_protocol(protocols: frozenset[str]) -> str:
    return ",".join(p for p in PROTOCOLS if p in protocols)


def _ports_intersect(a: tuple[PortRange, ...], b: tuple[PortRange, ...]) -> bool:
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i][1] < b[j][0]:
            i += 1
        elif b[j][1] < a[i][0]:
            j += 1
        else:
            return True
    return False


def _port_in(port: int, ranges: tuple[PortRange, ...]) -> bool:
    # Segments have a few ranges; a linear walk beats bisect at that size.
    for lo, hi in ranges:
        if port < lo:
            return False
        if port <= hi:
            return True
    return False


# --- destinations ---------------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_ip(text: str, what: str) -> IPAddress:
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        raise ConfigError(f"{what}: {text.strip()!r} is not an IPv4 or IPv6 address") from None
    return _unmap(addr)


def _unmap(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def normalize_name(text: str, what: str = "name") -> str:
    """Lower-case, drop a trailing dot, convert to IDNA A-labels, validate every label."""
    name = text.strip().rstrip(".").lower() if isinstance(text, str) else ""
    if not name:
        raise ConfigError(f"{what}: empty DNS name")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii").lower()
        except UnicodeError as exc:
            raise ConfigError(f"{what}: {text.strip()!r} is not a valid IDNA name") from exc
    if len(name) > MAX_NAME:
        raise ConfigError(f"{what}: {text.strip()!r} is longer than {MAX_NAME} characters")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise ConfigError(f"{what}: {text.strip()!r} has an empty label")
        if len(label) > MAX_LABEL or not _LABEL.fullmatch(label):
            raise ConfigError(f"{what}: label {label!r} of {text.strip()!r} is not a valid label")
    if labels[-1].isdigit():
        # An all-numeric last label is an IP literal or nothing: no TLD is numeric.
        raise ConfigError(f"{what}: {text.strip()!r} looks like an IP address, not a DNS name")
    return name


@dataclass(frozen=True, slots=True)
class Destination:
    """A validated, normalised destination, ports and protocols of a segment."""

    dest_type: str
    #: canonical text (``10.0.0.0/24``, ``*.corp.example``, ``10.0.0.1-10.0.0.9``...)
    destination: str
    ports: str
    protocol: str
    port_ranges: tuple[PortRange, ...]
    protocols: frozenset[str]
    #: IP types: 4 or 6, and the first and last address as integers; 0 for names.
    ip_version: int = 0
    ip_first: int = 0
    ip_last: int = 0
    #: Name types: the name (fqdn) or the suffix (wildcard, dns_suffix) without ``*.``.
    name: str = ""

    @property
    def size(self) -> int:
        """How many addresses an IP destination covers (0 for names)."""
        return self.ip_last - self.ip_first + 1 if self.ip_version else 0


def validate_segment(dest_type: str, destination: str, ports: str, protocol: str) -> Destination:
    """Validate and normalise a segment; :class:`ConfigError` says what is wrong."""
    if dest_type not in DEST_TYPES:
        raise ConfigError(f"type: {dest_type!r} is not one of {', '.join(DEST_TYPES)}")
    if not isinstance(destination, str) or not destination.strip():
        raise ConfigError("destination: empty")
    port_ranges = parse_ports(ports)
    protocols = parse_protocol(protocol)
    common_ports = format_ports(port_ranges)
    common_protocol = format_protocol(protocols)

    def make(
        canonical: str, *, version: int = 0, first: int = 0, last: int = 0, name: str = ""
    ) -> Destination:
        return Destination(
            dest_type=dest_type,
            destination=canonical,
            ports=common_ports,
            protocol=common_protocol,
            port_ranges=port_ranges,
            protocols=protocols,
            ip_version=version,
            ip_first=first,
            ip_last=last,
            name=name,
        )

    text = destination.strip()
    if dest_type == "ip":
        addr = _parse_ip(text, "destination")
        return make(str(addr), version=addr.version, first=int(addr), last=int(addr))
    if dest_type == "ip_range":
        if text.count("-") != 1:
            raise ConfigError(f"destination: {text!r} is not a range such as '10.0.0.1-10.0.0.50'")
        first_text, last_text = text.split("-")
        first = _parse_ip(first_text, "destination")
        last = _parse_ip(last_text, "destination")
        if first.version != last.version:
            raise ConfigError(f"destination: {text!r} mixes IPv4 and IPv6")
        if int(first) > int(last):
            raise ConfigError(f"destination: range {text!r} is reversed")
        return make(f"{first}-{last}", version=first.version, first=int(first), last=int(last))
    if dest_type == "cidr":
        net = _parse_cidr(text)
        return make(
            str(net),
            version=net.version,
            first=int(net.network_address),
            last=int(net.broadcast_address),
        )
    if dest_type == "fqdn":
        if "*" in text:
            raise ConfigError(f"destination: {text!r} has a '*'; use type 'wildcard'")
        _refuse_ip_literal(text)
        name = normalize_name(text, "destination")
        return make(name, name=name)
    if dest_type == "wildcard":
        if not text.startswith("*.") or "*" in text[2:]:
            raise ConfigError(f"destination: {text!r} is not a wildcard such as '*.corp.example'")
        suffix = normalize_name(text[2:], "destination")
        return make(f"*.{suffix}", name=suffix)
    # dns_suffix
    if "*" in text:
        raise ConfigError(f"destination: {text!r} has a '*'; use type 'wildcard'")
    _refuse_ip_literal(text)
    suffix = normalize_name(text.lstrip("."), "destination")
    return make(suffix, name=suffix)


_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")


def _parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if "/" not in text:
        raise ConfigError(f"destination: {text!r} is not a CIDR such as '10.0.0.0/16'")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            raise ConfigError(
                f"destination: {text!r} has host bits set; did you mean "
                f"{ipaddress.ip_network(text, strict=False)}?"
            ) from None
        raise ConfigError(f"destination: {text!r} is not a valid CIDR: {exc}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED_V4):
        # IPv4-mapped IPv6 networks are IPv4 networks: hosts are unmapped before matching.
        mapped = net.network_address.ipv4_mapped
        assert mapped is not None  # inside ::ffff:0:0/96, so always mapped
        return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
    return net


def _refuse_ip_literal(text: str) -> None:
    try:
        ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return
    raise ConfigError(f"destination: {text!r} is an IP address; use type 'ip'")


# --- segments -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentSpec:
    """One segment of one application, validated on construction (:class:`ConfigError`).

    ``destination``, ``ports`` and ``protocol`` are replaced by their canonical text; the
    parsed form is in ``parsed``.
    """

    id: str
    app_id: str
    app_kind: str
    dest_type: str
    destination: str
    ports: str
    protocol: str = "tcp"
    parsed: Destination = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.app_kind not in APP_KINDS:
            raise ConfigError(f"kind: {self.app_kind!r} is not one of {', '.join(APP_KINDS)}")
        parsed = validate_segment(self.dest_type, self.destination, self.ports, self.protocol)
        # Frozen dataclass: normalise through object.__setattr__, once, at construction.
        object.__setattr__(self, "parsed", parsed)
        object.__setattr__(self, "destination", parsed.destination)
        object.__setattr__(self, "ports", parsed.ports)
        object.__setattr__(self, "protocol", parsed.protocol)

    @property
    def port_ranges(self) -> tuple[PortRange, ...]:
        return self.parsed.port_ranges

    @property
    def protocols(self) -> frozenset[str]:
        return self.parsed.protocols

    def allows(self, port: int, protocol: str) -> bool:
        """Whether the port and protocol of a flow are inside this segment."""
        return protocol in self.parsed.protocols and _port_in(port, self.parsed.port_ranges)


def _name_set_key(d: Destination) -> tuple[str, str]:
    return (d.dest_type, d.name)


def _names_intersect(a: Destination, b: Destination) -> bool:
    """Whether two name destinations can match a common host."""

    def covers(pattern: Destination, host: str) -> bool:
        # Does the pattern match the (exact) host name?
        if pattern.dest_type == "fqdn":
            return host == pattern.name
        under = host.endswith("." + pattern.name)
        if pattern.dest_type == "wildcard":
            return under
        return under or host == pattern.name

    if a.dest_type == "fqdn":
        return covers(b, a.name)
    if b.dest_type == "fqdn":
        return covers(a, b.name)
    # Two patterns: their sets intersect iff one suffix is under-or-equal the other (every
    # pattern contains names arbitrarily deep under its suffix).
    return a.name == b.name or a.name.endswith("." + b.name) or b.name.endswith("." + a.name)


def _name_proper_subset(a: Destination, b: Destination) -> bool:
    """Whether the names matched by ``a`` are a proper subset of those matched by ``b``
    (given that they intersect)."""
    if a.dest_type == "fqdn":
        return b.dest_type != "fqdn"
    if b.dest_type == "fqdn":
        return False
    if a.name == b.name:
        # Same suffix: *.s is a proper subset of the suffix s (which adds the apex).
        return a.dest_type == "wildcard" and b.dest_type == "dns_suffix"
    # a deeper than b: *.x.s and x.s are both inside *.s and inside s.
    return a.name.endswith("." + b.name)


def overlaps(a: SegmentSpec, b: SegmentSpec) -> bool:
    """Whether two segments conflict: they can match the same (destination, port, protocol)
    and neither destination set is a proper subset of the other (see the module docstring).
    Application ids and kinds are not considered here; see :func:`find_conflicts`."""
    pa, pb = a.parsed, b.parsed
    if not (pa.protocols & pb.protocols):
        return False
    if not _ports_intersect(pa.port_ranges, pb.port_ranges):
        return False
    a_ip = pa.dest_type in IP_TYPES
    if a_ip != (pb.dest_type in IP_TYPES):
        return False
    if a_ip:
        if pa.ip_version != pb.ip_version:
            return False
        if pa.ip_last < pb.ip_first or pb.ip_last < pa.ip_first:
            return False
        a_in_b = pb.ip_first <= pa.ip_first and pa.ip_last <= pb.ip_last
        b_in_a = pa.ip_first <= pb.ip_first and pb.ip_last <= pa.ip_last
        # Exactly one containment = proper subset = the smaller one wins: no conflict.
        # Both (identical sets) or neither (partial intersection): conflict.
        return a_in_b == b_in_a
    if not _names_intersect(pa, pb):
        return False
    return not (_name_proper_subset(pa, pb) or _name_proper_subset(pb, pa))


def find_conflicts(new: SegmentSpec, existing: Iterable[SegmentSpec]) -> list[SegmentSpec]:
    """The existing segments that ``new`` may not coexist with: segments of *other*
    enterprise applications that :func:`overlaps` it. Empty when ``new`` is Quick Access."""
    if new.app_kind != "enterprise":
        return []
    return [
        seg
        for seg in existing
        if seg.app_kind == "enterprise" and seg.app_id != new.app_id and overlaps(new, seg)
    ]


# --- the matcher ----------------------------------------------------------------------------


def _kind_rank(spec: SegmentSpec) -> int:
    return 0 if spec.app_kind == "enterprise" else 1


def _priority(spec: SegmentSpec) -> tuple[int, int, str]:
    # Order inside one bucket of equal specificity.
    return (_kind_rank(spec), spec.parsed.ip_first, spec.id)


def _normalize_host(host: str) -> IPAddress | str | None:
    """An IP address, a normalised name, or None when the host is neither."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if ":" in h or (h[-1:].isdigit()):
        try:
            return _unmap(ipaddress.ip_address(h))
        except ValueError:
            if ":" in h:
                return None
    try:
        return normalize_name(h)
    except ConfigError:
        return None


def _dotted_quad(host: str) -> int | None:
    """A strict dotted-quad IPv4 literal as an integer (one C call: this runs on every flow),
    else None and the general parser decides."""
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")
    except (OSError, ValueError):
        return None


@dataclass(slots=True)
class _IpFamily:
    bits: int
    exact: dict[int, list[SegmentSpec]] = field(default_factory=dict)
    #: prefix length -> network int -> segments whose range contains that CIDR block. Ranges
    #: are cut into their minimal CIDR cover, so a lookup is one dict hit per prefix length.
    blocks: dict[int, dict[int, list[SegmentSpec]]] = field(default_factory=dict)
    #: prefix lengths present, longest (smallest blocks) first
    prefixes: tuple[int, ...] = ()


class SegmentIndex:
    """Every segment of a configuration snapshot, indexed for :meth:`match`. Immutable once
    built; build a new one when the configuration changes."""

    __slots__ = ("_families", "_fqdn", "_segments", "_suffix", "_wildcard")

    def __init__(self) -> None:
        self._segments: tuple[SegmentSpec, ...] = ()
        self._families: dict[int, _IpFamily] = {4: _IpFamily(32), 6: _IpFamily(128)}
        self._fqdn: dict[str, list[SegmentSpec]] = {}
        self._wildcard: dict[str, list[SegmentSpec]] = {}
        self._suffix: dict[str, list[SegmentSpec]] = {}

    @classmethod
    def build(cls, specs: Iterable[SegmentSpec]) -> SegmentIndex:
        index = cls()
        index._segments = tuple(specs)
        for spec in index._segments:
            d = spec.parsed
            if d.dest_type == "ip":
                index._families[d.ip_version].exact.setdefault(d.ip_first, []).append(spec)
            elif d.dest_type in ("ip_range", "cidr"):
                fam = index._families[d.ip_version]
                addr_cls = ipaddress.IPv4Address if d.ip_version == 4 else ipaddress.IPv6Address
                for net in ipaddress.summarize_address_range(
                    addr_cls(d.ip_first), addr_cls(d.ip_last)
                ):
                    bucket = fam.blocks.setdefault(net.prefixlen, {})
                    bucket.setdefault(int(net.network_address), []).append(spec)
            elif d.dest_type == "fqdn":
                index._fqdn.setdefault(d.name, []).append(spec)
            elif d.dest_type == "wildcard":
                index._wildcard.setdefault(d.name, []).append(spec)
            else:
                index._suffix.setdefault(d.name, []).append(spec)
        for fam in index._families.values():
            fam.prefixes = tuple(sorted(fam.blocks, reverse=True))
            for exact in fam.exact.values():
                exact.sort(key=_priority)
            for bucket in fam.blocks.values():
                for specs_ in bucket.values():
                    specs_.sort(key=_priority)
        for table in (index._fqdn, index._wildcard, index._suffix):
            for specs_ in table.values():
                specs_.sort(key=_priority)
        return index

    @property
    def segments(self) -> tuple[SegmentSpec, ...]:
        return self._segments

    def __len__(self) -> int:
        return len(self._segments)

    def match(self, host: str, port: int, protocol: str) -> SegmentSpec | None:
        """The most specific segment for a flow to ``host:port`` over ``protocol`` (``tcp``
        or ``udp``), or None. ``host`` is an IP literal (IPv6 optionally in brackets) or a
        DNS name."""
        quad = _dotted_quad(host)
        if quad is not None:  # the common case, without building an ipaddress object
            return self._match_ip(4, quad, port, protocol)
        target = _normalize_host(host)
        if target is None:
            return None
        if isinstance(target, str):
            return self._match_name(target, port, protocol)
        return self._match_ip(target.version, int(target), port, protocol)

    def _match_ip(self, version: int, n: int, port: int, protocol: str) -> SegmentSpec | None:
        fam = self._families[version]
        for spec in fam.exact.get(n, ()):
            if spec.allows(port, protocol):
                return spec
        best: SegmentSpec | None = None
        best_key: tuple[int, int, int, str] | None = None
        for prefix in fam.prefixes:
            block_size = 1 << (fam.bits - prefix)
            # A segment found at this prefix covers at least block_size addresses: once that
            # exceeds the best so far, nothing further can win.
            if best_key is not None and block_size > best_key[0]:
                break
            net = (n >> (fam.bits - prefix)) << (fam.bits - prefix)
            for spec in fam.blocks[prefix].get(net, ()):
                if not spec.allows(port, protocol):
                    continue
                d = spec.parsed
                key = (d.size, _kind_rank(spec), d.ip_first, spec.id)
                if best_key is None or key < best_key:
                    best, best_key = spec, key
        return best

    def _match_name(self, name: str, port: int, protocol: str) -> SegmentSpec | None:
        for spec in self._fqdn.get(name, ()):
            if spec.allows(port, protocol):
                return spec
        for spec in self._suffix.get(name, ()):
            if spec.allows(port, protocol):
                return spec
        # Walk the proper suffixes of the name, longest first.
        pos = name.find(".")
        while pos >= 0:
            suffix = name[pos + 1 :]
            for spec in self._wildcard.get(suffix, ()):
                if spec.allows(port, protocol):
                    return spec
            for spec in self._suffix.get(suffix, ()):
                if spec.allows(port, protocol):
                    return spec
            pos = name.find(".", pos + 1)
        return None


__all__ = [
    "APP_KINDS",
    "DEST_TYPES",
    "Destination",
    "PortRange",
    "SegmentIndex",
    "SegmentSpec",
    "find_conflicts",
    "format_ports",
    "normalize_name",
    "overlaps",
    "parse_ports",
    "parse_protocol",
    "validate_segment",
]
