"""Unit tests of the DNS pieces without sockets: the DoH request branch of the flow-head
reader, the exchange response reader (with Hypothesis), the TTL cache, the suffix rules."""

from __future__ import annotations

import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limen.client.dns import is_under
from limen.edge.dns import SuffixIndex
from limen.edge.snapshot import AppInfo, Snapshot
from limen.errors import LimenError, LocalProtocolError, RemoteProtocolError
from limen.net.resolver import DnsCache, Upstream, error_answer, parse_query
from limen.wire.connect import FlowRequestReader
from limen.wire.doh import (
    ExchangeResponseReader,
    encode_dns_answer,
    encode_dns_query,
    encode_suffix_list,
    encode_suffix_request,
    parse_suffix_list,
)

QUERY = dns.message.make_query("www.corp.example", "A").to_wire()


def test_dns_query_head_parses_and_keeps_the_body_as_trailing() -> None:
    reader = FlowRequestReader()
    request = reader.feed(encode_dns_query(QUERY, [("Authorization", "Bearer t")]))
    assert request is not None and request.protocol == "dns"
    assert request.bearer_token == "t"
    assert int(request.headers["content-length"]) == len(QUERY)
    assert reader.trailing == QUERY


def test_suffix_request_head_parses() -> None:
    request = FlowRequestReader().feed(encode_suffix_request([("Authorization", "Bearer t")]))
    assert request is not None and request.protocol == "dns-suffixes"


