"""The asyncio shell around :class:`limen.wire.yamux.YamuxSession`: one TLS connection
carrying many streams.

The shell only moves bytes: it feeds what the transport reads into the session, dispatches
the session's events to the streams, and writes what the session queued. Flow control is the
session's: a stream whose reader is paused stops returning window to the peer, so the peer
stops sending; nothing here buffers without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import cast

from limen.errors import LocalProtocolError, RemoteProtocolError
from limen.net.endpoints import Buffer, Endpoint, Receiver
from limen.wire import yamux
from limen.wire.connect import FlowResponse, FlowResponseReader

log = logging.getLogger(__name__)

#: How often an idle connection is pinged, and how long the peer may show no sign of life
#: before the connection is declared dead and closed. Taking a connector out of rotation
#: does not wait for this (the edge's health checks do it within the failover bound); this
#: only ends links that are really gone, so it allows a loaded peer or a congested link a
#: few seconds — a tighter value cut healthy links during bulk transfers on a busy machine.
KEEPALIVE_INTERVAL = 1.0
KEEPALIVE_TIMEOUT = 5.0

#: Unsent bytes the kernel may hold for a mux connection (TCP_NOTSENT_LOWAT). Measured
#: (docs/performance.md): an interactive flow's round trip under four bulk flows through
#: the same connections fell from ~240 to ~90 ms (p50) for ~5% of single-flow throughput.
NOTSENT_LOWAT = 128 * 1024

#: The rate a connection's receive budget (:data:`limen.wire.yamux.DEFAULT_RECEIVE_BUDGET`)
#: must sustain over the connection's round trip: about what one Limen connection moves on
#: a fast core (5 Gbit/s). Up to ~6.7 ms of round trip the default budget covers it; a
#: connection across a WAN gets ``rate x minimum round trip`` so bulk flows still fill it.
BUDGET_RATE = 625_000_000
#: No budget beyond this, whatever the round trip claims.
MAX_RECEIVE_BUDGET = 64 * 1024 * 1024

_TCP_INFO_MIN_RTT_OFFSET = 148  # struct tcp_info.tcpi_min_rtt (u32, microseconds), Linux 4.6+
_TCP_INFO_NO_SAMPLE = 0xFFFFFFFF


def tcp_min_rtt(sock: socket.socket) -> float | None:
    """The kernel's minimum round trip of a TCP socket in seconds (the path's base delay,
    without queueing), or None where unknown (no sample yet, not Linux, not TCP)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCP_INFO_MIN_RTT_OFFSET + 4:
        return None
    micros = int(struct.unpack_from("=I", info, _TCP_INFO_MIN_RTT_OFFSET)[0])
    if micros in (0, _TCP_INFO_NO_SAMPLE):
        return None
    return micros / 1e6


def receive_budget_for(min_rtt: float | None) -> int:
    """The receive budget for a connection whose minimum round trip is ``min_rtt``."""
    if min_rtt is None:
        return yamux.DEFAULT_RECEIVE_BUDGET
    wanted = int(min_rtt * BUDGET_RATE)
    return min(MAX_RECEIVE_BUDGET, max(yamux.DEFAULT_RECEIVE_BUDGET, wanted))


#: How much a local application may send before its flow is accepted (see
#: :class:`EarlyData`); past it the local socket waits for the answer.
EARLY_DATA_LIMIT = 64 * 1024


