"""Segments: parsing, validation, overlap rules and the matcher (against a brute-force
reference)."""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limen.errors import ConfigError
from limen.policy.segments import (
    SegmentIndex,
    SegmentSpec,
    find_conflicts,
    format_ports,
    overlaps,
    parse_ports,
    validate_segment,
)

# --- parse_ports ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("22", ((22, 22),)),
        ("80, 443", ((80, 80), (443, 443))),
        ("8000-8100", ((8000, 8100),)),
        (" 443 ,80,81,82 ", ((80, 82), (443, 443))),
        ("1-65535", ((1, 65535),)),
        ("100-200,150-300", ((100, 300),)),
        ("8000 - 8100", ((8000, 8100),)),
    ],
)
def test_parse_ports_accepts_and_normalises(
    text: str, expected: tuple[tuple[int, int], ...]
) -> None:
    assert parse_ports(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0", "0"),
        ("65536", "65536"),
        ("100-90", "reversed"),
        ("", "empty"),
        ("   ", "empty"),
        ("http", "'http'"),
        ("22,", "''"),
        ("1-", "'1-'"),
        ("80,,443", "''"),
        ("\u0662\u0662", "is not a port"),  # Arabic-Indic digits: int() would take them
        ("22\n", None),
    ],
)
def test_parse_ports_refuses_with_clear_message(text: str, fragment: str | None) -> None:
    if fragment is None:
        # Trailing whitespace (newline included) is just whitespace.
        assert parse_ports(text) == ((22, 22),)
        return
    with pytest.raises(ConfigError) as info:
        parse_ports(text)
    assert "ports" in str(info.value)
    assert fragment in str(info.value)


@given(st.text(max_size=40))
def test_parse_ports_random_text_raises_only_config_error(text: str) -> None:
    try:
        ranges = parse_ports(text)
    except ConfigError:
        return
    assert ranges
    assert all(1 <= lo <= hi <= 65535 for lo, hi in ranges)
    assert parse_ports(format_ports(ranges)) == ranges


@given(st.lists(st.tuples(st.integers(1, 65535), st.integers(0, 50)), min_size=1, max_size=8))
def test_parse_ports_round_trips_valid_lists(parts: list[tuple[int, int]]) -> None:
    text = ",".join(f"{lo}-{min(lo + n, 65535)}" if n else str(lo) for lo, n in parts)
    ranges = parse_ports(text)
    covered = {p for lo, n in parts for p in range(lo, min(lo + n, 65535) + 1)}
    assert {p for lo, hi in ranges for p in range(lo, hi + 1)} == covered
    # merged: sorted, disjoint, not even adjacent
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(ranges))


# --- validate_segment -------------------------------------------------------------------------


def test_validate_normalises_names_and_protocols() -> None:
    d = validate_segment("fqdn", " Files.Corp.Example. ", "445", "TCP")
    assert (d.destination, d.protocol, d.ports) == ("files.corp.example", "tcp", "445")
    d = validate_segment("fqdn", "bücher.example", "443", "udp, tcp")
    assert d.destination == "xn--bcher-kva.example"
    assert d.protocol == "tcp,udp"
    assert validate_segment("wildcard", "*.Corp.Example.", "22", "tcp").destination == (
        "*.corp.example"
    )
    assert validate_segment("dns_suffix", ".corp.example", "53", "udp").destination == (
        "corp.example"
    )
    assert validate_segment("fqdn", "_ldap._tcp.dc.corp", "389", "tcp").destination == (
        "_ldap._tcp.dc.corp"
    )


def test_validate_ips() -> None:
    d = validate_segment("ip", "::ffff:10.0.0.1", "22", "tcp")
    assert (d.destination, d.ip_version) == ("10.0.0.1", 4)
    d = validate_segment("ip_range", "10.0.0.1 - 10.0.0.50", "22", "tcp")
    assert (d.destination, d.size) == ("10.0.0.1-10.0.0.50", 50)
    d = validate_segment("cidr", "2001:DB8::/32", "22", "tcp")
    assert (d.destination, d.ip_version, d.size) == ("2001:db8::/32", 6, 2**96)
    d = validate_segment("cidr", "::ffff:10.0.0.0/120", "22", "tcp")
    assert (d.destination, d.ip_version) == ("10.0.0.0/24", 4)


