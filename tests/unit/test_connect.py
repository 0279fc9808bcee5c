"""Flow head codec: CONNECT / connect-udp requests and their responses (RFC 9110 §9.3.6,
RFC 9298 §3.3), caps, bearer tokens, header injection, fuzzing."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limen.errors import LocalProtocolError, RemoteProtocolError
from limen.wire.connect import (
    CONTROL_UPGRADE,
    HEADER_FLOW_ID,
    HEADER_PROCESS,
    MAX_HEAD_BYTES,
    MAX_REFUSAL_BODY,
    FlowRequest,
    FlowRequestReader,
    FlowResponse,
    FlowResponseReader,
    describe,
    encode_refusal,
    encode_request,
    encode_response,
    format_authority,
    parse_authority,
)


def read_request(raw: bytes, chunk: int | None = None) -> tuple[FlowRequest, bytes]:
    """Feed ``raw`` (optionally ``chunk`` bytes at a time) until a request comes out; returns
    (request, every byte after the head: the reader's trailing plus what was not fed)."""
    reader = FlowRequestReader()
    step = chunk or len(raw)
    for pos in range(0, len(raw), step):
        result = reader.feed(raw[pos : pos + step])
        if result is not None:
            assert reader.request is result
            return result, reader.trailing + raw[pos + step :]
    raise AssertionError("no request came out")


def request_error(raw: bytes, chunk: int | None = None) -> str:
    """Feed ``raw`` and return the code of the RemoteProtocolError it must raise."""
    reader = FlowRequestReader()
    step = chunk or max(len(raw), 1)
    with pytest.raises(RemoteProtocolError) as info:
        for pos in range(0, len(raw), step):
            reader.feed(raw[pos : pos + step])
        reader.feed(b"")  # end of stream: a head still incomplete is an error too
    return info.value.code


def read_response(
    raw: bytes, protocol: str = "tcp", chunk: int | None = None
) -> tuple[FlowResponse, bytes]:
    reader = FlowResponseReader(protocol)
    result = None
    step = chunk or len(raw)
    for pos in range(0, len(raw), step):
        if result is not None:
            break
        result = reader.feed(raw[pos : pos + step])
    assert result is not None
    return result, reader.trailing


def head(first_line: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [first_line, *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- requests -----------------------------------------------------------------------------


def test_connect_host_port() -> None:
    req, trailing = read_request(head("CONNECT App.Corp.Example.:8443 HTTP/1.1", "Host: x"))
    assert req == FlowRequest("tcp", "app.corp.example", 8443, {"host": "x"})
    assert trailing == b""


def test_connect_ipv6_literal_is_normalised() -> None:
    req, _ = read_request(head("CONNECT [FD00:0::0001]:22 HTTP/1.1", "Host: x"))
    assert (req.protocol, req.host, req.port) == ("tcp", "fd00::1", 22)
    req, _ = read_request(head("CONNECT 010.1.2.3:22 HTTP/1.1", "Host: x"))
    # Not a valid IPv4 literal (leading zero): kept as a name, never reinterpreted as octal.
    assert req.host == "010.1.2.3"


def test_connect_udp_masque_path() -> None:
    raw = head(
        "GET /.well-known/masque/udp/192.0.2.6/443/ HTTP/1.1",  # RFC 9298 §3.3 example
        "Host: edge.example",
        "Connection: Upgrade",
        "Upgrade: connect-udp",
        "Capsule-Protocol: ?1",
    )
    req, trailing = read_request(raw)
    assert (req.protocol, req.host, req.port) == ("udp", "192.0.2.6", 443)
    assert req.headers["capsule-protocol"] == "?1"
    assert trailing == b""


def test_connect_udp_percent_encoded_host() -> None:
    for encoded, host in [
        ("2001%3Adb8%3A%3A42", "2001:db8::42"),
        ("2001%3adb8%3a%3a42", "2001:db8::42"),
        ("DNS.Corp.Example", "dns.corp.example"),
        ("dns%2Ecorp%2Eexample", "dns.corp.example"),
    ]:
        raw = head(
            f"GET /.well-known/masque/udp/{encoded}/53/ HTTP/1.1",
            "Host: e",
            "Connection: Upgrade",
            "Upgrade: Connect-UDP",
        )
        req, _ = read_request(raw)
        assert (req.protocol, req.host, req.port) == ("udp", host, 53)


@pytest.mark.parametrize(
    "target",
    [
        "/.well-known/masque/udp/host/53",  # no trailing slash
        "/.well-known/masque/udp/host/53/extra/",
        "/.well-known/masque/udp//53/",
        "/.well-known/masque/udp/host/0/",
        "/.well-known/masque/udp/a%2Fb/53/",  # an encoded slash is not a host
        "/.well-known/masque/tcp/host/53/",
        "/",
    ],
)
def test_connect_udp_bad_paths(target: str) -> None:
    raw = head(f"GET {target} HTTP/1.1", "Host: e", "Upgrade: connect-udp")
    assert request_error(raw) == "bad_target"


def test_repeated_headers_are_joined_and_names_lower_cased() -> None:
    req, _ = read_request(
        head("CONNECT a:1 HTTP/1.1", "Host: x", "X-Tag: one", "x-tag: two", "X-TAG: three")
    )
    assert req.headers == {"host": "x", "x-tag": "one, two, three"}


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Proxy-Authorization: Bearer abc.def.ghi", "abc.def.ghi"),
        ("Authorization: Bearer abc.def.ghi", "abc.def.ghi"),
        ("Proxy-Authorization: bearer tok", "tok"),
        ("Proxy-Authorization: BEARER   tok  ", "tok"),
        ("Proxy-Authorization: Basic dXNlcjpwYXNz", None),
        ("Authorization: Negotiate abc", None),
        ("Proxy-Authorization: Bearer", None),
        ("Proxy-Authorization: Bearer   ", None),
        ("Proxy-Authorization: Bearertok", None),
        ("X-Other: Bearer tok", None),
    ],
)
def test_bearer_token(header: str, token: str | None) -> None:
    req, _ = read_request(head("CONNECT a:1 HTTP/1.1", "Host: x", header))
    assert req.bearer_token == token


def test_bearer_token_prefers_proxy_authorization() -> None:
    req, _ = read_request(
        head(
            "CONNECT a:1 HTTP/1.1",
            "Host: x",
            "Authorization: Bearer origin",
            "Proxy-Authorization: Bearer proxy",
        )
    )
    assert req.bearer_token == "proxy"


def test_describe_never_contains_the_token() -> None:
    req, _ = read_request(
        head(
            "CONNECT a:1 HTTP/1.1",
            "Host: x",
            "Proxy-Authorization: Bearer s3cret-token",
            f"{HEADER_FLOW_ID}: flw_1",
        )
    )
    summary = describe(req)
    assert summary == {"protocol": "tcp", "host": "a", "port": 1, "flow_id": "flw_1"}
    assert "s3cret-token" not in repr(summary)


def test_bytes_after_the_head_are_trailing_tunnel_bytes() -> None:
    tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256))
    raw = head("CONNECT a:443 HTTP/1.1", "Host: a:443") + tls_hello
    req, trailing = read_request(raw)
    assert req.port == 443
    assert trailing == tls_hello
    # Trailing bytes do not count against the head cap.
    req, trailing = read_request(head("CONNECT a:443 HTTP/1.1", "Host: x") + bytes(100_000))
    assert len(trailing) == 100_000


