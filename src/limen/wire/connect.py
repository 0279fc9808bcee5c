"""The head of every flow: an HTTP/1.1 CONNECT (RFC 9110 §9.3.6) or connect-udp upgrade
(RFC 9298 §3.3, HTTP/1.1 form), parsed by h11. Sans-IO.

Rules this module keeps:

* A flow stream (or a plain one-flow TLS connection) starts with one request head. ``CONNECT
  host:port`` opens a TCP flow; ``GET /.well-known/masque/udp/{host}/{port}/`` with
  ``Upgrade: connect-udp`` and ``Capsule-Protocol: ?1`` opens a UDP flow.
* The head is capped at ``MAX_HEAD_BYTES``; a larger one is refused (431) without buffering
  it further. Request bodies are not allowed on the flow head.
* The answer is a response head: ``200`` (CONNECT) or ``101`` (connect-udp) switches the
  stream to raw bytes or capsules; anything else is a refusal that carries a small JSON body
  (``{"error": code, "message": ...}``) and ends the stream.
* Bytes that follow the head in the same read belong to the tunnel (``trailing``), never to
  HTTP.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import h11

from limen.errors import LocalProtocolError, RemoteProtocolError

#: 16 KiB holds a bearer token (a few KiB at most) and every Limen header with room to
#: spare; anything larger is abuse or a bug, and refusing it bounds per-stream memory.
MAX_HEAD_BYTES = 16 * 1024
#: A refusal body is a short JSON object; cap what we will read of one.
MAX_REFUSAL_BODY = 8 * 1024
MASQUE_UDP_PREFIX = "/.well-known/masque/udp/"
#: RFC 8484 §4.1's conventional path: a DNS query stream (protocol "dns", wire/doh.py).
DNS_QUERY_PATH = "/dns-query"
#: The private DNS suffixes a client's stub sends through Limen (protocol "dns-suffixes").
DNS_SUFFIXES_PATH = "/.well-known/limen/dns-suffixes"
#: The client's control stream on its edge connection (protocol "control"): ``GET`` this path
#: with ``Upgrade: limen-control`` and the bearer token, answered ``101``, then control frames
#: (wire/control.py).
CONTROL_PATH = "/.well-known/limen/control"
CONTROL_UPGRADE = "limen-control"
#: A DNS message is at most 65,535 bytes (the TCP length prefix, RFC 1035 §4.2.2); the
#: 12-byte header is the least a message can be.
MAX_DNS_MESSAGE = 65_535
MIN_DNS_MESSAGE = 12

HEADER_FLOW_ID = "limen-flow-id"
HEADER_DEVICE_ID = "limen-device-id"
HEADER_PROCESS = "limen-process"
HEADER_CLIENT_VERSION = "limen-client-version"
HEADER_SOURCE = "limen-source"
HEADER_USER = "limen-user"

REASONS = {
    101: "Switching Protocols",
    200: "Connection Established",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(frozen=True, slots=True)
class FlowRequest:
    """A parsed flow head."""

    #: tcp | udp | dns (a DNS query, body follows) | dns-suffixes (the suffix list)
    protocol: str
    host: str
    port: int
    #: Lower-cased header names; repeated headers joined with ", ".
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def bearer_token(self) -> str | None:
        value = self.headers.get("proxy-authorization") or self.headers.get("authorization")
        if not value:
            return None
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()


@dataclass(frozen=True, slots=True)
class FlowResponse:
    status: int
    headers: dict[str, str]
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status in (200, 101)

    def error(self) -> tuple[str, str]:
        """(code, message) of a refusal, from its JSON body when it has one."""
        try:
            data = json.loads(self.body or b"{}")
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        code = str(data.get("error") or f"http_{self.status}")
        return code, str(data.get("message") or REASONS.get(self.status, ""))


def parse_authority(authority: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); RemoteProtocolError if malformed."""
    if authority.startswith("["):
        host, sep, rest = authority[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise RemoteProtocolError(f"bad authority {authority!r}", code="bad_target")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise RemoteProtocolError(
                f"bad IPv6 literal in {authority!r}", code="bad_target"
            ) from exc
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep or not host:
            raise RemoteProtocolError(f"bad authority {authority!r}", code="bad_target")
    return _check_host(host), _check_port(port_text)


def _check_port(text: str) -> int:
    if not text.isdigit() or len(text) > 5:
        raise RemoteProtocolError(f"bad port {text!r}", code="bad_target")
    port = int(text)
    if not 0 < port < 65536:
        raise RemoteProtocolError(f"port {port} out of range", code="bad_target")
    return port


def _check_host(host: str) -> str:
    host = host.strip().rstrip(".").lower()
    if not host or len(host) > 253:
        raise RemoteProtocolError("bad host", code="bad_target")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    for label in host.split("."):
        if not 0 < len(label) <= 63 or not all(c.isalnum() or c in "-_" for c in label):
            raise RemoteProtocolError(f"bad host name {host!r}", code="bad_target")
    return host


def format_authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _headers_dict(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("ascii", "replace").lower()
        text = value.decode("latin-1")
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


#: A CONNECT head in the shape Limen's encoder writes (``encode_request``), whole in one
#: read: ``CONNECT authority HTTP/1.1``, then ``Name: value`` lines (one space after the colon,
#: no space at the end, no folding), then a blank line. Heads of this shape are a subset of
#: what h11 accepts and read the same (a Hypothesis test compares them); any other head, or
#: one split across reads, goes through h11. h11 costs ~40 µs a head, twice per flow.
_FAST_REQUEST_LINE = re.compile(rb"CONNECT ([!-~]+) HTTP/1\.1\r\n")
_FAST_FIELD = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+): "
    rb"((?:[\x21-\x7e\x80-\xff](?:[\x20\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?)\r\n"
)
_NOT_ON_FAST_PATH = (b"host", b"content-length", b"transfer-encoding")


