"""The distributed event bus on PostgreSQL: a durable ``bus_events`` table plus LISTEN/NOTIFY.

Rules this module keeps (design section 7):

- **Same interface as the in-process bus.** :class:`PostgresBus` is an :class:`EventBus`:
  ``subscribe(handler)`` and ``publish(topic, **payload)``. Handlers are called on the
  publisher's thread for local events and on the listener thread for remote ones, as the
  in-process contract already allows ("called from any thread").
- **Local first.** ``publish`` delivers to this process's subscribers at once, then hands the
  event to a writer thread; it never does I/O on the caller's thread, so the edge may publish
  from its event loop.
- **One transaction per write.** The writer inserts the rows and ``NOTIFY``\\ s in the same
  transaction, under a transaction-scoped advisory lock: publishers commit one at a time, so
  ids become visible in increasing order and "every event after id N" never skips one that
  committed late.
- **Every node catches up by id.** A listener thread ``LISTEN``\\ s on its own connection; on
  each notification (and every few seconds regardless) it reads the rows after the last id it
  processed and delivers those from other processes (its own it delivered when publishing).
  After a lost connection it reconnects and reads from the same id: nothing is lost while the
  link was down. A restarted node starts from its persisted position (``bus_positions``), so it
  replays what it missed while it was down; a node without one starts at the head.
- **Bounded.** Rows older than the retention (1 h by default) are pruned; a node away for
  longer loses those events and relies on its snapshot (which it reloads at start anyway).
  The writer's queue holds ``OUTBOX_CAP`` events; when full the durable copy of an event is
  dropped and logged (local delivery has happened, the state change is in the store, and the
  other nodes see it at their next configuration poll).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import func, insert, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import SQLAlchemyError

from limen.bus.inprocess import BusEvent, EventBus
from limen.errors import ConfigError
from limen.store.db import Store
from limen.store.models import BusEventRow, BusPosition

log = logging.getLogger(__name__)

DEFAULT_CHANNEL = "limen_bus"
#: How long events are kept for nodes that were away (seconds).
DEFAULT_RETENTION = 3600.0
#: Events waiting for the writer; beyond it the durable copy is dropped (see module docs).
OUTBOX_CAP = 10_000
#: Events written per transaction: bounds a transaction's size after a burst.
WRITE_BATCH = 200
#: Rows read per catch-up query: bounds memory when replaying a long absence.
FETCH_BATCH = 500
#: The listener reads the table at least this often even without a notification (a NOTIFY
#: is never lost on a live connection; this only bounds the damage of a bug or a proxy).
IDLE_FETCH_SECONDS = 5.0
#: How often a node deletes events past the retention (any node may; it is idempotent).
PRUNE_EVERY_SECONDS = 60.0
#: Attempts to write one batch before it is dropped and logged.
WRITE_ATTEMPTS = 3
#: pg_advisory_xact_lock key serialising publishers ("LIMEN" in ASCII, truncated to int64).
_PUBLISH_LOCK_KEY = 0x4C494D454E
#: ``application_name`` of the listener's connection (visible in pg_stat_activity).
LISTENER_APPLICATION_NAME = "limen-bus-listener"
_CHANNEL_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True, slots=True)
class RemoteBusEvent(BusEvent):
    """An event another process published, as delivered by :class:`PostgresBus`: a handler
    that must act once per deployment (not once per node) can skip these."""

    #: ``bus_events.id``
    event_id: int = 0
    #: the publishing process (:attr:`PostgresBus.origin`)
    origin: str = ""


def is_remote(event: BusEvent) -> bool:
    """True for an event another process published (delivered through the database)."""
    return isinstance(event, RemoteBusEvent)


@dataclass(frozen=True, slots=True)
class _Outgoing:
    topic: str
    payload: dict[str, Any]
    at: float


_Item = _Outgoing | threading.Event | None


class PostgresBus(EventBus):
    """An :class:`EventBus` shared by every process on one PostgreSQL database.

    ``start()`` begins listening (and replays from the persisted position of
    ``position_key``); before it, and after ``close()``, the bus still delivers locally and
    (before ``close``) writes what it publishes, so other nodes see it."""

    def __init__(
        self,
        store: Store,
        *,
        channel: str = DEFAULT_CHANNEL,
        retention_seconds: float = DEFAULT_RETENTION,
    ) -> None:
        super().__init__()
        if store.is_sqlite or not store.engine.dialect.name.startswith("postgresql"):
            raise ConfigError("the postgres bus needs a PostgreSQL database", code="bus_backend")
        if not _CHANNEL_RE.match(channel):
            raise ConfigError(f"bus channel {channel!r} is not a plain lower-case identifier")
        self.store = store
        self.channel = channel
        self.retention_seconds = retention_seconds
        #: Random per process: rows with this origin are this process's own events.
        self.origin = secrets.token_hex(8)
        #: Id of the last event processed (delivered or skipped as our own).
        self.last_id = 0
        #: Remote events delivered to local subscribers (tests and metrics).
        self.delivered = 0
        self.position_key: str | None = None
        self._outbox: queue.Queue[_Item] = queue.Queue(maxsize=OUTBOX_CAP)
        self._state = threading.Lock()
        self._writer: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._closed = False
        self._last_prune = 0.0

    # --- publishing ----------------------------------------------------------------------------

    def publish(self, topic: str, **payload: Any) -> None:
        """Deliver to this process's subscribers now; write for the other nodes soon after."""
        super().publish(topic, **payload)
        with self._state:
            if self._closed:
                log.debug("bus closed: %s delivered locally only", topic)
                return
            self._ensure_writer()
        try:
            self._outbox.put_nowait(_Outgoing(topic, dict(payload), time.time()))
        except queue.Full:
            log.error("bus outbox full (%d): %s not sent to other nodes", OUTBOX_CAP, topic)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event published so far is written; False on timeout."""
        with self._state:
            if self._writer is None or not self._writer.is_alive():
                return True
        marker = threading.Event()
        try:
            self._outbox.put(marker, timeout=timeout)
        except queue.Full:
            return False
        return marker.wait(timeout)

    def _ensure_writer(self) -> None:
        # Called with self._state held.
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(
                target=self._write_loop, name=f"bus writer {self.channel}", daemon=True
            )
            self._writer.start()

    def _write_loop(self) -> None:
        while True:
            items: list[_Item] = [self._outbox.get()]
            while len(items) < WRITE_BATCH:
                try:
                    items.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            events = [i for i in items if isinstance(i, _Outgoing)]
            if events:
                self._write(events)
            for item in items:
                if isinstance(item, threading.Event):
                    item.set()
            if any(item is None for item in items):
                return

    def _write(self, events: list[_Outgoing]) -> None:
        rows = [
            {
                "topic": e.topic,
                "payload": _jsonable(e.payload),
                "origin": self.origin,
                "created_at": e.at,
            }
            for e in events
        ]
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self.store.engine.begin() as conn:
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PUBLISH_LOCK_KEY}
                    )
                    conn.execute(insert(BusEventRow), rows)
                    conn.execute(
                        text("SELECT pg_notify(:channel, :origin)"),
                        {"channel": self.channel, "origin": self.origin},
                    )
                return
            except (SQLAlchemyError, TypeError, ValueError) as exc:
                log.warning(
                    "bus: writing %d events failed (attempt %d/%d): %s",
                    len(rows),
                    attempt,
                    WRITE_ATTEMPTS,
                    exc.__class__.__name__,
                )
                if self._stopping.wait(0.2 * attempt):
                    break
        log.error(
            "bus: %d events (%s) not sent to other nodes",
            len(rows),
            ", ".join(sorted({e.topic for e in events})),
        )

    # --- listening -----------------------------------------------------------------------------

    def start(self, position_key: str | None = None, *, wait: float = 10.0) -> None:
        """Listen for other nodes' events. With ``position_key``, resume after the last event
        this key processed (replaying what was missed) and keep the position up to date;
        else start at the newest event. Returns once listening and caught up (or after
        ``wait`` seconds, the listener then retrying in the background)."""
        with self._state:
            if self._listener is not None:
                return
            self._closed = False
            self._stopping.clear()
            self._ensure_writer()
        self.position_key = position_key
        self.last_id = self._start_position(position_key)
        self._listener = threading.Thread(
            target=self._listen_loop, name=f"bus listener {self.channel}", daemon=True
        )
        self._listener.start()
        if not self._listening.wait(wait):
            log.warning("bus: not listening after %.0f s; retrying in the background", wait)

    def _start_position(self, key: str | None) -> int:
        with self.store.session() as s:
            head = int(s.scalar(select(func.max(BusEventRow.id))) or 0)
            oldest = int(s.scalar(select(func.min(BusEventRow.id))) or 0)
            saved = s.scalar(select(BusPosition.last_id).where(BusPosition.node == key))
        if key is None or saved is None or saved > head:
            return head
        if oldest and oldest > saved + 1:
            log.warning(
                "bus: events %d..%d were pruned while %s was away; relying on the snapshot",
                saved + 1,
                oldest - 1,
                key,
            )
        return int(saved)

    def _connect(self) -> psycopg.Connection[Any]:
        # The engine's own connect arguments: same host, credentials and options as the store.
        args, kwargs = self.store.engine.dialect.create_connect_args(self.store.engine.url)
        kwargs.setdefault("application_name", LISTENER_APPLICATION_NAME)
        return psycopg.connect(*args, **kwargs, autocommit=True)

    def _listen_loop(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(f"LISTEN {self.channel}")
                    # Whatever was committed before LISTEN took effect is read here.
                    self._catch_up(conn)
                    self._listening.set()
                    backoff = 0.2
                    while not self._stopping.is_set():
                        for _ in conn.notifies(timeout=IDLE_FETCH_SECONDS, stop_after=1):
                            pass
                        if self._stopping.is_set():
                            break
                        self._catch_up(conn)
                        self._maybe_prune(conn)
            except psycopg.Error as exc:
                self._listening.clear()
                log.warning("bus: listener connection lost (%s); reconnecting", exc)
            except Exception:
                # A bug must not silently end cross-node delivery: log it, then reconnect.
                self._listening.clear()
                log.exception("bus: listener failed; reconnecting")
            if self._stopping.wait(backoff):
                break
            backoff = min(backoff * 2, 5.0)
        self._listening.clear()

    def _catch_up(self, conn: psycopg.Connection[Any]) -> None:
        while True:
            rows = conn.execute(
                "SELECT id, topic, payload, origin FROM bus_events"
                " WHERE id > %s ORDER BY id LIMIT %s",
                (self.last_id, FETCH_BATCH),
            ).fetchall()
            for event_id, topic, payload, origin in rows:
                if origin != self.origin:
                    self.delivered += 1
                    self._deliver(
                        RemoteBusEvent(str(topic), _as_payload(payload), int(event_id), origin)
                    )
                self.last_id = int(event_id)
            if rows:
                self._save_position()
            if len(rows) < FETCH_BATCH:
                return

    def _deliver(self, event: RemoteBusEvent) -> None:
        # EventBus.publish builds a plain BusEvent; remote events keep their marker, so the
        # fan-out is repeated here with the same contract (a failing handler is logged).
        with self._lock:
            handlers = list(self._handlers)
        for handler in handlers:
            try:
                handler(event)
            except Exception:
                log.exception("bus handler failed for %s", event.topic)

    def _save_position(self) -> None:
        if self.position_key is None:
            return
        stmt = pg_insert(BusPosition).values(
            node=self.position_key, last_id=self.last_id, updated_at=time.time()
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[BusPosition.node],
            set_={
                "last_id": func.greatest(BusPosition.last_id, stmt.excluded.last_id),
                "updated_at": stmt.excluded.updated_at,
            },
        )
        try:
            with self.store.engine.begin() as conn:
                conn.execute(stmt)
        except SQLAlchemyError as exc:
            # Only a restart's replay depends on it, and the next batch saves it again.
            log.warning("bus: could not save the position: %s", exc.__class__.__name__)

    def _maybe_prune(self, conn: psycopg.Connection[Any]) -> None:
        now = time.time()
        if now - self._last_prune < PRUNE_EVERY_SECONDS:
            return
        self._last_prune = now
        cur = conn.execute(
            "DELETE FROM bus_events WHERE created_at < %s", (now - self.retention_seconds,)
        )
        if cur.rowcount:
            log.info(
                "bus: pruned %d events older than %.0f s", cur.rowcount, self.retention_seconds
            )

    def prune(self, now: float | None = None) -> int:
        """Delete events older than the retention now; how many."""
        cutoff = (time.time() if now is None else now) - self.retention_seconds
        with self.store.engine.begin() as conn:
            result = conn.execute(
                text("DELETE FROM bus_events WHERE created_at < :c"), {"c": cutoff}
            )
        return int(getattr(result, "rowcount", 0) or 0)

    @property
    def listening(self) -> bool:
        """True while the listener is connected and caught up."""
        return self._listening.is_set()

    # --- shutdown ------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening, write what is queued, save the position. Later publishes are
        delivered locally only."""
        with self._state:
            if self._closed:
                return
            self._closed = True
            writer, listener = self._writer, self._listener
            self._writer = self._listener = None
        if writer is not None and writer.is_alive():
            try:
                self._outbox.put(None, timeout=timeout)
            except queue.Full:
                log.error("bus: outbox full at shutdown; queued events are not sent")
            writer.join(timeout)
        self._stopping.set()
        if listener is not None:
            self._wake_listener()
            listener.join(timeout)
            if self.last_id:
                self._save_position()

    def _wake_listener(self) -> None:
        # The listener blocks in notifies() for up to IDLE_FETCH_SECONDS: a NOTIFY ends it now.
        try:
            with self.store.engine.begin() as conn:
                conn.execute(
                    text("SELECT pg_notify(:channel, :origin)"),
                    {"channel": self.channel, "origin": self.origin},
                )
        except SQLAlchemyError as exc:
            log.debug("bus: could not wake the listener: %s", exc)


def _jsonable(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload as PostgreSQL's ``json`` accepts it: anything JSON lacks (a set, a
    datetime, NaN) becomes its ``str``, so one odd value cannot fail the writer's batch."""
    try:
        out: dict[str, Any] = json.loads(json.dumps(payload, allow_nan=False, default=str))
    except ValueError:
        out = {str(k): v if _plain(v) else str(v) for k, v in payload.items()}
    return out


def _plain(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _as_payload(raw: Any) -> dict[str, Any]:
    # psycopg decodes json columns; a row written by hand could hold anything else.
    if isinstance(raw, dict):
        return {str(k): v for k, v in raw.items()}
    return {"value": raw}