def test_byte_at_a_time_gives_the_same_request() -> None:
    raw = encode_request("udp", "fd00::53", 53, [("Proxy-Authorization", "Bearer t")]) + b"tail"
    whole = read_request(raw)
    # The request completes on the last byte of the head; trailing bytes come later.
    reader = FlowRequestReader()
    head_len = len(raw) - 4
    for i in range(head_len - 1):
        assert reader.feed(raw[i : i + 1]) is None
    assert reader.feed(raw[head_len - 1 : head_len]) == whole[0]
    assert reader.trailing == b""
    assert read_request(raw, chunk=1) == whole
    assert read_request(raw, chunk=7) == whole


def test_feed_after_completion_is_local_misuse() -> None:
    reader = FlowRequestReader()
    assert reader.feed(head("CONNECT a:1 HTTP/1.1", "Host: x")) is not None
    with pytest.raises(LocalProtocolError):
        reader.feed(b"more")


def test_oversized_head_is_refused() -> None:
    big = head("CONNECT a:1 HTTP/1.1", "Host: x", "X-Pad: " + "p" * MAX_HEAD_BYTES)
    assert request_error(big) == "head_too_large"  # all in one read
    assert request_error(big, chunk=1000) == "head_too_large"
    assert request_error(big, chunk=1) == "head_too_large"
    # Refused without waiting for the end of the head.
    reader = FlowRequestReader()
    with pytest.raises(RemoteProtocolError) as info:
        reader.feed(b"CONNECT a:1 HTTP/1.1\r\nX-Pad: " + b"p" * (MAX_HEAD_BYTES + 1))
    assert info.value.code == "head_too_large"
    # A head just under the cap is fine.
    line = "CONNECT a:1 HTTP/1.1"
    pad = MAX_HEAD_BYTES - len(head(line, "Host: x", "X-Pad: "))
    ok = head(line, "Host: x", "X-Pad: " + "p" * pad)
    assert len(ok) == MAX_HEAD_BYTES
    assert read_request(ok)[0].headers["x-pad"] == "p" * pad