@pytest.mark.parametrize(
    ("dest_type", "destination", "protocol", "fragment"),
    [
        ("cidr", "10.0.0.1/24", "tcp", "host bits set; did you mean 10.0.0.0/24"),
        ("cidr", "10.0.0.0/33", "tcp", "not a valid CIDR"),
        ("cidr", "10.0.0.0", "tcp", "not a CIDR"),
        ("ip", "10.0.0.256", "tcp", "not an IPv4 or IPv6 address"),
        ("ip", "files.corp", "tcp", "not an IPv4 or IPv6 address"),
        ("ip_range", "10.0.0.9-10.0.0.1", "tcp", "reversed"),
        ("ip_range", "10.0.0.1-::1", "tcp", "mixes IPv4 and IPv6"),
        ("ip_range", "10.0.0.1", "tcp", "not a range"),
        ("fqdn", "10.0.0.1", "tcp", "use type 'ip'"),
        ("fqdn", "a..b", "tcp", "empty label"),
        ("fqdn", "-bad.example", "tcp", "not a valid label"),
        ("fqdn", "a" * 64 + ".example", "tcp", "not a valid label"),
        ("fqdn", "has space.example", "tcp", "not a valid label"),
        ("fqdn", "*.corp", "tcp", "use type 'wildcard'"),
        ("fqdn", "host.123", "tcp", "looks like an IP"),
        ("wildcard", "corp.example", "tcp", "not a wildcard"),
        ("wildcard", "*corp.example", "tcp", "not a wildcard"),
        ("wildcard", "*.a.*.example", "tcp", "not a wildcard"),
        ("dns_suffix", "*.corp", "tcp", "use type 'wildcard'"),
        ("fqdn", "files.corp", "icmp", "protocol"),
        ("hostname", "files.corp", "tcp", "type"),
        ("fqdn", "  ", "tcp", "empty"),
    ],
)
def test_validate_refuses(dest_type: str, destination: str, protocol: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_segment(dest_type, destination, "22", protocol)
    assert fragment in str(info.value)


def test_segment_spec_normalises_on_construction() -> None:
    spec = SegmentSpec("seg_1", "app_1", "enterprise", "cidr", "10.1.0.0/16", "443, 80", "TCP")
    assert (spec.destination, spec.ports, spec.protocol) == ("10.1.0.0/16", "80,443", "tcp")
    assert spec.allows(443, "tcp") and not spec.allows(443, "udp") and not spec.allows(81, "tcp")
    with pytest.raises(ConfigError):
        SegmentSpec("seg_1", "app_1", "vpn", "ip", "10.0.0.1", "22")


# --- overlaps ---------------------------------------------------------------------------------


def seg(
    dest_type: str,
    destination: str,
    ports: str = "1-65535",
    protocol: str = "tcp",
    *,
    app: str = "app_a",
    kind: str = "enterprise",
    sid: str = "",
) -> SegmentSpec:
    return SegmentSpec(
        sid or f"seg_{dest_type}_{destination}_{app}",
        app,
        kind,
        dest_type,
        destination,
        ports,
        protocol,
    )


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        # identical destinations
        (("ip", "10.0.0.1"), ("ip", "10.0.0.1"), True),
        (("cidr", "10.0.0.0/24"), ("ip_range", "10.0.0.0-10.0.0.255"), True),
        (("ip", "10.0.0.1"), ("cidr", "10.0.0.1/32"), True),
        (("fqdn", "a.corp"), ("fqdn", "A.corp."), True),
        (("wildcard", "*.corp"), ("wildcard", "*.corp"), True),
        (("dns_suffix", "corp"), ("dns_suffix", "corp"), True),
        # partial intersection of ranges
        (("ip_range", "10.0.0.0-10.0.0.100"), ("ip_range", "10.0.0.50-10.0.0.200"), True),
        # proper subsets: most specific wins, allowed
        (("ip", "10.0.0.1"), ("cidr", "10.0.0.0/24"), False),
        (("cidr", "10.0.0.0/25"), ("cidr", "10.0.0.0/24"), False),
        (("ip_range", "10.0.0.5-10.0.0.9"), ("cidr", "10.0.0.0/24"), False),
        (("fqdn", "a.corp"), ("wildcard", "*.corp"), False),
        (("fqdn", "corp"), ("dns_suffix", "corp"), False),
        (("wildcard", "*.a.corp"), ("wildcard", "*.corp"), False),
        (("dns_suffix", "a.corp"), ("wildcard", "*.corp"), False),
        (("wildcard", "*.corp"), ("dns_suffix", "corp"), False),
        # disjoint
        (("ip", "10.0.0.1"), ("ip", "10.0.0.2"), False),
        (("cidr", "10.0.0.0/24"), ("cidr", "10.0.1.0/24"), False),
        (("fqdn", "corp"), ("wildcard", "*.corp"), False),
        (("wildcard", "*.a.corp"), ("wildcard", "*.b.corp"), False),
        (("ip", "::ffff:10.0.0.1"), ("ip", "::1"), False),
        (("ip", "10.0.0.1"), ("fqdn", "a.corp"), False),
    ],
)
def test_overlaps_destinations(a: tuple[str, str], b: tuple[str, str], expected: bool) -> None:
    sa, sb = seg(*a, app="app_a"), seg(*b, app="app_b")
    assert overlaps(sa, sb) is expected
    assert overlaps(sb, sa) is expected


