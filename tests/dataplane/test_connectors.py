"""Component tests of connector groups: balancing, health checks, failover, drain,
certificate renewal, the outbound proxy, status, cleanup and bad connectors. Real TLS on
loopback, real SQLite, real connector agents in this process."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from limen.client.tunnel import EdgeSession, FlowRefused
from limen.connector.agent import ConnectorAgent, ConnectorIdentity, enroll, parse_hostport
from limen.edge.connectors import ConnectorLink
from limen.edge.health import Health, remove_stale_connectors
from limen.edge.server import Edge
from limen.errors import AuthError
from limen.net.mux import MuxConnection, MuxStream
from limen.net.proxy import open_tls
from limen.net.tasks import spawn
from limen.net.tls import ALPN_MUX, client_context
from limen.pki import CONNECTOR_OU
from limen.store.db import Store
from limen.store.models import AuditRecord, Connector, TrafficRecord
from tests.support import EchoServer, Tenant, echo_roundtrip, running_tenant

#: The detection bound of issue 4.
BOUND = 2.0


@pytest.fixture
async def echo():
    server = await EchoServer().start()
    yield server
    await server.stop()


def _edge(tenant: Tenant) -> Edge:
    edge = tenant.service.edge
    assert edge is not None
    return edge


async def _setup(tenant: Tenant, echo: EchoServer, n: int) -> tuple[list[ConnectorAgent], Any]:
    alice = await tenant.user("alice")
    await tenant.app("echo", [("ip", "127.0.0.1", str(echo.port))], [alice["id"]])
    agents = [await tenant.connector(f"c{i}") for i in range(n)]
    ids = {a.identity.connector_id for a in agents}
    await tenant.wait_edge_sees(lambda e: ids <= set(e.connectors.links))
    return agents, await tenant.login("alice")


async def _records(tenant: Tenant, n: int, **where: Any) -> list[TrafficRecord]:
    assert tenant.service.ctx is not None
    store = tenant.service.ctx.store
    rows: list[TrafficRecord] = []
    for _ in range(1000):  # bounded: the writer flushes every 50 ms in tests
        with store.session() as s:
            q = select(TrafficRecord).filter_by(**where).order_by(TrafficRecord.started_at)
            rows = list(s.scalars(q))
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {n} traffic records, found {len(rows)}")


def _row(store: Store, connector_id: str) -> tuple[str, float, float, str]:
    """(cert serial, cert expiry, last seen, address) of a stored connector."""
    with store.session() as s:
        row = s.get(Connector, connector_id)
        assert row is not None
        return row.cert_serial, row.cert_not_after, row.last_seen_at, row.address


def _kill(agent: ConnectorAgent) -> None:
    """Stop an agent abruptly: its links are reset, nothing is said to the edge."""
    agent._stopping = True
    for task in agent._tasks:
        task.cancel()
    for conn in list(agent.live):
        assert conn.transport is not None
        conn.transport.abort()


class _Held:
    """A flow kept open: echoes what is written, records how it ended."""

    def __init__(self, stream: MuxStream) -> None:
        self.stream = stream
        self.got = bytearray()
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stream.attach(self)

    def on_data(self, data: Any) -> None:
        self.got.extend(data)

    def on_eof(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def on_closed(self, error: BaseException | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def on_drained(self) -> None:
        pass

    async def echo(self, payload: bytes) -> None:
        start = len(self.got)
        self.stream.write(payload)
        for _ in range(500):
            if len(self.got) - start >= len(payload):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no echo on a held flow")


async def _hold(session: EdgeSession, port: int) -> _Held:
    stream, _ = await session.open("tcp", "127.0.0.1", port)
    held = _Held(stream)
    await held.echo(b"hello")
    return held


async def _wait_health(edge: Edge, connector_id: str, wanted: set[Health]) -> float:
    """Seconds until the edge judges the connector to be in one of ``wanted``."""
    started = time.monotonic()
    for _ in range(1000):
        link = edge.connectors.links.get(connector_id)
        if link is not None and edge.connectors.health_of(link, edge._loop.time()) in wanted:
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"connector {connector_id} never became {wanted}")


# --- balancing --------------------------------------------------------------------------------


async def test_flows_spread_over_three_connectors(tmp_path: Path, echo: EchoServer) -> None:
    async with running_tenant(tmp_path) as tenant:
        agents, session = await _setup(tenant, echo, 3)
        for _ in range(100):  # 300 flows, three at a time
            results = await asyncio.gather(*(echo_roundtrip(session, echo.port) for _ in range(3)))
            assert results == [b"ping"] * 3
        rows = await _records(tenant, 300, action="allow")
        counts = collections.Counter(r.connector_id for r in rows)
        assert set(counts) == {a.identity.connector_id for a in agents}
        for connector_id, n in counts.items():
            assert 0.20 * 300 <= n <= 0.45 * 300, (connector_id, counts)
        # The choice is in the traffic log: which connector, how loaded it was.
        assert all(r.reason.startswith(f"connector {r.connector_id} (") for r in rows)
        assert all(r.connector_group_id == rows[0].connector_group_id for r in rows)
        await session.close()


# --- failover ---------------------------------------------------------------------------------


async def test_killed_connector_flows_end_as_lost_and_new_flows_succeed(
    tmp_path: Path, echo: EchoServer
) -> None:
    async with running_tenant(tmp_path) as tenant:
        agents, session = await _setup(tenant, echo, 3)
        edge = _edge(tenant)
        held = [await _hold(session, echo.port) for _ in range(6)]
        rows = await _records(tenant, 0)
        assert edge.flows, rows
        by_connector = collections.Counter(
            f.link.connector_id for f in edge.flows.values() if f.link is not None
        )
        victim = agents[0]
        victim_id = victim.identity.connector_id
        assert by_connector[victim_id] >= 1  # least-loaded spreads six flows over three

        # Flows keep starting while the connector dies: (start time, succeeded).
        outcomes: list[tuple[float, bool]] = []
        stop = asyncio.Event()

        async def traffic() -> int:
            n = 0
            while not stop.is_set():
                started = time.monotonic()
                try:
                    ok = await echo_roundtrip(session, echo.port) == b"ping"
                except FlowRefused:
                    ok = False
                outcomes.append((started, ok))
                n += 1
            return n

        runners = [spawn(traffic(), name=f"traffic {i}") for i in range(3)]
        await asyncio.sleep(0.2)  # let traffic run before the kill
        _kill(victim)
        killed_at = time.monotonic()
        await tenant.wait_edge_sees(lambda e: victim_id not in e.connectors.links)
        noticed_at = time.monotonic()
        assert noticed_at - killed_at < BOUND
        await asyncio.sleep(1.0)  # traffic keeps flowing through the survivors
        stop.set()
        await asyncio.gather(*runners)
        # Only flows the victim was carrying when it died may fail (they end, as they
        # must); every flow started once the edge noticed succeeds.
        after = [ok for started, ok in outcomes if started >= noticed_at]
        assert len(after) > 20 and all(after), (len(after), after.count(False))
        assert sum(not ok for _, ok in outcomes) <= 3

        # The victim's flows ended, and are logged as connector_lost.
        lost = [h for h in held if h.ended.done()]
        assert len(lost) == by_connector[victim_id]
        lost_rows = await _records(tenant, len(lost), close_reason="connector_lost")
        assert {r.connector_id for r in lost_rows} == {victim_id}
        assert all("was lost" in r.reason for r in lost_rows)
        # The survivors' flows are untouched.
        for h in held:
            if not h.ended.done():
                await h.echo(b"still here")

        # Restart it: it is used again.
        directory = tenant.tmp / "connector-c0"
        again = ConnectorAgent(ConnectorIdentity.load(directory))
        tenant.agents.append(again)
        tenant.agent_tasks.append(spawn(again.run(), name="test connector c0 again"))
        await tenant.wait_edge_sees(lambda e: victim_id in e.connectors.links)
        for h in held:
            h.stream.close()
        before = len(await _records(tenant, 0, connector_id=victim_id))
        for _ in range(10):
            await asyncio.gather(*(echo_roundtrip(session, echo.port) for _ in range(3)))
        reused = await _records(tenant, before + 1, connector_id=victim_id)
        assert len(reused) > before
        await session.close()


async def test_every_connector_down_fails_fast_with_no_connector(
    tmp_path: Path, echo: EchoServer
) -> None:
    async with running_tenant(tmp_path) as tenant:
        agents, session = await _setup(tenant, echo, 2)
        for agent in agents:
            _kill(agent)
        await tenant.wait_edge_sees(lambda e: not e.connectors.links)
        started = time.monotonic()
        with pytest.raises(FlowRefused) as refused:
            await session.open("tcp", "127.0.0.1", echo.port)
        assert time.monotonic() - started < 1.0
        assert (refused.value.status, refused.value.code) == (502, "no_connector")
        assert "no healthy connector of group" in refused.value.message
        await session.close()


# --- health -------------------------------------------------------------------------------------


async def test_connector_whose_dials_fail_leaves_rotation_and_returns(
    tmp_path: Path, echo: EchoServer
) -> None:
    async with running_tenant(tmp_path) as tenant:
        agents, session = await _setup(tenant, echo, 3)
        edge = _edge(tenant)
        broken = agents[2]
        broken_id = broken.identity.connector_id
        await _wait_health(edge, broken_id, {Health.HEALTHY})

        # Its control channel stays up, but every dial now fails: it leaves from an
        # address this host does not have (TEST-NET-1, RFC 5737), like a cut LAN route.
        broken.dial_source = "192.0.2.1"
        took = await _wait_health(edge, broken_id, {Health.UNHEALTHY})
        assert took < BOUND
        link = edge.connectors.links[broken_id]
        assert link.health.last_failure == "target_unreachable"
        assert broken.connected.is_set()

        count = len(await _records(tenant, 0, connector_id=broken_id))
        for _ in range(10):
            results = await asyncio.gather(*(echo_roundtrip(session, echo.port) for _ in range(3)))
            assert results == [b"ping"] * 3
        assert len(await _records(tenant, 0, connector_id=broken_id)) == count

        # The API shows it (live status is published on change and every 0.1 s).
        for _ in range(100):
            status = await tenant.call("GET", f"/api/v1/connectors/{broken_id}")
            if status["health"] == "unhealthy":
                break
            await asyncio.sleep(0.01)
        assert status["health"] == "unhealthy"
        assert status["last_failure"] == "target_unreachable"

        # It recovers: back in rotation within the bound, and used again.
        broken.dial_source = None
        assert await _wait_health(edge, broken_id, {Health.HEALTHY}) < BOUND
        for _ in range(30):
            await asyncio.gather(*(echo_roundtrip(session, echo.port) for _ in range(3)))
            if len(await _records(tenant, 0, connector_id=broken_id)) > count:
                break
        else:
            raise AssertionError("the recovered connector got no flow")
        await session.close()


async def test_target_down_for_everyone_keeps_connectors_in_rotation(
    tmp_path: Path, echo: EchoServer
) -> None:
    async with running_tenant(tmp_path) as tenant:
        agents, session = await _setup(tenant, echo, 2)
        edge = _edge(tenant)
        for agent in agents:
            agent.dial_source = "192.0.2.1"
        for agent in agents:
            await _wait_health(edge, agent.identity.connector_id, {Health.DEGRADED})
        with pytest.raises(FlowRefused) as refused:
            await session.open("tcp", "127.0.0.1", echo.port)
        # The target's error, not "no connector": nobody is better placed.
        assert refused.value.code == "target_unreachable"
        await session.close()


# --- drain ------------------------------------------------------------------------------------


async def test_admin_drain_stops_new_flows_and_keeps_current_ones(
    tmp_path: Path, echo: EchoServer
) -> None:
    async with running_tenant(tmp_path) as tenant:
        agents, session = await _setup(tenant, echo, 2)
        edge = _edge(tenant)
        held = [await _hold(session, echo.port) for _ in range(4)]
        drained_id = agents[0].identity.connector_id
        version = edge.snapshot.version
        out = await tenant.call("POST", f"/api/v1/connectors/{drained_id}/drain")
        assert out["state"] == "draining"
        await tenant.wait_edge_sees(lambda e: e.connectors.links[drained_id].draining)
        assert edge.snapshot.version > version
        for h in held:
            await h.echo(b"still flowing")
        before = len(await _records(tenant, 0, connector_id=drained_id))
        for _ in range(5):
            await asyncio.gather(*(echo_roundtrip(session, echo.port) for _ in range(4)))
        assert len(await _records(tenant, 0, connector_id=drained_id)) == before
        # The status board is republished by the edge's monitor a few times a second:
        # poll (bounded) until it shows the drain rather than racing its next publish.
        for _ in range(100):
            status = await tenant.call("GET", f"/api/v1/connectors/{drained_id}")
            if status["health"] == "draining":
                break
            await asyncio.sleep(0.05)
        assert status["health"] == "draining"
        assert tenant.service.ctx is not None
        with tenant.service.ctx.store.session() as s:
            actions = [a.action for a in s.scalars(select(AuditRecord))]
        assert "connector.drain" in actions

        out = await tenant.call("POST", f"/api/v1/connectors/{drained_id}/resume")
        assert out["state"] == "active"
        await tenant.wait_edge_sees(lambda e: not e.connectors.links[drained_id].draining)
        for h in held:
            h.stream.close()
        await session.close()


async def test_connector_drains_itself_then_exits(tmp_path: Path, echo: EchoServer) -> None:
    async with running_tenant(tmp_path) as tenant:
        agents, session = await _setup(tenant, echo, 2)
        leaving = agents[0]
        leaving_id = leaving.identity.connector_id
        held = [await _hold(session, echo.port) for _ in range(4)]
        assert leaving.flows_in_progress >= 1
        drain = spawn(leaving.drain(grace=20), name="test drain")
        await tenant.wait_edge_sees(lambda e: e.connectors.links[leaving_id].self_draining)
        before = len(await _records(tenant, 0, connector_id=leaving_id))
        for _ in range(5):
            await asyncio.gather(*(echo_roundtrip(session, echo.port) for _ in range(4)))
        assert len(await _records(tenant, 0, connector_id=leaving_id)) == before
        assert not drain.done()  # its flows are still running
        for h in held:
            await h.echo(b"still flowing")
            h.stream.close()
        async with asyncio.timeout(10):
            await drain
        assert leaving.flows_in_progress == 0
        await tenant.wait_edge_sees(lambda e: leaving_id not in e.connectors.links)
        lost = await _records(tenant, 0, close_reason="connector_lost")
        assert lost == []
        await session.close()


# --- certificates ---------------------------------------------------------------------------


async def test_certificate_renewed_over_control_stream_and_expired_refused(
    tmp_path: Path, echo: EchoServer
) -> None:
    async with running_tenant(tmp_path, connector_cert_ttl=4) as tenant:
        agents, session = await _setup(tenant, echo, 1)
        renewing = agents[0]
        renewing_id = renewing.identity.connector_id
        first_cert = renewing.identity.cert_pem
        first_not_after = x509.load_pem_x509_certificate(first_cert.encode()).not_valid_after_utc

        # A second connector that never renews.
        group = await tenant.default_group()
        enr = await tenant.call(
            "POST", f"/api/v1/connector-groups/{group}/enrollment-tokens", {"name": "old"}
        )
        directory = tenant.tmp / "connector-old"
        await asyncio.to_thread(
            enroll,
            tenant.service.api_url,
            enr["token"],
            directory,
            ca_pem=tenant.ca_pem,
            name="old",
            edge=tenant.service.edge_address,
        )
        stale = ConnectorAgent(ConnectorIdentity.load(directory), renew=False)
        tenant.agents.append(stale)
        tenant.agent_tasks.append(spawn(stale.run(), name="test connector old"))
        stale_id = stale.identity.connector_id
        await tenant.wait_edge_sees(lambda e: stale_id in e.connectors.links)

        # Renewal at two thirds of four seconds.
        for _ in range(1000):
            if renewing.identity.cert_pem != first_cert:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the connector did not renew its certificate")
        assert tenant.service.ctx is not None
        store = tenant.service.ctx.store
        first_serial = format(
            x509.load_pem_x509_certificate(first_cert.encode()).serial_number, "x"
        )
        for _ in range(500):
            serial, not_after, _seen, _address = _row(store, renewing_id)
            if serial != first_serial:
                break
            await asyncio.sleep(0.01)
        assert serial != first_serial and not_after > first_not_after.timestamp()
        with store.session() as s:
            audits = [a.action for a in s.scalars(select(AuditRecord))]
        assert "connector.renew" in audits

        # Past the first certificates' expiry, both reconnect: the renewed one is accepted,
        # the expired one refused by TLS.
        # Waiting for the wall clock itself, not for an event.
        stale_not_after = x509.load_pem_x509_certificate(
            stale.identity.cert_pem.encode()
        ).not_valid_after_utc.timestamp()
        await asyncio.sleep(max(0.0, stale_not_after + 0.5 - time.time()))
        for agent in (renewing, stale):
            for conn in list(agent.live):
                conn.close()
        await tenant.wait_edge_sees(lambda e: stale_id not in e.connectors.links)
        for _ in range(1000):
            if renewing_id in _edge(tenant).connectors.links and renewing.connected.is_set():
                break
            await asyncio.sleep(0.01)
        for _ in range(5):
            assert await echo_roundtrip(session, echo.port) == b"ping"
        assert stale_id not in _edge(tenant).connectors.links
        await session.close()


async def test_revoked_connector_is_cut_and_refused(tmp_path: Path, echo: EchoServer) -> None:
    async with running_tenant(tmp_path) as tenant:
        agents, session = await _setup(tenant, echo, 2)
        victim_id = agents[0].identity.connector_id
        held = [await _hold(session, echo.port) for _ in range(4)]
        out = await tenant.call("POST", f"/api/v1/connectors/{victim_id}/revoke")
        assert out["state"] == "revoked" and out["health"] == "revoked"
        await tenant.wait_edge_sees(lambda e: victim_id not in e.connectors.links)
        # It keeps trying to reconnect and keeps being refused.
        for _ in range(5):
            assert await echo_roundtrip(session, echo.port) == b"ping"
        assert victim_id not in _edge(tenant).connectors.links
        assert sum(h.ended.done() for h in held) >= 1
        for h in held:
            h.stream.close()
        await session.close()


# --- outbound proxy -------------------------------------------------------------------------


class ConnectProxy:
    """A minimal HTTP CONNECT proxy on loopback (the e2e test uses tinyproxy)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tunnels: list[str] = []
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> ConnectProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            assert method == "CONNECT"
            self.tunnels.append(target)
            host, port = parse_hostport(target)
            up_reader, up_writer = await asyncio.open_connection(host, port)
            self.writers.add(up_writer)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

            async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
                w.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.close()


