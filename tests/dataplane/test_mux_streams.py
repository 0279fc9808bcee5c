"""The mux shell's receive side: a paused stream holds what arrives (in order, EOF last) and
returns no window for it, so a receiver that paused never gets data it cannot take — the
relay relies on it to keep memory bounded and to avoid re-buffering (docs/architecture.md)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import pytest

from limen.net import mux
from limen.net.endpoints import Buffer
from limen.net.mux import (
    MAX_RECEIVE_BUDGET,
    NOTSENT_LOWAT,
    MuxConnection,
    MuxStream,
    receive_budget_for,
    tcp_min_rtt,
)
from limen.wire.yamux import DEFAULT_RECEIVE_BUDGET, INITIAL_WINDOW
from tests.muxpair import Collect, mux_pair, next_stream


class _PausesAfterFirstChunk(Collect):
    """Pauses its stream on every chunk while ``pausing``; counts what still arrives."""

    def __init__(self, stream: MuxStream) -> None:
        super().__init__()
        self.stream = stream
        self.pausing = True
        self.paused = False
        self.while_paused = 0

    def on_data(self, data: Buffer) -> None:
        if self.paused:
            self.while_paused += len(data)
        super().on_data(data)
        if self.pausing:
            self.stream.pause_reading()
            self.paused = True

    def on_eof(self) -> None:
        if self.paused:
            self.while_paused += 1
        super().on_eof()


async def _until_held(stream: MuxStream, nbytes: int) -> None:
    for _ in range(1000):  # bounded poll (5 s): holding raises no event
        if stream.held_bytes >= nbytes:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{stream.held_bytes} bytes held, expected {nbytes}")


async def test_paused_stream_holds_data_and_eof_until_resumed() -> None:
    async with mux_pair() as (client, accepted):
        near = client.open_stream()
        near.write(b"first")
        far = await next_stream(accepted)
        receiver = _PausesAfterFirstChunk(far)
        far.attach(receiver)
        await receiver.until(lambda d: d == b"first", "the first chunk")

        # While paused: nearly a window's worth more. None of it is delivered...
        more = bytes(range(256)) * (INITIAL_WINDOW // 256 - 1)
        near.write(more)
        await _until_held(far, len(more))
        assert bytes(receiver.data) == b"first" and receiver.while_paused == 0
        # ...and its window is not returned: the sender has only what it never used.
        left = INITIAL_WINDOW - len(b"first") - len(more)
        assert client.session.send_window(near.stream_id) == left

        # Resumed: all of it, in order, and the window comes back.
        receiver.pausing = receiver.paused = False
        far.resume_reading()
        await receiver.until(lambda d: d == b"first" + more, "the held data")
        for _ in range(1000):  # bounded poll (5 s) on the window update
            if client.session.send_window(near.stream_id) >= len(more):
                break
            await asyncio.sleep(0.005)
        else:
            raise AssertionError("the window of the delivered data was not returned")

        # EOF that arrives while paused waits behind the data held before it.
        far.pause_reading()
        receiver.paused = True
        near.write(b"tail")
        near.write_eof()
        await _until_held(far, len(b"tail"))
        assert not receiver.eof and receiver.while_paused == 0
        receiver.paused = False
        far.resume_reading()
        await receiver.until(lambda d: d.endswith(b"tail"), "the tail")
        assert receiver.eof


async def test_detach_and_attach_keep_order_with_held_data() -> None:
    async with mux_pair() as (client, accepted):
        near = client.open_stream()
        near.write(b"head|")
        far = await next_stream(accepted)
        first = Collect()
        far.attach(first)
        await first.until(lambda d: d == b"head|", "the head")
        far.pause_reading()
        far.detach(replay=b"replayed|")
        near.write(b"later")
        await _until_held(far, len(b"replayed|later"))
        second = Collect()
        far.attach(second)
        await second.until(lambda d: d == b"replayed|later", "replay then later data")


@asynccontextmanager
async def _tcp_mux_pair() -> AsyncIterator[tuple[MuxConnection, MuxConnection]]:
    """A client MuxConnection and the one its server accepted, over loopback TCP."""
    loop = asyncio.get_running_loop()
    accepted: list[MuxConnection] = []
    peer_accepted = asyncio.Event()

    def accept() -> MuxConnection:
        accepted.append(MuxConnection(is_client=False, name="peer"))
        peer_accepted.set()
        return accepted[-1]

    server = await loop.create_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = MuxConnection(is_client=True, name="client")
    try:
        await loop.create_connection(lambda: client, "127.0.0.1", port)
        async with asyncio.timeout(5):
            await client.ready
            await peer_accepted.wait()  # the server's accept runs in a later loop turn
            await accepted[0].ready
        assert len(accepted) == 1
        yield client, accepted[0]
    finally:
        client.close()
        for conn in accepted:
            conn.close()
        server.close()


def _socket(conn: MuxConnection) -> socket.socket:
    assert conn.transport is not None
    sock: socket.socket = conn.transport.get_extra_info("socket")
    return sock


async def test_mux_tcp_sockets_keep_little_unsent_data_and_no_nagle() -> None:
    """Over TCP, a mux connection's socket holds at most NOTSENT_LOWAT unsent bytes (so
    frames of other streams do not queue behind megabytes of one bulk stream) and sends
    small frames at once (no Nagle)."""
    async with _tcp_mux_pair() as conns:
        for conn in conns:
            sock = _socket(conn)
            lowat = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
            assert lowat == NOTSENT_LOWAT
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


async def test_receive_budget_follows_the_connections_minimum_round_trip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each side sizes its bulk streams' budget from the kernel's minimum round trip of its
    own socket. Loopback's few microseconds fall under the default budget at the real rate,
    so the rate is raised here until they count."""
    monkeypatch.setattr(mux, "BUDGET_RATE", 10**12)  # 1 us of round trip -> 1 MB
    async with _tcp_mux_pair() as conns:
        for conn in conns:
            rtt = tcp_min_rtt(_socket(conn))
            assert rtt is not None and 0 < rtt < 1
            assert conn.session.receive_budget > DEFAULT_RECEIVE_BUDGET
            conn.update_receive_budget()
            assert conn.session.receive_budget == receive_budget_for(rtt)


