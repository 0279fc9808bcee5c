"""Opening the store: an engine, a session factory, migrations applied at start."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from limen.errors import StoreError
from limen.store.models import Base, ConfigVersion

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class Store:
    """The database. Thread-safe: each unit of work opens its own session."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, object] = {"future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)  # type: ignore[arg-type]
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    def migrate(self) -> None:
        """Bring the schema to the newest revision (Alembic)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["engine"] = self.engine
        try:
            command.upgrade(cfg, "head")
        except SQLAlchemyError as exc:
            raise StoreError(f"migration failed: {exc}") from exc

    def create_all_for_tests(self) -> None:
        Base.metadata.create_all(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: committed on success, rolled back on any error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            raise _store_error(exc) from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A Core connection in a transaction, for bulk writes below the ORM: committed on
        success, rolled back on any error, database errors raised as StoreError."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise _store_error(exc) from exc

    def bump_config_version(self, session: Session) -> None:
        """Mark configuration as changed (inside the caller's unit of work)."""
        bump_config_version(session)

    def config_version(self) -> int:
        with self.session() as s:
            row = s.scalar(select(ConfigVersion.version).where(ConfigVersion.id == 1))
            return int(row or 0)

    def dispose(self) -> None:
        self.engine.dispose()


def _store_error(exc: SQLAlchemyError) -> StoreError:
    # The driver's message can quote statement parameters (user data): only the type leaves.
    return StoreError(f"database error: {exc.__class__.__name__}")


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    cur = dbapi_conn.cursor()  # type: ignore[attr-defined]
    # WAL lets readers (the edge's snapshot loads) run while the log writer writes.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def bump_config_version(session: Session) -> None:
    """Mark configuration as changed inside ``session``'s unit of work, so every edge node
    recompiles its snapshot (at once in this process via the bus, else on its next poll)."""
    now = time.time()
    # One atomic UPDATE, not read-then-write: on PostgreSQL two concurrent changes would both
    # read N and both write N + 1, and an edge that reloaded between them would miss one.
    bumped = session.execute(
        update(ConfigVersion)
        .where(ConfigVersion.id == 1)
        .values(version=ConfigVersion.version + 1, changed_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(bumped, "rowcount", 0) == 1:
        return
    try:
        with session.begin_nested():
            session.add(ConfigVersion(id=1, version=1, changed_at=now))
    except IntegrityError:
        # Another transaction created the row first: bump that one.
        session.execute(
            update(ConfigVersion)
            .where(ConfigVersion.id == 1)
            .values(version=ConfigVersion.version + 1, changed_at=now)
            .execution_options(synchronize_session=False)
        )


def token_hash(token: str) -> str:
    """How secrets (refresh tokens, enrollment tokens, API tokens) are stored: SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()