async def test_connector_through_http_connect_proxy(tmp_path: Path, echo: EchoServer) -> None:
    proxy = await ConnectProxy().start()
    try:
        async with running_tenant(tmp_path) as tenant:
            alice = await tenant.user("alice")
            await tenant.app("echo", [("ip", "127.0.0.1", str(echo.port))], [alice["id"]])
            group = await tenant.default_group()
            enr = await tenant.call(
                "POST", f"/api/v1/connector-groups/{group}/enrollment-tokens", {"name": "px"}
            )
            directory = tenant.tmp / "connector-px"
            await asyncio.to_thread(
                enroll,
                tenant.service.api_url,
                enr["token"],
                directory,
                ca_pem=tenant.ca_pem,
                name="px",
                edge=tenant.service.edge_address,
            )
            agent = ConnectorAgent(
                ConnectorIdentity.load(directory), proxy=f"http://127.0.0.1:{proxy.port}"
            )
            tenant.agents.append(agent)
            tenant.agent_tasks.append(spawn(agent.run(), name="test connector px"))
            async with asyncio.timeout(10):
                await agent.connected.wait()
            assert proxy.tunnels and proxy.tunnels[0] == tenant.service.edge_address
            session = await tenant.login("alice")
            assert await echo_roundtrip(session, echo.port, b"via proxy") == b"via proxy"
            await session.close()
    finally:
        await proxy.stop()


