"""The traffic-log pipeline: one record per flow, written in batches off the event loop.

The data plane never waits for the database: ``submit`` appends to a bounded deque; a
background task writes batches in a worker thread. When the store falls behind by more than
``max_queue`` records the oldest are dropped and counted, rather than stalling flows.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from sqlalchemy import insert

from limen.errors import StoreError
from limen.metrics import TRAFFIC_LOG_DROPPED
from limen.store.db import Store
from limen.store.models import TrafficRecord

log = logging.getLogger(__name__)


class TrafficLogWriter:
    def __init__(
        self, store: Store, *, batch: int = 200, flush_seconds: float = 1.0, max_queue: int = 50_000
    ) -> None:
        self.store = store
        self.batch = batch
        self.flush_seconds = flush_seconds
        self._queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_queue)
        self._wake = asyncio.Event()
        self._stopping = False
        self.written = 0

    def submit(self, record: dict[str, Any]) -> None:
        if len(self._queue) == self._queue.maxlen:
            TRAFFIC_LOG_DROPPED.inc()
        self._queue.append(record)
        if len(self._queue) >= self.batch:
            self._wake.set()

    async def run(self) -> None:
        """Write until :meth:`stop`; then write what is left."""
        while not self._stopping:
            try:
                async with asyncio.timeout(self.flush_seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()
        await self.flush()

    async def flush(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self.batch, len(self._queue)))]
            try:
                await asyncio.to_thread(self._write, batch)
                self.written += len(batch)
            except StoreError as exc:
                # Keep serving; the records are counted as dropped and the reason logged.
                log.error("traffic log: could not write %d records: %s", len(batch), exc)
                TRAFFIC_LOG_DROPPED.inc(len(batch))

    def _write(self, batch: list[dict[str, Any]]) -> None:
        # One multi-row INSERT per batch: no ORM objects, no per-row SELECT. Every row gets
        # every column (an executemany needs one shape), defaults filling what a record lacks.
        defaults = _column_defaults()
        rows = [{**defaults, **record} for record in batch]
        with self.store.session() as s:
            s.execute(insert(TrafficRecord), rows)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)


def _column_defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for column in TrafficRecord.__table__.columns:
        default = column.default
        if default is not None and getattr(default, "is_scalar", False):
            out[column.key] = default.arg  # type: ignore[attr-defined]
        elif column.nullable:
            out[column.key] = None
    return out
