"""Several nodes sharing PostgreSQL: the PostgreSQL bus between processes' worth of buses,
and two services (API + edge on node 1, an edge alone on node 2) in one test process, each
with its own bus, its own listener and its own snapshot — only the database in common.

Node 2 polls the configuration version every 60 s here, so whatever it does within the
test's bounds it learned from the bus."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from limen.admin.auth import create_admin_token
from limen.bus import create_bus
from limen.bus.inprocess import CONFIG_CHANGED, SUBJECT_REVOKED, BusEvent, EventBus
from limen.bus.postgres import LISTENER_APPLICATION_NAME, PostgresBus, is_remote
from limen.client import auth
from limen.client.profile import ClientState, new_device_id
from limen.client.tunnel import EdgeSession, FlowRefused
from limen.config import Settings, load_settings
from limen.connector.agent import ConnectorAgent, ConnectorIdentity, enroll
from limen.errors import ConfigError
from limen.net.tasks import spawn
from limen.runner import Service
from limen.signals import SIGNAL_ENFORCED
from limen.store.db import Store
from limen.store.models import BusEventRow, BusPosition
from tests.support import EchoServer, echo_roundtrip

pytestmark = pytest.mark.postgres

PASSWORD = "correct horse battery"


# --- the bus alone ------------------------------------------------------------------------------


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[Store]:
    store = Store(pg_url)
    store.migrate()
    yield store
    store.dispose()


async def _until(predicate: Any, what: str, seconds: float = 5.0) -> float:
    """Bounded polling; how long it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def test_events_reach_the_other_node_once_and_in_order(pg_store: Store) -> None:
    a, b = PostgresBus(pg_store), PostgresBus(pg_store)
    seen_a: list[BusEvent] = []
    seen_b: list[BusEvent] = []
    a.subscribe(seen_a.append)
    b.subscribe(seen_b.append)
    await asyncio.to_thread(a.start)
    await asyncio.to_thread(b.start)
    try:
        assert a.listening and b.listening
        t0 = time.monotonic()
        for i in range(20):
            a.publish(SUBJECT_REVOKED, user_id=f"usr_{i}", at=1_700_000_000.123456 + i)
        # Local subscribers got them at once, before any I/O.
        assert [e.payload["user_id"] for e in seen_a] == [f"usr_{i}" for i in range(20)]
        took = await _until(lambda: len(seen_b) == 20, "node b to receive 20 events")
        print(f"\n20 events from node a to node b in {took * 1000:.1f} ms")
        assert [e.payload["user_id"] for e in seen_b] == [f"usr_{i}" for i in range(20)]
        assert seen_b[3].payload["at"] == 1_700_000_003.123456  # floats round trip exactly
        b.publish(CONFIG_CHANGED, reason="test")
        await _until(lambda: len(seen_a) == 21, "node a to receive b's event")
        last = seen_a[-1]
        assert (last.topic, last.payload) == (CONFIG_CHANGED, {"reason": "test"})
        assert is_remote(last) and not is_remote(seen_a[0])
        assert await asyncio.to_thread(a.flush) and await asyncio.to_thread(b.flush)
        await asyncio.sleep(0.2)  # let any (wrong) echo arrive before counting
        assert len(seen_a) == 21 and len(seen_b) == 21  # no node got its own events back
        assert time.monotonic() - t0 < 10
    finally:
        await asyncio.to_thread(a.close)
        await asyncio.to_thread(b.close)
    # Closed: local delivery still works, nothing more is written.
    rows = _count(pg_store)
    a.publish(CONFIG_CHANGED, reason="after close")
    assert seen_a[-1].payload == {"reason": "after close"} and _count(pg_store) == rows == 21


def _count(store: Store) -> int:
    with store.session() as s:
        return int(s.scalar(select(func.count()).select_from(BusEventRow)) or 0)


async def test_a_node_replays_what_it_missed_from_its_saved_position(pg_store: Store) -> None:
    publisher = PostgresBus(pg_store)
    publisher.publish(CONFIG_CHANGED, reason="before b ever ran")
    assert await asyncio.to_thread(publisher.flush)

    b = PostgresBus(pg_store)
    b_seen: list[BusEvent] = []
    b.subscribe(b_seen.append)
    await asyncio.to_thread(b.start, "node-b/edge")
    publisher.publish(CONFIG_CHANGED, reason="while b runs")
    await _until(lambda: len(b_seen) == 1, "node b to receive the live event")
    await asyncio.to_thread(b.close)
    assert b_seen[0].payload["reason"] == "while b runs"  # not history from before its start

    for i in range(3):
        publisher.publish(SUBJECT_REVOKED, user_id=f"usr_missed_{i}")
    assert await asyncio.to_thread(publisher.flush)

    again = PostgresBus(pg_store)
    replayed: list[BusEvent] = []
    again.subscribe(replayed.append)
    await asyncio.to_thread(again.start, "node-b/edge")  # returns once caught up
    try:
        assert [e.payload.get("user_id") for e in replayed] == [f"usr_missed_{i}" for i in range(3)]
        with pg_store.session() as s:
            head = s.scalar(select(func.max(BusEventRow.id)))
            saved = s.scalar(select(BusPosition.last_id).where(BusPosition.node == "node-b/edge"))
        assert again.last_id == head == saved
        # A node without a saved position starts at the head: no replay.
        fresh = PostgresBus(pg_store)
        fresh_seen: list[BusEvent] = []
        fresh.subscribe(fresh_seen.append)
        await asyncio.to_thread(fresh.start)
        await asyncio.to_thread(fresh.close)
        assert fresh_seen == []
    finally:
        await asyncio.to_thread(again.close)
        await asyncio.to_thread(publisher.close)