def test_overlaps_needs_common_ports_and_protocol() -> None:
    assert overlaps(seg("ip", "10.0.0.1", "22"), seg("ip", "10.0.0.1", "20-22"))
    assert not overlaps(seg("ip", "10.0.0.1", "22"), seg("ip", "10.0.0.1", "23-80"))
    assert not overlaps(seg("ip", "10.0.0.1", "53", "tcp"), seg("ip", "10.0.0.1", "53", "udp"))
    assert overlaps(seg("ip", "10.0.0.1", "53", "tcp,udp"), seg("ip", "10.0.0.1", "53", "udp"))


def test_find_conflicts_only_between_different_enterprise_apps() -> None:
    new = seg("cidr", "10.0.0.0/24", app="app_new")
    same_app = seg("cidr", "10.0.0.0/24", app="app_new", sid="seg_same")
    quick = seg("cidr", "10.0.0.0/24", app="app_qa", kind="quick_access")
    other = seg("ip_range", "10.0.0.0-10.0.0.255", app="app_other")
    assert find_conflicts(new, [same_app, quick, other]) == [other]
    qa_new = seg("cidr", "10.0.0.0/24", app="app_qa2", kind="quick_access")
    assert find_conflicts(qa_new, [other]) == []


# --- match: directed cases ----------------------------------------------------------------------


def test_match_most_specific_ip() -> None:
    ip = seg("ip", "10.0.0.5", app="app_ip")
    small = seg("cidr", "10.0.0.0/28", app="app_small")
    big = seg("cidr", "10.0.0.0/16", app="app_big")
    rng = seg("ip_range", "10.0.0.1-10.0.0.100", app="app_range")
    index = SegmentIndex.build([big, rng, small, ip])
    assert index.match("10.0.0.5", 22, "tcp") is ip
    assert index.match("10.0.0.6", 22, "tcp") is small
    assert index.match("10.0.0.50", 22, "tcp") is rng
    assert index.match("10.0.200.1", 22, "tcp") is big
    assert index.match("::ffff:10.0.0.5", 22, "tcp") is ip
    assert index.match("10.1.0.0", 22, "tcp") is None
    assert index.match("not a host", 22, "tcp") is None
    assert index.match("", 22, "tcp") is None
    assert len(index) == 4


def test_match_falls_back_when_port_or_protocol_differs() -> None:
    ip = seg("ip", "10.0.0.5", "22", app="app_ip")
    big = seg("cidr", "10.0.0.0/16", "80,443", "tcp,udp", app="app_big")
    index = SegmentIndex.build([ip, big])
    assert index.match("10.0.0.5", 22, "tcp") is ip
    assert index.match("10.0.0.5", 443, "udp") is big
    assert index.match("10.0.0.5", 22, "udp") is None


def test_match_names_wildcard_excludes_apex_suffix_includes_it() -> None:
    wild = seg("wildcard", "*.corp.example", app="app_w")
    index = SegmentIndex.build([wild])
    assert index.match("a.corp.example", 443, "tcp") is wild
    assert index.match("a.b.corp.example", 443, "tcp") is wild
    assert index.match("corp.example", 443, "tcp") is None
    assert index.match("xcorp.example", 443, "tcp") is None
    suffix = seg("dns_suffix", "corp.example", app="app_s")
    index = SegmentIndex.build([suffix])
    assert index.match("CORP.example.", 443, "tcp") is suffix
    assert index.match("a.b.corp.example", 443, "tcp") is suffix
    assert index.match("xcorp.example", 443, "tcp") is None


