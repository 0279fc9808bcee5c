"""Byte endpoints and the receiver interface the relay joins them with.

An *endpoint* is one side of a flow that can be written to and read from: a TCP or TLS
socket (:class:`TransportEndpoint`) or a yamux stream (:class:`limen.net.mux.MuxStream`).
An endpoint pushes what happens on it to its *receiver*. Until a receiver is attached, an
endpoint holds what it reads (bounded: a socket stops reading, a stream stops granting
window) and replays it on :meth:`attach`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Protocol, cast

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview


class Receiver(Protocol):
    def on_data(self, data: Buffer) -> None:
        """Bytes read from the endpoint."""

    def on_eof(self) -> None:
        """The endpoint's peer will send nothing more (half-close)."""

    def on_closed(self, error: BaseException | None) -> None:
        """The endpoint is gone (reset, connection lost, closed)."""

    def on_drained(self) -> None:
        """The endpoint's write side has room again after reporting ``full``."""


class Endpoint(Protocol):
    @property
    def full(self) -> bool: ...

    def attach(self, receiver: Receiver) -> None: ...

    def write(self, data: Buffer) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class TransportEndpoint(asyncio.Protocol):
    """A TCP or TLS socket as an endpoint. Starts with reading paused until a receiver is
    attached, so nothing is read that nobody will take."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.receiver: Receiver | None = None
        self._full = False
        self._paused = False
        self._closed = False
        self._eof = False
        self._error: BaseException | None = None
        self._backlog: list[bytes] = []
        self._tls = False
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._tls = transport.get_extra_info("ssl_object") is not None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.receiver is None:
            self.transport.pause_reading()
            self._paused = True
        if not self.connected.done():
            self.connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.receiver is not None:
            self.receiver.on_data(data)
            return
        # No receiver yet. Reading was paused in connection_made, but an event loop may
        # deliver one read before the pause takes effect (uvloop does): keep it for attach().
        self._backlog.append(data)
        if self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        if self.receiver is not None:
            self.receiver.on_eof()
        # Keep a TCP socket open for the other direction (half-close); TLS has none.
        return not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._error = exc
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("connection closed"))
        if self.receiver is not None:
            receiver, self.receiver = self.receiver, None
            receiver.on_closed(exc)

    def pause_writing(self) -> None:
        self._full = True

    def resume_writing(self) -> None:
        self._full = False
        if self.receiver is not None:
            self.receiver.on_drained()

    # Endpoint ------------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        return self._full

    @property
    def closed(self) -> bool:
        return self._closed

    def attach(self, receiver: Receiver) -> None:
        self.receiver = receiver
        backlog, self._backlog = self._backlog, []
        for chunk in backlog:
            receiver.on_data(chunk)
            if self.receiver is not receiver:
                return
        if self._closed:
            self.receiver = None
            receiver.on_closed(self._error)
            return
        if self._eof:
            receiver.on_eof()
        elif self._paused:
            self.resume_reading()

    def write(self, data: Buffer) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is None or self._closed:
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            # TLS has no half-close: closing after the buffered data is the best we can do.
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self._paused and not self._closed:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._paused and not self._closed:
            self._paused = False
            self.transport.resume_reading()

    def peer(self) -> tuple[str, int]:
        if self.transport is None:
            return ("", 0)
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            return str(peer[0]), int(peer[1])
        return ("", 0)
