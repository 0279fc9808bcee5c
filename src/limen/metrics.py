"""Prometheus metrics of the service (served at ``/metrics`` by the API)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry(auto_describe=True)

FLOWS_ACTIVE = Gauge("limen_flows_active", "Flows being relayed now", registry=REGISTRY)
FLOWS_TOTAL = Counter(
    "limen_flows_total",
    "Flows by outcome (allow, block, challenge, error) and refusal code",
    ["action", "code"],
    registry=REGISTRY,
)
BYTES_TOTAL = Counter(
    "limen_bytes_total", "Bytes relayed (up: client to target)", ["direction"], registry=REGISTRY
)
CONNECTORS_CONNECTED = Gauge(
    "limen_connectors_connected", "Connector connections open at this edge", registry=REGISTRY
)
CLIENT_CONNECTIONS = Gauge(
    "limen_client_connections", "Client connections open at this edge", registry=REGISTRY
)
TRAFFIC_LOG_DROPPED = Counter(
    "limen_traffic_log_dropped_total",
    "Traffic-log records dropped because the writer could not keep up",
    registry=REGISTRY,
)
PROTOCOL_ERRORS = Counter(
    "limen_protocol_errors_total", "Connections closed for bad input", ["code"], registry=REGISTRY
)
