"""Component tests of UDP flows: the whole service on loopback (real TLS, real SQLite), an
enrolled connector, a client session; UDP echo servers as targets."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from limen.client.tunnel import FlowRefused, serve_socks
from limen.client.udp import serve_udp_forward
from limen.net.udp import MAX_UDP_PAYLOAD, DatagramTunnel, UdpSettings
from limen.store.models import TrafficRecord
from limen.wire.capsule import encode_capsule, encode_varint
from limen.wire.socks5 import build_udp_datagram, parse_udp_datagram
from tests.support import EchoServer, Tenant, echo_roundtrip, running_tenant


class UdpEcho(asyncio.DatagramProtocol):
    """Echoes every datagram back to its sender; remembers the senders."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.received = 0
        self.peers: set[tuple[str, int]] = set()

    async def start(self) -> UdpEcho:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        assert self.transport is not None
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        self.peers.add(addr)
        assert self.transport is not None
        self.transport.sendto(data, addr)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class UdpClient(asyncio.DatagramProtocol):
    """A local UDP program: sends datagrams, collects what comes back."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    @classmethod
    async def open(cls, port: int) -> UdpClient:
        client = cls()
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: client, remote_addr=("127.0.0.1", port))
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    async def recv(self) -> bytes:
        async with asyncio.timeout(10):
            return await self.queue.get()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@pytest.fixture
async def tenant(tmp_path: Path) -> Any:
    async with running_tenant(tmp_path) as t:
        yield t


@pytest.fixture
async def udp_echo() -> Any:
    server = await UdpEcho().start()
    yield server
    server.close()


async def _publish_udp(tenant: Tenant, port: int, protocol: str = "udp") -> dict[str, Any]:
    alice = await tenant.user("alice")
    group = await tenant.default_group()
    app = await tenant.call("POST", "/api/v1/apps", {"name": "udp", "connector_group_id": group})
    await tenant.call(
        "POST",
        f"/api/v1/apps/{app['id']}/segments",
        {"type": "ip", "destination": "127.0.0.1", "ports": str(port), "protocol": protocol},
    )
    await tenant.call(
        "POST", f"/api/v1/apps/{app['id']}/assignments", {"principal_id": alice["id"]}
    )
    await tenant.connector()
    return alice


async def _records(tenant: Tenant, predicate: Any, n: int = 1) -> list[TrafficRecord]:
    assert tenant.service.ctx is not None
    store = tenant.service.ctx.store
    rows: list[TrafficRecord] = []
    for _ in range(500):  # bounded: the writer flushes every 50 ms in tests
        with store.session() as s:
            rows = [r for r in s.scalars(select(TrafficRecord)) if predicate(r)]
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.01)
    raise AssertionError("no matching traffic record")


async def test_udp_echo_through_a_forward_is_logged_with_datagram_counts(
    tenant: Tenant, udp_echo: UdpEcho
) -> None:
    await _publish_udp(tenant, udp_echo.port)
    session = await tenant.login("alice")
    forward = await serve_udp_forward(
        session,
        "127.0.0.1",
        udp_echo.port,
        "127.0.0.1",
        0,
        settings=UdpSettings(idle_timeout=0.5),
    )
    assert forward.sock is not None
    local_port = int(forward.sock.local_address[1])
    one, two = await UdpClient.open(local_port), await UdpClient.open(local_port)
    # 65,507: the largest UDP payload over IPv4 (65,535 - 20 IP - 8 UDP header bytes).
    sizes = [1, 100, 1400, 8000, 65_507]
    for size in sizes:
        payload = bytes([size % 251]) * size
        one.send(payload)
        assert await one.recv() == payload
    two.send(b"from two")
    assert await two.recv() == b"from two"
    # Two local 5-tuples, two flows, two connector sockets.
    assert len(forward.flows) == 2
    assert len(udp_echo.peers) == 2
    one.close()
    two.close()
    # Closing the forward ends its flows; each is logged when it ends.
    forward.close()
    rows = await _records(tenant, lambda r: r.transport == "udp" and r.ended_at, n=2)
    row = max(rows, key=lambda r: r.datagrams_up)
    assert row.action == "allow" and row.dest_port == udp_echo.port
    assert row.datagrams_up == len(sizes) and row.datagrams_down == len(sizes)
    assert row.bytes_up >= sum(sizes) and row.bytes_down >= sum(sizes)
    await session.close()


async def test_udp_needs_a_udp_segment(tenant: Tenant, udp_echo: UdpEcho) -> None:
    await _publish_udp(tenant, udp_echo.port, protocol="tcp")
    session = await tenant.login("alice")
    with pytest.raises(FlowRefused) as refused:
        await session.open("udp", "127.0.0.1", udp_echo.port)
    assert (refused.value.status, refused.value.code) == (403, "no_segment")
    await session.close()


async def test_connector_ends_an_idle_udp_flow(tenant: Tenant, udp_echo: UdpEcho) -> None:
    await _publish_udp(tenant, udp_echo.port)
    for agent in tenant.agents:
        agent.udp_settings = UdpSettings(idle_timeout=0.3)
    session = await tenant.login("alice")
    stream, _ = await session.open("udp", "127.0.0.1", udp_echo.port)
    got: list[bytes] = []
    tunnel = DatagramTunnel(stream, got.append, idle_timeout=30.0)
    tunnel.start()
    assert tunnel.send(b"hello")
    async with asyncio.timeout(10):
        reason = await tunnel.done
    assert got == [b"hello"]
    assert reason == "closed"  # the connector's idle timeout ended it, not ours
    rows = await _records(tenant, lambda r: r.transport == "udp" and r.ended_at)
    assert rows[0].datagrams_up == 1 and rows[0].datagrams_down == 1
    await session.close()


async def test_datagram_over_the_limit_ends_the_flow_with_a_code(
    tenant: Tenant, udp_echo: UdpEcho
) -> None:
    await _publish_udp(tenant, udp_echo.port)
    session = await tenant.login("alice")
    stream, _ = await session.open("udp", "127.0.0.1", udp_echo.port)
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    class Watch:
        def on_data(self, data: object) -> None:
            pass

        def on_eof(self) -> None:
            if not ended.done():
                ended.set_result(None)

        def on_closed(self, error: BaseException | None) -> None:
            if not ended.done():
                ended.set_result(None)

        def on_drained(self) -> None:
            pass

    stream.attach(Watch())
    # A DATAGRAM capsule whose payload is one byte over 65,527 (context id 0 + payload).
    value = encode_varint(0) + b"x" * (MAX_UDP_PAYLOAD + 1)
    stream.write(encode_capsule(0, value))
    async with asyncio.timeout(10):
        await ended
    rows = await _records(tenant, lambda r: r.transport == "udp" and r.ended_at)
    assert rows[0].code == "capsule_too_large"
    assert rows[0].close_reason == "error"
    assert udp_echo.received == 0
    await session.close()


async def test_socks5_udp_associate_echo(tenant: Tenant, udp_echo: UdpEcho) -> None:
    await _publish_udp(tenant, udp_echo.port)
    session = await tenant.login("alice")
    socks = await serve_socks(session, "127.0.0.1", 0)
    sport = socks.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", sport)
    w.write(b"\x05\x01\x00")
    assert await r.readexactly(2) == b"\x05\x00"
    # UDP ASSOCIATE with DST 0.0.0.0:0 (the client does not know its address yet, §4).
    w.write(b"\x05\x03\x00\x01" + socket.inet_aton("0.0.0.0") + (0).to_bytes(2, "big"))
    reply = await r.readexactly(10)
    assert reply[:2] == b"\x05\x00"
    relay_port = int.from_bytes(reply[8:10], "big")
    relay = await UdpClient.open(relay_port)
    relay.send(build_udp_datagram("127.0.0.1", udp_echo.port, b"via socks udp"))
    host, port, payload = parse_udp_datagram(await relay.recv())
    assert (host, port, payload) == ("127.0.0.1", udp_echo.port, b"via socks udp")
    # Malformed and fragmented datagrams are dropped; the association goes on.
    relay.send(b"\x00")
    relay.send(b"\x00\x00\x01\x01" + socket.inet_aton("127.0.0.1") + b"\x00\x01frag")
    relay.send(build_udp_datagram("127.0.0.1", udp_echo.port, b"again"))
    assert parse_udp_datagram(await relay.recv())[2] == b"again"
    # A destination that is not published: the flow is refused, nothing comes back.
    relay.send(build_udp_datagram("127.0.0.1", 9, b"nope"))
    relay.close()
    w.close()  # ends the association
    socks.close()
    rows = await _records(tenant, lambda r: r.transport == "udp" and r.code == "no_segment")
    assert rows[0].dest_port == 9
    await session.close()


async def test_udp_flood_is_bounded_and_tcp_keeps_working(
    tenant: Tenant, udp_echo: UdpEcho, monkeypatch: pytest.MonkeyPatch
) -> None:
    from limen.edge import udp as edge_udp

    echo = await EchoServer().start()
    alice = await _publish_udp(tenant, udp_echo.port)
    await tenant.app("tcp-echo", [("ip", "127.0.0.1", str(echo.port))], [alice["id"]])
    # A small cap so the test floods it quickly; the mechanism is the production one.
    monkeypatch.setattr(edge_udp, "MAX_UDP_FLOWS_PER_CONNECTION", 20)
    session = await tenant.login("alice")
    session.max_connections = 1
    results = await asyncio.gather(
        *(session.open("udp", "127.0.0.1", udp_echo.port) for _ in range(60)),
        return_exceptions=True,
    )
    opened = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, FlowRefused)]
    assert len(opened) == 20
    assert len(refused) == 40
    assert {(r.status, r.code) for r in refused} == {(429, "too_many_udp_flows")}
    # TCP flows on the same connection are still served.
    assert await echo_roundtrip(session, echo.port, b"tcp still works") == b"tcp still works"
    # Ending UDP flows frees their slots.
    for stream, _response in opened:  # type: ignore[misc]
        stream.abort()
    for _ in range(200):
        try:
            stream, _ = await session.open("udp", "127.0.0.1", udp_echo.port)
            break
        except FlowRefused:
            await asyncio.sleep(0.02)
    else:
        raise AssertionError("UDP slots were not freed")
    stream.abort()
    await echo.stop()
    await session.close()
