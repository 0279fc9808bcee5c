"""Event buses: in-process (one process, the default on SQLite) and PostgreSQL (several
processes sharing one PostgreSQL database). :func:`create_bus` picks one from the settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from limen.bus.inprocess import EventBus
    from limen.config import Settings
    from limen.store.db import Store

#: Values of the ``bus`` setting.
BUS_KINDS = ("auto", "inprocess", "postgres")


def create_bus(settings: Settings, store: Store) -> EventBus:
    """The bus the settings ask for. ``auto``: the PostgreSQL bus when the store is
    PostgreSQL, else the in-process bus. ``postgres`` on another database is a ConfigError."""
    # Imported here: the bus modules are imported by the store's users, and the PostgreSQL
    # bus needs psycopg, which an SQLite deployment never loads.
    from limen.bus.inprocess import EventBus
    from limen.errors import ConfigError

    kind = settings.bus.strip().lower()
    if kind not in BUS_KINDS:
        raise ConfigError(
            f"setting 'bus': {settings.bus!r} is not one of {', '.join(BUS_KINDS)}",
            code="bus_backend",
        )
    is_postgres = store.engine.dialect.name.startswith("postgresql")
    if kind == "auto":
        kind = "postgres" if is_postgres else "inprocess"
    if kind == "inprocess":
        return EventBus()
    from limen.bus.postgres import PostgresBus

    return PostgresBus(store, retention_seconds=settings.bus_retention_seconds)
