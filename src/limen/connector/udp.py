"""The connector's end of a UDP flow (connect-udp, RFC 9298): resolve the target on the
private side, open a connected UDP socket, answer ``101``, then move datagrams between the
stream's DATAGRAM capsules and the socket until the flow is idle or either side ends it."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

from limen.errors import ConfigError
from limen.net.mux import MuxStream
from limen.net.udp import DatagramTunnel, UdpSettings, connect_udp
from limen.wire import connect as wire

if TYPE_CHECKING:
    from limen.connector.agent import ConnectorAgent

log = logging.getLogger(__name__)


async def serve_udp(
    agent: ConnectorAgent,
    stream: MuxStream,
    request: wire.FlowRequest,
    settings: UdpSettings,
) -> None:
    """Serve one UDP flow the edge opened on ``stream``."""
    try:
        sock = await connect_udp(request.host, request.port, agent.dial_timeout)
    except TimeoutError:
        agent.dials_failed += 1
        agent._refuse(stream, 504, "target_timeout", f"resolving {request.host} timed out")
        return
    except socket.gaierror as exc:
        agent.dials_failed += 1
        agent._refuse(
            stream, 502, "target_unresolvable", f"cannot resolve {request.host}: {exc.strerror}"
        )
        return
    except OSError as exc:
        agent.dials_failed += 1
        agent._refuse(
            stream, 502, "target_unreachable", f"{request.host}:{request.port}: {exc.strerror}"
        )
        return
    stream.write(wire.encode_response(101))
    tunnel = DatagramTunnel(
        stream,
        sock.send,
        idle_timeout=settings.idle_for(request.port),
        max_payload=settings.max_payload,
        name=f"udp {request.host}:{request.port}",
    )
    sock.on_datagram = lambda data, _addr: tunnel.send(data)
    agent.active_flows += 1
    try:
        tunnel.start()
        reason = await tunnel.done
    finally:
        agent.active_flows -= 1
        sock.close()
        agent.bytes_up += tunnel.bytes_in
        agent.bytes_down += tunnel.bytes_out
    log.debug(
        "udp flow to %s:%d ended (%s): %d/%d datagrams up/down, %d dropped",
        request.host,
        request.port,
        reason,
        tunnel.datagrams_in,
        tunnel.datagrams_out,
        tunnel.dropped + sock.dropped,
    )


#: Seconds a UDP flow may stay idle (default 60); flows to port 53 use the DNS one (default 5).
ENV_UDP_IDLE = "LIMEN_CONNECTOR_UDP_IDLE_TIMEOUT"
ENV_UDP_DNS_IDLE = "LIMEN_CONNECTOR_UDP_DNS_IDLE_TIMEOUT"


def udp_settings_from_env(environ: Mapping[str, str] | None = None) -> UdpSettings:
    """The connector's UDP limits, from the environment (see the constants)."""
    env = os.environ if environ is None else environ
    defaults = UdpSettings()
    try:
        idle = float(env.get(ENV_UDP_IDLE, "") or defaults.idle_timeout)
        dns_idle = float(env.get(ENV_UDP_DNS_IDLE, "") or defaults.dns_idle_timeout)
    except ValueError as exc:
        raise ConfigError("UDP idle timeouts must be numbers of seconds") from exc
    if idle <= 0 or dns_idle <= 0:
        raise ConfigError("UDP idle timeouts must be positive")
    return UdpSettings(idle_timeout=idle, dns_idle_timeout=dns_idle)