# --- status and cleanup ---------------------------------------------------------------------


async def test_status_shows_live_and_stored_fields(tmp_path: Path, echo: EchoServer) -> None:
    async with running_tenant(tmp_path) as tenant:
        agents, session = await _setup(tenant, echo, 1)
        connector_id = agents[0].identity.connector_id
        held = await _hold(session, echo.port)
        status: dict[str, Any] = {}
        for _ in range(500):
            status = await tenant.call("GET", f"/api/v1/connectors/{connector_id}")
            if status["active_flows"] == 1 and status["last_heartbeat"] > 0:
                break
            await asyncio.sleep(0.02)
        groups = await tenant.call("GET", "/api/v1/connector-groups")
        assert status["group_name"] == next(g["name"] for g in groups if g["is_default"])
        assert status["health"] in ("healthy", "unknown")
        assert status["active_flows"] == 1 and status["connections"] == 2
        assert status["version"] and status["address"] == "127.0.0.1"
        assert status["cert_not_after"] > time.time() + 20 * 86400
        listed = await tenant.call("GET", "/api/v1/connectors")
        assert [c["id"] for c in listed] == [connector_id]
        # last_seen_at is persisted by the edge (bounded rate) for APIs in other processes.
        assert tenant.service.ctx is not None
        for _ in range(500):
            _serial, _not_after, seen, address = _row(tenant.service.ctx.store, connector_id)
            if seen > 0:
                break
            await asyncio.sleep(0.01)
        assert seen > time.time() - 60 and address == "127.0.0.1"
        held.stream.close()
        rows = await _records(tenant, 1, action="allow")
        assert rows[0].bytes_up == len(b"hello")
        await session.close()


