"""Connector connections known to this edge, and the choice of one for a new flow."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from limen.metrics import CONNECTORS_CONNECTED
from limen.net.mux import MuxConnection

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
    active_flows: int = 0
    recent_failures: int = 0
    draining: bool = False
    last_heartbeat: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0

    def best_connection(self) -> MuxConnection | None:
        live = [c for c in self.connections if c.is_open]
        if not live:
            return None
        return min(live, key=lambda c: len(c.streams))


class ConnectorRegistry:
    def __init__(self) -> None:
        self.links: dict[str, ConnectorLink] = {}

    def add(self, link_id: str, group_id: str, conn: MuxConnection, **info: str) -> ConnectorLink:
        link = self.links.get(link_id)
        if link is None:
            link = ConnectorLink(link_id, group_id)
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
            if group is not None:
                link.group_id = group

    def pick(self, group_id: str) -> tuple[ConnectorLink, MuxConnection] | None:
        """The healthy connector of the group with the fewest active flows, then the fewest
        recent failures; ties broken at random so load spreads evenly."""
        best: list[tuple[ConnectorLink, MuxConnection]] = []
        best_key: tuple[int, int] | None = None
        for link in self.links.values():
            if link.group_id != group_id or link.draining:
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
