"""The in-process event bus: configuration changes and revocation signals reach every
subscriber in this process. A distributed backend (PostgreSQL LISTEN/NOTIFY, NATS) implements
the same interface for clusters."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: Topics
CONFIG_CHANGED = "config.changed"
SUBJECT_REVOKED = "subject.revoked"


@dataclass(frozen=True, slots=True)
class BusEvent:
    topic: str
    payload: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[BusEvent], None]


class EventBus:
    """Synchronous fan-out to registered handlers. Handlers must be quick and must not block:
    an asyncio consumer registers a handler that does ``loop.call_soon_threadsafe``. A failing
    handler is logged and does not stop delivery to the others."""

    def __init__(self) -> None:
        self._handlers: list[Handler] = []
        self._lock = threading.Lock()

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        with self._lock:
            self._handlers.append(handler)

        def unsubscribe() -> None:
            with self._lock:
                if handler in self._handlers:
                    self._handlers.remove(handler)

        return unsubscribe

    def publish(self, topic: str, **payload: Any) -> None:
        event = BusEvent(topic, payload)
        with self._lock:
            handlers = list(self._handlers)
        for handler in handlers:
            try:
                handler(event)
            except Exception:
                log.exception("bus handler failed for %s", topic)