async def test_stale_connectors_are_removed(tmp_path: Path) -> None:
    async with running_tenant(tmp_path) as tenant:
        assert tenant.service.ctx is not None
        store = tenant.service.ctx.store
        group = await tenant.default_group()
        now = time.time()
        old = now - 11 * 86400
        with store.session() as s:
            for cid, seen in (("con_old", old), ("con_recent", now - 3600), ("con_live", old)):
                s.add(
                    Connector(
                        id=cid,
                        name=cid,
                        group_id=group,
                        state="active",
                        last_seen_at=seen,
                        created_at=old,
                    )
                )
        version = store.config_version()
        removed = remove_stale_connectors(store, now=now, max_age_days=10, keep={"con_live"})
        assert removed == ["con_old"]
        with store.session() as s:
            left = set(s.scalars(select(Connector.id)))
            audits = [a.target for a in s.scalars(select(AuditRecord)) if a.actor == "system"]
        assert left == {"con_recent", "con_live"}
        assert audits == ["con_old"]
        assert store.config_version() > version


# --- bad input --------------------------------------------------------------------------------


async def test_enrollment_token_cannot_be_reused(tmp_path: Path) -> None:
    async with running_tenant(tmp_path) as tenant:
        group = await tenant.default_group()
        enr = await tenant.call("POST", f"/api/v1/connector-groups/{group}/enrollment-tokens", {})
        args = (tenant.service.api_url, enr["token"])
        edge = tenant.service.edge_address
        await asyncio.to_thread(
            enroll, *args, tenant.tmp / "first", ca_pem=tenant.ca_pem, edge=edge
        )
        with pytest.raises(AuthError) as reused:
            await asyncio.to_thread(
                enroll, *args, tenant.tmp / "second", ca_pem=tenant.ca_pem, edge=edge
            )
        assert reused.value.code == "invalid_enrollment_token"


