"""One request, one response on a stream: the asyncio shell of ``wire/doh.py``.

:func:`read_body` collects a request's ``Content-Length`` body from an endpoint (bounded by
the length the head announced, which the head parser has already capped);
:func:`exchange` opens a stream, sends a request and waits for the complete response.
Both fail with a deadline rather than hang.
"""

from __future__ import annotations

import asyncio

from limen.errors import RemoteProtocolError
from limen.net.endpoints import Buffer, Endpoint
from limen.net.mux import MuxConnection, MuxStream
from limen.wire.doh import ExchangeResponse, ExchangeResponseReader


class _BodyCollector:
    def __init__(self, endpoint: Endpoint, length: int, initial: bytes) -> None:
        self.endpoint = endpoint
        self.length = length
        self.body = bytearray(initial[:length])
        self.result: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._check()

    def _check(self) -> None:
        if len(self.body) >= self.length and not self.result.done():
            self.endpoint.pause_reading()
            self.result.set_result(bytes(self.body[: self.length]))

    def on_data(self, data: Buffer) -> None:
        if self.result.done():
            return
        self.body += data
        self._check()

    def on_eof(self) -> None:
        if not self.result.done():
            self.result.set_exception(
                RemoteProtocolError("stream ended inside the body", code="bad_request")
            )

    def on_closed(self, error: BaseException | None) -> None:
        if not self.result.done():
            self.result.set_exception(ConnectionResetError(f"stream closed: {error!r}"))

    def on_drained(self) -> None:
        pass


async def read_body(endpoint: Endpoint, length: int, initial: bytes, deadline: float) -> bytes:
    """``length`` bytes: ``initial`` (read with the head) first, then from ``endpoint``.
    Raises TimeoutError, RemoteProtocolError (the stream ended early) or ConnectionError."""
    collector = _BodyCollector(endpoint, length, initial)
    if not collector.result.done():
        endpoint.attach(collector)
    async with asyncio.timeout(deadline):
        return await collector.result


class _ResponseCollector:
    def __init__(self, stream: MuxStream, reader: ExchangeResponseReader) -> None:
        self.stream = stream
        self.reader = reader
        self.result: asyncio.Future[ExchangeResponse] = stream.conn.loop.create_future()

    def on_data(self, data: Buffer) -> None:
        if self.result.done():
            return
        try:
            response = self.reader.feed(data)
        except RemoteProtocolError as exc:
            self.result.set_exception(exc)
            return
        if response is not None:
            self.result.set_result(response)

    def on_eof(self) -> None:
        if self.result.done():
            return
        try:
            response = self.reader.feed_eof()
        except RemoteProtocolError as exc:
            self.result.set_exception(exc)
            return
        if response is not None:
            self.result.set_result(response)

    def on_closed(self, error: BaseException | None) -> None:
        if not self.result.done():
            self.result.set_exception(ConnectionResetError(f"stream closed: {error!r}"))

    def on_drained(self) -> None:
        pass


async def exchange(
    conn: MuxConnection, request: bytes, method: str, max_body: int, deadline: float
) -> ExchangeResponse:
    """Open a stream on ``conn``, send ``request`` (head and body) and half-close, then wait
    for the complete response; the stream is finished either way."""
    stream = conn.open_stream()
    collector = _ResponseCollector(stream, ExchangeResponseReader(method, max_body))
    stream.attach(collector)
    stream.write(request)
    stream.write_eof()
    try:
        async with asyncio.timeout(deadline):
            response = await collector.result
    except BaseException:
        stream.abort()
        raise
    stream.close()
    return response
