"""Service configuration: a TOML file, overridden by ``LIMEN_*`` environment variables.

Every setting has a documented default (docs/operations.md); ``limen up`` needs none of them.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from limen.errors import ConfigError


def default_data_dir() -> Path:
    env = os.environ.get("LIMEN_DATA_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/limen")
    return Path.home() / ".local" / "share" / "limen"


@dataclass(slots=True)
class Settings:
    """The service's settings. Field names are the TOML keys and, upper-cased with a
    ``LIMEN_`` prefix, the environment variables."""

    data_dir: Path = field(default_factory=default_data_dir)
    #: SQLAlchemy URL; empty means SQLite at ``<data_dir>/limen.db``.
    database_url: str = ""
    #: The data-plane port: clients and connectors (TLS, ALPN ``limen/1`` or ``http/1.1``).
    edge_host: str = "0.0.0.0"
    edge_port: int = 8443
    #: Identity (OIDC) and admin API (HTTPS).
    api_host: str = "0.0.0.0"
    api_port: int = 9443
    #: Names and addresses put in the server certificate and in URLs handed to clients.
    public_host: str = "localhost"
    extra_san: list[str] = field(default_factory=list)
    #: Issuer URL of tokens; empty means ``https://<public_host>:<api_port>``.
    issuer: str = ""
    #: A plain-HTTP Prometheus endpoint for processes without the API (``limen edge``);
    #: 0 disables it. The API serves ``/metrics`` itself.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    log_format: str = "text"  # text | json
    log_level: str = "INFO"
    #: Access-token lifetime bounds (seconds) for clients without the ``cp1`` capability.
    access_token_min_ttl: int = 3600
    access_token_max_ttl: int = 5400
    #: Access-token lifetime for CAE-capable (``cp1``) clients.
    cae_token_ttl: int = 24 * 3600
    #: Continuous access evaluation for ``cp1`` clients. Off: every client gets ordinary
    #: 60-90 minute tokens without ``xms_cc``. Revocations still cut live flows either way
    #: (turning that off would only make access outlive a disabled account).
    cae_enabled: bool = True
    #: Strict enforcement: a flow is refused (401 ``insufficient_claims``) when its source
    #: address differs from the token's ``ipaddr`` (the address seen at sign-in or refresh),
    #: so a stolen token replayed from elsewhere fails. Needs the API and the edge to see the
    #: same client address (no NAT between them).
    cae_strict_ip: bool = False
    refresh_token_ttl: int = 14 * 24 * 3600
    device_code_ttl: int = 600
    device_code_interval: int = 5
    #: Traffic-log batching: flush after this many records or this many seconds.
    traffic_log_batch: int = 200
    traffic_log_flush_seconds: float = 1.0
    #: Upper bound of records waiting to be written; beyond it the oldest are dropped and
    #: counted (``limen_traffic_log_dropped_total``) rather than stalling the data plane.
    traffic_log_queue: int = 50_000
    #: Connector certificate lifetime (seconds).
    connector_cert_ttl: int = 30 * 24 * 3600
    #: Connectors not seen for this many days are removed (their certificates stay valid
    #: until they expire, but the edge refuses an unknown connector).
    connector_stale_days: float = 10.0
    #: How long the edge waits for a connector to answer a dial.
    connector_dial_timeout: float = 10.0
    #: How often the edge re-reads configuration changes from the store (seconds).
    config_poll_seconds: float = 1.0
    #: Event bus for revocations and configuration changes: ``inprocess`` (one process),
    #: ``postgres`` (every process sharing the PostgreSQL database), or ``auto``: ``postgres``
    #: when ``database_url`` is PostgreSQL, else ``inprocess``.
    bus: str = "auto"
    #: How long the PostgreSQL bus keeps events for a node that was away (seconds).
    bus_retention_seconds: float = 3600.0
    #: This node's name in traffic records, enforcement reports and the bus's replay
    #: position; unique per node of a deployment. Empty means the host name.
    node_name: str = ""
    #: Create a demo tenant (user, app, connector) on first start (``limen up``).
    demo: bool = False

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'limen.db'}"

    @property
    def resolved_issuer(self) -> str:
        if self.issuer:
            return self.issuer.rstrip("/")
        return f"https://{self.public_host}:{self.api_port}"

    @property
    def edge_url(self) -> str:
        return f"https://{self.public_host}:{self.edge_port}"


def _coerce(name: str, current: Any, raw: Any) -> Any:
    try:
        if isinstance(current, bool):
            if isinstance(raw, bool):
                return raw
            return str(raw).strip().lower() in {"1", "true", "yes", "on"}
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, Path):
            return Path(raw)
        if isinstance(current, list):
            if isinstance(raw, list):
                return [str(x) for x in raw]
            return [x.strip() for x in str(raw).split(",") if x.strip()]
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r}: cannot use {raw!r}: {exc}") from exc


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Defaults, then the TOML file, then ``LIMEN_*`` variables, then explicit overrides."""
    settings = Settings()
    names = {f.name for f in dataclasses.fields(Settings)}
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc}") from exc
        for key, value in data.items():
            if key not in names:
                raise ConfigError(f"unknown setting {key!r} in {path}")
            values[key] = value
    for name in names:
        env = os.environ.get(f"LIMEN_{name.upper()}")
        if env is not None:
            values[name] = env
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown setting {key!r}")
        setattr(settings, key, _coerce(key, getattr(settings, key), value))
    return settings