def test_smaller_cap_is_honoured() -> None:
    reader = FlowRequestReader(max_head=100)
    with pytest.raises(RemoteProtocolError) as info:
        reader.feed(head("CONNECT a:1 HTTP/1.1", "Host: x", "X-Pad: " + "p" * 100))
    assert info.value.code == "head_too_large"


@pytest.mark.parametrize(
    "raw",
    [
        head("GET / HTTP/1.1", "Host: x"),
        head("GET /.well-known/masque/udp/h/53/ HTTP/1.1", "Host: x"),  # no Upgrade
        head("GET /.well-known/masque/udp/h/53/ HTTP/1.1", "Host: x", "Upgrade: websocket"),
        head("POST / HTTP/1.1", "Host: x", "Content-Length: 2", body=b"{}"),
        head("PUT a:1 HTTP/1.1", "Host: x", "Content-Length: 0"),
        head("OPTIONS * HTTP/1.1", "Host: x"),
    ],
)
def test_other_methods_are_not_flows(raw: bytes) -> None:
    assert request_error(raw) == "method_not_allowed"


@pytest.mark.parametrize(
    "authority",
    [
        "a:0",
        "a:65536",
        "a:x",
        "a:",
        "a",
        ":443",
        "a:+80",
        "a:-1",
        "a:0000080",
        "[::1:443",
        "[::1]443",
        "[not-v6]:443",
        "a b:1",
        "a..b:1",
        "-" * 64 + ":1",
        ("a." * 127) + "a:1",  # 255 characters
        "ex%61mple:1",
    ],
)
def test_bad_targets(authority: str) -> None:
    code = request_error(head(f"CONNECT {authority} HTTP/1.1", "Host: x"))
    # "a b:1" splits the request line: h11 refuses it before we see a target.
    assert code in ("bad_target", "bad_request")
    if " " not in authority:
        assert code == "bad_target"


def test_parse_authority_accepts_port_bounds() -> None:
    assert parse_authority("a:1") == ("a", 1)
    assert parse_authority("a:65535") == ("a", 65535)
    assert parse_authority("[::1]:80") == ("::1", 80)
    assert format_authority("::1", 80) == "[::1]:80"
    assert format_authority("a", 80) == "a:80"


