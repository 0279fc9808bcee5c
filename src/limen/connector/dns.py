"""The connector's private DNS: answers the DNS queries the edge forwards (``POST
/dns-query``, RFC 8484 semantics) by asking its resolver on the private side — the system's
nameservers by default, or the servers given with ``limen connector run --dns-server`` —
through a TTL-honouring cache (:class:`limen.net.resolver.DnsResolver`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from limen.errors import ConfigError, RemoteProtocolError
from limen.net.exchange import read_body
from limen.net.mux import MuxStream
from limen.net.resolver import DEFAULT_TIMEOUT, DnsResolver, Upstream, serve_one
from limen.wire import connect as wire
from limen.wire.doh import encode_dns_answer

if TYPE_CHECKING:
    from limen.connector.agent import ConnectorAgent

log = logging.getLogger(__name__)

#: The whole query (body, resolution with retries) must be served within this.
DNS_DEADLINE = 8.0


async def serve_dns(
    agent: ConnectorAgent, stream: MuxStream, request: wire.FlowRequest, resolver: DnsResolver
) -> None:
    """Serve one DNS query stream the edge opened."""
    length = int(request.headers.get("content-length", "0"))
    try:
        # The head reader handed what followed the head back to the stream (detach replay).
        query = await read_body(stream, length, b"", DNS_DEADLINE)
    except (TimeoutError, RemoteProtocolError, ConnectionError) as exc:
        log.info("DNS query body not received: %r", exc)
        stream.abort()
        return
    answer = await serve_one(resolver, query, DNS_DEADLINE)
    if answer is None:
        agent._refuse(stream, 400, "dns_malformed", "the DNS query does not parse")
        return
    stream.write(encode_dns_answer(answer))
    stream.close()


#: Private DNS servers of the connector (comma-separated ``IP`` / ``IP:PORT``); empty: the
#: system's (/etc/resolv.conf). ``limen connector run --dns-server`` sets it.
ENV_DNS_SERVERS = "LIMEN_CONNECTOR_DNS_SERVERS"
#: Seconds each upstream server gets per query.
ENV_DNS_TIMEOUT = "LIMEN_CONNECTOR_DNS_TIMEOUT"


def resolver_from_env(environ: Mapping[str, str] | None = None) -> DnsResolver:
    """The connector's resolver, configured from the environment (see the constants)."""
    env = os.environ if environ is None else environ
    servers = [Upstream.parse(s) for s in env.get(ENV_DNS_SERVERS, "").split(",") if s.strip()]
    try:
        timeout = float(env.get(ENV_DNS_TIMEOUT, "") or DEFAULT_TIMEOUT)
    except ValueError as exc:
        raise ConfigError(f"{ENV_DNS_TIMEOUT} must be a number of seconds") from exc
    return DnsResolver(servers or None, timeout=timeout)