def _foreign_identity(connector_id: str, edge: str, ca_pem: str) -> ConnectorIdentity:
    """A connector certificate with the right shape from a CA the edge does not trust."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Other CA")])
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, connector_id),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, CONNECTOR_OU),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    return ConnectorIdentity(
        connector_id=connector_id,
        edge=edge,
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        ca_pem=ca_pem,
    )


async def _mux_to_edge(tenant: Tenant, identity: ConnectorIdentity) -> MuxConnection:
    conn = MuxConnection(is_client=True, name="test link")
    context = client_context(
        identity.ca_pem, cert_pem=identity.cert_pem, key_pem=identity.key_pem, alpn=[ALPN_MUX]
    )
    host, port = parse_hostport(tenant.service.edge_address)
    await open_tls(conn, host, port, ssl_context=context)
    return conn


async def test_foreign_ca_and_garbage_control_are_refused_others_unaffected(
    tmp_path: Path, echo: EchoServer
) -> None:
    async with running_tenant(tmp_path) as tenant:
        agents, session = await _setup(tenant, echo, 1)
        good_id = agents[0].identity.connector_id
        edge = _edge(tenant)

        # A certificate from another CA, naming a real connector: TLS refuses it.
        foreign = _foreign_identity(good_id, tenant.service.edge_address, tenant.ca_pem)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            conn = await _mux_to_edge(tenant, foreign)
            # TLS 1.3: the client learns of the refusal after its side of the handshake.
            async with asyncio.timeout(5):
                await conn.closed
            raise ConnectionError("closed by the edge")
        assert len(edge.connectors.links[good_id].connections) == 2

        # A real connector identity speaking garbage on its control stream: that link is
        # closed, the connector's other links and flows are unaffected.
        identity = agents[0].identity
        conn = await _mux_to_edge(tenant, identity)
        await tenant.wait_edge_sees(lambda e: len(e.connectors.links[good_id].connections) == 3)
        control = conn.open_stream()
        control.write(b"\x00\x00\x00\x05hello")
        async with asyncio.timeout(5):
            await conn.closed
        await tenant.wait_edge_sees(lambda e: len(e.connectors.links[good_id].connections) == 2)
        for _ in range(3):
            assert await echo_roundtrip(session, echo.port) == b"ping"
        await session.close()


def test_link_health_judgement_is_relative() -> None:
    a, b = ConnectorLink("con_a", "grp_1"), ConnectorLink("con_b", "grp_1")
    a.health.record_control(10.0)
    b.health.record_control(10.0)
    a.health.record_check(False, 10.0, "target_unreachable")
    b.health.record_check(True, 10.0)
    from limen.edge.health import judge

    assert judge(a.health, [b.health], 10.5, False) is Health.UNHEALTHY
    assert judge(b.health, [a.health], 10.5, False) is Health.HEALTHY
    b.health.record_check(False, 11.0, "target_timeout")
    assert judge(a.health, [b.health], 11.5, False) is Health.DEGRADED
    assert judge(a.health, [b.health], 20.0, False) is Health.SILENT
    assert judge(a.health, [b.health], 10.5, True) is Health.DRAINING
