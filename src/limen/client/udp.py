"""The client's UDP capture: ``limen client forward --udp`` and SOCKS5 UDP ASSOCIATE.

Each local UDP 5-tuple becomes one UDP flow: one connect-udp stream (RFC 9298) to the edge,
opened on the first datagram and ended after ``idle_timeout`` without traffic (by the
connector, which then finishes the stream). Nothing here queues without bound:

* while a flow's stream is being opened, at most :data:`MAX_PENDING` datagrams wait; more are
  dropped, as a full UDP socket would;
* a forward or an association keeps at most ``max_flows`` flows; datagrams from new 5-tuples
  beyond that are dropped;
* a flow the edge refused is remembered for :data:`REFUSAL_HOLD` seconds, so a chatty local
  program does not turn every datagram into a refused flow.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from limen.errors import LocalProtocolError, RemoteProtocolError
from limen.net.endpoints import Buffer, TransportEndpoint
from limen.net.tasks import spawn
from limen.net.udp import Address, DatagramTunnel, UdpSettings, UdpSocket, bind_udp
from limen.wire.socks5 import (
    ReplyCode,
    Socks5Server,
    UdpAssociateRequested,
    build_udp_datagram,
    parse_udp_datagram,
)

if TYPE_CHECKING:
    from limen.client.tunnel import EdgeSession, FlowRefused

log = logging.getLogger(__name__)

#: Datagrams held per flow while its stream opens (one round trip to the connector).
MAX_PENDING = 32
#: Flows per forward or SOCKS association.
MAX_FLOWS = 1024
#: Seconds a refused flow stays refused before a new datagram tries again.
REFUSAL_HOLD = 2.0

ReportRefusal = Callable[[str, "FlowRefused"], None]


class ClientUdpFlow:
    """One local 5-tuple's UDP flow through the edge."""

    def __init__(
        self,
        session: EdgeSession,
        host: str,
        port: int,
        deliver: Callable[[bytes], object],
        settings: UdpSettings,
        on_refused: ReportRefusal,
        on_end: Callable[[ClientUdpFlow], object],
    ) -> None:
        self.session = session
        self.host = host
        self.port = port
        self.deliver = deliver
        self.settings = settings
        self.on_refused = on_refused
        self.on_end = on_end
        self.pending: list[bytes] = []
        self.tunnel: DatagramTunnel | None = None
        self.refused = False
        self.dropped = 0
        self._closing = False

    def send(self, payload: bytes) -> None:
        """A datagram from the local side."""
        if self.tunnel is not None:
            self.tunnel.send(payload)
        elif self.refused or len(self.pending) >= MAX_PENDING:
            self.dropped += 1
        else:
            self.pending.append(payload)

    async def run(self) -> None:
        from limen.client.tunnel import FlowRefused

        try:
            stream, _response = await self.session.open("udp", self.host, self.port)
        except FlowRefused as exc:
            self.refused = True
            self.pending.clear()
            self.on_refused(f"udp {self.host}:{self.port}", exc)
            # Keep the entry a moment so the next datagrams are dropped, not re-refused.
            await asyncio.sleep(REFUSAL_HOLD)  # a hold period, not synchronisation
            self.on_end(self)
            return
        tunnel = DatagramTunnel(
            stream,
            self.deliver,
            idle_timeout=self.settings.idle_for(self.port),
            max_payload=self.settings.max_payload,
            name=f"udp {self.host}:{self.port}",
        )
        self.tunnel = tunnel
        tunnel.start()
        if self._closing:
            tunnel.close()
        pending, self.pending = self.pending, []
        for payload in pending:
            tunnel.send(payload)
        try:
            await tunnel.done
        finally:
            self.on_end(self)

    def close(self) -> None:
        self._closing = True
        if self.tunnel is not None:
            self.tunnel.close()


class UdpForward:
    """``limen client forward --udp``: datagrams to a local socket go to one private
    ``host:port``; each local source address is its own flow."""

    def __init__(
        self,
        session: EdgeSession,
        host: str,
        port: int,
        *,
        settings: UdpSettings | None = None,
        max_flows: int = MAX_FLOWS,
        on_refused: ReportRefusal | None = None,
    ) -> None:
        self.session = session
        self.host = host
        self.port = port
        self.settings = settings or UdpSettings()
        self.max_flows = max_flows
        self.on_refused = on_refused or _log_refusal
        self.flows: dict[Address, ClientUdpFlow] = {}
        self.sock: UdpSocket | None = None
        #: Datagrams dropped because the flow table was full.
        self.dropped = 0

    async def start(self, listen_host: str, listen_port: int) -> Address:
        """Bind the local socket; its address."""
        self.sock = await bind_udp(listen_host, listen_port)
        self.sock.on_datagram = self._on_datagram
        return self.sock.local_address

    def _on_datagram(self, data: bytes, addr: Address) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            if len(self.flows) >= self.max_flows:
                self.dropped += 1
                return
            sock = self.sock
            assert sock is not None  # datagrams arrive only once bound

            def deliver(payload: bytes) -> None:
                sock.send(payload, addr)

            flow = ClientUdpFlow(
                self.session,
                self.host,
                self.port,
                deliver,
                self.settings,
                self.on_refused,
                lambda f: self._forget(addr, f),
            )
            self.flows[addr] = flow
            spawn(flow.run(), name=f"udp forward {addr[0]}:{addr[1]} to {self.host}:{self.port}")
        flow.send(data)

    def _forget(self, addr: Address, flow: ClientUdpFlow) -> None:
        if self.flows.get(addr) is flow:
            del self.flows[addr]

    def close(self) -> None:
        for flow in list(self.flows.values()):
            flow.close()
        if self.sock is not None:
            self.sock.close()