@pytest.mark.parametrize(
    "raw",
    [
        head("CONNECT a:1 HTTP/1.1", "Host: x", "Content-Length: 3", body=b"abc"),
        head("CONNECT a:1 HTTP/1.1", "Host: x", "Content-Length: 0"),
        head("CONNECT a:1 HTTP/1.1", "Host: x", "Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
        head(
            "GET /.well-known/masque/udp/h/53/ HTTP/1.1",
            "Host: x",
            "Upgrade: connect-udp",
            "Content-Length: 1",
            body=b"x",
        ),
    ],
)
def test_head_with_a_body_is_a_bad_request(raw: bytes) -> None:
    assert request_error(raw) == "bad_request"


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01\x00\x05hello\r\n\r\n",  # TLS where HTTP was expected
        b"CONNECT a:1 HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"CONNECT a:1 HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
        b"CONNECT a:1 HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"CONNECT a:1 HTTP/1.1\r\nHost: x\r\n",  # ends before the blank line
        b"",
    ],
)
def test_malformed_heads_are_bad_requests(raw: bytes) -> None:
    assert request_error(raw) == "bad_request"


@given(st.binary(max_size=400), st.integers(1, 64))
@settings(max_examples=400)
def test_garbage_only_raises_remote_protocol_error(raw: bytes, chunk: int) -> None:
    reader = FlowRequestReader(max_head=256)
    try:
        for pos in range(0, len(raw), chunk):
            if reader.feed(raw[pos : pos + chunk]) is not None:
                break
    except RemoteProtocolError as exc:
        assert exc.code in ("bad_request", "bad_target", "head_too_large", "method_not_allowed")


_methods = st.sampled_from(["CONNECT", "GET", "POST", "connect", "CONNECT "])
_targets = st.one_of(
    st.from_regex(r"[\x21-\x7e]{0,40}", fullmatch=True),
    st.builds(
        lambda host, port: f"/.well-known/masque/udp/{host}/{port}/",
        st.from_regex(r"[a-zA-Z0-9%:.\-]{0,20}", fullmatch=True),
        st.from_regex(r"[0-9x]{0,7}", fullmatch=True),
    ),
    st.builds(
        lambda host, port: f"{host}:{port}",
        st.from_regex(r"[\[\]a-zA-Z0-9:.\-]{0,20}", fullmatch=True),
        st.from_regex(r"[0-9x]{0,7}", fullmatch=True),
    ),
)
_header_lines = st.lists(
    st.sampled_from(
        [
            "Host: x",
            "Upgrade: connect-udp",
            "Connection: Upgrade",
            "Content-Length: 0",
            "Transfer-Encoding: chunked",
            "Proxy-Authorization: Bearer t",
            "X: \x7f\xff",
        ]
    ),
    max_size=5,
)


@given(_methods, _targets, _header_lines, st.binary(max_size=20))
@settings(max_examples=400)
def test_near_miss_heads_only_raise_remote_protocol_error(
    method: str, target: str, lines: list[str], tail: bytes
) -> None:
    raw = head(f"{method} {target} HTTP/1.1", *lines) + tail
    reader = FlowRequestReader()
    try:
        req = reader.feed(raw)
    except RemoteProtocolError:
        return
    assert req is not None
    assert req.protocol in ("tcp", "udp")
    assert 0 < req.port < 65536
    assert req.host == req.host.strip().lower()


# --- encode_request round trip ------------------------------------------------------------

