"""The store on SQLite and on PostgreSQL: the same admin API, the same conditional updates
(refresh-token rotation, enrollment tokens) under real concurrency, the traffic-log batch
insert and the configuration version. Every test runs on both backends (``store_url``)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import select

from limen.admin.api import build_router, install_error_handlers
from limen.admin.auth import create_admin_token
from limen.bus.inprocess import EventBus
from limen.config import load_settings
from limen.errors import AuthError, LimenError, StoreError
from limen.identity.service import IdentityService
from limen.logs.traffic import TrafficLogWriter
from limen.pki import make_csr, new_key
from limen.service import ServiceContext, open_context
from limen.store.db import Store
from limen.store.models import Connector, RefreshToken, TrafficRecord, User


@pytest.fixture
def ctx(store_url: str, tmp_path: Path) -> Iterator[ServiceContext]:
    # The in-process bus: these tests are about the store (the bus has its own tests).
    context = open_context(
        load_settings(data_dir=tmp_path, database_url=store_url, bus="inprocess")
    )
    assert type(context.bus) is EventBus
    yield context
    context.store.dispose()


@contextmanager
def _serve(ctx: ServiceContext) -> Iterator[str]:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(build_router(ctx))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, name="store-backend-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:  # bounded: uvicorn sets `started` once it serves
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def base_url(ctx: ServiceContext) -> Iterator[str]:
    with _serve(ctx) as url:
        yield url


@pytest.fixture
def api(ctx: ServiceContext, base_url: str) -> Iterator[httpx.Client]:
    token = create_admin_token(ctx.store, "backend-test", "admin")
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        yield client


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json() if response.content else None


def _race(n: int, work: Callable[[int], Any]) -> list[Any]:
    """Run ``work(i)`` on ``n`` threads released together; results or raised LimenErrors."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait(10)
        try:
            results[i] = work(i)
        except LimenError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), name=f"race-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


# --- the admin API on each backend --------------------------------------------------------------


def test_schema_is_the_models_on_each_backend(ctx: ServiceContext) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from limen.store.models import Base

    with ctx.store.engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    assert diff == []
    # Migrating again is a no-op (every process migrates at start).
    ctx.store.migrate()


def test_users_groups_apps_segments_assignments(ctx: ServiceContext, api: httpx.Client) -> None:
    alice = ok(api.post("/api/v1/users", json={"username": "alice", "password": "pw-alice-1"}), 201)
    bob = ok(api.post("/api/v1/users", json={"username": "bob", "display_name": "Bøb 🚀"}), 201)
    assert ok(api.get(f"/api/v1/users/{bob['id']}"))["display_name"] == "Bøb 🚀"
    dup = api.post("/api/v1/users", json={"username": "alice"})
    assert dup.status_code == 409 and dup.json()["error"] == "name_taken"

    eng = ok(api.post("/api/v1/groups", json={"name": "eng"}), 201)["id"]
    ops = ok(api.post("/api/v1/groups", json={"name": "ops"}), 201)["id"]
    ok(api.post(f"/api/v1/groups/{eng}/members", json={"member_id": alice["id"]}), 201)
    ok(api.post(f"/api/v1/groups/{eng}/members", json={"member_id": ops}), 201)
    cycle = api.post(f"/api/v1/groups/{ops}/members", json={"member_id": eng})
    assert cycle.status_code == 409 and cycle.json()["error"] == "group_cycle"
    assert ok(api.get(f"/api/v1/users/{alice['id']}"))["groups"] == [eng]

    app = ok(api.post("/api/v1/apps", json={"name": "HR", "dns_suffixes": ["HR.Corp."]}), 201)
    assert app["dns_suffixes"] == ["hr.corp"]  # JSON column round trip
    seg = ok(
        api.post(
            f"/api/v1/apps/{app['id']}/segments",
            json={"type": "cidr", "destination": "10.1.0.0/16", "ports": "443, 80"},
        ),
        201,
    )
    assert (seg["ports"], seg["protocol"]) == ("80,443", "tcp")
    fin = ok(api.post("/api/v1/apps", json={"name": "Finance"}), 201)
    overlap = api.post(
        f"/api/v1/apps/{fin['id']}/segments",
        json={"type": "ip_range", "destination": "10.1.0.0-10.1.255.255", "ports": "443"},
    )
    assert overlap.status_code == 409
    ok(api.post(f"/api/v1/apps/{app['id']}/assignments", json={"principal_id": eng}), 201)
    ok(api.post(f"/api/v1/apps/{app['id']}/assignments", json={"principal_id": "bob"}), 201)
    got = ok(api.get(f"/api/v1/apps/{app['id']}"))
    assert [s["id"] for s in got["segments"]] == [seg["id"]]
    assert sorted(a["principal_id"] for a in got["assignments"]) == sorted([eng, bob["id"]])

    # Disabling revokes (float and boolean columns round trip); deleting cascades.
    before = time.time()
    ok(api.post(f"/api/v1/users/{alice['id']}/disable"))
    with ctx.store.session() as s:
        row = s.get(User, alice["id"])
        assert row is not None and row.enabled is False
        assert row.revoked_before >= before
    ok(api.delete(f"/api/v1/users/{alice['id']}"), 204)
    assert ok(api.get(f"/api/v1/groups/{eng}"))["members"] == [ops]
    ok(api.delete(f"/api/v1/apps/{app['id']}"), 204)
    assert api.get(f"/api/v1/apps/{app['id']}").status_code == 404
    audit = ok(api.get("/api/v1/audit?limit=1000"))
    actions = {r["action"] for r in (audit["items"] if isinstance(audit, dict) else audit)}
    assert {"user.disable", "user.delete", "app.delete"} <= actions