def _log_refusal(target: str, exc: FlowRefused) -> None:
    log.warning("flow to %s refused: %s (%s)", target, exc.message, exc.code)


async def serve_udp_forward(
    session: EdgeSession,
    target_host: str,
    target_port: int,
    listen_host: str,
    listen_port: int,
    *,
    settings: UdpSettings | None = None,
    on_refused: ReportRefusal | None = None,
) -> UdpForward:
    """Start a UDP forward; ``forward.sock.local_address`` is where it listens."""
    forward = UdpForward(
        session, target_host, target_port, settings=settings, on_refused=on_refused
    )
    await forward.start(listen_host, listen_port)
    return forward


class _ControlWatch:
    """The SOCKS TCP connection of a UDP association: when it ends, so does the association
    (RFC 1928 §7). Anything the client sends on it is ignored."""

    def __init__(self, done: asyncio.Event) -> None:
        self.done = done

    def on_data(self, data: Buffer) -> None:
        pass

    def on_eof(self) -> None:
        self.done.set()

    def on_closed(self, error: BaseException | None) -> None:
        self.done.set()

    def on_drained(self) -> None:
        pass


async def udp_associate(
    session: EdgeSession,
    control: TransportEndpoint,
    codec: Socks5Server,
    request: UdpAssociateRequested,
    on_refused: ReportRefusal | None = None,
    settings: UdpSettings | None = None,
) -> None:
    """Serve one SOCKS5 UDP ASSOCIATE: a relay socket beside the TCP connection, one flow per
    destination, until the TCP connection ends."""
    transport = control.transport
    if transport is None:
        return
    local_ip = str(transport.get_extra_info("sockname")[0])
    client_ip = control.peer()[0]
    try:
        sock = await bind_udp(local_ip, 0)
    except OSError as exc:
        log.warning("socks: cannot open a UDP relay socket: %s", exc)
        codec.reject(ReplyCode.GENERAL_FAILURE)
        control.write(codec.data_to_send())
        control.close()
        return
    codec.accept(local_ip, int(sock.local_address[1]))
    control.write(codec.data_to_send())
    flows: dict[tuple[str, int], ClientUdpFlow] = {}
    udp_settings = settings or UdpSettings()
    report = on_refused or _log_refusal
    expected_port = request.port
    dropped = 0

    def on_datagram(data: bytes, addr: Address) -> None:
        nonlocal dropped
        # Only the client that asked may use the relay (RFC 1928 §7), from the port it named.
        if addr[0] != client_ip or (expected_port and addr[1] != expected_port):
            dropped += 1
            return
        try:
            host, port, payload = parse_udp_datagram(data)
        except RemoteProtocolError:
            dropped += 1  # malformed or fragmented: §7 says drop
            return
        key = (host, port)
        flow = flows.get(key)
        if flow is None:
            if len(flows) >= MAX_FLOWS:
                dropped += 1
                return

            def deliver(answer: bytes) -> None:
                try:
                    sock.send(build_udp_datagram(host, port, answer), addr)
                except LocalProtocolError:
                    pass  # too large with the SOCKS header: dropped, as UDP would

            flow = ClientUdpFlow(
                session,
                host,
                port,
                deliver,
                udp_settings,
                report,
                lambda f: flows.pop(key, None) if flows.get(key) is f else None,
            )
            flows[key] = flow
            spawn(flow.run(), name=f"socks udp {addr[0]}:{addr[1]} to {host}:{port}")
        flow.send(payload)

    sock.on_datagram = on_datagram
    ended = asyncio.Event()
    control.attach(_ControlWatch(ended))
    try:
        await ended.wait()
    finally:
        for flow in list(flows.values()):
            flow.close()
        sock.close()
        control.close()
        if dropped:
            log.info("socks udp association from %s dropped %d datagrams", client_ip, dropped)
