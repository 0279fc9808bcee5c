"""A small forwarding DNS resolver with a TTL-honouring cache (dnspython for messages).

Used by the connector (private names, resolved on the private side) and by the client's DNS
stub (every name that is not private goes to the system resolver).

Rules it keeps:

* One question per query; anything else gets FORMERR (RFC 1035 §4.1.2 allows more, no server
  answers it). A message that does not parse is the caller's error (``dns_malformed``).
* Upstream servers are tried in order, each within ``timeout``; UDP first, TCP when the answer
  is truncated. When none answers, the client gets SERVFAIL — which is not cached.
* Answers are passed through as the upstream gave them (A, AAAA, CNAME, TXT, SRV, NXDOMAIN,
  SERVFAIL...), with the query's id. NOERROR and NXDOMAIN answers are cached for the smallest
  TTL of their records (for a negative answer, the SOA's ``min(ttl, minimum)``, RFC 2308 §5),
  capped at ``max_ttl``; an answer without records is not cached. A cached answer is served
  with its TTLs lowered by the time it spent in the cache.
* The cache holds at most ``cache_size`` answers; the least recently used goes first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver

from limen.errors import ConfigError, RemoteProtocolError

log = logging.getLogger(__name__)

#: An answer is never cached longer than this, whatever its TTL says.
DEFAULT_MAX_TTL = 3600
DEFAULT_CACHE_SIZE = 4096
DEFAULT_TIMEOUT = 2.0

CacheKey = tuple[str, int, int, bool]


@dataclass(frozen=True, slots=True)
class Upstream:
    """One upstream server."""

    host: str
    port: int = 53

    @classmethod
    def parse(cls, text: str) -> Upstream:
        """``IP``, ``IP:PORT`` or ``[IPv6]:PORT``."""
        text = text.strip()
        try:
            if text.startswith("["):
                host, _, rest = text[1:].partition("]")
                return cls(host, int(rest[1:]) if rest.startswith(":") else 53)
            if text.count(":") == 1:
                host, _, port = text.partition(":")
                return cls(host, int(port))
        except ValueError as exc:
            raise ConfigError(f"bad DNS server {text!r}", code="bad_dns_server") from exc
        if not text:
            raise ConfigError("empty DNS server", code="bad_dns_server")
        return cls(text)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def system_upstreams(exclude: Sequence[tuple[str, int]] = ()) -> list[Upstream]:
    """The nameservers of /etc/resolv.conf, without ``exclude`` (our own stub's address)."""
    try:
        servers = dns.resolver.Resolver(configure=True).nameservers
    except (dns.exception.DNSException, OSError):
        servers = []
    found = [Upstream(str(s)) for s in servers]
    return [u for u in found if (u.host, u.port) not in set(exclude)]


def _min_ttl(message: dns.message.Message) -> int | None:
    ttls: list[int] = []
    for rrset in message.answer:
        ttls.append(rrset.ttl)
    for rrset in message.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            minimum = min(int(getattr(rd, "minimum", rrset.ttl)) for rd in rrset)
            ttls.append(min(rrset.ttl, minimum))
        else:
            ttls.append(rrset.ttl)
    return min(ttls) if ttls else None


class DnsCache:
    """Bounded LRU of answers by (name, type, class, DO bit); ``now`` is passed in."""

    def __init__(self, size: int = DEFAULT_CACHE_SIZE, max_ttl: int = DEFAULT_MAX_TTL) -> None:
        self.size = size
        self.max_ttl = max_ttl
        self._entries: OrderedDict[CacheKey, tuple[float, float, bytes]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: CacheKey, answer: dns.message.Message, now: float) -> None:
        if answer.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) or answer.flags & (
            dns.flags.TC
        ):
            return
        ttl = _min_ttl(answer)
        if ttl is None or ttl <= 0 or self.size <= 0:
            return
        ttl = min(ttl, self.max_ttl)
        self._entries[key] = (now, now + ttl, answer.to_wire())
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get(self, key: CacheKey, query_id: int, now: float) -> dns.message.Message | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        stored_at, _expires, wire = entry
        message = dns.message.from_wire(wire)
        message.id = query_id
        elapsed = int(now - stored_at)
        for section in (message.answer, message.authority, message.additional):
            for rrset in section:
                rrset.ttl = max(rrset.ttl - elapsed, 0)
        self.hits += 1
        return message


def parse_query(wire: bytes) -> dns.message.Message:
    """A DNS query from wire bytes; RemoteProtocolError (``dns_malformed``) if it does not
    parse or is a response."""
    try:
        message = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, IndexError) as exc:
        raise RemoteProtocolError(f"malformed DNS message: {exc}", code="dns_malformed") from exc
    if message.flags & dns.flags.QR:
        raise RemoteProtocolError("a DNS response where a query belongs", code="dns_malformed")
    return message


def error_answer(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    """An answer to ``query`` with ``rcode`` and no records."""
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response.to_wire()


class DnsResolver:
    """Forwards queries to ``upstreams`` (default: the system's), caching answers."""

    def __init__(
        self,
        upstreams: Sequence[Upstream] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_ttl: int = DEFAULT_MAX_TTL,
        exclude: Sequence[tuple[str, int]] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._configured = list(upstreams) if upstreams else None
        self._exclude = list(exclude)
        self.timeout = timeout
        self.cache = DnsCache(cache_size, max_ttl)
        self.clock = clock
        self.failures = 0

    @property
    def upstreams(self) -> list[Upstream]:
        """The configured servers, or the system's (read when first needed)."""
        if self._configured is None:
            self._configured = system_upstreams(self._exclude)
            if not self._configured:
                log.warning("no system DNS server in /etc/resolv.conf; using 127.0.0.1")
                self._configured = [Upstream("127.0.0.1")]
        return self._configured

    async def resolve(self, wire: bytes) -> bytes:
        """The answer (wire bytes) to a query (wire bytes). RemoteProtocolError
        (``dns_malformed``) if the query does not parse; every other failure is SERVFAIL."""
        query = parse_query(wire)
        if len(query.question) != 1:
            return error_answer(query, dns.rcode.FORMERR)
        question = query.question[0]
        key: CacheKey = (
            question.name.to_text().lower(),
            int(question.rdtype),
            int(question.rdclass),
            bool(query.ednsflags & dns.flags.DO),
        )
        cached = self.cache.get(key, query.id, self.clock())
        if cached is not None:
            return cached.to_wire()
        for upstream in self.upstreams:
            try:
                answer, _tcp = await dns.asyncquery.udp_with_fallback(
                    query, upstream.host, timeout=self.timeout, port=upstream.port
                )
            except (dns.exception.DNSException, OSError, TimeoutError, EOFError) as exc:
                log.info("DNS server %s failed for %s: %r", upstream, key[0], exc)
                continue
            self.cache.put(key, answer, self.clock())
            answer.id = query.id
            return answer.to_wire()
        self.failures += 1
        return error_answer(query, dns.rcode.SERVFAIL)


async def serve_one(resolver: DnsResolver, wire: bytes, deadline: float) -> bytes | None:
    """``resolver.resolve`` bounded by ``deadline``: None for a malformed query, SERVFAIL when
    the deadline passes."""
    try:
        async with asyncio.timeout(deadline):
            return await resolver.resolve(wire)
    except RemoteProtocolError:
        return None
    except TimeoutError:
        return error_answer(parse_query(wire), dns.rcode.SERVFAIL)
