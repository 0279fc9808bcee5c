"""Private names in transparent mode, the pure parts: the synthetic address map, the stub's own
answers, the packet-filter rules for the synthetic range, and the resolv.conf takeover."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from limen.client.dns import SYNTHETIC_ANSWER_TTL, synthetic_answer
from limen.client.forwarding import (
    Action,
    ForwardingProfile,
    ForwardingRule,
    SyntheticExhausted,
    SyntheticMap,
    build_profile,
)
from limen.client.resolvconf import ResolvConf, nameservers, render_stub_conf, uses_resolved
from limen.client.transparent import CaptureState, render_ruleset
from limen.errors import ConfigError

# --- SyntheticMap -------------------------------------------------------------------------------


def test_allocation_is_sequential_from_the_range_and_stable_per_name() -> None:
    m = SyntheticMap("100.80.0.0/16", ttl=60)
    a = m.address_for("intranet.corp.example", now=0)
    b = m.address_for("git.corp.example", now=0)
    assert (a, b) == ("100.80.0.1", "100.80.0.2")
    # Names are normalised: case and a trailing dot do not make a new mapping.
    assert m.address_for("Intranet.Corp.Example.", now=1) == a
    assert m.name_for(a, now=2) == "intranet.corp.example"
    assert m.name_for(b, now=2) == "git.corp.example"
    assert len(m) == 2
    assert a in m and "100.81.0.1" not in m and "::1" not in m and "junk" not in m


def test_unknown_and_foreign_addresses_map_to_nothing() -> None:
    m = SyntheticMap("100.80.0.0/16")
    assert m.name_for("100.80.0.9", now=0) is None
    assert m.name_for("198.18.3.10", now=0) is None
    assert m.name_for("not an address", now=0) is None


def test_a_mapping_expires_after_ttl_without_use_and_use_keeps_it() -> None:
    m = SyntheticMap("100.80.0.0/29", ttl=10)
    a = m.address_for("a.corp.example", now=0)
    assert m.name_for(a, now=9) == "a.corp.example"  # a use at 9 …
    assert m.name_for(a, now=18) == "a.corp.example"  # … keeps it alive until 19
    assert m.name_for(a, now=28.5) is None  # unused for 10 s: gone
    assert len(m) == 0
    # The name gets a fresh address, not the one just released (reused as late as possible).
    assert m.address_for("a.corp.example", now=29) == "100.80.0.2"


def test_exhaustion_reuses_only_expired_addresses_least_recently_used_first() -> None:
    m = SyntheticMap("100.80.0.0/30", ttl=10)  # two usable addresses: .1 and .2
    a = m.address_for("a.corp.example", now=0)
    b = m.address_for("b.corp.example", now=5)
    with pytest.raises(SyntheticExhausted) as info:
        m.address_for("c.corp.example", now=9)
    assert info.value.code == "synthetic_exhausted"
    # At 11 "a" has expired (last used at 0) and "b" has not: "c" takes a's address.
    assert m.address_for("c.corp.example", now=11) == a
    assert m.name_for(a, now=11) == "c.corp.example"
    assert m.name_for(b, now=11) == "b.corp.example"
    assert len(m) == 2


def test_max_entries_bounds_a_large_range() -> None:
    m = SyntheticMap("100.64.0.0/10", ttl=10, max_entries=3)
    for i in range(3):
        m.address_for(f"n{i}.corp.example", now=0)
    with pytest.raises(SyntheticExhausted):
        m.address_for("n3.corp.example", now=1)


@pytest.mark.parametrize(
    ("network", "kw"),
    [
        ("100.80.0.0/31", {}),
        ("100.80.0.1/16", {}),
        ("2001:db8::/64", {}),
        ("x", {}),
        ("100.80.0.0/16", {"ttl": 0}),
        ("100.80.0.0/16", {"max_entries": 0}),
    ],
)
def test_bad_ranges_are_config_errors(network: str, kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        SyntheticMap(network, **kw)  # type: ignore[arg-type]


# --- the stub's own answers ---------------------------------------------------------------------


def _rule(ident: str, dest_type: str, dest: str, ports: str, **kw: object) -> ForwardingRule:
    return ForwardingRule(
        id=ident,
        priority=int(kw.pop("priority", 100)),  # type: ignore[call-overload]
        dest_type=dest_type,
        destination=dest,
        ports=ports,
        protocol="tcp",
        action=kw.pop("action", Action.TUNNEL),  # type: ignore[arg-type]
        hardening=str(kw.pop("hardening", "block")),
        app_name="corp",
    )


def _profile() -> ForwardingProfile:
    return build_profile(
        [
            _rule("seg_pub", "fqdn", "www.corp.example", "80", action=Action.BYPASS, priority=90),
            _rule("seg_corp", "dns_suffix", "corp.example", "22,80", priority=100),
            _rule("seg_wiki", "fqdn", "wiki.other.example", "443", priority=110, hardening="pass"),
            _rule("seg_ip", "ip", "198.18.3.10", "22", priority=120),
        ],
        version=3,
        enabled=True,
        dns_suffixes=("corp.example",),
    )


def _ask(name: str, rdtype: str = "A", **kw: bool) -> dns.message.Message | None:
    query = dns.message.make_query(name, rdtype)
    out = synthetic_answer(
        query,
        _profile(),
        MAP,
        now=0,
        suffixes=["corp.example"],
        edge_up=kw.get("edge_up", True),
        paused=kw.get("paused", False),
    )
    return None if out is None else dns.message.from_wire(out)


MAP = SyntheticMap("100.80.0.0/16", ttl=600)


def test_a_private_name_gets_a_synthetic_a_record_with_a_short_ttl() -> None:
    answer = _ask("intranet.corp.example")
    assert answer is not None and answer.rcode() == dns.rcode.NOERROR
    assert answer.flags & dns.flags.AA
    (rrset,) = answer.answer
    assert rrset.ttl == SYNTHETIC_ANSWER_TTL
    address = rrset[0].address
    assert ipaddress.ip_address(address) in ipaddress.ip_network("100.80.0.0/16")
    assert MAP.name_for(address, now=1) == "intranet.corp.example"
    # The apex of a suffix rule is covered too.
    assert _ask("corp.example") is not None


def test_aaaa_is_empty_and_other_types_go_to_the_edge_under_a_suffix() -> None:
    aaaa = _ask("intranet.corp.example", "AAAA")
    assert aaaa is not None and aaaa.rcode() == dns.rcode.NOERROR and not aaaa.answer
    assert _ask("intranet.corp.example", "TXT") is None  # the edge answers it
    # Not under a private suffix: no records, never a public query for a private name.
    txt = _ask("wiki.other.example", "TXT")
    assert txt is not None and not txt.answer


def test_names_without_a_tunnel_rule_resolve_as_usual() -> None:
    assert _ask("www.corp.example") is None  # bypassed
    assert _ask("example.org") is None  # no rule
    assert _ask("intranet.corp.example", paused=True) is None
    # Edge away: "pass" goes direct (real address), "block" stays synthetic (reset at once).
    assert _ask("wiki.other.example", edge_up=False) is None
    assert _ask("intranet.corp.example", edge_up=False) is not None


def test_an_exhausted_range_answers_servfail() -> None:
    tiny = SyntheticMap("100.80.0.0/30", ttl=600)
    codes = []
    for name in ("a.corp.example", "b.corp.example", "c.corp.example"):
        out = synthetic_answer(
            dns.message.make_query(name, "A"),
            _profile(),
            tiny,
            now=0,
            suffixes=[],
            edge_up=True,
            paused=False,
        )
        assert out is not None
        codes.append(dns.message.from_wire(out).rcode())
    assert codes == [dns.rcode.NOERROR, dns.rcode.NOERROR, dns.rcode.SERVFAIL]


# --- the packet filter ----------------------------------------------------------------------------


def test_ruleset_redirects_the_synthetic_range_on_name_rule_ports() -> None:
    active = render_ruleset(
        _profile(), state=CaptureState.ACTIVE, listen_ports={4: 4000}, synthetic="100.80.0.0/16"
    )
    capture = active[active.index("chain capture") : active.index("chain harden")]
    assert "ip daddr 100.80.0.0/16 tcp dport { 22, 80 } redirect to :4000" in capture
    assert "ip daddr 100.80.0.0/16 tcp dport 443 redirect to :4000" in capture
    assert "seg_pub" not in active  # a bypassed name is never synthetic
    # Edge down: still redirected (the listener applies block/pass per name).
    down = render_ruleset(
        _profile(), state=CaptureState.EDGE_DOWN, listen_ports={4: 4000}, synthetic="100.80.0.0/16"
    )
    assert "ip daddr 100.80.0.0/16 tcp dport { 22, 80 } redirect to :4000" in down
    paused = render_ruleset(
        _profile(), state=CaptureState.PAUSED, listen_ports={4: 4000}, synthetic="100.80.0.0/16"
    )
    assert "100.80" not in paused
    without = render_ruleset(_profile(), state=CaptureState.ACTIVE, listen_ports={4: 4000})
    assert "100.80" not in without


# --- resolv.conf ----------------------------------------------------------------------------------

ORIGINAL = (
    b"# from DHCP\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\n"
    b"search corp.example lan\noptions edns0 ndots:2\n"
)


def test_render_keeps_search_and_options() -> None:
    text = render_stub_conf(ORIGINAL.decode(), "127.0.53.1")
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == ["nameserver 127.0.53.1", "search corp.example lan", "options edns0 ndots:2"]
    assert [u.host for u in nameservers(ORIGINAL.decode())] == ["10.0.0.2", "fe80::1"]
    assert not uses_resolved(ORIGINAL.decode())


def test_take_over_and_restore_exactly_in_place(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_bytes(ORIGINAL)
    inode = conf.stat().st_ino
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    rc = ResolvConf(client_dir, conf)
    upstreams = rc.take_over("127.0.53.1")
    assert [u.host for u in upstreams] == ["10.0.0.2", "fe80::1"]
    assert b"nameserver 127.0.53.1\n" in conf.read_bytes()
    assert b"10.0.0.2" not in conf.read_bytes()
    assert rc.saved.read_bytes() == ORIGINAL and rc.saved.stat().st_mode & 0o777 == 0o600
    assert conf.stat().st_ino == inode  # written in place (a bind mount cannot be renamed over)
    assert rc.restore() is True
    assert conf.read_bytes() == ORIGINAL and conf.stat().st_ino == inode
    assert not rc.saved.exists()
    assert rc.restore() is False  # idempotent


def test_a_crashed_takeover_is_recovered_by_the_next_start(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_bytes(ORIGINAL)
    ResolvConf(tmp_path, conf).take_over("127.0.53.1")  # … and the process dies here
    again = ResolvConf(tmp_path, conf)
    # A second takeover first restores, so it saves the real original, not the stub's file.
    upstreams = again.take_over("127.0.53.1")
    assert [u.host for u in upstreams] == ["10.0.0.2", "fe80::1"]
    assert again.saved.read_bytes() == ORIGINAL
    assert ResolvConf(tmp_path, conf).recover() is True
    assert conf.read_bytes() == ORIGINAL


# --- UDP capture (tproxy) -------------------------------------------------------------------------


def _udp_profile() -> ForwardingProfile:
    def udp(ident: str, dest: str, ports: str, **kw: object) -> ForwardingRule:
        return ForwardingRule(
            id=ident,
            priority=int(kw.pop("priority", 100)),  # type: ignore[call-overload]
            dest_type="ip" if "/" not in dest else "cidr",
            destination=dest,
            ports=ports,
            protocol=str(kw.pop("protocol", "udp")),
            action=kw.pop("action", Action.TUNNEL),  # type: ignore[arg-type]
            hardening=str(kw.pop("hardening", "block")),
        )

    return build_profile(
        [
            udp("byp", "198.18.3.20", "53", action=Action.BYPASS, priority=90),
            udp("dns", "198.18.3.10", "53", priority=100),
            udp("both", "198.18.3.0/24", "5201", protocol="tcp,udp", priority=110),
            udp("pass", "198.18.4.1", "9", priority=120, hardening="pass"),
            udp("v6", "2001:db8::1", "53", priority=130),
        ],
        version=1,
        enabled=True,
    )


def test_udp_rules_mark_for_tproxy_when_active() -> None:
    script = render_ruleset(
        _udp_profile(), state=CaptureState.ACTIVE, listen_ports={4: 4000}, udp_port=5000
    )
    route = script[script.index("chain udp_route") : script.index("chain udp_tproxy")]
    assert "type route hook output priority mangle" in route
    assert "meta mark 0x4c4d0001 return" in route  # the client's own sockets are never marked
    lines = [line.strip() for line in route.splitlines() if "comment" in line]
    assert lines[0].startswith("ip daddr 198.18.3.20 udp dport 53 return")
    assert lines[1].startswith("ip daddr 198.18.3.10 udp dport 53 meta mark set 0x4c4d0002")
    assert lines[2].startswith("ip daddr 198.18.3.0/24 udp dport 5201 meta mark set 0x4c4d0002")
    assert "2001:db8" not in script  # IPv4 only
    tproxy = script[script.index("chain udp_tproxy") :]
    assert "meta mark 0x4c4d0002 meta l4proto udp tproxy ip to 127.0.0.1:5000" in tproxy
    # The tcp,udp rule is captured for TCP too; udp-only rules are not.
    assert "ip daddr 198.18.3.0/24 tcp dport 5201 redirect to :4000" in script
    assert "tcp dport 53" not in script


def test_udp_hardening_with_the_edge_down_and_no_udp_chains_without_a_listener() -> None:
    down = render_ruleset(
        _udp_profile(), state=CaptureState.EDGE_DOWN, listen_ports={4: 4000}, udp_port=5000
    )
    assert "mark set 0x4c4d0002" not in down
    assert "ip daddr 198.18.3.10 udp dport 53 reject" in down
    assert "198.18.4.1" not in down  # hardening "pass": straight to the network
    paused = render_ruleset(
        _udp_profile(), state=CaptureState.PAUSED, listen_ports={4: 4000}, udp_port=5000
    )
    assert "mark set" not in paused and "reject" not in paused
    assert "udp_route" not in render_ruleset(
        _udp_profile(), state=CaptureState.ACTIVE, listen_ports={4: 4000}
    )