def _fast_connect_head(
    data: bytes, max_head: int
) -> tuple[str, list[tuple[bytes, bytes]], int] | None:
    """(target, header fields, head length) of a head in the fast shape, else None."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 > max_head:
        return None
    line = _FAST_REQUEST_LINE.match(data)
    if line is None:
        return None
    fields: list[tuple[bytes, bytes]] = []
    pos, last = line.end(), end + 2
    hosts = 0
    while pos < last:
        field = _FAST_FIELD.match(data, pos)
        if field is None:
            return None
        name = field.group(1)
        lowered = name.lower()
        if lowered in _NOT_ON_FAST_PATH:
            if lowered != b"host":
                return None  # a body: h11 and the checks below refuse it
            hosts += 1
        fields.append((name, field.group(2)))
        pos = field.end()
    if pos != last or hosts != 1:  # HTTP/1.1 needs exactly one Host (h11 says why)
        return None
    return line.group(1).decode("ascii"), fields, end + 4


class FlowRequestReader:
    """Server side: feed bytes until a :class:`FlowRequest` comes out."""

    def __init__(self, max_head: int = MAX_HEAD_BYTES) -> None:
        self._h11: h11.Connection | None = None  # made only when the fast path does not apply
        self._max_head = max_head
        self._seen = 0
        self._fresh = True
        self.trailing = b""
        self.request: FlowRequest | None = None

    @property
    def _conn(self) -> h11.Connection:
        if self._h11 is None:
            self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
        return self._h11

    def feed(self, data: bytes | bytearray | memoryview) -> FlowRequest | None:
        if self.request is not None:
            raise LocalProtocolError("flow head already complete")
        if self._fresh:
            self._fresh = False
            raw = bytes(data)
            fast = _fast_connect_head(raw, self._max_head)
            if fast is not None:
                target, fields, head_length = fast
                host, port = parse_authority(target)
                self._seen = len(raw)
                self.trailing = raw[head_length:]
                self.request = FlowRequest("tcp", host, port, _headers_dict(fields))
                return self.request
        self._seen += len(data)
        try:
            self._conn.receive_data(bytes(data))
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            too_large = self._seen > self._max_head or exc.error_status_hint == 431
            code = "head_too_large" if too_large else "bad_request"
            raise RemoteProtocolError(f"malformed flow head: {exc}", code=code) from exc
        if event is h11.NEED_DATA:
            if self._seen > self._max_head:
                raise RemoteProtocolError("flow head too large", code="head_too_large")
            return None
        if not isinstance(event, h11.Request):
            raise RemoteProtocolError("expected a request head", code="bad_request")
        # h11 caps only an *incomplete* head: a whole oversized head in one read gets through.
        if self._seen - len(self._conn.trailing_data[0]) > self._max_head:
            raise RemoteProtocolError("flow head too large", code="head_too_large")
        headers = _headers_dict(list(event.headers))
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        if method == "CONNECT":
            host, port = parse_authority(target)
            request = FlowRequest("tcp", host, port, headers)
        elif method == "GET" and headers.get("upgrade", "").lower() == "connect-udp":
            host, port = _parse_masque_path(target)
            request = FlowRequest("udp", host, port, headers)
        elif method == "POST" and target == DNS_QUERY_PATH:
            request = _dns_query_request(headers)
        elif method == "GET" and target == DNS_SUFFIXES_PATH:
            request = FlowRequest("dns-suffixes", "", 0, headers)
        elif method == "GET" and target == CONTROL_PATH:
            if headers.get("upgrade", "").lower() != CONTROL_UPGRADE:
                raise RemoteProtocolError(
                    f"a control stream upgrades to {CONTROL_UPGRADE}", code="bad_request"
                )
            request = FlowRequest("control", "", 0, headers)
        else:
            raise RemoteProtocolError(
                f"method {method} is not a flow; use CONNECT or connect-udp",
                code="method_not_allowed",
            )
        has_body = "content-length" in headers or "transfer-encoding" in headers
        if has_body and request.protocol != "dns":
            raise RemoteProtocolError("a flow head has no body", code="bad_request")
        data_after, _closed = self._conn.trailing_data
        self.trailing = bytes(data_after)
        self.request = request
        return request


def _dns_query_request(headers: dict[str, str]) -> FlowRequest:
    """RFC 8484 §4.1 POST: one DNS message as a ``Content-Length`` body (no chunking: the
    body is small and its length bounds what we buffer)."""
    media = headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/dns-message":
        raise RemoteProtocolError("a DNS query is application/dns-message", code="bad_request")
    if "transfer-encoding" in headers:
        raise RemoteProtocolError("a DNS query has a Content-Length body", code="bad_request")
    length = headers.get("content-length", "")
    if not length.isdigit() or not MIN_DNS_MESSAGE <= int(length) <= MAX_DNS_MESSAGE:
        raise RemoteProtocolError(f"bad DNS query length {length!r}", code="bad_request")
    return FlowRequest("dns", "", 0, headers)


def _parse_masque_path(target: str) -> tuple[str, int]:
    if not target.startswith(MASQUE_UDP_PREFIX):
        raise RemoteProtocolError(f"unknown connect-udp path {target!r}", code="bad_target")
    parts = target[len(MASQUE_UDP_PREFIX) :].split("/")
    if len(parts) != 3 or parts[2] != "":
        raise RemoteProtocolError(f"bad connect-udp path {target!r}", code="bad_target")
    host = unquote(parts[0])
    return _check_host(host), _check_port(parts[1])


#: CR, LF and NUL would split or end the head; beyond latin-1 cannot be encoded (RFC 9110
#: §5.5 obs-text) and would escape as UnicodeEncodeError instead of a LimenError. One C-level
#: scan: header values include a bearer token of a kilobyte or so, on every flow.
_BAD_VALUE = re.compile(r"[\r\n\x00]|[^\x00-\xff]")
_BAD_NAME = re.compile(r"[\r\n\x00: ]|[^\x00-\xff]")


def _head_line(name: str, value: str) -> str:
    if _BAD_NAME.search(name) or _BAD_VALUE.search(value):
        raise LocalProtocolError(f"header {name!r} has a forbidden character")
    return f"{name}: {value}\r\n"


def encode_request(
    protocol: str, host: str, port: int, headers: list[tuple[str, str]] | None = None
) -> bytes:
    """The flow head a client (or the edge toward a connector) sends."""
    authority = format_authority(host, port)
    lines: list[str]
    if protocol == "tcp":
        lines = [f"CONNECT {authority} HTTP/1.1\r\n", _head_line("Host", authority)]
    elif protocol == "udp":
        from urllib.parse import quote

        path = f"{MASQUE_UDP_PREFIX}{quote(host, safe='')}/{port}/"
        lines = [
            f"GET {path} HTTP/1.1\r\n",
            _head_line("Host", authority),
            "Connection: Upgrade\r\n",
            "Upgrade: connect-udp\r\n",
            "Capsule-Protocol: ?1\r\n",
        ]
    elif protocol == "control":
        lines = [
            f"GET {CONTROL_PATH} HTTP/1.1\r\n",
            _head_line("Host", authority),
            "Connection: Upgrade\r\n",
            f"Upgrade: {CONTROL_UPGRADE}\r\n",
        ]
    else:
        raise LocalProtocolError(f"unknown flow protocol {protocol!r}")
    for name, value in headers or ():
        lines.append(_head_line(name, value))
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def encode_response(
    status: int,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    upgrade: str = "connect-udp",
) -> bytes:
    """A response head (``upgrade`` names what a 101 switches to: connect-udp or
    limen-control)."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"]
    if status == 101 and upgrade == CONTROL_UPGRADE:
        lines += ["Connection: Upgrade\r\n", f"Upgrade: {CONTROL_UPGRADE}\r\n"]
    elif status == 101:
        lines += ["Connection: Upgrade\r\n", "Upgrade: connect-udp\r\n", "Capsule-Protocol: ?1\r\n"]
    for name, value in headers or ():
        lines.append(_head_line(name, value))
    if status not in (101, 200):
        lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1") + (body if status not in (101, 200) else b"")


