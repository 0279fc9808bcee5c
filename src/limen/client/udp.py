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
import contextlib
import ipaddress
import logging
import socket
import struct
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
    from limen.client.forwarding import ForwardingProfile
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


#: Linux socket options (linux/in.h) the socket module does not name.
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IP_ORIGDSTADDR = 20
#: Datagrams read per wake-up before yielding to the loop.
READ_BATCH = 64
_MAX_DATAGRAM = 65535


def _origdst(ancillary: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            # struct sockaddr_in: family, port (network order), address
            port = struct.unpack_from("!H", data, 2)[0]
            return str(ipaddress.IPv4Address(data[4:8])), port
    return None


class TransparentUdp:
    """``limen client up``'s UDP capture: datagrams the packet filter hands over with
    ``tproxy`` (IPv4), one flow per (source, original destination); answers are sent from the
    original destination's address (``IP_TRANSPARENT``) so the application sees its peer."""

    def __init__(
        self,
        session: EdgeSession,
        *,
        profile: Callable[[], ForwardingProfile],
        tunnel_allowed: Callable[[str, int], bool],
        mark: int,
        settings: UdpSettings | None = None,
        max_flows: int = MAX_FLOWS,
    ) -> None:
        self.session = session
        self.profile = profile
        #: Whether a flow to (host, port) goes through the edge now (the daemon's decision).
        self.tunnel_allowed = tunnel_allowed
        self.mark = mark
        self.settings = settings or UdpSettings()
        self.max_flows = max_flows
        self.sock: socket.socket | None = None
        self.flows: dict[tuple[Address, Address], ClientUdpFlow] = {}
        self._replies: dict[tuple[Address, Address], socket.socket] = {}
        self.dropped = 0
        self.port = 0

    def start(self, port: int = 0) -> int:
        """Bind the tproxy socket on 127.0.0.1; its port."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        self.sock = sock
        self.port = sock.getsockname()[1]
        return self.port

    def close(self) -> None:
        for flow in list(self.flows.values()):
            flow.close()
        for reply in self._replies.values():
            reply.close()
        self._replies.clear()
        if self.sock is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closing already
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for _ in range(READ_BATCH):
            try:
                data, ancillary, _flags, src = sock.recvmsg(_MAX_DATAGRAM, socket.CMSG_SPACE(16))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.info("transparent udp: %s", exc)
                return
            dst = _origdst(ancillary)
            if dst is None:
                self.dropped += 1  # sent to the listener directly: nothing to carry
                continue
            self._on_datagram(data, src, dst)

    def _on_datagram(self, data: bytes, src: Address, dst: tuple[str, int]) -> None:
        key = (src, dst)
        flow = self.flows.get(key)
        if flow is None:
            host, port = dst
            if len(self.flows) >= self.max_flows or not self.tunnel_allowed(host, port):
                # Not ours any more (a profile change or the edge lost since the packet
                # filter marked it): drop, as the network would.
                self.dropped += 1
                return
            try:
                reply = self._reply_socket(dst)
            except OSError as exc:
                log.warning("transparent udp: cannot answer from %s:%s: %s", host, port, exc)
                self.dropped += 1
                return
            self._replies[key] = reply

            def deliver(payload: bytes) -> None:
                with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
                    reply.sendto(payload, src)  # a full buffer drops, as UDP does

            flow = ClientUdpFlow(
                self.session, host, port, deliver, self.settings, _log_refusal,
                lambda f: self._forget(key, f),
            )  # fmt: skip
            self.flows[key] = flow
            spawn(flow.run(), name=f"transparent udp {src[0]}:{src[1]} to {host}:{port}")
        flow.send(data)

    def _reply_socket(self, dst: tuple[str, int]) -> socket.socket:
        # Bound to the original destination (not a local address: IP_TRANSPARENT) and marked
        # so the packet filter does not capture the answer again.
        reply = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            reply.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            reply.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            reply.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            reply.bind(dst)
            reply.setblocking(False)
        except OSError:
            reply.close()
            raise
        return reply

    def _forget(self, key: tuple[Address, Address], flow: ClientUdpFlow) -> None:
        if self.flows.get(key) is flow:
            del self.flows[key]
            reply = self._replies.pop(key, None)
            if reply is not None:
                reply.close()


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
