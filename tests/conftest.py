"""Fixtures shared by every test package: a fresh PostgreSQL database per test, and a store
URL parametrised over SQLite and PostgreSQL.

PostgreSQL is expected at 127.0.0.1:5432 (user ``postgres``, trust auth; override with
``LIMEN_TEST_PG``, a libpq URL of the server's maintenance database). Unreachable, the
PostgreSQL cases are skipped, except with ``CI=true``, where they fail: CI must not pass by
skipping the backend it is there to test.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

PG_ADMIN_URL = os.environ.get("LIMEN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _sqlalchemy_url(libpq_url: str, database: str) -> str:
    base = libpq_url.rsplit("/", 1)[0]
    return f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{database}"


def _admin_connection() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A SQLAlchemy URL of a new, empty PostgreSQL database, dropped after the test."""
    name = f"limen_test_{secrets.token_hex(6)}"
    with _admin_connection() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _sqlalchemy_url(PG_ADMIN_URL, name)
    finally:
        with _admin_connection() as conn:
            # FORCE ends connections a failed test left open (PostgreSQL 13+).
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL on each backend: SQLite in ``tmp_path``, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/t.db"
    url: str = request.getfixturevalue("pg_url")
    return url