_label = st.from_regex(r"[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,20}[a-zA-Z0-9_])?", fullmatch=True)
_hostnames = st.lists(_label, min_size=1, max_size=6).map(".".join)
_hosts = st.one_of(
    _hostnames,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
_extra_headers = st.lists(
    st.tuples(
        st.from_regex(r"X-[A-Za-z0-9-]{1,16}", fullmatch=True),
        st.from_regex(r"[!-~\xa0-\xff]([ -~\xa0-\xff]{0,40}[!-~\xa0-\xff])?", fullmatch=True),
    ),
    max_size=4,
    unique_by=lambda item: item[0].lower(),
)


def _normalised(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


@given(
    st.sampled_from(["tcp", "udp"]),
    _hosts,
    st.integers(1, 65535),
    _extra_headers,
    st.binary(max_size=50),
    st.integers(1, 200),
)
@settings(max_examples=300)
def test_encode_request_round_trip(
    protocol: str,
    host: str,
    port: int,
    extra: list[tuple[str, str]],
    tail: bytes,
    chunk: int,
) -> None:
    raw = encode_request(protocol, host, port, extra)
    req, trailing = read_request(raw + tail)
    assert (req.protocol, req.host, req.port) == (protocol, _normalised(host), port)
    for name, value in extra:
        assert req.headers[name.lower()] == value
    assert trailing == tail
    # Split reads give the same request and the same tunnel bytes.
    assert read_request(raw + tail, chunk) == (req, tail)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Evil", "a\r\nInjected: 1"),
        ("X-Evil", "a\nInjected: 1"),
        ("X-Evil", "a\rb"),
        ("X-Evil", "a\x00b"),
        ("X-Evil\r\nInjected", "1"),
        ("X-Evil: 1\r\n", "x"),
        ("X Evil", "1"),
        ("X:Evil", "1"),
        (HEADER_PROCESS, "caf\u00e9\u20ac"),  # not latin-1
    ],
)
def test_header_injection_is_local_misuse(name: str, value: str) -> None:
    with pytest.raises(LocalProtocolError):
        encode_request("tcp", "a", 1, [(name, value)])
    with pytest.raises(LocalProtocolError):
        encode_response(200, [(name, value)])


def test_host_injection_is_local_misuse() -> None:
    for protocol in ("tcp", "udp"):
        with pytest.raises(LocalProtocolError):
            encode_request(protocol, "a\r\nX-Injected: 1", 80)
    with pytest.raises(LocalProtocolError):
        encode_request("sctp", "a", 80)


def test_latin1_header_values_survive() -> None:
    raw = encode_request("tcp", "a", 1, [(HEADER_PROCESS, "caf\u00e9")])
    assert read_request(raw)[0].headers[HEADER_PROCESS] == "caf\u00e9"


# --- responses ----------------------------------------------------------------------------


def test_connect_200_with_trailing_bytes() -> None:
    resp, trailing = read_response(encode_response(200, [("Limen-Flow-Id", "flw_1")]) + b"data")
    assert resp.ok
    assert resp.status == 200
    assert resp.headers["limen-flow-id"] == "flw_1"
    assert trailing == b"data"


def test_connect_200_byte_at_a_time() -> None:
    raw = encode_response(200) + b"\x00\x01"
    resp, trailing = read_response(raw, chunk=1)
    assert resp.status == 200
    # The response completes with the head; later bytes were never fed to the reader.
    assert trailing == b""


def test_connect_udp_101_with_trailing_capsules() -> None:
    raw = encode_response(101) + b"\x00\x04\x00abc"
    resp, trailing = read_response(raw, "udp")
    assert resp.ok
    assert resp.status == 101
    assert resp.headers["upgrade"] == "connect-udp"
    assert resp.headers["capsule-protocol"] == "?1"
    assert trailing == b"\x00\x04\x00abc"
    assert read_response(raw, "udp", chunk=3)[0].status == 101


def test_refusal_with_json_body() -> None:
    raw = encode_refusal(403, "access_denied", "no segment for db.corp:5432")
    resp, trailing = read_response(raw)
    assert not resp.ok
    assert resp.status == 403
    assert resp.error() == ("access_denied", "no segment for db.corp:5432")
    assert json.loads(resp.body)["error"] == "access_denied"
    assert trailing == b""
    assert read_response(raw, chunk=1)[0] == resp
    udp_resp, _ = read_response(raw, "udp")
    assert udp_resp.error() == ("access_denied", "no segment for db.corp:5432")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"<html>bad gateway</html>", ("http_502", "Bad Gateway")),
        (b"", ("http_502", "Bad Gateway")),
        (b"[1, 2]", ("http_502", "Bad Gateway")),
        (b'{"message": "connector down"}', ("http_502", "connector down")),
        (b'{"error": "no_connector"}', ("no_connector", "Bad Gateway")),
        (b"\xff\xfe", ("http_502", "Bad Gateway")),
    ],
)
def test_refusal_with_other_bodies(body: bytes, expected: tuple[str, str]) -> None:
    resp, _ = read_response(encode_response(502, body=body))
    assert resp.status == 502
    assert resp.body == body
    assert resp.error() == expected


