"""DNS messages over HTTP/1.1 semantics on a flow stream (RFC 8484), and the suffix list
request. Sans-IO: heads and bodies in, bytes out.

Rules this module keeps:

* A DNS query is ``POST /dns-query`` with ``Content-Type: application/dns-message`` and a
  ``Content-Length`` body of one DNS wire message (RFC 8484 §4.1). The request head is parsed
  by :class:`limen.wire.connect.FlowRequestReader` (protocol ``"dns"``); the body is the
  ``Content-Length`` bytes after it.
* A DNS answer is ``200`` with ``Content-Type: application/dns-message`` and the wire message
  as body (RFC 8484 §4.2). A refusal of the *HTTP* request (bad token, malformed head) is an
  ordinary refusal with a JSON body (``connect.encode_refusal``); a refusal of the *query*
  (the user may not resolve that name) is a DNS answer with RCODE REFUSED.
* ``GET /.well-known/limen/dns-suffixes`` (protocol ``"dns-suffixes"``) answers ``200`` with
  ``{"suffixes": [...], "ttl": seconds}``: the private DNS suffixes a client's stub sends
  through Limen.
* Bodies are capped: a DNS message is at most 65,535 bytes (its TCP length prefix, RFC 1035
  §4.2.2); a suffix list at most :data:`MAX_SUFFIX_BODY`. A larger ``Content-Length`` is
  refused before any of the body is buffered.
* Every stream carries one request and one response, then ends (``Connection: close``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import h11

from limen.errors import LocalProtocolError, RemoteProtocolError
from limen.wire.connect import (
    DNS_QUERY_PATH,
    DNS_SUFFIXES_PATH,
    MAX_DNS_MESSAGE,
    MAX_HEAD_BYTES,
    REASONS,
    _head_line,
)

__all__ = [
    "DNS_CONTENT_TYPE",
    "MAX_SUFFIX_BODY",
    "ExchangeResponse",
    "ExchangeResponseReader",
    "encode_dns_answer",
    "encode_dns_query",
    "encode_suffix_list",
    "encode_suffix_request",
    "parse_suffix_list",
]

DNS_CONTENT_TYPE = "application/dns-message"
#: 64 applications' worth of 64 suffixes of 253 characters is about 1 MiB: far beyond any real
#: tenant; 256 KiB keeps a misbehaving edge from pinning a client's memory.
MAX_SUFFIX_BODY = 256 * 1024


def encode_dns_query(message: bytes, headers: list[tuple[str, str]] | None = None) -> bytes:
    """The head and body of a DNS query stream (client → edge, edge → connector)."""
    if not isinstance(message, bytes | bytearray) or not 12 <= len(message) <= MAX_DNS_MESSAGE:
        raise LocalProtocolError("a DNS message is 12 to 65,535 bytes", code="dns_bad_message")
    lines = [
        f"POST {DNS_QUERY_PATH} HTTP/1.1\r\n",
        "Host: limen\r\n",
        f"Content-Type: {DNS_CONTENT_TYPE}\r\n",
        f"Accept: {DNS_CONTENT_TYPE}\r\n",
        f"Content-Length: {len(message)}\r\n",
    ]
    lines += [_head_line(name, value) for name, value in headers or ()]
    lines.append("\r\n")
    return "".join(lines).encode("latin-1") + bytes(message)


def encode_dns_answer(message: bytes) -> bytes:
    """A ``200`` carrying one DNS wire message (RFC 8484 §4.2.1)."""
    if len(message) > MAX_DNS_MESSAGE:
        raise LocalProtocolError("DNS answer too large", code="dns_bad_message")
    head = (
        f"HTTP/1.1 200 {REASONS[200]}\r\n"
        f"Content-Type: {DNS_CONTENT_TYPE}\r\n"
        f"Content-Length: {len(message)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + bytes(message)


def encode_suffix_request(headers: list[tuple[str, str]] | None = None) -> bytes:
    """The head of a suffix-list request (client → edge)."""
    lines = [f"GET {DNS_SUFFIXES_PATH} HTTP/1.1\r\n", "Host: limen\r\n"]
    lines += [_head_line(name, value) for name, value in headers or ()]
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def encode_suffix_list(suffixes: list[str], ttl: int) -> bytes:
    """A ``200`` carrying the suffix list as JSON."""
    names = sorted({s.strip().rstrip(".").lower() for s in suffixes if s.strip()})
    body = json.dumps({"suffixes": names, "ttl": int(ttl)}).encode()
    head = (
        f"HTTP/1.1 200 {REASONS[200]}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def parse_suffix_list(body: bytes) -> tuple[list[str], int]:
    """``(suffixes, ttl)`` from a suffix-list body; RemoteProtocolError if malformed."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise RemoteProtocolError("suffix list is not JSON", code="bad_response") from exc
    if not isinstance(data, dict):
        raise RemoteProtocolError("suffix list is not an object", code="bad_response")
    suffixes = data.get("suffixes")
    ttl = data.get("ttl", 60)
    if not isinstance(suffixes, list) or not all(isinstance(s, str) for s in suffixes):
        raise RemoteProtocolError("suffixes must be a list of names", code="bad_response")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
        raise RemoteProtocolError("ttl must be a non-negative integer", code="bad_response")
    return [s.strip().rstrip(".").lower() for s in suffixes if s.strip()], ttl


