"""Early data (docs/protocol.md): what an application sends while its flow opens goes out
right behind the flow head, before any answer, is sent again when the flow is retried on a
new stream, and reaches the target exactly once.

The mux pair runs over a real socket pair; the far side is a scripted peer that holds its
answer, so "sent before the answer" is observed, not inferred from timing."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from limen.net.endpoints import TransportEndpoint
from limen.net.mux import EarlyData, open_flow
from limen.net.relay import Relay
from limen.net.tasks import spawn
from limen.wire import connect as wire
from tests.muxpair import Collect, mux_pair, next_stream
from tests.support import EchoServer, Tenant, running_tenant


@asynccontextmanager
async def _application() -> AsyncIterator[tuple[TransportEndpoint, socket.socket]]:
    """A local endpoint as a forward would hold it, and the application's end of it."""
    loop = asyncio.get_running_loop()
    ours, app = socket.socketpair()
    local = TransportEndpoint()
    await loop.create_connection(lambda: local, sock=ours)
    app.setblocking(False)
    try:
        yield local, app
    finally:
        local.abort()
        app.close()


async def test_early_data_leaves_before_the_answer_and_again_on_retry() -> None:
    loop = asyncio.get_running_loop()
    head = wire.encode_request("tcp", "10.0.0.1", 22, [("Proxy-Authorization", "Bearer t")])
    async with mux_pair() as (client, accepted), _application() as (local, app):
        await loop.sock_sendall(app, b"SSH-2.0-first\r\n")
        early = EarlyData(local)
        first = spawn(open_flow(client, head, early=early), name="open")

        peer = Collect()
        (first_stream := await next_stream(accepted)).attach(peer)
        await peer.until(lambda d: d.endswith(b"first\r\n"), "early data")
        assert bytes(peer.data) == head + b"SSH-2.0-first\r\n"  # head, then data, no answer yet
        # More from the application while the flow still opens goes on at once.
        await loop.sock_sendall(app, b"more")
        await peer.until(lambda d: d.endswith(b"more"), "later early data")
        # The first attempt is refused (say, an expired token): its bytes are dropped.
        first_stream.write(wire.encode_refusal(401, "token_expired", "expired"))
        first_stream.close()
        stream, response = await first
        assert response.status == 401 and stream.closed

        # The retry sends the head and everything so far again, once.
        second = spawn(open_flow(client, head, early=early), name="open")
        retry = Collect()
        (second_stream := await next_stream(accepted)).attach(retry)
        await retry.until(lambda d: d.endswith(b"more"), "early data again")
        assert bytes(retry.data) == head + b"SSH-2.0-first\r\nmore"
        second_stream.write(wire.encode_response(200) + b"SSH-2.0-server\r\n")
        stream, response = await second
        assert response.ok

        # The relay takes over: the bytes behind the answer, then both ways.
        relay = Relay(local, stream)
        relay.start(sent_to_b=len(early.data))
        async with asyncio.timeout(5):
            assert await loop.sock_recv(app, 64) == b"SSH-2.0-server\r\n"
        await loop.sock_sendall(app, b"after")
        await retry.until(lambda d: d.endswith(b"after"), "relayed data")
        assert bytes(retry.data).count(b"SSH-2.0-first") == 1
        assert relay.bytes_a_to_b == len(b"SSH-2.0-first\r\nmoreafter")


async def test_early_data_is_bounded_while_the_flow_opens() -> None:
    loop = asyncio.get_running_loop()
    head = wire.encode_request("tcp", "10.0.0.1", 80)
    async with mux_pair() as (client, accepted), _application() as (local, app):
        early = EarlyData(local, limit=4096)
        opening = spawn(open_flow(client, head, early=early), name="open")
        peer = Collect()
        (first_stream := await next_stream(accepted)).attach(peer)
        # The application writes far more than the limit: the endpoint stops reading, so
        # the write stalls once the socket buffers are full (a wrong implementation would
        # read it all and let it finish).
        blob = b"x" * 8_000_000
        try:
            await asyncio.wait_for(loop.sock_sendall(app, blob), 1.0)
        except TimeoutError:
            pass
        else:
            raise AssertionError("the local side was read past the early-data limit")
        await peer.until(lambda d: len(d) >= len(head) + 4096, "the limit")
        # One read (up to 256 KiB) may cross the limit before reading pauses.
        assert 4096 <= len(early.data) <= 4096 + 256 * 1024
        first_stream.write(wire.encode_response(200))
        stream, response = await opening
        assert response.ok
        stream.abort()


async def test_forward_sends_early_data_through_edge_and_connector(tmp_path: object) -> None:
    """Through the real edge and connector: an application that writes at once (an HTTP
    client) and half-closes before any answer gets its whole reply, exactly once."""
    from pathlib import Path

    from limen.client.tunnel import serve_forward

    assert isinstance(tmp_path, Path)
    echo = await EchoServer().start()
    try:
        async with running_tenant(tmp_path) as tenant:
            await _publish(tenant, echo)
            session = await tenant.login("alice")
            forward = await serve_forward(session, "127.0.0.1", echo.port, "127.0.0.1", 0)
            port = forward.sockets[0].getsockname()[1]
            for _ in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET / HTTP/1.0\r\n\r\n")
                writer.write_eof()
                async with asyncio.timeout(10):
                    assert await reader.read() == b"GET / HTTP/1.0\r\n\r\n"
                writer.close()
            forward.close()
            await session.close()
    finally:
        await echo.stop()


async def _publish(tenant: Tenant, echo: EchoServer) -> None:
    alice = await tenant.user("alice")
    await tenant.app("echo", [("ip", "127.0.0.1", str(echo.port))], [alice["id"]])
    await tenant.connector()
