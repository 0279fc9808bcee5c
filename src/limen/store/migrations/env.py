"""Alembic environment: the engine comes from :meth:`limen.store.db.Store.migrate`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from limen.store.models import Base

config = context.config
engine: Engine = config.attributes["engine"]

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
