"""A yamux connection pair over a real socket pair, with a scripted far side: for tests of
the mux shell (net/mux.py) that must observe what goes on the wire and when."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from limen.net.endpoints import Buffer
from limen.net.mux import MuxConnection, MuxStream


class Collect:
    """Receiver that keeps what a stream delivers and wakes a waiter on each chunk."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.changed = asyncio.Event()

    def on_data(self, data: Buffer) -> None:
        self.data += data
        self.changed.set()

    def on_eof(self) -> None:
        self.eof = True
        self.changed.set()

    def on_closed(self, error: BaseException | None) -> None:
        self.changed.set()

    def on_drained(self) -> None:
        pass

    async def until(self, predicate: Callable[[bytes], bool], what: str) -> None:
        """Wait (bounded) until ``predicate`` holds for what was received."""
        try:
            async with asyncio.timeout(5):
                while not predicate(bytes(self.data)):
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None


@asynccontextmanager
async def mux_pair() -> AsyncIterator[tuple[MuxConnection, asyncio.Queue[MuxStream]]]:
    """A client MuxConnection and the streams its scripted peer accepts, in order."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[MuxStream] = asyncio.Queue()
    near, far = socket.socketpair()
    client = MuxConnection(is_client=True, name="client")
    server = MuxConnection(is_client=False, name="peer", on_stream=accepted.put_nowait)
    await loop.create_connection(lambda: client, sock=near)
    await loop.create_connection(lambda: server, sock=far)
    try:
        yield client, accepted
    finally:
        client.close()
        server.close()


async def next_stream(accepted: asyncio.Queue[MuxStream]) -> MuxStream:
    """The next stream the far side accepted (bounded wait)."""
    async with asyncio.timeout(5):
        return await accepted.get()