@dataclass(frozen=True, slots=True)
class ExchangeResponse:
    """A complete response to a one-request stream."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def ok(self) -> bool:
        return self.status == 200

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


class ExchangeResponseReader:
    """Client side of a one-request stream (``POST /dns-query`` or the suffix list): feed
    bytes until a complete :class:`ExchangeResponse` comes out."""

    def __init__(self, method: str = "POST", max_body: int = MAX_DNS_MESSAGE) -> None:
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        # h11 must see the request to frame the response.
        headers = [("Host", "limen")]
        if method == "POST":
            headers.append(("Content-Length", "12"))
        self._conn.send(h11.Request(method=method, target="/", headers=headers))
        if method == "POST":
            self._conn.send(h11.Data(data=b"\x00" * 12))
            self._conn.send(h11.EndOfMessage())
        self._max_body = max_body
        self._head: h11.Response | None = None
        self._body = bytearray()
        self.response: ExchangeResponse | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> ExchangeResponse | None:
        if self.response is not None:
            raise LocalProtocolError("response already complete")
        try:
            self._conn.receive_data(bytes(data))
            return self._drain()
        except h11.RemoteProtocolError as exc:
            raise RemoteProtocolError(f"malformed response: {exc}", code="bad_response") from exc

    def feed_eof(self) -> ExchangeResponse | None:
        """The stream ended; a response without ``Content-Length`` ends here, anything else
        incomplete is ``bad_response``."""
        if self.response is not None:
            return self.response
        try:
            self._conn.receive_data(b"")
            result = self._drain()
        except h11.RemoteProtocolError as exc:
            raise RemoteProtocolError(f"truncated response: {exc}", code="bad_response") from exc
        if result is None:
            raise RemoteProtocolError("stream ended before the response", code="bad_response")
        return result

    def _drain(self) -> ExchangeResponse | None:
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                self._head = event
                length = dict(event.headers).get(b"content-length")
                if length is not None and length.isdigit() and int(length) > self._max_body:
                    raise RemoteProtocolError("response body too large", code="bad_response")
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self._max_body:
                    raise RemoteProtocolError("response body too large", code="bad_response")
            elif isinstance(event, h11.EndOfMessage):
                if self._head is None:  # h11 never ends a message without a head
                    raise RemoteProtocolError("response without a head", code="bad_response")
                headers = {
                    k.decode("ascii", "replace").lower(): v.decode("latin-1")
                    for k, v in self._head.headers
                }
                self.response = ExchangeResponse(self._head.status_code, headers, bytes(self._body))
                return self.response
            elif isinstance(event, h11.ConnectionClosed):
                raise RemoteProtocolError("closed before a response", code="bad_response")
