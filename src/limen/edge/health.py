"""Connector health: what takes a connector out of rotation and what brings it back.

Rules (pure: every function takes ``now``; the edge's shell runs the probes):

- **Control channel.** The edge records when a connector's control stream last delivered a
  message (hello, heartbeat every second). Silence longer than :data:`CONTROL_SILENCE` takes
  the connector out. A frozen or partitioned connector is cut sooner by the mux keepalive
  (1.5 s), which removes its link altogether; this rule is the backstop for a connector whose
  pings are answered but whose control loop is stuck.
- **Data path.** Every :data:`PROBE_INTERVAL` (jittered) the edge opens a probe flow on each
  connector: a CONNECT to a target taken from the segments of the applications bound to the
  connector's group, with the ``Limen-Probe`` header. The connector dials the target, answers
  ``200`` and closes at once (or refuses with the dial's error code). The edge waits at most
  :data:`PROBE_TIMEOUT`. A probe *succeeds* when the connector reached the target's host
  (``200``, or ``target_refused``: a RST proves the route works); anything else fails.
  Failures of real flows (connector or target unreachable, timeouts) count too, so a broken
  connector is noticed between probes when traffic flows.
- **Relative judgement.** A connector whose last data-path check failed is out of rotation
  only while another connector of its group passed a check within :data:`PROBE_FRESH`. When
  every connector of a group fails, the target (not the connectors) is down: all stay in
  rotation, and flows fail with the target's own error rather than ``no_connector``.
- It comes back with its first passing probe.

Worst case from "route to the LAN blocked" to "out of rotation": the next probe starts within
``PROBE_INTERVAL * 1.2`` (0.6 s) and fails within ``PROBE_TIMEOUT`` (1 s) — 1.6 s, inside the
2 s bound. A blackhole route or firewall REJECT fails the dial at once.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass

from sqlalchemy import delete, select

from limen.ids import new_id
from limen.store.db import Store
from limen.store.models import AuditRecord, Connector

log = logging.getLogger(__name__)

#: Seconds between data-path probes on one connector (each jittered by ±20%).
PROBE_INTERVAL = 0.5
#: How long the edge waits for a probe's answer. A LAN dial that takes longer than this is
#: treated as failing: real flows would be slow too.
PROBE_TIMEOUT = 1.0
#: A peer's passing check counts as evidence "the target is up" for this long.
PROBE_FRESH = 3.0
#: Control-stream silence (seconds) after which a connector is out of rotation.
CONTROL_SILENCE = 3.0
#: Header on a probe flow's head (edge → connector); the connector dials and hangs up.
PROBE_HEADER = "Limen-Probe"
#: Refusal codes from a connector that still prove its route to the target works.
PROBE_OK_CODES = frozenset({"target_refused"})
#: How often connector status (last seen, version, address) is written to the store, at most.
PERSIST_INTERVAL = 10.0
#: Connectors not seen for this many days are removed (``Settings.connector_stale_days``
#: overrides it when that setting exists).
STALE_DAYS_DEFAULT = 10


class Health(enum.StrEnum):
    """What the API shows for a connector."""

    HEALTHY = "healthy"
    #: Its data-path check fails while a peer's passes: out of rotation.
    UNHEALTHY = "unhealthy"
    #: Its control stream went quiet: out of rotation.
    SILENT = "silent"
    #: Its last check failed, as did every peer's: the target is down; kept in rotation.
    DEGRADED = "degraded"
    DRAINING = "draining"
    #: Not connected to any edge in this process.
    OFFLINE = "offline"
    #: Connected, no check has completed yet.
    UNKNOWN = "unknown"


@dataclass
class HealthState:
    """Per-connector health inputs, kept by the edge on its :class:`ConnectorLink`."""

    last_control: float = 0.0
    #: Result of the latest data-path check (probe or real flow): None until one completes.
    last_check_ok: bool | None = None
    last_check_at: float = 0.0
    last_ok_at: float = 0.0
    last_failure: str = ""
    consecutive_failures: int = 0
    next_probe_at: float = 0.0
    probe_in_flight: bool = False

    def record_control(self, now: float) -> None:
        self.last_control = now

    def record_check(self, ok: bool, now: float, failure: str = "") -> None:
        self.last_check_ok = ok
        self.last_check_at = now
        if ok:
            self.last_ok_at = now
            self.consecutive_failures = 0
            self.last_failure = ""
        else:
            self.consecutive_failures += 1
            self.last_failure = failure

    def silent(self, now: float) -> bool:
        return self.last_control > 0 and now - self.last_control > CONTROL_SILENCE

    def failing(self) -> bool:
        return self.last_check_ok is False


def peers_pass(states: list[HealthState], now: float) -> bool:
    """Whether any of ``states`` passed a data-path check recently."""
    return any(s.last_check_ok and now - s.last_ok_at <= PROBE_FRESH for s in states)


def judge(state: HealthState, peers: list[HealthState], now: float, draining: bool) -> Health:
    """The health of one connector given its group's other connectors."""
    if draining:
        return Health.DRAINING
    if state.silent(now):
        return Health.SILENT
    if state.failing():
        return Health.UNHEALTHY if peers_pass(peers, now) else Health.DEGRADED
    if state.last_check_ok is None:
        return Health.UNKNOWN
    return Health.HEALTHY