@pytest.mark.parametrize(
    "head",
    [
        # wrong media type
        b"POST /dns-query HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 20\r\n\r\n",
        # too short to be a DNS message, and too long
        b"POST /dns-query HTTP/1.1\r\nHost: x\r\nContent-Type: application/dns-message\r\n"
        b"Content-Length: 3\r\n\r\n",
        b"POST /dns-query HTTP/1.1\r\nHost: x\r\nContent-Type: application/dns-message\r\n"
        b"Content-Length: 70000\r\n\r\n",
        # chunked
        b"POST /dns-query HTTP/1.1\r\nHost: x\r\nContent-Type: application/dns-message\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_bad_dns_query_heads_are_refused(head: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        FlowRequestReader().feed(head)
    assert exc.value.code == "bad_request"


def test_other_posts_are_not_flows() -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        FlowRequestReader().feed(b"POST /other HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert exc.value.code == "method_not_allowed"


def test_a_tcp_flow_head_still_refuses_a_body() -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        FlowRequestReader().feed(b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\nContent-Length: 2\r\n\r\n")
    assert exc.value.code == "bad_request"


def test_encode_dns_query_refuses_non_messages() -> None:
    with pytest.raises(LocalProtocolError):
        encode_dns_query(b"short")


@pytest.mark.parametrize("split", [1, 10, 60, 10_000])
def test_answer_reader_reassembles_any_split(split: int) -> None:
    answer = encode_dns_answer(b"A" * 300)
    reader = ExchangeResponseReader()
    result = None
    for i in range(0, len(answer), split):
        result = reader.feed(answer[i : i + split])
    assert result is not None and result.ok and result.body == b"A" * 300
    assert result.headers["content-type"] == "application/dns-message"


def test_answer_reader_refusal_and_oversize() -> None:
    from limen.wire.connect import encode_refusal

    refusal = ExchangeResponseReader().feed(encode_refusal(401, "token_expired", "old"))
    assert refusal is not None and refusal.error() == ("token_expired", "old")
    with pytest.raises(RemoteProtocolError):
        ExchangeResponseReader(max_body=10).feed(encode_dns_answer(b"x" * 100))
    with pytest.raises(RemoteProtocolError):
        ExchangeResponseReader().feed_eof()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_answer_reader_never_raises_anything_but_limen_errors(data: bytes) -> None:
    reader = ExchangeResponseReader()
    try:
        reader.feed(data)
        reader.feed_eof()
    except LimenError:
        pass


def test_suffix_list_roundtrip_and_bad_bodies() -> None:
    wire = encode_suffix_list(["Corp.Example", "b.test", "b.test"], 60)
    response = ExchangeResponseReader("GET").feed(wire)
    assert response is not None
    assert parse_suffix_list(response.body) == (["b.test", "corp.example"], 60)
    for body in (b"[]", b"{", b'{"suffixes": "x"}', b'{"suffixes": [], "ttl": -1}'):
        with pytest.raises(RemoteProtocolError):
            parse_suffix_list(body)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_parse_query_only_raises_dns_malformed(data: bytes) -> None:
    try:
        parse_query(data)
    except RemoteProtocolError as exc:
        assert exc.code == "dns_malformed"


def test_parse_query_refuses_responses() -> None:
    response = error_answer(dns.message.from_wire(QUERY), dns.rcode.SERVFAIL)
    with pytest.raises(RemoteProtocolError):
        parse_query(response)


def _answer(name: str, ttl: int, rcode: dns.rcode.Rcode = dns.rcode.NOERROR) -> dns.message.Message:
    name += "."  # absolute, as names on the wire are
    query = dns.message.make_query(name, "A")
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    if rcode == dns.rcode.NOERROR:
        response.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", "10.0.0.1"))
    else:
        response.authority.append(
            dns.rrset.from_text("corp.example.", ttl, "IN", "SOA", "ns. admin. 1 60 60 600 30")
        )
    return response


def test_cache_honours_ttl_and_counts_down() -> None:
    cache = DnsCache()
    key = ("www.corp.example.", 1, 1, False)
    cache.put(key, _answer("www.corp.example", 100), now=1000.0)
    hit = cache.get(key, query_id=7, now=1040.0)
    assert hit is not None and hit.id == 7 and hit.answer[0].ttl == 60
    assert cache.get(key, query_id=7, now=1100.0) is None  # expired
    assert len(cache) == 0


def test_negative_answers_use_the_soa_minimum_and_servfail_is_not_cached() -> None:
    cache = DnsCache()
    nx = ("nope.corp.example.", 1, 1, False)
    cache.put(nx, _answer("nope.corp.example", 300, dns.rcode.NXDOMAIN), now=0.0)
    assert cache.get(nx, 1, now=29.0) is not None  # SOA minimum is 30
    assert cache.get(nx, 1, now=31.0) is None
    sf = ("x.corp.example.", 1, 1, False)
    cache.put(sf, _answer("x.corp.example", 300, dns.rcode.SERVFAIL), now=0.0)
    assert cache.get(sf, 1, now=1.0) is None


def test_cache_is_bounded_lru_and_caps_ttl() -> None:
    cache = DnsCache(size=2, max_ttl=10)
    keys = [(f"n{i}.", 1, 1, False) for i in range(3)]
    for i, key in enumerate(keys):
        cache.put(key, _answer(f"n{i}.test", 3600), now=0.0)
    assert len(cache) == 2
    assert cache.get(keys[0], 1, now=1.0) is None
    assert cache.get(keys[2], 1, now=11.0) is None  # capped at 10 s


def test_upstream_parsing() -> None:
    assert Upstream.parse("10.0.0.53") == Upstream("10.0.0.53", 53)
    assert Upstream.parse("10.0.0.53:5353") == Upstream("10.0.0.53", 5353)
    assert Upstream.parse("[fd00::1]:53") == Upstream("fd00::1", 53)
    assert Upstream.parse("fd00::1") == Upstream("fd00::1", 53)
    with pytest.raises(LimenError):
        Upstream.parse("10.0.0.1:x")


def _app(app_id: str, suffixes: tuple[str, ...], enabled: bool = True) -> AppInfo:
    return AppInfo(app_id, app_id, "enterprise", "grp_1", enabled, suffixes)


def test_suffix_index_longest_suffix_wins_and_matches_the_apex() -> None:
    snapshot = Snapshot(
        version=3,
        apps={
            "app_a": _app("app_a", ("corp.example",)),
            "app_b": _app("app_b", ("hr.corp.example",)),
            "app_c": _app("app_c", ("old.example",), enabled=False),
        },
    )
    index = SuffixIndex.build(snapshot)
    assert index.suffixes() == ["corp.example", "hr.corp.example"]
    found = index.owners_of("corp.example")
    assert found is not None and found[0] == "corp.example"  # the apex is included
    found = index.owners_of("pay.HR.corp.example.")
    assert found is not None and found[1][0].id == "app_b"
    assert index.owners_of("notcorp.example") is None
    assert index.owners_of("example") is None


def test_stub_suffix_rule_is_label_wise() -> None:
    suffixes = ["corp.example"]
    assert is_under("corp.example", suffixes)
    assert is_under("a.b.Corp.Example.", suffixes)
    assert not is_under("evilcorp.example", suffixes)
    assert not is_under("example", suffixes)
