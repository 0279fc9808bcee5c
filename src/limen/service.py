"""What every part of the service shares in one process: settings, store, PKI, bus."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any

from limen.bus import create_bus
from limen.bus.inprocess import CONFIG_CHANGED, EventBus
from limen.config import Settings
from limen.ids import new_id
from limen.pki import Pki
from limen.store.db import Store
from limen.store.models import AuditRecord


@dataclass
class ServiceContext:
    settings: Settings
    store: Store
    pki: Pki
    bus: EventBus = field(default_factory=EventBus)
    #: Name of this node in logs and traffic records.
    node_name: str = "edge-1"

    def config_changed(self, reason: str) -> None:
        """Tell every edge to recompile its snapshot now: in this process, and with a
        distributed bus on every node (otherwise others notice the bumped config version
        within ``config_poll_seconds``)."""
        self.bus.publish(CONFIG_CHANGED, reason=reason)

    def audit(
        self, actor: str, action: str, target: str = "", details: dict[str, Any] | None = None
    ) -> None:
        """Record an admin action. Never put a secret in ``details``."""
        with self.store.session() as s:
            s.add(
                AuditRecord(
                    id=new_id("audit"),
                    at=time.time(),
                    actor=actor,
                    action=action,
                    target=target,
                    details=details or {},
                )
            )


def open_context(settings: Settings, *, migrate: bool = True) -> ServiceContext:
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = Store(settings.resolved_database_url)
    if migrate:
        store.migrate()
    pki = Pki.load_or_create(store, settings)
    return ServiceContext(
        settings=settings,
        store=store,
        pki=pki,
        bus=create_bus(settings, store),
        node_name=settings.node_name or socket.gethostname(),
    )