async def test_events_published_while_the_listener_is_cut_off_arrive(pg_store: Store) -> None:
    a, b = PostgresBus(pg_store), PostgresBus(pg_store)
    seen: list[BusEvent] = []
    b.subscribe(seen.append)
    await asyncio.to_thread(b.start)
    try:
        # Kill b's listening connection (a network cut, a database restart), then publish
        # while it reconnects.
        with pg_store.engine.begin() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = :name AND datname = current_database()"
                ),
                {"name": LISTENER_APPLICATION_NAME},
            ).scalar()
        assert killed == 1
        for i in range(5):
            a.publish(SUBJECT_REVOKED, user_id=f"usr_{i}")
        await _until(lambda: len(seen) == 5, "the events published during the cut", 10)
        assert [e.payload["user_id"] for e in seen] == [f"usr_{i}" for i in range(5)]
        await _until(lambda: b.listening, "b to listen again")
    finally:
        await asyncio.to_thread(a.close)
        await asyncio.to_thread(b.close)


async def test_an_odd_payload_does_not_sink_its_batch(pg_store: Store) -> None:
    a, b = PostgresBus(pg_store), PostgresBus(pg_store)
    seen: list[BusEvent] = []
    b.subscribe(seen.append)
    await asyncio.to_thread(b.start)
    try:
        a.publish(CONFIG_CHANGED, reason="before")
        a.publish("test.odd", members={"x"}, at=float("nan"))
        a.publish(CONFIG_CHANGED, reason="after")
        await _until(lambda: len(seen) == 3, "all three events")
        assert seen[1].payload == {"members": "{'x'}", "at": "nan"}
        assert [e.payload.get("reason") for e in seen] == ["before", None, "after"]
    finally:
        await asyncio.to_thread(a.close)
        await asyncio.to_thread(b.close)


async def test_old_events_are_pruned(pg_store: Store) -> None:
    bus = PostgresBus(pg_store, retention_seconds=60)
    bus.publish(CONFIG_CHANGED, reason="old")
    assert await asyncio.to_thread(bus.flush)
    assert bus.prune(now=time.time()) == 0
    assert bus.prune(now=time.time() + 61) == 1
    assert _count(pg_store) == 0
    await asyncio.to_thread(bus.close)


def test_create_bus_follows_the_settings(pg_store: Store, tmp_path: Path) -> None:
    sqlite = Store(f"sqlite:///{tmp_path}/t.db")
    try:
        assert type(create_bus(Settings(), sqlite)) is EventBus
        assert type(create_bus(Settings(bus="inprocess"), pg_store)) is EventBus
        auto = create_bus(Settings(), pg_store)
        assert isinstance(auto, PostgresBus)
        auto.close()
        with pytest.raises(ConfigError) as wrong:
            create_bus(Settings(bus="postgres"), sqlite)
        assert wrong.value.code == "bus_backend"
        with pytest.raises(ConfigError):
            create_bus(Settings(bus="kafka"), pg_store)
    finally:
        sqlite.dispose()


# --- two services on one database ---------------------------------------------------------------


def _settings(tmp: Path, name: str, pg_url: str) -> Settings:
    return load_settings(
        data_dir=tmp / name,
        database_url=pg_url,
        node_name=name,
        api_host="127.0.0.1",
        api_port=0,
        edge_host="127.0.0.1",
        edge_port=0,
        public_host="localhost",
        config_poll_seconds=60.0,
        traffic_log_flush_seconds=0.05,
    )