def test_refusal_with_unknown_status_has_empty_message() -> None:
    resp, _ = read_response(encode_response(418, body=b"teapot"))
    assert resp.error() == ("http_418", "")


def test_oversized_refusal_body_is_refused() -> None:
    raw = encode_response(403, body=b"x" * (MAX_REFUSAL_BODY + 1))
    for chunk in (None, 1000):
        reader = FlowResponseReader()
        step = chunk or len(raw)
        with pytest.raises(RemoteProtocolError) as info:
            for pos in range(0, len(raw), step):
                reader.feed(raw[pos : pos + step])
        assert info.value.code == "bad_response"
    # At the cap exactly it is accepted.
    resp, _ = read_response(encode_response(403, body=b"x" * MAX_REFUSAL_BODY))
    assert len(resp.body) == MAX_REFUSAL_BODY


def test_closed_before_a_response() -> None:
    for partial in (b"", b"HTTP/1.1 200 Conn"):
        reader = FlowResponseReader()
        if partial:
            assert reader.feed(partial) is None
        with pytest.raises(RemoteProtocolError) as info:
            reader.feed(b"")
        assert info.value.code == "bad_response"


def test_response_feed_after_completion_is_local_misuse() -> None:
    reader = FlowResponseReader()
    assert reader.feed(encode_response(200)) is not None
    with pytest.raises(LocalProtocolError):
        reader.feed(b"x")


@given(st.sampled_from(["tcp", "udp"]), st.binary(max_size=300), st.integers(1, 64))
@settings(max_examples=400)
def test_response_garbage_only_raises_remote_protocol_error(
    protocol: str, raw: bytes, chunk: int
) -> None:
    reader = FlowResponseReader(protocol)
    try:
        for pos in range(0, len(raw), chunk):
            if reader.feed(raw[pos : pos + chunk]) is not None:
                break
    except RemoteProtocolError as exc:
        assert exc.code == "bad_response"


@given(
    st.sampled_from([400, 401, 403, 404, 429, 500, 502, 503, 504]),
    st.from_regex(r"[a-z_]{1,30}", fullmatch=True),
    st.text(max_size=200),
)
@settings(max_examples=200)
def test_refusal_round_trip(status: int, code: str, message: str) -> None:
    resp, _ = read_response(encode_refusal(status, code, message))
    assert resp.status == status
    assert not resp.ok
    assert resp.error() == (code, message or resp.error()[1])