def test_receive_budget_never_falls_below_the_default_nor_exceeds_the_cap() -> None:
    assert receive_budget_for(None) == DEFAULT_RECEIVE_BUDGET
    assert receive_budget_for(0.000_05) == DEFAULT_RECEIVE_BUDGET  # a LAN
    assert receive_budget_for(0.05) == int(0.05 * mux.BUDGET_RATE)  # 50 ms across a WAN
    assert receive_budget_for(60.0) == MAX_RECEIVE_BUDGET


def test_min_rtt_of_a_socket_that_is_not_tcp_is_unknown() -> None:
    near, far = socket.socketpair()
    with near, far:
        assert tcp_min_rtt(near) is None


class _CountingWrites:
    """Counts the connection's transport writes (one per TLS record over TLS)."""

    def __init__(self, conn: MuxConnection) -> None:
        assert conn.transport is not None
        self.transport = conn.transport
        self.real = conn.transport.write
        self.count = 0
        conn.transport = cast(asyncio.Transport, self)

    def write(self, data: Buffer) -> None:
        self.count += 1
        self.real(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.transport, name)


async def _accepted_with_collector(accepted: asyncio.Queue[MuxStream], near: MuxStream) -> Collect:
    near.write(b"open")  # the far side learns of the stream from its first frame
    far = await next_stream(accepted)
    got = Collect()
    far.attach(got)
    await got.until(lambda d: d == b"open", "the opening bytes")
    got.data.clear()
    return got


@asynccontextmanager
async def _a_stream_and_its_far_end() -> AsyncIterator[
    tuple[MuxConnection, asyncio.Queue[MuxStream], MuxStream, Collect]
]:
    """A mux pair, one open stream on the near side, and what its far end receives."""
    async with mux_pair() as (client, accepted):
        near = client.open_stream()
        yield client, accepted, near, await _accepted_with_collector(accepted, near)


async def test_a_deferred_head_leaves_with_the_next_write_in_one_flush() -> None:
    async with _a_stream_and_its_far_end() as (client, _, near, got):
        writes = _CountingWrites(client)
        near.write_deferred(b"HEAD|", delay=5.0)
        near.write(b"first bytes")
        assert writes.count == 1  # head and data in one transport write
        await got.until(lambda d: d == b"HEAD|first bytes", "head then data")


async def test_a_deferred_head_goes_alone_after_its_delay() -> None:
    async with _a_stream_and_its_far_end() as (_, _, near, got):
        near.write_deferred(b"HEAD", delay=0.01)
        await got.until(lambda d: d == b"HEAD", "the head on its own")
        near.write(b"|later")
        await got.until(lambda d: d == b"HEAD|later", "later data after it, once")


async def test_a_deferred_head_precedes_eof_and_is_dropped_by_an_abort() -> None:
    async with _a_stream_and_its_far_end() as (client, accepted, near, got):
        near.write_deferred(b"HEAD", delay=5.0)
        near.write_eof()
        await got.until(lambda d: d == b"HEAD" and got.eof, "the head, then EOF")

        other = client.open_stream()
        got2 = await _accepted_with_collector(accepted, other)
        other.write_deferred(b"NEVER", delay=0.01)
        other.abort()
        # A later stream's bytes arrive; the aborted stream's head never does.
        third = client.open_stream()
        await _accepted_with_collector(accepted, third)
        assert bytes(got2.data) == b""