# --- conditional updates under concurrency ------------------------------------------------------


def _signed_in(ctx: ServiceContext, name: str) -> tuple[IdentityService, User, Any]:
    identity = IdentityService(ctx.store, ctx.settings)
    now = time.time()
    with ctx.store.session() as s:
        user = User(id=f"usr_{name}", username=name, created_at=now, updated_at=now)
        s.add(user)
    session = identity.start_session(
        user, client_id="limen-cli", amr=["pwd"], ip_address="127.0.0.1", capabilities=[], now=now
    )
    return identity, user, session


def test_refresh_rotation_one_winner_and_reuse_revokes_the_family(ctx: ServiceContext) -> None:
    identity, user, session = _signed_in(ctx, "rita")
    token = identity.issue_refresh_token(session, time.time())
    # Sequential: rotation, then reuse of the spent token revokes the family.
    _, _, second = identity.rotate_refresh_token(token, time.time())
    with pytest.raises(AuthError, match="reuse"):
        identity.rotate_refresh_token(token, time.time())
    with pytest.raises(AuthError, match="revoked"):
        identity.rotate_refresh_token(second, time.time())

    # Concurrent: of two uses of one token, exactly one gets the next token.
    for _ in range(5):
        sess = identity.start_session(
            user, client_id="c", amr=["pwd"], ip_address="", capabilities=[], now=time.time()
        )
        fresh = identity.issue_refresh_token(sess, time.time())

        def use(_i: int, token: str = fresh) -> tuple[User, Any, str]:
            return identity.rotate_refresh_token(token, time.time())

        results = _race(2, use)
        winners = [r for r in results if isinstance(r, tuple)]
        losers = [r for r in results if isinstance(r, LimenError)]
        assert len(winners) == 1 and len(losers) == 1, results
        if not ctx.store.is_sqlite:
            # PostgreSQL: the loser's conditional UPDATE waits for the winner's row lock,
            # then matches nothing: reuse is detected and the family revoked.
            assert isinstance(losers[0], AuthError) and losers[0].code == "invalid_grant"
        else:
            # SQLite serialises writers; the loser sees the spent token or a busy database.
            assert isinstance(losers[0], AuthError | StoreError)
        with ctx.store.session() as s:
            spent = s.get(RefreshToken, _hash(fresh))
            assert spent is not None and spent.used_at is not None