def test_match_most_specific_name() -> None:
    exact = seg("fqdn", "files.hr.corp", app="app_f")
    wild_hr = seg("wildcard", "*.hr.corp", app="app_whr")
    suffix_hr = seg("dns_suffix", "hr.corp", app="app_shr")
    wild = seg("wildcard", "*.corp", app="app_w")
    suffix = seg("dns_suffix", "corp", app="app_s")
    index = SegmentIndex.build([suffix, wild, suffix_hr, wild_hr, exact])
    assert index.match("files.hr.corp", 1, "tcp") is exact
    assert index.match("x.hr.corp", 1, "tcp") is wild_hr
    assert index.match("hr.corp", 1, "tcp") is suffix_hr  # longer suffix beats *.corp
    assert index.match("x.corp", 1, "tcp") is wild
    assert index.match("corp", 1, "tcp") is suffix
    assert index.match("bücher.corp", 1, "tcp") is wild


def test_match_enterprise_beats_quick_access_at_equal_specificity() -> None:
    qa = seg("cidr", "10.0.0.0/24", app="app_qa", kind="quick_access", sid="seg_0")
    ent = seg("cidr", "10.0.0.0/24", app="app_e", sid="seg_9")
    qa_exact = seg("ip", "10.0.0.7", app="app_qa", kind="quick_access")
    index = SegmentIndex.build([qa, ent, qa_exact])
    assert index.match("10.0.0.1", 22, "tcp") is ent
    assert index.match("10.0.0.7", 22, "tcp") is qa_exact  # more specific still wins
    qn = seg("fqdn", "a.corp", app="app_qa", kind="quick_access", sid="seg_0")
    en = seg("fqdn", "a.corp", app="app_e", sid="seg_9")
    assert SegmentIndex.build([qn, en]).match("a.corp", 22, "tcp") is en


def test_match_ipv6() -> None:
    net = seg("cidr", "2001:db8::/64", app="app_6")
    one = seg("ip", "2001:db8::1", app="app_61")
    index = SegmentIndex.build([net, one])
    assert index.match("2001:db8::1", 22, "tcp") is one
    assert index.match("[2001:db8::2]", 22, "tcp") is net
    assert index.match("2001:db9::1", 22, "tcp") is None


# --- match: property test against a brute-force reference --------------------------------------

V4_BASE = int(ipaddress.IPv4Address("10.0.0.0"))
V6_BASE = int(ipaddress.IPv6Address("2001:db8::"))
LABELS = ["a", "b", "c"]


def _addr(version: int, offset: int) -> str:
    if version == 4:
        return str(ipaddress.IPv4Address(V4_BASE + offset))
    return str(ipaddress.IPv6Address(V6_BASE + offset))


@st.composite
def ip_specs(draw: st.DrawFn) -> tuple[str, str]:
    version = draw(st.sampled_from([4, 6]))
    dest_type = draw(st.sampled_from(["ip", "ip_range", "cidr"]))
    if dest_type == "ip":
        return dest_type, _addr(version, draw(st.integers(0, 63)))
    if dest_type == "ip_range":
        lo = draw(st.integers(0, 63))
        hi = draw(st.integers(lo, 63))
        return dest_type, f"{_addr(version, lo)}-{_addr(version, hi)}"
    host_bits = draw(st.integers(0, 6))
    start = draw(st.integers(0, 63 >> host_bits)) << host_bits
    bits = 32 if version == 4 else 128
    return dest_type, f"{_addr(version, start)}/{bits - host_bits}"


names = st.lists(st.sampled_from(LABELS), min_size=0, max_size=2).map(
    lambda labels: ".".join([*labels, "corp"])
)


@st.composite
def name_specs(draw: st.DrawFn) -> tuple[str, str]:
    dest_type = draw(st.sampled_from(["fqdn", "wildcard", "dns_suffix"]))
    name = draw(names)
    return dest_type, f"*.{name}" if dest_type == "wildcard" else name


@st.composite
def spec_lists(draw: st.DrawFn) -> list[SegmentSpec]:
    n = draw(st.integers(0, 12))
    out = []
    for i in range(n):
        dest_type, destination = draw(st.one_of(ip_specs(), name_specs()))
        lo = draw(st.integers(1, 8))
        hi = draw(st.integers(lo, 10))
        out.append(
            SegmentSpec(
                f"seg_{i:02d}",
                f"app_{draw(st.integers(0, 3))}",
                draw(st.sampled_from(["enterprise", "quick_access"])),
                dest_type,
                destination,
                f"{lo}-{hi}",
                draw(st.sampled_from(["tcp", "udp", "tcp,udp"])),
            )
        )
    return out