class Cluster:
    """Node 1 runs the API and an edge, node 2 an edge only; one PostgreSQL database."""

    def __init__(self, tmp: Path, pg_url: str) -> None:
        self.tmp = tmp
        self.pg_url = pg_url
        self.node1 = Service(_settings(tmp, "node-1", pg_url))
        self.node2 = Service(_settings(tmp, "node-2", pg_url), run_api=False)
        self.admin: httpx.AsyncClient | None = None
        self.agents: list[ConnectorAgent] = []
        self.tasks: list[asyncio.Task[Any]] = []

    @property
    def ca_pem(self) -> str:
        return (self.node1.settings.data_dir / "ca.pem").read_text()

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        assert self.admin is not None
        response = await self.admin.request(method, path, json=body)
        assert response.status_code < 400, f"{method} {path}: {response.text}"
        return response.json() if response.content else {}

    async def connector_on(self, service: Service, name: str) -> ConnectorAgent:
        groups = await self.call("GET", "/api/v1/connector-groups")
        group = next(g["id"] for g in groups if g.get("is_default"))
        enr = await self.call(
            "POST", f"/api/v1/connector-groups/{group}/enrollment-tokens", {"name": name}
        )
        directory = self.tmp / f"connector-{name}"
        await asyncio.to_thread(
            enroll,
            self.node1.api_url,
            enr["token"],
            directory,
            ca_pem=self.ca_pem,
            name=name,
            edge=service.edge_address,
        )
        agent = ConnectorAgent(ConnectorIdentity.load(directory))
        self.agents.append(agent)
        self.tasks.append(spawn(agent.run(), name=f"test connector {name}"))
        async with asyncio.timeout(10):
            await agent.connected.wait()
        return agent

    async def login_on(self, service: Service, username: str) -> EdgeSession:
        state = ClientState(
            api_url=self.node1.api_url,
            edge=service.edge_address,
            ca_pem=self.ca_pem,
            device_id=new_device_id(),
            capabilities=["cp1"],
        )

        def do_login() -> None:
            with auth.http_client(state) as http:
                auth.password_login(state, http, username, PASSWORD)

        await asyncio.to_thread(do_login)
        return EdgeSession(state)


