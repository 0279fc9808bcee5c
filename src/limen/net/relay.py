"""The relay: two endpoints joined, bytes counted, backpressure kept, one end reason.

No queue sits between the endpoints: data read from one side is written to the other in the
same callback. When the side written to reports ``full``, the side read from is paused and
resumed on ``on_drained`` — the kernel's (or the stream window's) buffers are the only ones.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable

from limen.net.endpoints import Buffer, Endpoint


class CloseReason(enum.StrEnum):
    CLIENT_CLOSED = "client_closed"
    TARGET_CLOSED = "target_closed"
    REVOKED = "revoked"
    POLICY = "policy"
    ERROR = "error"
    CONNECTOR_LOST = "connector_lost"
    SHUTDOWN = "shutdown"
    IDLE = "idle"


class _Side:
    """Receives from ``source`` and writes to ``sink``."""

    __slots__ = ("bytes", "eof", "relay", "sink", "source")

    def __init__(self, relay: Relay, source: Endpoint, sink: Endpoint) -> None:
        self.relay = relay
        self.source = source
        self.sink = sink
        self.bytes = 0
        self.eof = False

    def on_data(self, data: Buffer) -> None:
        self.bytes += len(data)
        sink = self.sink
        sink.write(data)
        if sink.full:
            self.source.pause_reading()

    def on_eof(self) -> None:
        if self.eof:
            return
        self.eof = True
        self.sink.write_eof()
        self.relay._side_eof(self)

    def on_closed(self, error: BaseException | None) -> None:
        self.relay._side_closed(self, error)

    def on_drained(self) -> None:
        # ``source`` (what this side reads) has room to be written again: resume the
        # endpoint that feeds it, which is the other side's source.
        other = self.relay._other(self)
        other.source.resume_reading()


class Relay:
    """Join ``a`` (the initiating side, e.g. the client) and ``b`` (the target side)."""

    def __init__(
        self,
        a: Endpoint,
        b: Endpoint,
        on_end: Callable[[Relay], None] | None = None,
    ) -> None:
        self.a = a
        self.b = b
        self._a_to_b = _Side(self, a, b)
        self._b_to_a = _Side(self, b, a)
        self._on_end = on_end
        self.reason: CloseReason | None = None
        self.error: BaseException | None = None
        self._first_eof: _Side | None = None
        self.done: asyncio.Future[CloseReason] = asyncio.get_running_loop().create_future()

    def start(
        self, initial_to_b: Buffer = b"", initial_to_a: Buffer = b"", *, sent_to_b: int = 0
    ) -> None:
        """Join the endpoints; ``initial_*`` is written first, ``sent_to_b`` counts bytes
        already written to ``b`` before the relay (early data)."""
        self._a_to_b.bytes += sent_to_b
        if initial_to_b:
            self._a_to_b.bytes += len(initial_to_b)
            self.b.write(initial_to_b)
        if initial_to_a:
            self._b_to_a.bytes += len(initial_to_a)
            self.a.write(initial_to_a)
        self.a.attach(self._a_to_b)
        if self.reason is None:
            self.b.attach(self._b_to_a)

    @property
    def bytes_a_to_b(self) -> int:
        return self._a_to_b.bytes

    @property
    def bytes_b_to_a(self) -> int:
        return self._b_to_a.bytes

    def _other(self, side: _Side) -> _Side:
        return self._b_to_a if side is self._a_to_b else self._a_to_b

    def _side_eof(self, side: _Side) -> None:
        if self._first_eof is None:
            self._first_eof = side
        if self._a_to_b.eof and self._b_to_a.eof:
            first_a = self._first_eof is self._a_to_b
            reason = CloseReason.CLIENT_CLOSED if first_a else CloseReason.TARGET_CLOSED
            self._finish(reason, None, close=True)

    def _side_closed(self, side: _Side, error: BaseException | None) -> None:
        reason = CloseReason.CLIENT_CLOSED if side is self._a_to_b else CloseReason.TARGET_CLOSED
        if error is not None and not isinstance(error, ConnectionError | OSError):
            reason = CloseReason.ERROR
        self._finish(reason, error, close=False)

    def abort(self, reason: CloseReason) -> None:
        """End the flow now from outside (revocation, shutdown, connector lost)."""
        self._finish(reason, None, close=False)

    def _finish(self, reason: CloseReason, error: BaseException | None, *, close: bool) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        self.error = error
        if close:
            self.a.close()
            self.b.close()
        else:
            self.a.abort()
            self.b.abort()
        if not self.done.done():
            self.done.set_result(reason)
        if self._on_end is not None:
            self._on_end(self)