def test_refusal_body_delimited_by_close() -> None:
    reader = FlowResponseReader()
    assert reader.feed(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n\r\n") is None
    assert reader.feed(b'{"error": "access_denied"') is None
    assert reader.feed(b"}") is None
    resp = reader.feed(b"")  # end of stream ends the body
    assert resp is not None
    assert resp.error() == ("access_denied", "Forbidden")


def test_informational_response_before_200() -> None:
    resp, trailing = read_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nabc")
    assert resp.status == 200
    assert trailing == b"abc"


def test_101_to_connect_is_a_bad_response() -> None:
    reader = FlowResponseReader("tcp")
    with pytest.raises(RemoteProtocolError) as info:
        reader.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    assert info.value.code == "bad_response"


@given(
    st.sampled_from(["tcp", "udp", "control"]),
    st.binary(max_size=64),
    st.integers(1, 200),
)
@settings(max_examples=300)
def test_success_shortcut_answers_what_the_parser_would(
    protocol: str, after: bytes, first_read: int
) -> None:
    """The success head is recognised without h11 when a read starts with it; split
    anywhere, it goes through h11: both give the same response and trailing bytes."""
    upgrade = CONTROL_UPGRADE if protocol == "control" else "connect-udp"
    raw = encode_response(200 if protocol == "tcp" else 101, upgrade=upgrade) + after
    whole, whole_trailing = read_response(raw, protocol)

    parsed = FlowResponseReader(protocol)
    parsed._fresh = False  # h11 only
    assert parsed.feed(raw) == whole and parsed.trailing == whole_trailing == after

    split = FlowResponseReader(protocol)
    head_len = len(raw) - len(after)
    result = split.feed(raw[:first_read])
    if first_read >= head_len:  # the whole head in the first read: the shortcut
        assert result == whole and split.trailing == raw[head_len:first_read]
    else:  # split inside the head: h11
        assert result is None
        assert split.feed(raw[first_read:]) == whole and split.trailing == after


def _outcome(raw: bytes, *, fast: bool) -> tuple[object, bytes]:
    """What a reader makes of ``raw`` in one read: (request or error code, trailing)."""
    reader = FlowRequestReader()
    reader._fresh = fast  # False: h11 only
    try:
        return reader.feed(raw), reader.trailing
    except RemoteProtocolError as exc:
        return exc.code, b""


_near_miss_fields = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "Host: x:1",
                "host: y",
                "Content-Length: 0",
                "Transfer-Encoding: chunked",
                "Proxy-Authorization: Bearer t",
                "X-Empty: ",
                "X-Tab:\tv",
                "X-Trail: v ",
                "X-Lead:  v",
                "X-Obs: \x80\xff",
                "X-Ctl: a\x7fb",
                " X-Fold: v",
                "Bad Name: v",
                "X-Colon : v",
                "X-Nocolon",
            ]
        ),
        st.tuples(
            st.from_regex(r"[!-~]{1,12}", fullmatch=True),
            st.from_regex(r"[\t -~\x80-\xff]{0,20}", fullmatch=True),
        ).map(lambda f: f"{f[0]}: {f[1]}"),
    ),
    max_size=6,
)


@given(
    st.sampled_from(["CONNECT", "connect", "GET", "CONNECT  "]),
    _targets,
    st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.1 "]),
    _near_miss_fields,
    st.binary(max_size=20),
)
@settings(max_examples=1000)
def test_fast_connect_path_reads_what_h11_reads(
    method: str, target: str, version: str, fields: list[str], tail: bytes
) -> None:
    """Whatever the fast path accepts, h11 accepts and reads the same; what it does not,
    h11 decides (so the outcome never depends on which path ran)."""
    raw = f"{method} {target} {version}\r\n".encode("latin-1")
    raw += "".join(f"{line}\r\n" for line in fields).encode("latin-1") + b"\r\n" + tail
    assert _outcome(raw, fast=True) == _outcome(raw, fast=False)


@given(_hosts, st.integers(1, 65535), _extra_headers, st.binary(max_size=20))
@settings(max_examples=300)
def test_encoded_connect_heads_take_the_fast_path(
    host: str, port: int, extra: list[tuple[str, str]], tail: bytes
) -> None:
    raw = encode_request("tcp", host, port, [("Proxy-Authorization", "Bearer t"), *extra])
    reader = FlowRequestReader()
    request = reader.feed(raw + tail)
    assert reader._h11 is None  # read without h11
    assert (request, reader.trailing) == _outcome(raw + tail, fast=False)


@given(
    _hosts,
    st.integers(0, 70000),
    _near_miss_fields.filter(lambda fs: not any(f.lower().startswith("host") for f in fs)),
    st.integers(0, 6),
    st.binary(max_size=20),
)
@settings(max_examples=1000)
def test_fast_connect_path_reads_what_h11_reads_for_near_valid_heads(
    host: str, port: int, fields: list[str], host_at: int, tail: bytes
) -> None:
    """Mostly valid heads (one Host, a real authority) with near-miss fields among them."""
    authority = format_authority(host, port)
    fields = [*fields]
    fields.insert(min(host_at, len(fields)), f"Host: {authority}")
    raw = f"CONNECT {authority} HTTP/1.1\r\n".encode("latin-1")
    raw += "".join(f"{line}\r\n" for line in fields).encode("latin-1") + b"\r\n" + tail
    assert _outcome(raw, fast=True) == _outcome(raw, fast=False)
