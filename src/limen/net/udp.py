"""UDP sockets and the datagram tunnel: one connect-udp stream (RFC 9298) joined to UDP.

* :class:`UdpSocket` is an asyncio datagram endpoint (connected to one target, or bound and
  talking to many local peers) that hands each datagram to a callback and refuses (drops) a
  send while the kernel's buffer is full: UDP has no backpressure, and queueing would only
  add delay and memory.
* :class:`DatagramTunnel` is one UDP flow's stream: DATAGRAM capsules read from the stream are
  delivered as payloads; payloads sent are framed as DATAGRAM capsules, or dropped (and
  counted) when the stream's send window is exhausted. It ends on idle, on the stream's end,
  or on a protocol error (an oversized or malformed capsule), and says why in ``done``.

Rules (RFC 9297 §3.2, RFC 9298 §5): unknown capsule types are skipped; DATAGRAM capsules with
a context id other than 0 are dropped (no extension is negotiated); a payload over
``max_payload`` (65,527 bytes: the largest UDP payload, 65,535 minus the 8-byte UDP header)
ends the flow with ``capsule_too_large``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from limen.errors import LocalProtocolError, RemoteProtocolError
from limen.net.endpoints import Buffer, Endpoint
from limen.wire.capsule import DATAGRAM, CapsuleDecoder, decode_datagram, encode_datagram

log = logging.getLogger(__name__)

#: The largest UDP payload (65,535 minus the 8-byte UDP header).
MAX_UDP_PAYLOAD = 65_527
#: A UDP socket's send buffer above which we drop rather than queue (the kernel holds more).
MAX_UDP_SEND_BUFFER = 256 * 1024

Address = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class UdpSettings:
    """Limits of UDP flows (connector and client)."""

    #: A flow with no datagram either way for this long ends.
    idle_timeout: float = 60.0
    #: Flows to port 53 are DNS exchanges: they end after this much idle time.
    dns_idle_timeout: float = 5.0
    max_payload: int = MAX_UDP_PAYLOAD

    def idle_for(self, port: int) -> float:
        """The idle timeout of a flow to ``port``."""
        return min(self.dns_idle_timeout, self.idle_timeout) if port == 53 else self.idle_timeout


class UdpSocket(asyncio.DatagramProtocol):
    """A UDP socket as a callback-driven endpoint."""

    def __init__(self, on_datagram: Callable[[bytes, Address], object] | None = None) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None
        self.dropped = 0
        self._paused = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self.on_datagram is not None:
            self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable, ...) on a UDP socket: the flow goes on, as UDP would.
        log.debug("udp socket error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def send(self, data: bytes, addr: Address | None = None) -> bool:
        """Send one datagram; False (dropped, counted) when the socket is closed or full."""
        transport = self.transport
        if (
            transport is None
            or transport.is_closing()
            or self._paused
            or _buffered(transport) > MAX_UDP_SEND_BUFFER
        ):
            self.dropped += 1
            return False
        try:
            if addr is None:
                transport.sendto(data)
            else:
                transport.sendto(data, addr)
        except OSError:
            self.dropped += 1
            return False
        return True

    @property
    def local_address(self) -> Address:
        if self.transport is None:
            return ("", 0)
        return tuple(self.transport.get_extra_info("sockname"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _buffered(transport: asyncio.DatagramTransport) -> int:
    # Selector and uvloop datagram transports both have it; the ABC does not declare it.
    size = getattr(transport, "get_write_buffer_size", None)
    return int(size()) if size is not None else 0


async def connect_udp(host: str, port: int, deadline: float) -> UdpSocket:
    """A UDP socket connected to ``host:port`` (resolved here, on this side). Raises
    ``socket.gaierror`` when the name does not resolve, ``TimeoutError``, or ``OSError``."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(deadline):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise socket.gaierror(socket.EAI_NONAME, "no address")
    family, _type, _proto, _canon, addr = infos[0]
    sock = UdpSocket()
    remote = cast(tuple[str, int], addr[:2])
    await loop.create_datagram_endpoint(lambda: sock, remote_addr=remote, family=family)
    return sock