def _hash(token: str) -> str:
    from limen.store.db import token_hash

    return token_hash(token)


def test_enrollment_token_is_single_use_under_concurrency(
    ctx: ServiceContext, api: httpx.Client, base_url: str
) -> None:
    group = ok(api.post("/api/v1/connector-groups", json={"name": "dc1"}), 201)["id"]
    for _ in range(3):
        token = ok(api.post(f"/api/v1/connector-groups/{group}/enrollment-tokens"), 201)["token"]
        csrs = [make_csr(new_key(), "c") for _ in range(4)]

        def enroll(i: int, token: str = token, csrs: list[str] = csrs) -> int:
            with httpx.Client(base_url=base_url, timeout=30) as anon:
                body = {"token": token, "csr_pem": csrs[i], "name": f"{token[-6:]}-{i}"}
                return anon.post("/api/v1/connectors/enroll", json=body).status_code

        statuses = _race(4, enroll)
        assert sorted(statuses) == [201, 401, 401, 401], statuses
    with ctx.store.session() as s:
        names = s.scalars(select(Connector.name).where(Connector.group_id == group)).all()
    assert len(names) == 3


def test_config_version_bumps_are_not_lost(ctx: ServiceContext) -> None:
    start = ctx.store.config_version()

    def bump(_i: int) -> None:
        for _ in range(5):
            for attempt in range(50):  # SQLite may answer "busy": retry, bounded
                try:
                    with ctx.store.session() as s:
                        ctx.store.bump_config_version(s)
                    break
                except StoreError:
                    if attempt == 49:
                        raise
                    time.sleep(0.01)

    results = _race(6, bump)
    assert all(r is None for r in results), results
    assert ctx.store.config_version() == start + 30


# --- traffic log -------------------------------------------------------------------------------


async def test_traffic_log_batch_insert(ctx: ServiceContext, api: httpx.Client) -> None:
    writer = TrafficLogWriter(ctx.store, batch=50)
    big = 5 * 2**30  # a 5 GiB flow: past a 32-bit column
    for i in range(120):
        writer.submit(
            {
                "flow_id": f"flw_{i:04d}",
                "started_at": 1_700_000_000.123456 + i,
                "ended_at": 1_700_000_001.5 + i,
                "user_id": "usr_x",
                "username": "zoë",
                "action": "allow" if i % 3 else "block",
                **({"policy_ids": ["pol_a", "pol_b"]} if i % 2 else {}),  # default: []
                "bytes_up": big + i,
                "bytes_down": i,
                "dest_host": "fileserver.corp",
                "dest_port": 445,
            }
        )
    await writer.flush()
    assert writer.written == 120 and writer.pending == 0
    with ctx.store.session() as s:
        rows = s.scalars(select(TrafficRecord).order_by(TrafficRecord.flow_id)).all()
    assert len(rows) == 120
    assert rows[7].bytes_up == big + 7 and rows[7].policy_ids == ["pol_a", "pol_b"]
    assert rows[0].started_at == 1_700_000_000.123456  # double precision, not float4
    assert rows[0].close_reason == "" and rows[0].transport == "tcp"  # column defaults
    page = ok(
        await asyncio.to_thread(api.get, "/api/v1/traffic", params={"action": "block", "limit": 10})
    )
    items = page["items"] if isinstance(page, dict) else page
    assert len(items) == 10 and all(r["action"] == "block" for r in items)
    assert items[0]["flow_id"] == "flw_0117"  # newest first


def test_store_refuses_what_the_database_refuses(store_url: str) -> None:
    store = Store(store_url)
    store.migrate()
    try:
        now = time.time()
        with store.session() as s:
            s.add(User(id="usr_a", username="same", created_at=now, updated_at=now))
        with pytest.raises(StoreError), store.session() as s:
            s.add(User(id="usr_b", username="same", created_at=now, updated_at=now))
    finally:
        store.dispose()
