"""SOCKS5 server core (RFC 1928): handshakes, replies, caps, UDP headers, fuzzing."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limen.errors import LocalProtocolError, RemoteProtocolError
from limen.wire.socks5 import (
    MAX_EARLY_DATA,
    MAX_HANDSHAKE,
    MAX_UDP_DATAGRAM,
    ConnectRequested,
    ReplyCode,
    Socks5Server,
    Socks5State,
    UdpAssociateRequested,
    build_udp_datagram,
    parse_udp_datagram,
)

GREETING = b"\x05\x01\x00"


def state(srv: Socks5Server) -> Socks5State:
    # A call, not an attribute read, so mypy does not narrow the state across assertions.
    return srv.state


def request(cmd: int, atyp: int, addr: bytes, port: int) -> bytes:
    return bytes([5, cmd, 0, atyp]) + addr + struct.pack("!H", port)


def domain(name: bytes) -> bytes:
    return bytes([len(name)]) + name


CONNECT_DOMAIN = request(1, 3, domain(b"rdp.corp.example"), 3389)
CONNECT_V4 = request(1, 1, bytes([10, 0, 0, 7]), 22)
CONNECT_V6 = request(1, 4, ipaddress.IPv6Address("fd00::1").packed, 443)
UDP_ASSOC = request(3, 1, b"\x00\x00\x00\x00", 0)


def test_connect_domain_full_handshake() -> None:
    assert Socks5Server().state is Socks5State.AWAIT_GREETING
    srv = Socks5Server()
    assert srv.receive_data(GREETING) == []
    assert srv.data_to_send() == b"\x05\x00"
    assert srv.data_to_send() == b""  # drained
    assert state(srv) is Socks5State.AWAIT_REQUEST
    events = srv.receive_data(CONNECT_DOMAIN)
    assert events == [ConnectRequested("rdp.corp.example", 3389)]
    assert state(srv) is Socks5State.AWAIT_DECISION
    assert srv.data_to_send() == b""  # nothing until the shell decides
    srv.accept("10.1.2.3", 40000)
    assert state(srv) is Socks5State.ESTABLISHED
    assert srv.data_to_send() == b"\x05\x00\x00\x01\x0a\x01\x02\x03" + struct.pack("!H", 40000)
    assert srv.trailing_data() == b""


@pytest.mark.parametrize(
    ("req", "event"),
    [
        (CONNECT_V4, ConnectRequested("10.0.0.7", 22)),
        (CONNECT_V6, ConnectRequested("fd00::1", 443)),
        (UDP_ASSOC, UdpAssociateRequested("0.0.0.0", 0)),
        (request(3, 3, domain(b"dns.corp"), 53), UdpAssociateRequested("dns.corp", 53)),
    ],
)
def test_address_types_and_commands(req: bytes, event: object) -> None:
    srv = Socks5Server()
    srv.receive_data(GREETING)
    assert srv.receive_data(req) == [event]


def test_greeting_with_several_methods_picks_no_auth() -> None:
    srv = Socks5Server()
    srv.receive_data(b"\x05\x03\x02\x01\x00")
    assert srv.data_to_send() == b"\x05\x00"


def test_pipelined_handshake_with_early_payload() -> None:
    srv = Socks5Server()
    events = srv.receive_data(GREETING + CONNECT_V4 + b"SSH-2.0-")
    assert events == [ConnectRequested("10.0.0.7", 22)]
    assert srv.receive_data(b"OpenSSH") == []
    srv.accept("0.0.0.0", 0)
    assert srv.data_to_send() == b"\x05\x00" + b"\x05\x00\x00\x01" + b"\x00" * 6
    assert srv.trailing_data() == b"SSH-2.0-OpenSSH"
    assert srv.trailing_data() == b""  # exactly once


def test_byte_at_a_time_equals_whole() -> None:
    wire = GREETING + CONNECT_V6 + b"hello"
    whole = Socks5Server()
    whole_events = whole.receive_data(wire)
    split = Socks5Server()
    split_events = []
    for i in range(len(wire)):
        split_events += split.receive_data(wire[i : i + 1])
    assert split_events == whole_events == [ConnectRequested("fd00::1", 443)]
    for srv in (whole, split):
        srv.accept("::1", 1080)
    assert whole.data_to_send() == split.data_to_send()
    assert whole.trailing_data() == split.trailing_data() == b"hello"


def test_accept_udp_reply_carries_relay_address_ipv6_and_domain() -> None:
    srv = Socks5Server()
    srv.receive_data(GREETING + UDP_ASSOC)
    srv.data_to_send()
    srv.accept("::1", 5353)
    assert srv.data_to_send() == b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01" + b"\x14\xe9"

    srv = Socks5Server()
    srv.receive_data(GREETING + CONNECT_V4)
    srv.data_to_send()
    srv.accept("relay.local", 1)
    assert srv.data_to_send() == b"\x05\x00\x00\x03\x0brelay.local\x00\x01"


@pytest.mark.parametrize("code", [c for c in ReplyCode if c is not ReplyCode.SUCCEEDED])
def test_reject_queues_reply_and_closes(code: ReplyCode) -> None:
    srv = Socks5Server()
    srv.receive_data(GREETING + CONNECT_DOMAIN)
    srv.data_to_send()
    srv.reject(code)
    assert state(srv) is Socks5State.CLOSED
    assert srv.data_to_send() == bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])
    with pytest.raises(LocalProtocolError):
        srv.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        srv.trailing_data()


def test_no_acceptable_method_replies_ff_and_errors() -> None:
    srv = Socks5Server()
    with pytest.raises(RemoteProtocolError) as exc:
        srv.receive_data(b"\x05\x01\x02")  # username/password only
    assert exc.value.code == "socks_no_acceptable_method"
    assert state(srv) is Socks5State.ERROR
    assert srv.data_to_send() == b"\x05\xff"
    with pytest.raises(LocalProtocolError):
        srv.receive_data(b"\x05\x01\x00")


def test_zero_methods_is_no_acceptable_method() -> None:
    srv = Socks5Server()
    with pytest.raises(RemoteProtocolError) as exc:
        srv.receive_data(b"\x05\x00")
    assert exc.value.code == "socks_no_acceptable_method"
    assert srv.data_to_send() == b"\x05\xff"


@pytest.mark.parametrize("first", [b"\x04", b"G", b"\x00"])
def test_bad_version_in_greeting_is_refused_on_first_byte(first: bytes) -> None:
    srv = Socks5Server()
    with pytest.raises(RemoteProtocolError) as exc:
        srv.receive_data(first)
    assert exc.value.code == "socks_bad_version"
    assert srv.data_to_send() == b""  # cannot speak a reply the client would understand


def test_bad_version_in_request() -> None:
    srv = Socks5Server()
    srv.receive_data(GREETING)
    with pytest.raises(RemoteProtocolError) as exc:
        srv.receive_data(b"\x04")
    assert exc.value.code == "socks_bad_version"


def test_bind_is_command_not_supported() -> None:
    srv = Socks5Server()
    srv.receive_data(GREETING)
    srv.data_to_send()
    with pytest.raises(RemoteProtocolError) as exc:
        srv.receive_data(request(2, 1, b"\x00" * 4, 0))
    assert exc.value.code == "socks_command_not_supported"
    assert state(srv) is Socks5State.ERROR
    assert srv.data_to_send()[:2] == bytes([5, ReplyCode.COMMAND_NOT_SUPPORTED])


def test_unknown_address_type_gets_reply_8() -> None:
    srv = Socks5Server()
    srv.receive_data(GREETING)
    srv.data_to_send()
    with pytest.raises(RemoteProtocolError) as exc:
        srv.receive_data(b"\x05\x01\x00\x05")
    assert exc.value.code == "socks_bad_address_type"
    assert srv.data_to_send()[:2] == bytes([5, ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED])


@pytest.mark.parametrize(
    ("req", "code"),
    [
        (b"\x05\x01\x01\x01" + b"\x0a\x00\x00\x01\x00\x16", "socks_malformed"),  # RSV != 0
        (request(1, 3, domain(b""), 80), "socks_bad_domain"),
        (request(1, 3, domain(b"bad host"), 80), "socks_bad_domain"),
        (request(1, 3, domain("é.example".encode()), 80), "socks_bad_domain"),
        (request(1, 3, domain(b"a\x00b"), 80), "socks_bad_domain"),
        (request(1, 1, b"\x0a\x00\x00\x01", 0), "socks_bad_port"),
    ],
)
def test_malformed_requests_get_general_failure(req: bytes, code: str) -> None:
    srv = Socks5Server()
    srv.receive_data(GREETING)
    srv.data_to_send()
    with pytest.raises(RemoteProtocolError) as exc:
        srv.receive_data(req)
    assert exc.value.code == code
    assert srv.data_to_send()[:2] == bytes([5, ReplyCode.GENERAL_FAILURE])


def test_early_data_cap() -> None:
    srv = Socks5Server()
    srv.receive_data(GREETING + CONNECT_V4 + b"x" * MAX_EARLY_DATA)  # exactly at the cap: fine
    with pytest.raises(RemoteProtocolError) as exc:
        srv.receive_data(b"y")
    assert exc.value.code == "socks_early_data_too_large"
    assert state(srv) is Socks5State.ERROR


def test_early_data_cap_in_same_chunk_as_request() -> None:
    srv = Socks5Server()
    with pytest.raises(RemoteProtocolError) as exc:
        srv.receive_data(GREETING + CONNECT_V4 + b"x" * (MAX_EARLY_DATA + 1))
    assert exc.value.code == "socks_early_data_too_large"


def test_handshake_flood_refused_before_buffering() -> None:
    srv = Socks5Server()
    with pytest.raises(RemoteProtocolError) as exc:
        srv.receive_data(b"\x05" + b"\x00" * (MAX_HANDSHAKE + MAX_EARLY_DATA))
    assert exc.value.code == "socks_handshake_too_large"


def test_api_misuse_is_local() -> None:
    srv = Socks5Server()
    with pytest.raises(LocalProtocolError):
        srv.accept("0.0.0.0", 0)
    with pytest.raises(LocalProtocolError):
        srv.reject(ReplyCode.NOT_ALLOWED)
    srv.receive_data(GREETING + CONNECT_V4)
    with pytest.raises(LocalProtocolError):
        srv.trailing_data()  # before accept
    with pytest.raises(LocalProtocolError):
        srv.reject(ReplyCode.SUCCEEDED)
    with pytest.raises(LocalProtocolError):
        srv.reject(99)
    with pytest.raises(LocalProtocolError):
        srv.accept("0.0.0.0", 70000)
    with pytest.raises(LocalProtocolError):
        srv.accept("bad host", 1)
    with pytest.raises(LocalProtocolError):
        srv.accept("x" * 256, 1)
    assert state(srv) is Socks5State.AWAIT_DECISION  # failed calls moved nothing
    srv.accept("0.0.0.0", 0)
    with pytest.raises(LocalProtocolError):
        srv.accept("0.0.0.0", 0)
    with pytest.raises(LocalProtocolError):
        srv.receive_data(b"payload")  # the shell relays raw bytes after accept


def test_events_validate_themselves() -> None:
    with pytest.raises(LocalProtocolError):
        ConnectRequested("host", 0)
    with pytest.raises(LocalProtocolError):
        ConnectRequested("", 80)
    with pytest.raises(LocalProtocolError):
        UdpAssociateRequested("h", 65536)
    assert UdpAssociateRequested("0.0.0.0", 0).port == 0


# --- UDP ASSOCIATE datagrams (RFC 1928 §7) ---------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "header"),
    [
        ("10.0.0.53", 53, b"\x00\x00\x00\x01\x0a\x00\x00\x35\x00\x35"),
        (
            "fd00::53",
            53,
            b"\x00\x00\x00\x04" + ipaddress.IPv6Address("fd00::53").packed + b"\x00\x35",
        ),
        ("dns.corp", 5353, b"\x00\x00\x00\x03\x08dns.corp\x14\xe9"),
    ],
)
def test_udp_datagram_known_answers(host: str, port: int, header: bytes) -> None:
    assert build_udp_datagram(host, port, b"query") == header + b"query"
    assert parse_udp_datagram(header + b"query") == (host, port, b"query")
    assert parse_udp_datagram(header) == (host, port, b"")


def test_udp_fragment_refused() -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        parse_udp_datagram(b"\x00\x00\x01\x01\x0a\x00\x00\x01\x00\x35data")
    assert exc.value.code == "socks_udp_fragment"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00",
        b"\x00\x01\x00\x01\x0a\x00\x00\x01\x00\x35",  # RSV != 0
        b"\x00\x00\x00\x01\x0a\x00\x00",  # truncated address
        b"\x00\x00\x00\x07\x0a\x00\x00\x01\x00\x35",  # bad ATYP
        b"\x00\x00\x00\x03\x00\x00\x35",  # empty domain
        b"\x00\x00\x00\x01\x0a\x00\x00\x01\x00\x00",  # port 0
    ],
)
def test_udp_malformed(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        parse_udp_datagram(data)
    assert exc.value.code == "socks_udp_malformed"


def test_udp_build_cap() -> None:
    header_len = len(build_udp_datagram("1.2.3.4", 1, b""))
    assert len(build_udp_datagram("1.2.3.4", 1, b"x" * (MAX_UDP_DATAGRAM - header_len))) == (
        MAX_UDP_DATAGRAM
    )
    with pytest.raises(LocalProtocolError):
        build_udp_datagram("1.2.3.4", 1, b"x" * (MAX_UDP_DATAGRAM - header_len + 1))


hosts = st.one_of(
    st.ip_addresses().map(str),
    st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255
    )
    # A domain that parses as an IP would come back in canonical IP form: not a round trip.
    .filter(lambda s: not _is_ip(s)),
)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@given(host=hosts, port=st.integers(1, 65535), payload=st.binary(max_size=2000))
def test_udp_round_trip(host: str, port: int, payload: bytes) -> None:
    got_host, got_port, got_payload = parse_udp_datagram(build_udp_datagram(host, port, payload))
    assert (got_port, got_payload) == (port, payload)
    assert (
        ipaddress.ip_address(got_host) == ipaddress.ip_address(host)
        if _is_ip(host)
        else (got_host == host)
    )


@given(st.binary(max_size=300))
def test_udp_parse_fuzz(data: bytes) -> None:
    try:
        host, port, payload = parse_udp_datagram(data)
    except RemoteProtocolError:
        return
    assert 1 <= port <= 65535 and host and data.endswith(payload)


# --- fuzzing the stream parser -----------------------------------------------------------------


@given(st.binary(max_size=800), st.integers(1, 64))
@settings(max_examples=300)
def test_random_input_only_remote_errors(data: bytes, chunk: int) -> None:
    srv = Socks5Server()
    try:
        for i in range(0, len(data), chunk):
            for event in srv.receive_data(data[i : i + chunk]):
                assert isinstance(event, ConnectRequested | UdpAssociateRequested)
            if srv.state is Socks5State.AWAIT_DECISION:
                break
    except RemoteProtocolError:
        assert state(srv) is Socks5State.ERROR
    srv.data_to_send()


@given(
    host=hosts,
    port=st.integers(1, 65535),
    cmd=st.sampled_from([1, 3]),
    methods=st.lists(st.integers(1, 255), max_size=20).map(lambda m: [*m, 0]),
    data=st.data(),
)
def test_truncated_valid_handshake_yields_nothing(
    host: str, port: int, cmd: int, methods: list[int], data: st.DataObject
) -> None:
    wire = bytes([5, len(methods), *methods]) + request_for(cmd, host, port)
    cut = data.draw(st.integers(0, len(wire) - 1))
    srv = Socks5Server()
    assert srv.receive_data(wire[:cut]) == []  # no event, no error
    events = srv.receive_data(wire[cut:])
    assert len(events) == 1
    assert events[0].port == port


def request_for(cmd: int, host: str, port: int) -> bytes:
    return bytes([5, cmd, 0]) + build_udp_datagram(host, port, b"")[3:]