@contextlib.asynccontextmanager
async def _cluster(tmp: Path, pg_url: str) -> AsyncIterator[Cluster]:
    cluster = Cluster(tmp, pg_url)
    # One after the other: each migrates at start, and node 2 reuses node 1's PKI.
    await cluster.node1.start()
    # Every node of a deployment names the same issuer (docs/operations.md); here node 1's
    # port is only known now.
    cluster.node2.settings.issuer = cluster.node1.settings.resolved_issuer
    await cluster.node2.start()
    assert cluster.node1.ctx is not None
    token = create_admin_token(cluster.node1.ctx.store, "test", "admin")
    cluster.admin = httpx.AsyncClient(
        base_url=cluster.node1.api_url,
        verify=ssl.create_default_context(cadata=cluster.ca_pem),
        timeout=30,
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        yield cluster
    finally:
        await _quiesce(cluster.node1, cluster.node2)
        for agent in cluster.agents:
            await agent.stop()
        await cluster.admin.aclose()
        await cluster.node2.stop()
        await cluster.node1.stop()


async def _quiesce(*services: Service) -> None:
    """Let edges finish reloading before they stop. Known gap: ``Edge.stop`` does not wait
    for a snapshot load already running in a worker thread, which then opens a database
    connection after ``Store.dispose`` (a ResourceWarning with psycopg)."""
    for service in services:
        edge, ctx = service.edge, service.ctx
        if edge is None or ctx is None:
            continue
        version = await asyncio.to_thread(ctx.store.config_version)
        with contextlib.suppress(AssertionError):
            await _until(
                lambda e=edge, v=version: e.snapshot.version >= v and not e._reload.is_set(),
                "the edge to settle",
            )
    # The last reload's worker thread returns shortly after the snapshot is swapped in.
    await asyncio.sleep(0.2)


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = await EchoServer().start()
    yield server
    await server.stop()


def _edge_version(service: Service) -> int:
    assert service.edge is not None
    return service.edge.snapshot.version


class _Watch:
    """Resolves ``closed`` when the flow ends (EOF or reset)."""

    def __init__(self) -> None:
        self.closed: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def _done(self) -> None:
        if not self.closed.done():
            self.closed.set_result(time.monotonic())

    def on_data(self, data: object) -> None:
        pass

    def on_eof(self) -> None:
        self._done()

    def on_closed(self, error: BaseException | None) -> None:
        self._done()

    def on_drained(self) -> None:
        pass


async def test_revocation_and_config_reach_the_other_edge_through_the_bus(
    tmp_path: Path, pg_url: str, echo: EchoServer
) -> None:
    echo2 = await EchoServer().start()
    async with _cluster(tmp_path, pg_url) as cluster:
        node1, node2 = cluster.node1, cluster.node2
        assert node1.ctx is not None and node2.ctx is not None
        assert isinstance(node1.ctx.bus, PostgresBus) and isinstance(node2.ctx.bus, PostgresBus)
        reports: list[BusEvent] = []
        node1.ctx.bus.subscribe(lambda e: reports.append(e) if e.topic == SIGNAL_ENFORCED else None)

        alice = await cluster.call(
            "POST", "/api/v1/users", {"username": "alice", "password": PASSWORD}
        )
        app = await cluster.call("POST", "/api/v1/apps", {"name": "echo"})
        await cluster.call(
            "POST",
            f"/api/v1/apps/{app['id']}/segments",
            {"type": "ip", "destination": "127.0.0.1", "ports": str(echo.port)},
        )
        await cluster.call(
            "POST", f"/api/v1/apps/{app['id']}/assignments", {"principal_id": alice["id"]}
        )
        await cluster.connector_on(node2, "c2")
        version = node1.ctx.store.config_version()
        await _until(lambda: _edge_version(node2) >= version, "edge 2 to load the new config")

        session = await cluster.login_on(node2, "alice")
        assert await echo_roundtrip(session, echo.port) == b"ping"

        # A new segment made on node 1 is usable on edge 2 without waiting for its poll.
        t0 = time.monotonic()
        await cluster.call(
            "POST",
            f"/api/v1/apps/{app['id']}/segments",
            {"type": "ip", "destination": "127.0.0.1", "ports": str(echo2.port)},
        )
        version = node1.ctx.store.config_version()
        await _until(lambda: _edge_version(node2) >= version, "edge 2 to see the new segment")
        assert await echo_roundtrip(session, echo2.port, b"new segment") == b"new segment"
        print(f"\nnew segment usable on edge 2 after {(time.monotonic() - t0) * 1000:.0f} ms")

        # Disabling alice on node 1 cuts her live flow on edge 2.
        stream, _ = await session.open("tcp", "127.0.0.1", echo.port)
        watch = _Watch()
        stream.attach(watch)
        assert node2.edge is not None and node2.edge.flows_by_user.get(alice["id"])
        t0 = time.monotonic()
        await cluster.call("POST", f"/api/v1/users/{alice['id']}/disable")
        async with asyncio.timeout(10):
            closed_at = await watch.closed
        latency = closed_at - t0
        print(f"disable on node 1 -> flow cut on edge 2: {latency * 1000:.0f} ms")
        assert latency < 3.0  # the bar is 1 s at p99; generous against a busy CI machine
        with pytest.raises(FlowRefused) as refused:
            await session.open("tcp", "127.0.0.1", echo.port)
        assert refused.value.status == 401

        # Edge 2's enforcement report travels back to node 1 (the signal audit's flows cut).
        await _until(
            lambda: any(
                r.payload.get("node") == "node-2" and r.payload.get("flows_cut", 0) >= 1
                for r in reports
            ),
            "edge 2's enforcement report on node 1",
        )
        await session.close()
    await echo2.stop()


async def test_a_restarted_edge_replays_missed_revocations(tmp_path: Path, pg_url: str) -> None:
    async with _cluster(tmp_path, pg_url) as cluster:
        node1 = cluster.node1
        assert node1.ctx is not None
        reports: list[BusEvent] = []
        node1.ctx.bus.subscribe(lambda e: reports.append(e) if e.topic == SIGNAL_ENFORCED else None)
        bob = await cluster.call("POST", "/api/v1/users", {"username": "bob", "password": PASSWORD})

        await _quiesce(cluster.node2)
        await cluster.node2.stop()  # saves its position
        await cluster.call("POST", f"/api/v1/users/{bob['id']}/disable")
        assert isinstance(node1.ctx.bus, PostgresBus)
        assert await asyncio.to_thread(node1.ctx.bus.flush)
        with node1.ctx.store.session() as s:
            head = int(s.scalar(select(func.max(BusEventRow.id))) or 0)

        settings = cluster.node2.settings
        settings.edge_port = 0
        cluster.node2 = Service(settings, run_api=False)
        await cluster.node2.start()  # returns once its bus has caught up
        node2 = cluster.node2
        assert node2.ctx is not None and node2.edge is not None
        bus2 = node2.ctx.bus
        assert isinstance(bus2, PostgresBus)
        assert bus2.last_id >= head and bus2.delivered >= 1
        with node2.ctx.store.session() as s:
            saved = s.scalar(select(BusPosition.last_id).where(BusPosition.node == "node-2/edge"))
        assert saved is not None and saved >= head
        # Its snapshot has bob disabled, and its edge enforced the replayed revocation (no
        # live flows to cut after a restart) and reported it to node 1.
        user = node2.edge.snapshot.users.get(bob["id"])
        assert user is not None and not user.enabled
        await _until(
            lambda: any(
                r.payload.get("node") == "node-2" and r.payload.get("user_id") == bob["id"]
                for r in reports
            ),
            "node 2's report of the replayed revocation",
        )
