"""Connector connections known to this edge, their health, and the choice of one for a new
flow (least loaded healthy connector of the application's group; see :mod:`.health`)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

from limen.edge.health import (
    BOARD,
    PERSIST_INTERVAL,
    PROBE_HEADER,
    PROBE_INTERVAL,
    PROBE_TIMEOUT,
    STALE_DAYS_DEFAULT,
    ConnectorStatus,
    Health,
    HealthState,
    in_rotation,
    judge,
    persist_seen,
    probe_succeeded,
    probe_targets,
    remove_stale_connectors,
)
from limen.edge.snapshot import Snapshot
from limen.errors import RemoteProtocolError
from limen.ids import new_id
from limen.metrics import CONNECTORS_CONNECTED
from limen.net.mux import MuxConnection, open_flow
from limen.net.tasks import spawn
from limen.store.db import Store
from limen.wire import connect as wire

log = logging.getLogger(__name__)


@dataclass
class ConnectorLink:
    """One connector and its live connections to this edge."""

    connector_id: str
    group_id: str
    name: str = ""
    version: str = ""
    address: str = ""
    connections: list[MuxConnection] = field(default_factory=list)
    #: Flows this edge carries through the connector right now (opening or relaying).
    active_flows: int = 0
    recent_failures: int = 0
    #: An administrator drained it (connector state "draining" in the store).
    draining: bool = False
    #: The connector announced it is shutting down (a ``drain`` control message).
    self_draining: bool = False
    #: Wall-clock time of the last heartbeat (for the API).
    last_heartbeat: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    #: What the connector reports in its heartbeats.
    reported_active_flows: int = 0
    reported_dials_failed: int = 0
    health: HealthState = field(default_factory=HealthState)
    #: Monotonic time of the last write of last_seen_at to the store.
    persisted_at: float = 0.0

    def best_connection(self) -> MuxConnection | None:
        live = [c for c in self.connections if c.is_open]
        if not live:
            return None
        return min(live, key=lambda c: len(c.streams))

    @property
    def is_draining(self) -> bool:
        return self.draining or self.self_draining


class ConnectorRegistry:
    """Every connector connected to this edge, by id. Health judgements use the loop's
    monotonic clock, passed in as ``now``."""

    def __init__(self) -> None:
        self.links: dict[str, ConnectorLink] = {}

    def add(
        self, link_id: str, group_id: str, conn: MuxConnection, now: float = 0.0, **info: str
    ) -> ConnectorLink:
        link = self.links.get(link_id)
        if link is None:
            link = ConnectorLink(link_id, group_id)
            # A new connector counts as heard from now: silence is measured from here.
            link.health.record_control(now)
            self.links[link_id] = link
        link.group_id = group_id
        for key, value in info.items():
            setattr(link, key, value)
        link.connections.append(conn)
        CONNECTORS_CONNECTED.inc()
        return link

    def remove(self, link_id: str, conn: MuxConnection) -> None:
        link = self.links.get(link_id)
        if link is None or conn not in link.connections:
            return
        link.connections.remove(conn)
        CONNECTORS_CONNECTED.dec()
        if not link.connections:
            del self.links[link_id]

    def regroup(self, groups: dict[str, str]) -> None:
        """Apply group moves from a new configuration snapshot (connector id → group)."""
        for link in self.links.values():
            group = groups.get(link.connector_id)
            if group is not None and group != link.group_id:
                log.info("connector %s moved to group %s", link.connector_id, group)
                link.group_id = group

    def health_of(self, link: ConnectorLink, now: float) -> Health:
        peers = [
            other.health
            for other in self.links.values()
            if other is not link and other.group_id == link.group_id and not other.is_draining
        ]
        return judge(link.health, peers, now, link.is_draining)

    def pick(
        self, group_id: str, now: float, exclude: frozenset[str] = frozenset()
    ) -> tuple[ConnectorLink, MuxConnection] | None:
        """The connector of the group in rotation with the fewest active flows, then the
        fewest recent failures; ties broken at random so load spreads evenly. On it, the
        connection with the fewest streams. ``exclude``: connector ids not to use (a retry)."""
        best: list[tuple[ConnectorLink, MuxConnection]] = []
        best_key: tuple[int, int] | None = None
        for link in self.links.values():
            if link.group_id != group_id or link.connector_id in exclude:
                continue
            if not in_rotation(self.health_of(link, now)):
                continue
            conn = link.best_connection()
            if conn is None:
                continue
            key = (link.active_flows, link.recent_failures)
            if best_key is None or key < best_key:
                best, best_key = [(link, conn)], key
            elif key == best_key:
                best.append((link, conn))
        if not best:
            return None
        return random.choice(best)

    def connected_in_group(self, group_id: str) -> int:
        return sum(1 for link in self.links.values() if link.group_id == group_id)

    def statuses(self, now: float) -> list[ConnectorStatus]:
        """Live status of every connected connector, for the status board."""
        wall = time.time()
        return [
            ConnectorStatus(
                connector_id=link.connector_id,
                group_id=link.group_id,
                health=str(self.health_of(link, now)),
                connections=sum(1 for c in link.connections if c.is_open),
                active_flows=link.active_flows,
                bytes_up=link.bytes_up,
                bytes_down=link.bytes_down,
                last_heartbeat=link.last_heartbeat,
                version=link.version,
                address=link.address,
                last_failure=link.health.last_failure,
                updated_at=wall,
            )
            for link in self.links.values()
        ]


def targets_from_snapshot(snapshot: Snapshot) -> dict[str, tuple[str, int]]:
    """The probe target of every connector group, from a configuration snapshot."""
    groups = {a.id: a.connector_group_id for a in snapshot.apps.values() if a.enabled}
    segments = [
        (spec.app_id, spec.dest_type, spec.destination, spec.port_ranges[0][0], spec.protocol)
        for spec in snapshot.segments.segments
        if spec.port_ranges
    ]
    return probe_targets(groups, segments)


class ConnectorMonitor:
    """The edge's health shell: probes every connector's data path, publishes live status
    for the admin API, writes last-seen to the store at a bounded rate and removes
    connectors not seen for a long time. Decisions are :mod:`.health`'s."""

    def __init__(
        self,
        registry: ConnectorRegistry,
        store: Store,
        *,
        stale_days: float = STALE_DAYS_DEFAULT,
        probe_interval: float = PROBE_INTERVAL,
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self.registry = registry
        self.store = store
        self.stale_days = stale_days
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.targets: dict[str, tuple[str, int]] = {}
        self._published: set[str] = set()
        self._loop = asyncio.get_running_loop()

    def now(self) -> float:
        return self._loop.time()

    def set_snapshot(self, snapshot: Snapshot) -> None:
        self.targets = targets_from_snapshot(snapshot)

    # events from the edge ------------------------------------------------------------------

    def on_control(self, link: ConnectorLink) -> None:
        """Any control message arrived from the connector: it is alive. Persist last-seen at
        most every PERSIST_INTERVAL seconds, in a worker thread."""
        now = self.now()
        link.health.record_control(now)
        if now - link.persisted_at >= PERSIST_INTERVAL:
            link.persisted_at = now
            spawn(self._persist(link), name=f"persist connector {link.connector_id}")

    def on_flow_result(self, link: ConnectorLink, ok: bool, failure: str = "") -> None:
        """A real flow's dial through this connector completed: use it as a health check."""
        link.health.record_check(ok, self.now(), failure)

    async def _persist(self, link: ConnectorLink) -> None:
        try:
            await asyncio.to_thread(
                persist_seen,
                self.store,
                link.connector_id,
                seen_at=time.time(),
                version=link.version,
                address=link.address,
            )
        except Exception as exc:  # a store hiccup must not touch the data plane
            log.warning("could not record connector %s as seen: %s", link.connector_id, exc)

    # the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Probe, publish and clean up until cancelled."""
        next_cleanup = self.now() + 60.0  # not at start: let connectors reconnect first
        try:
            while True:
                now = self.now()
                for link in list(self.registry.links.values()):
                    self._maybe_probe(link, now)
                self.publish(now)
                if now >= next_cleanup:
                    next_cleanup = now + 3600.0
                    await self._cleanup()
                await asyncio.sleep(self.probe_interval / 5)  # a period, not synchronisation
        finally:
            BOARD.publish([], list(self._published))
            self._published.clear()

    def publish(self, now: float) -> None:
        statuses = self.registry.statuses(now)
        live = {s.connector_id for s in statuses}
        BOARD.publish(statuses, list(self._published - live))
        self._published = live

    def _maybe_probe(self, link: ConnectorLink, now: float) -> None:
        state = link.health
        if state.probe_in_flight or now < state.next_probe_at:
            return
        target = self.targets.get(link.group_id)
        conn = link.best_connection()
        if target is None or conn is None:
            return
        if self.registry.connected_in_group(link.group_id) < 2:
            # The judgement is relative: a lone connector stays in rotation whatever its
            # probes say, so do not bother its targets with them.
            state.last_check_ok = None
            return
        state.probe_in_flight = True
        state.next_probe_at = now + self.probe_interval * random.uniform(0.8, 1.2)
        spawn(
            self._probe(link, conn, target),
            name=f"probe {link.connector_id} {target[0]}:{target[1]}",
        )

    async def _probe(
        self, link: ConnectorLink, conn: MuxConnection, target: tuple[str, int]
    ) -> None:
        host, port = target
        head = wire.encode_request(
            "tcp", host, port, [(PROBE_HEADER, "1"), (wire.HEADER_FLOW_ID, new_id("flow"))]
        )
        failure = ""
        try:
            stream, response = await open_flow(conn, head, "tcp", self.probe_timeout)
            if response.ok:
                stream.close()
                ok = True
            else:
                code, _message = response.error()
                ok = probe_succeeded(response.status, code)
                failure = "" if ok else code
        except TimeoutError:
            ok, failure = False, "probe_timeout"
        except (ConnectionError, RemoteProtocolError) as exc:
            ok, failure = False, f"probe_failed: {exc}"[:200]
        finally:
            link.health.probe_in_flight = False
        was_failing = link.health.failing()
        link.health.record_check(ok, self.now(), failure)
        if ok == was_failing:  # a change: let the API see it now, not at the next tick
            self.publish(self.now())
        if ok and was_failing:
            log.info("connector %s passes its data-path check again", link.connector_id)
        elif not ok and not was_failing:
            log.warning(
                "connector %s failed its data-path check to %s:%d (%s)",
                link.connector_id,
                host,
                port,
                failure,
            )

    async def _cleanup(self) -> None:
        try:
            await asyncio.to_thread(
                remove_stale_connectors,
                self.store,
                now=time.time(),
                max_age_days=self.stale_days,
                keep=set(self.registry.links),
            )
        except Exception as exc:
            log.warning("stale connector cleanup failed: %s", exc)