class MuxStream:
    """One yamux stream as an :class:`~limen.net.endpoints.Endpoint`.

    While no receiver is attached, or reading is paused, what arrives is held (in order,
    EOF after the data) and its window is not returned, so the peer stops once the window
    is spent; it is delivered when a receiver is attached or reading resumes. A paused
    receiver therefore never gets data it said it cannot take."""

    __slots__ = (
        "_backlog",
        "_backlog_eof",
        "_closed",
        "_deferred",
        "_deferred_timer",
        "_eof_pending",
        "_held",
        "_paused",
        "_pending",
        "conn",
        "receiver",
        "stream_id",
        "tag",
    )

    def __init__(self, conn: MuxConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.receiver: Receiver | None = None
        self._pending: memoryview | None = None
        self._eof_pending = False
        self._paused = False
        #: Bytes received and not yet acknowledged (held, or taken while paused).
        self._held = 0
        self._backlog: list[bytes] = []
        self._backlog_eof = False
        self._closed = False
        # A head waiting to go out with the next write (see write_deferred).
        self._deferred: bytes | None = None
        self._deferred_timer: asyncio.TimerHandle | None = None
        #: Free slot for the owner (e.g. the flow this stream carries).
        self.tag: object = None

    # events from the connection ------------------------------------------------------------

    def _on_data(self, data: Buffer) -> None:
        receiver = self.receiver
        if receiver is None or self._paused or self._backlog:
            self._backlog.append(bytes(data))
            self._held += len(data)
            return
        receiver.on_data(data)
        if self._paused:
            self._held += len(data)
        else:
            self.conn.session.acknowledge(self.stream_id, len(data), self.conn.now())

    def _on_eof(self) -> None:
        if self.receiver is None or self._paused or self._backlog:
            self._backlog_eof = True
        else:
            self.receiver.on_eof()

    def _on_closed(self, error: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_deferred()
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.on_closed(error)

    def _on_window(self) -> None:
        pending = self._pending
        if pending is None:
            return
        try:
            sent = self.conn.session.send_data(self.stream_id, pending)
        except LocalProtocolError:
            # A later frame of the same read already closed or reset the stream.
            self._pending = None
            return
        if sent < len(pending):
            self._pending = pending[sent:]
            return
        self._pending = None
        if self._eof_pending:
            self._eof_pending = False
            self.conn.session.close_stream(self.stream_id)
        if self.receiver is not None and not self.conn.write_paused:
            self.receiver.on_drained()

    # Endpoint ------------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        return self._pending is not None or self.conn.write_paused

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def held_bytes(self) -> int:
        """Bytes received but not yet delivered to a receiver (no receiver, or paused)."""
        return sum(len(chunk) for chunk in self._backlog)

    def attach(self, receiver: Receiver) -> None:
        """Deliver to ``receiver`` from now on (what was held first); reading resumes."""
        self.receiver = receiver
        self._paused = False
        if self._closed:
            self.receiver = None
            receiver.on_closed(None)
            return
        self._deliver_held()

    def _deliver_held(self) -> None:
        """Hand what was held to the receiver until it pauses; then return the window of
        what it took, once nothing is left held."""
        receiver = self.receiver
        backlog = self._backlog
        while backlog:
            if self.receiver is not receiver or receiver is None or self._paused:
                return
            receiver.on_data(backlog.pop(0))
        if self.receiver is not receiver or receiver is None or self._paused:
            return
        if self._backlog_eof:
            self._backlog_eof = False
            receiver.on_eof()
        if self._held and self.receiver is receiver and not self._paused:
            held, self._held = self._held, 0
            self.conn.session.acknowledge(self.stream_id, held, self.conn.now())
            self.conn.flush()

    def detach(self, replay: bytes = b"") -> None:
        """Stop delivering; keep what arrives (and ``replay`` first) for the next
        :meth:`attach`."""
        self.receiver = None
        if replay:
            self._backlog.insert(0, replay)

    def write_deferred(self, head: bytes, delay: float) -> None:
        """Send ``head`` together with the next write, EOF or close (one frame flush, so one
        TLS record), or on its own after ``delay`` seconds, whichever comes first. A flow's
        answer travels with the first bytes that follow it (docs/protocol.md §4): a record
        less to encrypt, send and decrypt at every hop. ``delay=0`` waits for the rest of
        this turn of the event loop only."""
        if self._closed:
            return
        self._deferred = head
        self._deferred_timer = self.conn.loop.call_later(delay, self._flush_deferred)

    def _drop_deferred(self) -> None:
        self._deferred = None
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()
            self._deferred_timer = None

    def _take_deferred(self) -> None:
        # Queue the deferred head in the session, unflushed: the caller's write follows it.
        head = self._deferred
        self._drop_deferred()
        if head is not None and not self._closed:
            with contextlib.suppress(LocalProtocolError):
                self.conn.session.send_data(self.stream_id, head)

    def _flush_deferred(self) -> None:
        self._deferred_timer = None
        if self._deferred is not None:
            self._take_deferred()
            self.conn.flush()

    def write(self, data: Buffer) -> None:
        if self._closed:
            return
        if self._deferred is not None:
            self._take_deferred()
        if self._pending is not None:
            # The caller ignored ``full``; keep the order, at the cost of one copy (the
            # relay never does: it pauses its source, which then holds what arrives).
            self._pending = memoryview(bytes(self._pending) + bytes(data))
            return
        try:
            sent = self.conn.session.send_data(self.stream_id, data)
        except LocalProtocolError:
            return  # stream already half-closed or reset
        if sent < len(data):
            self._pending = memoryview(data)[sent:]
        self.conn.flush()

    def write_eof(self) -> None:
        if self._closed:
            return
        if self._deferred is not None:
            self._take_deferred()
        if self._pending is not None:
            self._eof_pending = True
            return
        self.conn.session.close_stream(self.stream_id)
        self.conn.flush()
        self._forget_if_done()

    def close(self) -> None:
        """Graceful end: FIN (after pending data)."""
        self.write_eof()

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_deferred()
        self.receiver = None
        self.conn.session.reset_stream(self.stream_id)
        self.conn.streams.pop(self.stream_id, None)
        self.conn.flush()

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self.receiver is not None:
            self._deliver_held()

    def mark_background(self) -> None:
        """This stream carries periodic control traffic: what it receives does not make the
        connection's bulk streams give way (:meth:`YamuxSession.set_background`)."""
        self.conn.session.set_background(self.stream_id)

    def _forget_if_done(self) -> None:
        if self.conn.session.stream_state(self.stream_id) is yamux.StreamState.CLOSED:
            self.conn.streams.pop(self.stream_id, None)


class MuxConnection(asyncio.Protocol):
    """A yamux session over one (TLS) transport."""

    def __init__(
        self,
        *,
        is_client: bool,
        on_stream: Callable[[MuxStream], None] | None = None,
        name: str = "mux",
        max_streams: int = yamux.DEFAULT_MAX_STREAMS,
    ) -> None:
        self.session = yamux.YamuxSession(is_client=is_client, max_streams=max_streams)
        self.streams: dict[int, MuxStream] = {}
        self.on_stream = on_stream
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[BaseException | None] = self.loop.create_future()
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self._last_rx = 0.0
        self._last_progress = 0.0
        self._tcp_sock: socket.socket | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._ping_sent_at = 0.0
        self._ping_seq = 0
        #: Round-trip time of the last answered keepalive ping (seconds).
        self.rtt = 0.0
        self.on_close: Callable[[MuxConnection], None] | None = None

    def now(self) -> float:
        return self.loop.time()

    # asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._last_rx = self.now()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Window updates and pings are tiny; Nagle would hold them behind unacknowledged
            # data (and the peer's delayed ACK), stalling every stream on the connection.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Every stream's frames share this socket's send queue, first in first out: a
            # bulk stream that fills megabytes of it makes an interactive stream's frame
            # wait behind them. Keeping little unsent data in the kernel leaves the rest
            # with the streams (their windows and pauses), where no one queues behind it.
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
            self._tcp_sock = sock
            self.update_receive_budget()
        if not self.ready.done():
            self.ready.set_result(None)

    def update_receive_budget(self) -> None:
        """Size the bulk streams' receive budget to this connection's round trip (the
        handshake gives the kernel its first samples; keepalive ticks refresh it)."""
        if self._tcp_sock is not None:
            budget = receive_budget_for(tcp_min_rtt(self._tcp_sock))
            self.session.receive_budget = budget
            self.session.max_window = max(yamux.DEFAULT_MAX_WINDOW, budget)

    def data_received(self, data: bytes) -> None:
        self._last_rx = self.now()
        try:
            events = self.session.receive_data(data)
        except RemoteProtocolError as exc:
            log.warning("%s: peer broke the mux protocol (%s): %s", self.name, exc.code, exc)
            self.session.protocol_error_goaway()
            self.flush()
            self.close(exc)
            return
        streams = self.streams
        for event in events:
            if type(event) is yamux.DataReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_data(event.data)
            elif type(event) is yamux.SendWindowOpened:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_window()
            elif type(event) is yamux.StreamOpened:
                self._accept(event.stream_id)
            elif type(event) is yamux.StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_eof()
                    stream._forget_if_done()
            elif type(event) is yamux.StreamReset:
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._on_closed(ConnectionResetError("stream reset by peer"))
            elif type(event) is yamux.PongReceived:
                if self._ping_sent_at:
                    self.rtt = self.now() - self._ping_sent_at
                    self._ping_sent_at = 0.0
            elif type(event) is yamux.GoAwayReceived:
                log.info("%s: peer is going away (code %d)", self.name, event.code)
        self.flush()

    def _accept(self, stream_id: int) -> None:
        stream = MuxStream(self, stream_id)
        self.streams[stream_id] = stream
        if self.on_stream is None:
            stream.abort()
            return
        try:
            self.on_stream(stream)
        except Exception:
            log.exception("%s: stream handler failed", self.name)
            stream.abort()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            if stream.receiver is not None and stream._pending is None:
                stream.receiver.on_drained()

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        error: BaseException = exc or ConnectionResetError(f"{self.name}: connection closed")
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream._on_closed(error)
        if not self.ready.done():
            self.ready.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(exc)
        if self.on_close is not None:
            self.on_close(self)

    # commands ------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return (
            self.transport is not None
            and not self.closed.done()
            and not self.session.go_away_received
            and not self.session.go_away_sent
        )

    def flush(self) -> None:
        if self.session.has_output() and self.transport is not None:
            self.transport.write(self.session.data_to_send())

    def open_stream(self, *, flush: bool = True) -> MuxStream:
        """Open a stream. ``flush=False`` leaves the SYN queued for the caller's first write,
        so SYN and flow head leave in one TLS record."""
        if not self.is_open:
            raise ConnectionError(f"{self.name}: connection is not open")
        stream_id = self.session.open_stream()
        stream = MuxStream(self, stream_id)
        self.streams[stream_id] = stream
        if flush:
            self.flush()
        return stream

    def go_away(self) -> None:
        self.session.go_away()
        self.flush()

    def close(self, error: BaseException | None = None) -> None:
        if self.transport is not None:
            self.transport.close()

    def start_keepalive(
        self, interval: float = KEEPALIVE_INTERVAL, timeout: float = KEEPALIVE_TIMEOUT
    ) -> None:
        """Ping when idle; close when the peer shows no sign of life for ``timeout``.

        Sign of life: bytes received, or our send buffer draining (the peer's TCP stack is
        taking our data). The second matters when we send in bulk: a pong queued behind
        megabytes of data can take longer than ``timeout`` to come back, yet the peer is
        plainly alive while it drains them. A frozen or cut-off peer stops both.
        """
        last_buffered = 0

        def tick() -> None:
            nonlocal last_buffered
            if self.closed.done() or self.transport is None:
                return
            now = self.now()
            self.update_receive_budget()
            buffered = self.transport.get_write_buffer_size()
            if buffered < last_buffered or (buffered and not last_buffered):
                self._last_progress = now
            last_buffered = buffered
            alive_at = max(self._last_rx, self._last_progress)
            if now - alive_at > timeout:
                log.warning("%s: peer silent for %.1fs, closing", self.name, now - alive_at)
                self.transport.abort()
                return
            if now - self._last_rx >= interval and not self._ping_sent_at:
                self._ping_seq = (self._ping_seq + 1) & 0xFFFFFFFF
                self._ping_sent_at = now
                self.session.ping(self._ping_seq)
                self.flush()
            elif self._ping_sent_at and now - self._ping_sent_at > timeout:
                self._ping_sent_at = 0.0
            self._keepalive = self.loop.call_later(interval / 2, tick)

        self._keepalive = self.loop.call_later(interval / 2, tick)


class _HeadCollector:
    """Receives a flow's response head; then hands the stream back."""

    def __init__(self, stream: MuxStream, protocol: str) -> None:
        self.stream = stream
        self.reader = FlowResponseReader(protocol)
        self.result: asyncio.Future[FlowResponse] = stream.conn.loop.create_future()

    def on_data(self, data: Buffer) -> None:
        if self.result.done():
            return
        try:
            response = self.reader.feed(data)
        except RemoteProtocolError as exc:
            self.result.set_exception(exc)
            return
        if response is not None:
            self.stream.detach(self.reader.trailing)
            self.result.set_result(response)

    def on_eof(self) -> None:
        if not self.result.done():
            self.result.set_exception(
                RemoteProtocolError("stream ended before a response", code="bad_response")
            )

    def on_closed(self, error: BaseException | None) -> None:
        if not self.result.done():
            self.result.set_exception(
                ConnectionResetError(f"stream closed before a response: {error!r}")
            )

    def on_drained(self) -> None:
        pass


class EarlyData:
    """What a local application sends while its flow opens.

    It goes out on the opening stream at once, right behind the flow head, instead of a
    round trip later when the answer is in: the edge and the connector hold it until the
    target is dialled, so a request reaches the target with the dial (docs/protocol.md,
    "early data"). It is also kept until the flow is accepted, because a flow retried on a
    new stream (a refreshed token, a new edge connection) must send it again; past
    ``limit`` bytes the local side is paused until then, so a refused flow costs at most
    that. EOF and a closed socket are not acted on here: the endpoint reports them again
    to the relay that takes over. The client uses it for what applications send, the edge
    for what the client sends while the connector dials (``initial``: what came with the
    flow head).
    """

    __slots__ = ("data", "limit", "local", "stream")

    def __init__(
        self, local: Endpoint, initial: Buffer = b"", limit: int = EARLY_DATA_LIMIT
    ) -> None:
        self.local = local
        self.limit = limit
        self.data = bytearray(initial)
        self.stream: MuxStream | None = None
        local.attach(self)

    def on_data(self, data: Buffer) -> None:
        self.data += data
        if self.stream is not None:
            self.stream.write(data)
        if len(self.data) >= self.limit:
            self.local.pause_reading()

    def on_eof(self) -> None:
        pass

    def on_closed(self, error: BaseException | None) -> None:
        pass

    def on_drained(self) -> None:
        pass


async def open_flow(
    conn: MuxConnection,
    head: bytes,
    protocol: str = "tcp",
    deadline: float = 10.0,
    early: EarlyData | None = None,
) -> tuple[MuxStream, FlowResponse]:
    """Open a stream, send a flow head (and ``early`` data: what the local side sent so far
    and sends until the answer), and wait for the response head. On a refusal the stream
    is already finished; the caller reads ``response.error()``."""
    stream = conn.open_stream(flush=False)
    collector = _HeadCollector(stream, protocol)
    stream.attach(collector)
    stream.write(head + early.data if early is not None and early.data else head)
    if early is not None:
        early.stream = stream
    try:
        async with asyncio.timeout(deadline):
            response = await collector.result
    except BaseException:
        stream.abort()
        raise
    finally:
        if early is not None:
            early.stream = None
    if not response.ok:
        stream.abort()
    return stream, response