def reference_match(
    specs: list[SegmentSpec], host: str, port: int, protocol: str
) -> SegmentSpec | None:
    """The rules of the module docstring, evaluated naively over every segment."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    keyed: list[tuple[tuple[object, ...], SegmentSpec]] = []
    for s in specs:
        if protocol not in s.protocol.split(","):
            continue
        if not any(lo <= port <= hi for lo, hi in parse_ports(s.ports)):
            continue
        kind = 0 if s.app_kind == "enterprise" else 1
        if addr is not None:
            if s.dest_type == "ip" and ipaddress.ip_address(s.destination) == addr:
                keyed.append(((0, 0, kind, 0, s.id), s))
            elif s.dest_type in ("ip_range", "cidr"):
                if s.dest_type == "cidr":
                    net = ipaddress.ip_network(s.destination)
                    first, last = net.network_address, net.broadcast_address
                else:
                    a, b = s.destination.split("-")
                    first, last = ipaddress.ip_address(a), ipaddress.ip_address(b)
                if first.version == addr.version and first <= addr <= last:  # type: ignore[operator]
                    size = int(last) - int(first) + 1
                    keyed.append(((1, size, kind, int(first), s.id), s))
        else:
            labels = host.count(".") + 1
            if s.dest_type == "fqdn" and s.destination == host:
                keyed.append(((0, 0, 0, kind, s.id), s))
            elif s.dest_type == "dns_suffix" and s.destination == host:
                keyed.append(((1, -labels, 1, kind, s.id), s))
            elif s.dest_type == "dns_suffix" and host.endswith("." + s.destination):
                keyed.append(((1, -(s.destination.count(".") + 1), 1, kind, s.id), s))
            elif s.dest_type == "wildcard" and host.endswith(s.destination[1:]):
                keyed.append(((1, -(s.destination.count(".")), 0, kind, s.id), s))
    if not keyed:
        return None
    return min(keyed, key=lambda pair: pair[0])[1]


hosts = st.one_of(
    st.builds(_addr, st.sampled_from([4, 6]), st.integers(0, 70)),
    names,
    st.lists(st.sampled_from(LABELS), min_size=1, max_size=3).map(lambda ls: ".".join(ls)),
)


@settings(max_examples=300, deadline=None)
@given(
    spec_lists(),
    st.lists(st.tuples(hosts, st.integers(1, 11), st.sampled_from(["tcp", "udp"])), max_size=20),
)
def test_match_agrees_with_brute_force(
    specs: list[SegmentSpec], queries: list[tuple[str, int, str]]
) -> None:
    index = SegmentIndex.build(specs)
    for host, port, protocol in queries:
        assert index.match(host, port, protocol) is reference_match(specs, host, port, protocol)


@settings(max_examples=200, deadline=None)
@given(st.one_of(ip_specs(), name_specs()), st.one_of(ip_specs(), name_specs()), hosts)
def test_non_overlapping_enterprise_pairs_route_to_the_subset(
    a: tuple[str, str], b: tuple[str, str], host: str
) -> None:
    """When two enterprise segments are allowed together but share a destination, the
    matcher sends every shared destination to the same one (the proper subset)."""
    sa = SegmentSpec("seg_a", "app_a", "enterprise", a[0], a[1], "1")
    sb = SegmentSpec("seg_b", "app_b", "enterprise", b[0], b[1], "1")
    if overlaps(sa, sb):
        return
    in_a = SegmentIndex.build([sa]).match(host, 1, "tcp") is sa
    in_b = SegmentIndex.build([sb]).match(host, 1, "tcp") is sb
    if in_a and in_b:
        winner = SegmentIndex.build([sa, sb]).match(host, 1, "tcp")
        assert winner is not None
        loser = sb if winner is sa else sa
        # The winner's whole set lies inside the loser's: the winner is the subset, so it
        # wins for every shared host, never some hosts each way.
        assert not overlaps(winner, loser)
        assert winner.parsed.dest_type in ("ip", "fqdn") or (
            winner.parsed.size <= loser.parsed.size
            if winner.parsed.ip_version
            else len(winner.parsed.name) >= len(loser.parsed.name)
        )