async def bind_udp(host: str, port: int) -> UdpSocket:
    """A UDP socket bound to ``host:port`` (0: any free port)."""
    loop = asyncio.get_running_loop()
    sock = UdpSocket()
    await loop.create_datagram_endpoint(lambda: sock, local_addr=(host, port))
    return sock


class DatagramTunnel:
    """A connect-udp stream carrying one UDP flow's datagrams (see the module docstring)."""

    def __init__(
        self,
        stream: Endpoint,
        deliver: Callable[[bytes], object],
        *,
        idle_timeout: float,
        max_payload: int = MAX_UDP_PAYLOAD,
        name: str = "udp flow",
    ) -> None:
        self.stream = stream
        self.deliver = deliver
        self.name = name
        self.max_payload = max_payload
        self.idle_timeout = idle_timeout
        self.decoder = CapsuleDecoder()
        self.datagrams_in = self.datagrams_out = 0
        self.bytes_in = self.bytes_out = 0
        #: Datagrams dropped because the stream's window was exhausted.
        self.dropped = 0
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._last = loop.time()
        self._timer: asyncio.TimerHandle | None = None
        #: Why the flow ended: "idle", "closed" (the stream ended), "local", or an error code.
        self.done: asyncio.Future[str] = loop.create_future()

    def start(self, initial: bytes = b"") -> None:
        """Deliver ``initial`` (capsule bytes that came with the head), then read the stream."""
        self._arm()
        if initial:
            self.on_data(initial)
        if not self.done.done():
            self.stream.attach(self)

    # sending ---------------------------------------------------------------------------------

    def send(self, payload: bytes) -> bool:
        """Frame ``payload`` as a DATAGRAM capsule; False (dropped, counted) when the stream
        is full, the payload is too large, or the flow is over."""
        if self.done.done() or len(payload) > self.max_payload:
            self.dropped += 1
            return False
        if self.stream.full:
            self.dropped += 1
            return False
        try:
            self.stream.write(encode_datagram(payload))
        except LocalProtocolError:
            self.dropped += 1
            return False
        self.datagrams_out += 1
        self.bytes_out += len(payload)
        self._last = self._loop.time()
        return True

    def close(self, reason: str = "local") -> None:
        """End the flow: FIN the stream (what it holds is still sent)."""
        if self._finish(reason):
            self.stream.close()

    def abort(self, reason: str) -> None:
        """End the flow at once: reset the stream."""
        if self._finish(reason):
            self.stream.abort()

    # Receiver --------------------------------------------------------------------------------

    def on_data(self, data: Buffer) -> None:
        if self.done.done():
            return
        try:
            capsules = self.decoder.feed(bytes(data))
            for capsule in capsules:
                if capsule.type != DATAGRAM:
                    continue  # RFC 9297 §3.2: skip unknown capsules
                context_id, payload = decode_datagram(capsule)
                if context_id != 0:
                    continue  # RFC 9298 §4: no extension negotiated
                if len(payload) > self.max_payload:
                    raise RemoteProtocolError(
                        f"datagram of {len(payload)} bytes over {self.max_payload}",
                        code="capsule_too_large",
                    )
                self.datagrams_in += 1
                self.bytes_in += len(payload)
                self._last = self._loop.time()
                self.deliver(payload)
                if self.done.done():
                    return
        except RemoteProtocolError as exc:
            log.info("%s: bad capsule stream (%s): %s", self.name, exc.code, exc)
            self.abort(exc.code)

    def on_eof(self) -> None:
        try:
            self.decoder.feed_eof()
        except RemoteProtocolError as exc:
            self.abort(exc.code)
            return
        self.close("closed")

    def on_closed(self, error: BaseException | None) -> None:
        self._finish("closed")

    def on_drained(self) -> None:
        pass

    # internals -------------------------------------------------------------------------------

    def _arm(self) -> None:
        delay = max(self._last + self.idle_timeout - self._loop.time(), 0.01)
        self._timer = self._loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        if self.done.done():
            return
        if self._loop.time() - self._last >= self.idle_timeout:
            self.close("idle")
        else:
            self._arm()

    def _finish(self, reason: str) -> bool:
        if self.done.done():
            return False
        if self._timer is not None:
            self._timer.cancel()
        self.done.set_result(reason)
        return True