def in_rotation(health: Health) -> bool:
    """Whether a connector in this state may receive new flows."""
    return health in (Health.HEALTHY, Health.DEGRADED, Health.UNKNOWN)


def probe_succeeded(status: int, code: str) -> bool:
    """Interpret a probe's answer (status and refusal code from the connector)."""
    return status == 200 or code in PROBE_OK_CODES


# --- probe targets -------------------------------------------------------------------------------


def probe_targets(
    groups_of_apps: dict[str, str], segments: list[tuple[str, str, str, int, str]]
) -> dict[str, tuple[str, int]]:
    """connector group id → the (host, port) its connectors are probed with.

    ``groups_of_apps`` maps each *enabled* application id to its connector group;
    ``segments`` are ``(app_id, dest_type, destination, first_port, protocol)``. Only
    concrete destinations qualify (an IP address or a host name, TCP); the choice is the
    smallest in sort order so every connector of a group is probed with the same target —
    which is what lets the relative judgement compare them. A group with no concrete
    destination has no probe; it relies on real flows' outcomes.
    """
    out: dict[str, tuple[str, int]] = {}
    for app_id, dest_type, destination, port, protocol in sorted(
        segments, key=lambda s: (s[1] != "ip", s[2], s[3])
    ):
        group = groups_of_apps.get(app_id)
        if group is None or group in out or "tcp" not in protocol:
            continue
        if dest_type in ("ip", "fqdn") and 0 < port < 65536:
            out[group] = (destination, port)
    return out


# --- status shared with the admin API ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectorStatus:
    """Live status of a connector as an edge in this process sees it."""

    connector_id: str
    group_id: str
    health: str
    connections: int
    active_flows: int
    bytes_up: int
    bytes_down: int
    last_heartbeat: float
    version: str
    address: str
    last_failure: str
    updated_at: float


class StatusBoard:
    """Live connector status published by the edges of this process, read by the admin API
    (``limen up`` and ``limen serve`` run both). An API in another process falls back to the
    ``last_seen_at`` the edge persists in the connector row."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, ConnectorStatus] = {}

    def publish(self, statuses: list[ConnectorStatus], gone: list[str]) -> None:
        with self._lock:
            for status in statuses:
                self._by_id[status.connector_id] = status
            for connector_id in gone:
                self._by_id.pop(connector_id, None)

    def get(self, connector_id: str) -> ConnectorStatus | None:
        with self._lock:
            return self._by_id.get(connector_id)


#: The process-wide board.
BOARD = StatusBoard()


# --- persistence (worker threads) --------------------------------------------------------------


def persist_seen(
    store: Store, connector_id: str, *, seen_at: float, version: str, address: str
) -> None:
    """Record when and from where a connector was last seen, and its version."""
    with store.session() as s:
        row = s.get(Connector, connector_id)
        if row is None:
            return
        row.last_seen_at = seen_at
        if version:
            row.version = version[:64]
        if address:
            row.address = address[:64]


def remove_stale_connectors(
    store: Store, *, now: float, max_age_days: float, keep: set[str]
) -> list[str]:
    """Delete connectors not seen for ``max_age_days`` (never seen: counted from enrollment),
    except those in ``keep`` (connected right now). Bumps the configuration version and
    audits each removal. Returns the removed ids."""
    cutoff = now - max_age_days * 86400
    with store.session() as s:
        rows = list(
            s.scalars(
                select(Connector).where(
                    Connector.last_seen_at < cutoff, Connector.created_at < cutoff
                )
            )
        )
        removed = [r.id for r in rows if r.id not in keep]
        if not removed:
            return []
        s.execute(delete(Connector).where(Connector.id.in_(removed)))
        store.bump_config_version(s)
        for connector_id in removed:
            s.add(
                AuditRecord(
                    id=new_id("audit"),
                    at=now,
                    actor="system",
                    action="connector.remove_stale",
                    target=connector_id,
                    details={"max_age_days": max_age_days},
                )
            )
    log.info("removed %d connectors not seen for %g days", len(removed), max_age_days)
    return removed


def monotonic() -> float:
    return time.monotonic()
