"""``limen client dns``: a local DNS stub (UDP and TCP) for private names.

* At start, and every ``ttl`` seconds after, the stub asks the edge for the private DNS
  suffixes (``GET /.well-known/limen/dns-suffixes`` on a flow stream, with the user's token).
  If the first request fails the stub does not start: answering private names from a public
  resolver would leak them. Later failures keep the last list.
* A query for a name equal to or under one of the suffixes goes to the edge as a DNS message
  (``POST /dns-query``, RFC 8484 semantics, on a new stream of the client's connection); the
  edge answers it through a connector of the application owning the suffix, or with REFUSED.
  When the edge cannot be reached or refuses the request itself (an expired sign-in), the
  stub answers SERVFAIL and logs why.
* Every other query goes to the system resolver (/etc/resolv.conf, without the stub's own
  address) through :class:`~limen.net.resolver.DnsResolver`, or to ``--upstream`` servers.
* A UDP answer larger than the client can take (512 bytes, or its EDNS payload size) is
  replaced by an empty answer with TC set, so the client retries over TCP (RFC 1035 §4.2.1).
* Under ``limen client up`` a ``local`` hook answers first: names of the forwarding
  profile's name rules get synthetic addresses (:func:`synthetic_answer`), so the
  transparent listener can map a connection back to its name.
* At most :data:`MAX_INFLIGHT` queries are served at once; more are dropped (UDP) — a stub
  must not turn a flood into unbounded tasks and streams. Malformed queries are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from limen.client.forwarding import (
    Action,
    ForwardingProfile,
    Match,
    Outcome,
    SyntheticExhausted,
    SyntheticMap,
    decide,
)
from limen.errors import LimenError, RemoteProtocolError
from limen.net.exchange import exchange
from limen.net.resolver import DnsResolver, error_answer, parse_query
from limen.net.tasks import spawn
from limen.net.udp import Address, UdpSocket, bind_udp
from limen.wire import connect as wire
from limen.wire.doh import (
    MAX_SUFFIX_BODY,
    ExchangeResponse,
    encode_dns_query,
    encode_suffix_request,
    parse_suffix_list,
)

if TYPE_CHECKING:
    from limen.client.tunnel import EdgeSession

log = logging.getLogger(__name__)

MAX_INFLIGHT = 256
#: One query through the tunnel (edge → connector → private resolver) must finish within this.
QUERY_DEADLINE = 10.0
#: A TCP client gets this long to send each query.
TCP_IDLE = 10.0
#: TTL of a synthetic answer: short, so a profile change (a rule removed, the client paused)
#: reaches applications quickly; the mapping itself lives much longer (SyntheticMap.ttl).
SYNTHETIC_ANSWER_TTL = 5

LocalAnswer = Callable[[dns.message.Message], "bytes | None"]


def synthetic_answer(
    query: dns.message.Message,
    profile: ForwardingProfile,
    synthetic: SyntheticMap,
    now: float,
    *,
    suffixes: list[str],
    edge_up: bool,
    paused: bool,
    ttl: int = SYNTHETIC_ANSWER_TTL,
) -> bytes | None:
    """The stub's own answer for a name of a tunnel name rule, or None to resolve it as usual.

    * ``A``: one synthetic address (allocated on first use); ``AAAA``: no records (NOERROR),
      so applications use the IPv4 answer; other types go to the edge when the name lies
      under a private suffix, else get no records (never leak a private name to public DNS).
    * None — the usual path — for names no tunnel rule covers, bypassed names, and when the
      flow would go direct anyway (paused, or hardening ``pass`` with the edge unreachable):
      then the application should get the real address.
    * SERVFAIL when the synthetic range is exhausted.
    """
    question = query.question[0]
    name = question.name.to_text(omit_final_dot=True)
    rule = profile.name_rule_for(name)
    if rule is None or rule.action is not Action.TUNNEL:
        return None
    if decide(Match(rule), edge_up=edge_up, paused=paused) is Outcome.DIRECT:
        return None
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    if question.rdtype == dns.rdatatype.A and question.rdclass == dns.rdataclass.IN:
        try:
            address = synthetic.address_for(name, now)
        except SyntheticExhausted as exc:
            log.warning("dns stub: %s: %s", name, exc.message)
            return error_answer(query, dns.rcode.SERVFAIL)
        response.answer.append(
            dns.rrset.from_text(question.name, ttl, dns.rdataclass.IN, dns.rdatatype.A, address)
        )
    elif question.rdtype != dns.rdatatype.AAAA and is_under(name, suffixes):
        return None
    return response.to_wire()


async def edge_request(
    session: EdgeSession, build: list[tuple[str, str]], method: str, body: bytes | None
) -> ExchangeResponse:
    """One request on a new stream to the edge with the user's token; refreshes an expired
    token once. Raises :class:`~limen.client.tunnel.FlowRefused` (``edge_unreachable``)
    when the edge cannot be reached."""
    from limen.client.tunnel import FlowRefused

    retried = False
    while True:
        token = await session.access_token()
        headers = [("Authorization", f"Bearer {token}"), *build]
        if body is None:
            request, limit = encode_suffix_request(headers), MAX_SUFFIX_BODY
        else:
            request, limit = encode_dns_query(body, headers), wire.MAX_DNS_MESSAGE
        conn = await session._connection()
        try:
            response = await exchange(conn, request, method, limit, QUERY_DEADLINE)
        except (ConnectionError, RemoteProtocolError, TimeoutError) as exc:
            if retried:
                raise FlowRefused(503, "edge_unreachable", f"edge request failed: {exc}") from exc
            retried = True
            conn.close()
            continue
        code, _message = response.error()
        if response.status == 401 and code == "token_expired" and not retried:
            retried = True
            await session.access_token(force_refresh=True)
            continue
        return response


def is_under(name: str, suffixes: list[str]) -> bool:
    """``name`` equals one of ``suffixes`` or lies under it (label-wise)."""
    name = name.strip(".").lower()
    return any(name == s or name.endswith("." + s) for s in suffixes)


class DnsStub:
    """The stub: see the module docstring."""

    def __init__(
        self,
        session: EdgeSession,
        *,
        upstream: DnsResolver | None = None,
        local: LocalAnswer | None = None,
    ) -> None:
        self.session = session
        self.upstream = upstream
        #: Answers first when set (see :func:`synthetic_answer`); None falls through.
        self.local = local
        self.suffixes: list[str] = []
        self.suffix_ttl = 60
        self.udp: UdpSocket | None = None
        self.tcp: asyncio.Server | None = None
        self._inflight = 0
        self._refresher: asyncio.Task[None] | None = None
        #: Counters for status and tests.
        self.private_queries = 0
        self.public_queries = 0
        self.dropped = 0

    async def refresh_suffixes(self) -> list[str]:
        """Fetch the suffix list from the edge (raises FlowRefused / RemoteProtocolError)."""
        from limen.client.tunnel import FlowRefused

        response = await edge_request(self.session, [], "GET", None)
        if not response.ok:
            code, message = response.error()
            raise FlowRefused(response.status, code, message)
        self.suffixes, self.suffix_ttl = parse_suffix_list(response.body)
        return self.suffixes

    async def start(self, host: str, port: int, *, require_suffixes: bool = True) -> Address:
        """Fetch the suffixes, then listen on UDP and TCP ``host:port`` (0: a free port, the
        same for both). Returns the bound address.

        With ``require_suffixes=False`` (``limen client up``, which must come up with the edge
        away so hardening applies) a failed fetch keeps the list the caller set in
        :attr:`suffixes`, and the refresh loop retries."""
        try:
            await self.refresh_suffixes()
        except (LimenError, OSError) as exc:
            if require_suffixes:
                raise
            log.warning("dns stub: cannot fetch the private suffixes yet (%s)", exc)
        # With port 0 the UDP port the kernel picks may be taken over TCP: try a few.
        for attempt in range(20):
            udp = await bind_udp(host, port)
            bound = udp.local_address
            try:
                self.tcp = await asyncio.start_server(self._on_tcp, host, int(bound[1]))
                break
            except OSError:
                udp.close()
                if port or attempt == 19:
                    raise
        if self.upstream is None:
            # Never forward to ourselves when resolv.conf names the stub's address.
            self.upstream = DnsResolver(exclude=[(str(bound[0]), int(bound[1]))])
        udp.on_datagram = self._on_udp
        self.udp = udp
        self._refresher = spawn(self._refresh_loop(), name="dns stub suffix refresh")
        return bound

    def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(max(self.suffix_ttl, 5))  # a period, not synchronisation
            try:
                await self.refresh_suffixes()
            except (LimenError, OSError) as exc:  # the edge away or refusing: keep serving
                log.warning("dns stub: suffix refresh failed (%s); keeping the last list", exc)

    async def answer(self, wire_query: bytes) -> bytes | None:
        """The answer to one query (wire bytes), or None to drop a malformed one."""
        from limen.client.tunnel import FlowRefused

        try:
            query = parse_query(wire_query)
        except RemoteProtocolError:
            return None
        if len(query.question) != 1:
            return error_answer(query, dns.rcode.FORMERR)
        if self.local is not None:
            own = self.local(query)
            if own is not None:
                return own
        name = query.question[0].name.to_text(omit_final_dot=True)
        if is_under(name, self.suffixes):
            self.private_queries += 1
            try:
                response = await edge_request(self.session, [], "POST", wire_query)
            except FlowRefused as exc:
                log.warning("dns stub: %s through Limen failed: %s", name, exc.code)
                return error_answer(query, dns.rcode.SERVFAIL)
            if not response.ok:
                code, message = response.error()
                log.warning("dns stub: the edge refused %s: %s (%s)", name, message, code)
                return error_answer(query, dns.rcode.SERVFAIL)
            return response.body
        self.public_queries += 1
        assert self.upstream is not None  # set in start()
        return await self.upstream.resolve(wire_query)

    # UDP -------------------------------------------------------------------------------------

    def _on_udp(self, data: bytes, addr: Address) -> None:
        if self._inflight >= MAX_INFLIGHT:
            self.dropped += 1
            return
        self._inflight += 1
        spawn(self._serve_udp(data, addr), name=f"dns query from {addr[0]}:{addr[1]}")

    async def _serve_udp(self, data: bytes, addr: Address) -> None:
        try:
            async with asyncio.timeout(QUERY_DEADLINE):
                answer = await self.answer(data)
        except TimeoutError:
            answer = None
        finally:
            self._inflight -= 1
        if answer is None or self.udp is None:
            return
        self.udp.send(_fit_udp(data, answer), addr)

    # TCP (RFC 1035 §4.2.2: two-byte length prefix) ---------------------------------------------

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE):
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    data = await reader.readexactly(size)
                async with asyncio.timeout(QUERY_DEADLINE):
                    answer = await self.answer(data)
                if answer is None:
                    break
                writer.write(struct.pack("!H", len(answer)) + answer)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _fit_udp(query_wire: bytes, answer: bytes) -> bytes:
    """``answer``, or a truncated (TC) empty answer when it exceeds what the client takes."""
    try:
        query = dns.message.from_wire(query_wire)
    except dns.exception.DNSException:  # parsed once already; cannot happen, do not trim
        return answer
    limit = max(query.payload, 512) if query.edns >= 0 else 512
    if len(answer) <= limit:
        return answer
    truncated = dns.message.make_response(query)
    truncated.flags |= dns.flags.TC
    return truncated.to_wire()
