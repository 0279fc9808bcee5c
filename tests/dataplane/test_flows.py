"""Component tests: the whole service on loopback with real TLS and real SQLite — identity,
admin API, edge, an enrolled connector, a client session — and every refusal path."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from limen.client.tunnel import FlowRefused, serve_forward, serve_socks
from limen.store.models import TrafficRecord
from tests.support import EchoServer, Tenant, echo_roundtrip, running_tenant


@pytest.fixture
async def tenant(tmp_path: Path):
    async with running_tenant(tmp_path) as t:
        yield t


@pytest.fixture
async def echo():
    server = await EchoServer().start()
    yield server
    await server.stop()


async def _published(tenant: Tenant, echo: EchoServer, user: str = "alice") -> dict[str, Any]:
    alice = await tenant.user(user)
    await tenant.app("echo", [("ip", "127.0.0.1", str(echo.port))], [alice["id"]])
    await tenant.connector()
    return alice


async def _records(tenant: Tenant, n: int) -> list[TrafficRecord]:
    assert tenant.service.ctx is not None
    store = tenant.service.ctx.store
    for _ in range(500):  # bounded: the writer flushes every 50 ms in tests
        with store.session() as s:
            rows = list(s.scalars(select(TrafficRecord).order_by(TrafficRecord.started_at)))
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {n} traffic records, found {len(rows)}")


async def test_allowed_flow_relays_bytes_and_is_logged(tenant: Tenant, echo: EchoServer) -> None:
    alice = await _published(tenant, echo)
    session = await tenant.login("alice")
    payload = bytes(range(256)) * 4096  # 1 MiB: several windows' worth
    assert await echo_roundtrip(session, echo.port, payload) == payload
    rows = await _records(tenant, 1)
    row = rows[-1]
    assert row.action == "allow"
    assert row.user_id == alice["id"] and row.username == "alice"
    assert row.dest_ip == "127.0.0.1" and row.dest_port == echo.port
    assert row.transport == "tcp"
    assert row.connector_id.startswith("con_") and row.app_id.startswith("app_")
    assert row.bytes_up == len(payload) and row.bytes_down == len(payload)
    assert row.close_reason in ("client_closed", "target_closed")
    assert row.device_id == session.state.device_id
    await session.close()


async def test_many_flows_share_few_connections(tenant: Tenant, echo: EchoServer) -> None:
    await _published(tenant, echo)
    session = await tenant.login("alice")
    results = await asyncio.gather(
        *(echo_roundtrip(session, echo.port, f"flow {i}".encode()) for i in range(50))
    )
    assert results == [f"flow {i}".encode() for i in range(50)]
    assert len(session.conns) <= session.max_connections
    assert echo.connections == 50
    await session.close()


async def test_refusals_have_stable_codes(tenant: Tenant, echo: EchoServer) -> None:
    await _published(tenant, echo)
    await tenant.user("mallory")
    alice = await tenant.login("alice")
    mallory = await tenant.login("mallory")

    with pytest.raises(FlowRefused) as not_assigned:
        await mallory.open("tcp", "127.0.0.1", echo.port)
    assert (not_assigned.value.status, not_assigned.value.code) == (403, "not_assigned")
    assert "not assigned" in not_assigned.value.message

    with pytest.raises(FlowRefused) as no_segment:
        await alice.open("tcp", "127.0.0.1", 1)
    assert (no_segment.value.status, no_segment.value.code) == (403, "no_segment")

    forged = await tenant.login("alice")
    forged.state.access_token = alice.state.access_token[:-4] + "AAAA"
    forged.state.expires_at = time.time() + 3600
    forged.state.refresh_token = ""
    with pytest.raises(FlowRefused) as bad_sig:
        await forged.open("tcp", "127.0.0.1", echo.port)
    assert bad_sig.value.status == 401
    assert bad_sig.value.code == "invalid_token"
    assert "Bearer" in bad_sig.value.www_authenticate

    rows = await _records(tenant, 3)
    assert {r.code for r in rows} >= {"not_assigned", "no_segment", "invalid_token"}
    assert all(r.action != "allow" for r in rows)
    for s in (alice, mallory, forged):
        await s.close()


async def test_target_refused_and_no_connector(tenant: Tenant) -> None:
    alice = await tenant.user("alice")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    await tenant.app("dead", [("ip", "127.0.0.1", str(dead_port))], [alice["id"]])
    session = await tenant.login("alice")
    with pytest.raises(FlowRefused) as no_connector:
        await session.open("tcp", "127.0.0.1", dead_port)
    assert (no_connector.value.status, no_connector.value.code) == (502, "no_connector")
    await tenant.connector()
    with pytest.raises(FlowRefused) as refused:
        await session.open("tcp", "127.0.0.1", dead_port)
    assert (refused.value.status, refused.value.code) == (502, "target_refused")
    await session.close()


async def test_connector_restart_flows_resume(tenant: Tenant, echo: EchoServer) -> None:
    await _published(tenant, echo)
    session = await tenant.login("alice")
    assert await echo_roundtrip(session, echo.port) == b"ping"
    agent = tenant.agents[0]
    await agent.stop()
    edge = tenant.service.edge
    assert edge is not None
    await tenant.wait_edge_sees(lambda e: not e.connectors.links)
    with pytest.raises(FlowRefused) as down:
        await session.open("tcp", "127.0.0.1", echo.port)
    assert down.value.code == "no_connector"
    # The same enrolled identity comes back.
    from limen.connector.agent import ConnectorAgent
    from limen.net.tasks import spawn

    again = ConnectorAgent(agent.identity)
    tenant.agents.append(again)
    spawn(again.run(), name="connector again")
    async with asyncio.timeout(10):
        await again.connected.wait()
    await tenant.wait_edge_sees(lambda e: bool(e.connectors.links))
    assert await echo_roundtrip(session, echo.port) == b"ping"
    await session.close()


async def test_expired_access_token_is_refreshed(tenant: Tenant, echo: EchoServer) -> None:
    await _published(tenant, echo)
    session = await tenant.login("alice")
    old_refresh = session.state.refresh_token
    session.state.expires_at = time.time() - 1  # the client thinks it expired
    assert await echo_roundtrip(session, echo.port) == b"ping"
    assert session.state.refresh_token != old_refresh  # rotated
    await session.close()


async def test_disabling_a_user_cuts_live_flows(tenant: Tenant, echo: EchoServer) -> None:
    alice = await _published(tenant, echo)
    session = await tenant.login("alice")
    stream, _ = await session.open("tcp", "127.0.0.1", echo.port)
    closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    class Watch:
        def on_data(self, data: object) -> None:
            pass

        def on_eof(self) -> None:
            if not closed.done():
                closed.set_result(None)

        def on_closed(self, error: BaseException | None) -> None:
            if not closed.done():
                closed.set_result(None)

        def on_drained(self) -> None:
            pass

    stream.attach(Watch())
    await tenant.call("POST", f"/api/v1/users/{alice['id']}/disable")
    async with asyncio.timeout(5):
        await closed
    with pytest.raises(FlowRefused) as after:
        await session.open("tcp", "127.0.0.1", echo.port)
    assert after.value.status == 401
    rows = await _records(tenant, 2)
    assert any(r.close_reason == "revoked" for r in rows)
    await session.close()


async def _plain_connect(port: int, ca_pem: str, head: bytes) -> bytes:
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.set_alpn_protocols(["http/1.1"])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    writer.write(head)
    async with asyncio.timeout(10):
        response = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " in response.split(b"\r\n", 1)[0]:
            writer.write(b"hello")
            response += await reader.readexactly(5)
        else:
            response += await reader.read(4096)
    writer.close()
    return response


async def test_plain_connect_for_standard_clients(tenant: Tenant, echo: EchoServer) -> None:
    await _published(tenant, echo)
    session = await tenant.login("alice")
    token = await session.access_token()
    port = tenant.service.settings.edge_port
    ok = await _plain_connect(
        port,
        tenant.ca_pem,
        f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: x\r\n"
        f"Proxy-Authorization: Bearer {token}\r\n\r\n".encode(),
    )
    assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"hello")
    no_token = await _plain_connect(
        port, tenant.ca_pem, f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert no_token.startswith(b"HTTP/1.1 401")
    assert b"WWW-Authenticate: Bearer" in no_token
    body = json.loads(no_token.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "missing_token"
    await session.close()


async def test_bad_input_on_the_edge_port_leaves_others_served(
    tenant: Tenant, echo: EchoServer
) -> None:
    await _published(tenant, echo)
    session = await tenant.login("alice")
    stream, _ = await session.open("tcp", "127.0.0.1", echo.port)  # a parallel good flow
    port = tenant.service.settings.edge_port

    # Garbage instead of a TLS ClientHello.
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"\x00garbage\xff" * 100)
    async with asyncio.timeout(15):
        assert await r.read() == b""
    w.close()
    # A half-open handshake: connect and say nothing (held open while we go on).
    half_r, half_w = await asyncio.open_connection("127.0.0.1", port)
    # An oversized CONNECT head.
    huge = await _plain_connect(
        port,
        tenant.ca_pem,
        b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nX-Pad: " + b"a" * 40_000 + b"\r\n\r\n",
    )
    assert huge.startswith(b"HTTP/1.1 431")
    assert json.loads(huge.split(b"\r\n\r\n", 1)[1])["error"] == "head_too_large"
    # A request that is not a flow.
    get = await _plain_connect(port, tenant.ca_pem, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert get.startswith(b"HTTP/1.1 405")
    # Garbage inside a multiplexed connection's stream: that stream is refused.
    with pytest.raises(FlowRefused):
        await session.open("tcp", "bad host name!", 80)

    # The parallel flow and new flows still work.
    assert await echo_roundtrip(session, echo.port, b"still here") == b"still here"
    stream.abort()
    half_w.close()
    del half_r
    await session.close()


async def test_unknown_enrollment_token_is_refused(tenant: Tenant) -> None:
    response = await tenant.admin.post(
        "/api/v1/connectors/enroll",
        json={"token": "enr_" + "0" * 40, "csr_pem": "x", "name": "evil"},
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_enrollment_token"


async def test_forward_and_socks_capture(tenant: Tenant, echo: EchoServer) -> None:
    await _published(tenant, echo)
    session = await tenant.login("alice")
    forward = await serve_forward(session, "127.0.0.1", echo.port, "127.0.0.1", 0)
    fport = forward.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", fport)
    w.write(b"via forward")
    assert await r.readexactly(11) == b"via forward"
    w.close()

    socks = await serve_socks(session, "127.0.0.1", 0)
    sport = socks.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", sport)
    w.write(b"\x05\x01\x00")
    assert await r.readexactly(2) == b"\x05\x00"
    w.write(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + echo.port.to_bytes(2, "big"))
    reply = await r.readexactly(10)
    assert reply[1] == 0
    w.write(b"via socks")
    assert await r.readexactly(9) == b"via socks"
    w.close()
    # A refused destination gives a SOCKS failure reply, not a hang.
    r, w = await asyncio.open_connection("127.0.0.1", sport)
    w.write(b"\x05\x01\x00")
    await r.readexactly(2)
    w.write(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + (1).to_bytes(2, "big"))
    reply = await r.readexactly(10)
    assert reply[1] == 2  # connection not allowed by ruleset
    w.close()
    forward.close()
    socks.close()
    await session.close()


async def test_metrics_endpoint(tenant: Tenant, echo: EchoServer) -> None:
    await _published(tenant, echo)
    session = await tenant.login("alice")
    await echo_roundtrip(session, echo.port)
    text = (await tenant.admin.get("/metrics")).text
    assert "limen_flows_total" in text and "limen_connectors_connected" in text
    await session.close()
