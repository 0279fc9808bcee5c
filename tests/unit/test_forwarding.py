"""Forwarding profiles: rule matching (priority, destination types, ports, protocol, bypass,
hardening), parsing of the edge's document, the edge's priority order, the nftables ruleset
rendered from a profile, and the diagnostics helpers that need no I/O."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limen.client.daemon import redact
from limen.client.diagnostics import explain_destination, parse_destination
from limen.client.forwarding import (
    Action,
    ForwardingProfile,
    ForwardingRule,
    Outcome,
    assign_priorities,
    build_profile,
    decide,
    parse_profile,
)
from limen.client.transparent import CaptureState, render_ruleset
from limen.errors import ConfigError, RemoteProtocolError
from limen.policy.segments import validate_segment


def rule(
    ident: str,
    dest_type: str,
    destination: str,
    ports: str = "1-65535",
    *,
    priority: int = 100,
    action: Action = Action.TUNNEL,
    protocol: str = "tcp",
    hardening: str = "block",
) -> ForwardingRule:
    return ForwardingRule(
        id=ident,
        priority=priority,
        dest_type=dest_type,
        destination=destination,
        ports=ports,
        protocol=protocol,
        action=action,
        hardening=hardening,
        app_name="app",
    )


def profile(*rules: ForwardingRule, enabled: bool = True) -> ForwardingProfile:
    return build_profile(rules, version=7, enabled=enabled)


def matched(p: ForwardingProfile, host: str, port: int, proto: str = "tcp") -> str | None:
    r = p.match(host, port, proto).rule
    return r.id if r is not None else None


# --- matching -----------------------------------------------------------------------------------


def test_priority_orders_rules_lowest_first() -> None:
    p = profile(
        rule("wide", "cidr", "10.0.0.0/8", priority=200),
        rule("narrow", "cidr", "10.1.0.0/16", priority=100),
    )
    assert [r.id for r in p.rules] == ["narrow", "wide"]
    assert matched(p, "10.1.2.3", 22) == "narrow"
    assert matched(p, "10.2.0.1", 22) == "wide"
    # Priority, not specificity, decides on the client: a wide rule first wins.
    flipped = profile(
        rule("wide", "cidr", "10.0.0.0/8", priority=1),
        rule("narrow", "cidr", "10.1.0.0/16", priority=2),
    )
    assert matched(flipped, "10.1.2.3", 22) == "wide"


@pytest.mark.parametrize(
    ("dest_type", "destination", "inside", "outside"),
    [
        ("ip", "198.18.3.10", "198.18.3.10", "198.18.3.11"),
        ("ip_range", "10.0.0.5-10.0.0.9", "10.0.0.9", "10.0.0.10"),
        ("cidr", "10.0.0.0/30", "10.0.0.3", "10.0.0.4"),
        ("ip", "2001:db8::1", "[2001:db8::1]", "2001:db8::2"),
        ("cidr", "2001:db8::/64", "2001:db8::ffff", "2001:db8:1::1"),
        ("fqdn", "intranet.corp.example", "INTRANET.corp.example.", "x.intranet.corp.example"),
        ("wildcard", "*.corp.example", "a.b.corp.example", "corp.example"),
        ("dns_suffix", "corp.example", "corp.example", "corp.example.net"),
    ],
)
def test_destination_types(dest_type: str, destination: str, inside: str, outside: str) -> None:
    p = profile(rule("r", dest_type, destination))
    assert matched(p, inside, 443) == "r"
    assert matched(p, outside, 443) is None


def test_ipv4_mapped_ipv6_matches_ipv4_rules() -> None:
    p = profile(rule("r", "ip", "198.18.3.10"))
    assert matched(p, "::ffff:198.18.3.10", 80) == "r"


def test_ip_flows_match_ip_rules_and_names_match_name_rules() -> None:
    p = profile(rule("names", "dns_suffix", "corp.example"), rule("ips", "cidr", "0.0.0.0/0"))
    assert matched(p, "10.0.0.1", 80) == "ips"
    assert matched(p, "a.corp.example", 80) == "names"
    assert matched(p, "example.org", 80) is None


def test_ports_and_protocol() -> None:
    p = profile(
        rule("ssh", "ip", "10.0.0.1", "22"),
        rule("web", "ip", "10.0.0.1", "80,443,8000-8100", priority=110),
        rule("dns", "ip", "10.0.0.1", "53", protocol="udp", priority=120),
    )
    assert matched(p, "10.0.0.1", 22) == "ssh"
    assert matched(p, "10.0.0.1", 8050) == "web"
    assert matched(p, "10.0.0.1", 8101) is None
    assert matched(p, "10.0.0.1", 53) is None  # tcp/53: no rule
    assert matched(p, "10.0.0.1", 53, "udp") == "dns"
    assert matched(p, "10.0.0.1", 22, "udp") is None


def test_bypass_carves_out_of_a_tunnel() -> None:
    p = profile(
        rule("printer", "ip", "10.0.0.9", action=Action.BYPASS, priority=100),
        rule("office", "cidr", "10.0.0.0/24", priority=110),
    )
    printer = p.match("10.0.0.9", 631)
    office = p.match("10.0.0.8", 631)
    assert printer.action is Action.BYPASS
    assert decide(printer, edge_up=True, paused=False) is Outcome.DIRECT
    assert decide(office, edge_up=True, paused=False) is Outcome.TUNNEL


def test_hardening_and_pause() -> None:
    blocked = profile(rule("b", "ip", "10.0.0.1", hardening="block")).match("10.0.0.1", 22)
    passed = profile(rule("p", "ip", "10.0.0.1", hardening="pass")).match("10.0.0.1", 22)
    assert decide(blocked, edge_up=False, paused=False) is Outcome.BLOCK
    assert decide(passed, edge_up=False, paused=False) is Outcome.DIRECT
    assert decide(blocked, edge_up=True, paused=False) is Outcome.TUNNEL
    # Paused: nothing is captured, whatever the hardening.
    assert decide(blocked, edge_up=False, paused=True) is Outcome.DIRECT


def test_a_disabled_profile_matches_nothing() -> None:
    p = profile(rule("r", "ip", "10.0.0.1"), enabled=False)
    assert p.match("10.0.0.1", 22).rule is None
    assert p.ip_rules() == [] and p.name_rules() == []


def test_junk_hosts_match_nothing() -> None:
    p = profile(rule("r", "cidr", "0.0.0.0/0"), rule("n", "dns_suffix", "example"))
    for host in ("", "..", "a..b", "[::1", "x" * 300):
        assert p.match(host, 80).rule is None


# --- the edge's priority order -----------------------------------------------------------------


def test_assign_priorities_bypass_first_then_most_specific() -> None:
    items = [
        (validate_segment("cidr", "10.0.0.0/8", "22", "tcp"), Action.TUNNEL),
        (validate_segment("ip", "10.0.0.1", "22", "tcp"), Action.TUNNEL),
        (validate_segment("cidr", "10.0.0.0/24", "22", "tcp"), Action.BYPASS),
        (validate_segment("dns_suffix", "corp.example", "22", "tcp"), Action.TUNNEL),
        (validate_segment("wildcard", "*.hr.corp.example", "22", "tcp"), Action.TUNNEL),
        (validate_segment("fqdn", "a.corp.example", "22", "tcp"), Action.TUNNEL),
    ]
    prios = assign_priorities(items)
    order = [i for _, i in sorted(zip(prios, range(len(items)), strict=True))]
    assert order == [2, 1, 0, 5, 4, 3]
    assert len(set(prios)) == len(prios)


# --- parsing --------------------------------------------------------------------------------------


DOC: dict[str, Any] = {
    "profile": "private-access",
    "version": 12,
    "enabled": True,
    "allow_pause": False,
    "hardening": "pass",
    "rules": [
        {
            "id": "seg_1",
            "priority": 110,
            "destination": {"type": "cidr", "value": "10.0.0.0/24"},
            "protocol": "tcp",
            "ports": "22",
            "action": "tunnel",
            "hardening": "pass",
            "app_id": "app_1",
            "app_name": "lan",
        },
        {
            "id": "bypass-1",
            "priority": 100,
            "destination": {"type": "ip", "value": "10.0.0.9"},
            "protocol": "tcp,udp",
            "ports": "1-65535",
            "action": "bypass",
            "hardening": "pass",
        },
    ],
    "dns_suffixes": ["corp.example"],
}


def test_parse_round_trip() -> None:
    p = parse_profile(DOC)
    assert (p.version, p.enabled, p.allow_pause, p.hardening) == (12, True, False, "pass")
    assert [r.id for r in p.rules] == ["bypass-1", "seg_1"]
    again = parse_profile(p.to_json())
    assert again == p


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(rules="x"),
        lambda d: d.update(version="12"),
        lambda d: d.update(version=True),
        lambda d: d.update(enabled="yes"),
        lambda d: d.update(hardening="maybe"),
        lambda d: d["rules"][0].update(action="drop"),
        lambda d: d["rules"][0].update(destination="10.0.0.0/24"),
        lambda d: d["rules"][0]["destination"].update(value="10.0.0.1/24"),
        lambda d: d["rules"][0].update(ports="0"),
        lambda d: d["rules"][0].update(protocol="icmp"),
        lambda d: d["rules"].append(7),
        lambda d: d.update(dns_suffixes=[1]),
    ],
)
def test_bad_documents_are_refused_with_a_code(mutate: Any) -> None:
    doc = copy.deepcopy(DOC)
    mutate(doc)
    with pytest.raises(RemoteProtocolError) as err:
        parse_profile(doc)
    assert err.value.code == "bad_profile"


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
        max_leaves=20,
    )
)
def test_parse_never_raises_anything_else(raw: Any) -> None:
    try:
        parse_profile(raw)
    except RemoteProtocolError:
        pass


# --- the nftables ruleset -----------------------------------------------------------------------


def _lab_profile() -> ForwardingProfile:
    return profile(
        rule("bypass-1", "ip", "198.18.3.20", action=Action.BYPASS, priority=100),
        rule("seg_ssh", "ip", "198.18.3.10", "22,80", priority=110),
        rule(
            "seg_pass", "ip_range", "198.18.4.1-198.18.4.9", "443", priority=120, hardening="pass"
        ),
        rule("seg_v6", "cidr", "2001:db8::/64", "443", priority=130),
        rule("seg_name", "fqdn", "intranet.corp.example", "80", priority=140),
        rule("seg_udp", "ip", "198.18.3.10", "53", protocol="udp", priority=150),
    )


def test_ruleset_active_redirects_tunnel_rules_in_priority_order() -> None:
    script = render_ruleset(
        _lab_profile(),
        state=CaptureState.ACTIVE,
        listen_ports={4: 4000, 6: 6000},
        excludes=[("198.18.1.1", 8443), ("198.18.1.1", 9443)],
    )
    lines = [line.strip() for line in script.splitlines()]
    # One transaction that replaces the table.
    assert lines[:2] == ["table inet limen", "delete table inet limen"]
    capture = lines[lines.index("chain capture {") : lines.index("chain harden {")]
    assert capture[1] == "type nat hook output priority -100; policy accept;"
    assert capture[2].startswith("meta mark 0x4c4d0001 return")
    assert "ip daddr 198.18.1.1 tcp dport 8443 return" in capture
    body = [c for c in capture if "comment" in c]
    assert body[0].startswith("ip daddr 198.18.3.20 tcp dport 1-65535 return")
    assert body[1].startswith("ip daddr 198.18.3.10 tcp dport { 22, 80 } redirect to :4000")
    assert body[2].startswith("ip daddr 198.18.4.1-198.18.4.9 tcp dport 443 redirect to :4000")
    assert body[3].startswith("ip6 daddr 2001:db8::/64 tcp dport 443 redirect to :6000")
    # Name and UDP rules are not packet-filter rules.
    assert "intranet" not in script and "dport 53" not in script
    assert "reject" not in script


def test_ruleset_edge_down_rejects_block_rules_and_leaves_pass_rules_direct() -> None:
    script = render_ruleset(_lab_profile(), state=CaptureState.EDGE_DOWN, listen_ports={4: 4000})
    assert "redirect" not in script
    assert "ip daddr 198.18.3.10 tcp dport { 22, 80 } reject with tcp reset" in script
    assert "198.18.4.1" not in script  # hardening "pass": not captured at all
    harden = script[script.index("chain harden") :]
    # The bypass rule still comes first in the filter chain.
    assert harden.index("198.18.3.20") < harden.index("198.18.3.10")


def test_ruleset_paused_captures_nothing() -> None:
    script = render_ruleset(_lab_profile(), state=CaptureState.PAUSED, listen_ports={4: 4000})
    assert "redirect" not in script and "reject" not in script
    assert "chain capture" in script  # the table stays: `status` and `doctor` can see it


def test_ruleset_without_an_ipv6_listener_leaves_ipv6_out() -> None:
    script = render_ruleset(_lab_profile(), state=CaptureState.ACTIVE, listen_ports={4: 4000})
    assert "2001:db8" not in script


# --- diagnostics ----------------------------------------------------------------------------------


def test_parse_destination() -> None:
    assert parse_destination("10.0.0.1:22") == ("10.0.0.1", 22, "tcp")
    assert parse_destination("dns.corp.example:53/udp") == ("dns.corp.example", 53, "udp")
    assert parse_destination("[2001:db8::1]:443") == ("2001:db8::1", 443, "tcp")
    for bad in ("10.0.0.1", "10.0.0.1:0", "10.0.0.1:99999", "a:22/icmp", "a..b:22"):
        with pytest.raises(ConfigError):
            parse_destination(bad)


def test_test_destination_explains_the_outcome() -> None:
    p = _lab_profile()
    tunneled = explain_destination(p, "198.18.3.10:22")
    assert tunneled["rule"]["id"] == "seg_ssh" and tunneled["outcome"] == "tunnel"
    assert "tunneled" in tunneled["explanation"]
    down = explain_destination(p, "198.18.3.10:22", edge_up=False)
    assert down["outcome"] == "block"
    bypassed = explain_destination(p, "198.18.3.20:22")
    assert bypassed["outcome"] == "direct" and "bypass" in bypassed["explanation"]
    paused = explain_destination(p, "198.18.3.10:22", paused=True)
    assert paused["outcome"] == "direct" and "paused" in paused["explanation"]
    udp = explain_destination(p, "198.18.3.10:53/udp")
    assert udp["rule"]["id"] == "seg_udp" and "UDP" in udp["note"]


def test_redact_removes_tokens() -> None:
    jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1c3JfMSJ9.c2lnbmF0dXJl"
    text = f"token {jwt} and Authorization: Bearer abc.def-ghi, fine"
    out = redact(text)
    assert jwt not in out and "abc.def-ghi" not in out
    assert out.endswith("fine")