def encode_refusal(
    status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None
) -> bytes:
    body = json.dumps({"error": code, "message": message}).encode()
    return encode_response(status, [("Content-Type", "application/json"), *(headers or [])], body)


class FlowResponseReader:
    """Client side: feed bytes until a :class:`FlowResponse` comes out.

    Every admitted flow is answered with the same success head, byte for byte (our
    :func:`encode_response`): when a read starts with it, the answer is known without a
    parser (h11 costs ~30 µs here, twice per flow). Anything else — a refusal, a head split
    across reads, another server's response — goes through h11."""

    def __init__(self, protocol: str = "tcp", max_head: int = MAX_HEAD_BYTES) -> None:
        self.protocol = protocol
        self._max_head = max_head
        self._fresh = True
        self._h11: h11.Connection | None = None  # made only when the shortcut does not apply
        self._response: h11.Response | h11.InformationalResponse | None = None
        self._body = bytearray()
        self.trailing = b""
        self.response: FlowResponse | None = None

    @property
    def _conn(self) -> h11.Connection:
        if self._h11 is None:
            self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_head)
            # h11 must see the request to know a 200/101 switches protocols.
            if self.protocol == "udp":
                req = h11.Request(
                    method="GET",
                    target="/.well-known/masque/udp/x/1/",
                    headers=[("Host", "x"), ("Connection", "Upgrade"), ("Upgrade", "connect-udp")],
                )
            elif self.protocol == "control":
                req = h11.Request(
                    method="GET",
                    target=CONTROL_PATH,
                    headers=[
                        ("Host", "x"),
                        ("Connection", "Upgrade"),
                        ("Upgrade", CONTROL_UPGRADE),
                    ],
                )
            else:
                req = h11.Request(method="CONNECT", target="x:1", headers=[("Host", "x:1")])
            self._h11.send(req)
        return self._h11

    def feed(self, data: bytes | bytearray | memoryview) -> FlowResponse | None:
        if self.response is not None:
            raise LocalProtocolError("flow response already complete")
        if self._fresh:
            self._fresh = False
            known = _SUCCESS_HEADS.get(self.protocol)
            if known is not None and bytes(data[: len(known[0])]) == known[0]:
                self.trailing = bytes(data[len(known[0]) :])
                self.response = known[1]
                return self.response
        try:
            self._conn.receive_data(bytes(data))
            while True:
                event = self._conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    if event is h11.PAUSED and self._response is not None:
                        return self._finish(switched=True)
                    return None
                if isinstance(event, h11.InformationalResponse | h11.Response):
                    self._response = event
                    if event.status_code == 101 or 200 <= event.status_code < 300:
                        return self._finish(switched=True)
                elif isinstance(event, h11.Data):
                    self._body += event.data
                    if len(self._body) > MAX_REFUSAL_BODY:
                        raise RemoteProtocolError("refusal body too large", code="bad_response")
                elif isinstance(event, h11.EndOfMessage):
                    return self._finish(switched=False)
                elif isinstance(event, h11.ConnectionClosed):
                    raise RemoteProtocolError("closed before a response", code="bad_response")
        except h11.RemoteProtocolError as exc:
            raise RemoteProtocolError(
                f"malformed flow response: {exc}", code="bad_response"
            ) from exc

    def _finish(self, *, switched: bool) -> FlowResponse:
        assert self._response is not None  # internal invariant, not peer data
        headers = _headers_dict(list(self._response.headers))
        if switched:
            self.trailing = bytes(self._conn.trailing_data[0])
        self.response = FlowResponse(self._response.status_code, headers, bytes(self._body))
        return self.response


def _parsed_success_head(protocol: str, head: bytes) -> tuple[bytes, FlowResponse]:
    """``head`` as h11 reads it (so the shortcut answers exactly what the parser would)."""
    reader = FlowResponseReader(protocol)
    reader._fresh = False
    response = reader.feed(head)
    assert response is not None and response.ok and not reader.trailing
    return head, response


#: The success heads the edge and the connector send, per flow protocol, and what they mean.
_SUCCESS_HEADS: dict[str, tuple[bytes, FlowResponse]] = {
    "tcp": _parsed_success_head("tcp", encode_response(200)),
    "udp": _parsed_success_head("udp", encode_response(101)),
    "control": _parsed_success_head("control", encode_response(101, upgrade=CONTROL_UPGRADE)),
}


def describe(request: FlowRequest) -> dict[str, Any]:
    """Loggable summary of a flow head: never the token."""
    return {
        "protocol": request.protocol,
        "host": request.host,
        "port": request.port,
        "flow_id": request.headers.get(HEADER_FLOW_ID, ""),
    }
