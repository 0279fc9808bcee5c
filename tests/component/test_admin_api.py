"""The admin REST API over a real SQLite store, served by uvicorn on loopback."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI
from sqlalchemy import select

from limen.admin.api import build_router, install_error_handlers
from limen.admin.auth import bootstrap_admin_token, create_admin_token
from limen.bus.inprocess import CONFIG_CHANGED, SUBJECT_REVOKED, BusEvent
from limen.config import load_settings
from limen.pki import connector_id_from_cert, make_csr, new_key
from limen.service import ServiceContext, open_context
from limen.store.models import (
    AuditRecord,
    EnrollmentToken,
    RefreshToken,
    SignInSession,
    TrafficRecord,
    User,
)
from tests.serving import serve


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    context = open_context(load_settings(data_dir=tmp_path))
    yield context
    context.store.dispose()


@pytest.fixture
def events(ctx: ServiceContext) -> list[BusEvent]:
    seen: list[BusEvent] = []
    ctx.bus.subscribe(seen.append)
    return seen


def make_app(ctx: ServiceContext) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(build_router(ctx))
    return app


@pytest.fixture
def base_url(ctx: ServiceContext) -> Iterator[str]:
    with serve(make_app(ctx)) as url:
        yield url


def client_for(ctx: ServiceContext, base_url: str, role: str | None) -> httpx.Client:
    headers = {}
    if role is not None:
        headers["Authorization"] = f"Bearer {create_admin_token(ctx.store, f'{role}-t', role)}"
    return httpx.Client(base_url=base_url, headers=headers, timeout=30)


@pytest.fixture
def api(ctx: ServiceContext, base_url: str) -> Iterator[httpx.Client]:
    with client_for(ctx, base_url, "admin") as c:
        yield c


def ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json() if response.content else None


def err(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    return str(body.get("message", ""))


# --- users and groups -------------------------------------------------------------------------


def test_user_crud_never_returns_secrets(api: httpx.Client) -> None:
    user = ok(
        api.post(
            "/api/v1/users", json={"username": "alice", "password": "pw-1", "display_name": "Alice"}
        ),
        201,
    )
    assert user["id"].startswith("usr_")
    assert user["has_password"] is True
    assert "password" not in json.dumps(user).replace("has_password", "")
    assert "$argon2" not in api.get("/api/v1/users").text
    assert [u["username"] for u in ok(api.get("/api/v1/users"))] == ["alice"]
    assert ok(api.get(f"/api/v1/users/{user['id']}"))["display_name"] == "Alice"
    err(api.post("/api/v1/users", json={"username": "alice"}), 409, "name_taken")
    ok(api.delete(f"/api/v1/users/{user['id']}"), 204)
    msg = err(api.get(f"/api/v1/users/{user['id']}"), 404, "not_found")
    assert user["id"] in msg


def test_validation_errors_name_the_field(api: httpx.Client) -> None:
    msg = err(api.post("/api/v1/users", json={"display_name": "x"}), 400, "invalid_request")
    assert "username" in msg
    msg = err(
        api.post("/api/v1/users", json={"username": "bob", "pasword": "x"}), 400, "invalid_request"
    )
    assert "pasword" in msg
    msg = err(
        api.post("/api/v1/users", content=b"{nope", headers={"content-type": "application/json"}),
        400,
        "invalid_request",
    )
    assert "JSON" in msg
    err(api.get("/api/v1/nowhere"), 404, "not_found")


def test_disable_password_and_delete_revoke_sessions_and_publish(
    api: httpx.Client, ctx: ServiceContext, events: list[BusEvent]
) -> None:
    uid = ok(api.post("/api/v1/users", json={"username": "bob", "password": "pw"}), 201)["id"]
    now = time.time()
    with ctx.store.session() as s:
        s.add(SignInSession(id="ses_1", user_id=uid, auth_time=now - 10, created_at=now - 10))
        s.add(
            RefreshToken(
                token_hash="h" * 64,
                family_id="rtf_1",
                session_id="ses_1",
                user_id=uid,
                issued_at=now - 10,
                expires_at=now + 1000,
            )
        )
    before = time.time()
    user = ok(api.post(f"/api/v1/users/{uid}/disable"))
    assert user["enabled"] is False and user["revoked_before"] >= before
    revoked = [e for e in events if e.topic == SUBJECT_REVOKED]
    assert [(e.payload["user_id"], e.payload["reason"]) for e in revoked] == [
        (uid, "user_disabled")
    ]
    with ctx.store.session() as s:
        assert s.get(SignInSession, "ses_1").revoked_at is not None  # type: ignore[union-attr]
        assert s.get(RefreshToken, "h" * 64).family_revoked is True  # type: ignore[union-attr]
    assert ok(api.post(f"/api/v1/users/{uid}/enable"))["enabled"] is True
    assert len([e for e in events if e.topic == SUBJECT_REVOKED]) == 1  # enabling revokes nothing

    ok(api.put(f"/api/v1/users/{uid}/password", json={"password": "new-pw"}))
    with ctx.store.session() as s:
        from limen.identity.passwords import verify_password

        row = s.get(User, uid)
        assert row is not None and verify_password(row.password_hash, "new-pw")
    ok(api.delete(f"/api/v1/users/{uid}"), 204)
    reasons = [e.payload["reason"] for e in events if e.topic == SUBJECT_REVOKED]
    assert reasons == ["user_disabled", "password_changed", "user_deleted"]
    err(api.post(f"/api/v1/users/{uid}/disable"), 404, "not_found")


def test_groups_members_and_cycles(api: httpx.Client) -> None:
    uid = ok(api.post("/api/v1/users", json={"username": "carol"}), 201)["id"]
    eng = ok(api.post("/api/v1/groups", json={"name": "eng"}), 201)["id"]
    ops = ok(api.post("/api/v1/groups", json={"name": "ops"}), 201)["id"]
    assert eng.startswith("grp_")
    ok(api.post(f"/api/v1/groups/{eng}/members", json={"member_id": uid}), 201)
    group = ok(api.post(f"/api/v1/groups/{eng}/members", json={"member_id": ops}), 201)
    assert sorted(group["members"]) == sorted([uid, ops])
    err(api.post(f"/api/v1/groups/{eng}/members", json={"member_id": uid}), 409, "already_member")
    msg = err(
        api.post(f"/api/v1/groups/{ops}/members", json={"member_id": eng}), 409, "group_cycle"
    )
    assert "cycle" in msg
    err(api.post(f"/api/v1/groups/{eng}/members", json={"member_id": eng}), 409, "group_cycle")
    err(
        api.post(f"/api/v1/groups/{eng}/members", json={"member_id": "usr_nobody"}),
        400,
        "unknown_principal",
    )
    assert ok(api.get(f"/api/v1/users/{uid}"))["groups"] == [eng]
    ok(api.delete(f"/api/v1/groups/{eng}/members/{uid}"), 204)
    err(api.delete(f"/api/v1/groups/{eng}/members/{uid}"), 404, "not_found")
    ok(api.delete(f"/api/v1/groups/{ops}"), 204)
    assert ok(api.get(f"/api/v1/groups/{eng}"))["members"] == []
    assert [g["name"] for g in ok(api.get("/api/v1/groups"))] == ["eng"]


# --- roles --------------------------------------------------------------------------------------


def test_roles_and_tokens(ctx: ServiceContext, base_url: str) -> None:
    with client_for(ctx, base_url, None) as anon:
        r = anon.get("/api/v1/apps")
        err(r, 401, "invalid_token")
        assert r.headers["www-authenticate"] == "Bearer"
        err(
            anon.get("/api/v1/apps", headers={"Authorization": "Bearer lat_forged"}),
            401,
            "invalid_token",
        )
        err(anon.get("/api/v1/apps", headers={"Authorization": "Basic eDp5"}), 401, "invalid_token")
    with client_for(ctx, base_url, "reader") as reader:
        assert ok(reader.get("/api/v1/apps")) == []
        assert ok(reader.get("/api/v1/audit"))["items"] == []
        msg = err(reader.post("/api/v1/apps", json={"name": "x"}), 403, "insufficient_role")
        assert "reader" in msg
    with client_for(ctx, base_url, "operator") as op:
        ok(op.post("/api/v1/apps", json={"name": "wiki"}), 201)
        err(op.post("/api/v1/users", json={"username": "eve"}), 403, "insufficient_role")
        err(op.post("/api/v1/groups", json={"name": "g"}), 403, "insufficient_role")
        err(op.get("/api/v1/admin-tokens"), 403, "insufficient_role")
        assert ok(op.get("/api/v1/users")) == []
    with client_for(ctx, base_url, "admin") as adm:
        created = ok(adm.post("/api/v1/admin-tokens", json={"name": "ci", "role": "reader"}), 201)
        assert created["token"].startswith("lat_")
        listed = ok(adm.get("/api/v1/admin-tokens"))
        assert "ci" in [t["name"] for t in listed]
        assert created["token"] not in json.dumps(listed)
        hdr = {"Authorization": f"Bearer {created['token']}"}
        ok(adm.get("/api/v1/apps", headers=hdr))
        ok(adm.delete(f"/api/v1/admin-tokens/{created['id']}"), 204)
        err(adm.get("/api/v1/apps", headers=hdr), 401, "invalid_token")


# --- connector groups, enrollment and connectors ------------------------------------------------


def test_connector_groups(api: httpx.Client) -> None:
    groups = ok(api.get("/api/v1/connector-groups"))
    assert [(g["name"], g["is_default"]) for g in groups] == [("Default", True)]
    cg = ok(api.post("/api/v1/connector-groups", json={"name": "eu", "region": "eu-west"}), 201)
    err(api.post("/api/v1/connector-groups", json={"name": "eu"}), 409, "name_taken")
    app = ok(api.post("/api/v1/apps", json={"name": "erp", "connector_group_id": "eu"}), 201)
    assert app["connector_group_id"] == cg["id"]
    msg = err(api.delete(f"/api/v1/connector-groups/{cg['id']}"), 409, "in_use")
    assert "erp" in msg
    err(api.delete(f"/api/v1/connector-groups/{groups[0]['id']}"), 409, "in_use")
    ok(api.delete(f"/api/v1/apps/{app['id']}"), 204)
    ok(api.delete(f"/api/v1/connector-groups/{cg['id']}"), 204)
    err(api.get(f"/api/v1/connector-groups/{cg['id']}"), 404, "not_found")


def enroll(api: httpx.Client, token: str, name: str = "") -> Any:
    csr = make_csr(new_key(), "whatever-the-connector-asks")
    return api.post(
        "/api/v1/connectors/enroll",
        json={"token": token, "csr_pem": csr, "name": name, "version": "0.1"},
    )


def test_enrollment_is_one_time_and_issues_a_connector_cert(
    ctx: ServiceContext, api: httpx.Client, base_url: str
) -> None:
    cg = ok(api.post("/api/v1/connector-groups", json={"name": "dc1"}), 201)["id"]
    issued = ok(
        api.post(f"/api/v1/connector-groups/{cg}/enrollment-tokens", json={"ttl_seconds": 600}), 201
    )
    token = issued["token"]
    assert token.startswith("enr_") and issued["expires_at"] > time.time() + 500
    with httpx.Client(base_url=base_url) as anon:
        # A broken CSR is a 400 and leaves the token usable.
        r = anon.post("/api/v1/connectors/enroll", json={"token": token, "csr_pem": "junk"})
        err(r, 400, "invalid_request")
        out = ok(enroll(anon, token, "conn-a"), 201)
        err(enroll(anon, token), 401, "invalid_enrollment_token")
        err(enroll(anon, "enr_unknown"), 401, "invalid_enrollment_token")
        err(enroll(anon, "lat_x"), 401, "invalid_enrollment_token")
    cert = x509.load_pem_x509_certificate(out["cert_pem"].encode())
    der = cert.public_bytes(serialization.Encoding.DER)
    assert connector_id_from_cert(der)[0] == out["connector_id"]
    assert out["ca_pem"] == ctx.pki.ca_pem and out["group_id"] == cg
    conn = ok(api.get(f"/api/v1/connectors/{out['connector_id']}"))
    assert (conn["name"], conn["group_id"], conn["state"]) == ("conn-a", cg, "active")
    assert conn["cert_serial"] and conn["cert_not_after"] == pytest.approx(out["not_after"])

    # expired tokens are refused
    expired = ok(api.post(f"/api/v1/connector-groups/{cg}/enrollment-tokens"), 201)["token"]
    with ctx.store.session() as s:
        for row in s.scalars(select(EnrollmentToken).where(EnrollmentToken.used_at.is_(None))):
            row.expires_at = time.time() - 1
    err(enroll(api, expired), 401, "invalid_enrollment_token")

    # connectors keep their group from deletion; move and revoke them
    err(api.delete(f"/api/v1/connector-groups/{cg}"), 409, "in_use")
    default = ok(api.get("/api/v1/connector-groups"))[0]["id"]
    moved = ok(
        api.post(f"/api/v1/connectors/{out['connector_id']}/move", json={"group_id": "Default"})
    )
    assert moved["group_id"] == default
    err(
        api.post(f"/api/v1/connectors/{out['connector_id']}/move", json={"group_id": "nope"}),
        400,
        "unknown_connector_group",
    )
    ok(api.delete(f"/api/v1/connectors/{out['connector_id']}"), 204)
    assert ok(api.get(f"/api/v1/connectors/{out['connector_id']}"))["state"] == "revoked"
    ok(api.delete(f"/api/v1/connector-groups/{cg}"), 204)

    audit = api.get("/api/v1/audit?limit=1000").text
    assert token not in audit and expired not in audit
    assert "connector.enroll" in audit


# --- applications, segments, assignments --------------------------------------------------------


def test_apps_segments_assignments(
    api: httpx.Client, ctx: ServiceContext, events: list[BusEvent]
) -> None:
    v0 = ctx.store.config_version()
    err(
        api.post("/api/v1/apps", json={"name": "x", "connector_group_id": "cng_missing"}),
        400,
        "unknown_connector_group",
    )
    hr = ok(api.post("/api/v1/apps", json={"name": "HR", "dns_suffixes": ["HR.Corp."]}), 201)
    assert hr["dns_suffixes"] == ["hr.corp"] and hr["segments"] == []
    assert ctx.store.config_version() > v0
    assert any(e.topic == CONFIG_CHANGED for e in events)
    fin = ok(api.post("/api/v1/apps", json={"name": "Finance"}), 201)
    qa = ok(api.post("/api/v1/apps", json={"name": "QA", "kind": "quick_access"}), 201)

    seg = ok(
        api.post(
            f"/api/v1/apps/{hr['id']}/segments",
            json={"type": "cidr", "destination": "10.1.0.0/16", "ports": "443, 80"},
        ),
        201,
    )
    assert (seg["ports"], seg["protocol"]) == ("80,443", "tcp")
    msg = err(
        api.post(
            f"/api/v1/apps/{fin['id']}/segments",
            json={"type": "ip_range", "destination": "10.1.0.0-10.1.255.255", "ports": 443},
        ),
        409,
        "segment_overlap",
    )
    assert "'HR'" in msg and seg["id"] in msg
    # more specific: allowed; other protocol: allowed; Quick Access: allowed
    ok(
        api.post(
            f"/api/v1/apps/{fin['id']}/segments",
            json={"type": "ip", "destination": "10.1.2.3", "ports": "443"},
        ),
        201,
    )
    ok(
        api.post(
            f"/api/v1/apps/{fin['id']}/segments",
            json={"type": "cidr", "destination": "10.1.0.0/16", "ports": "443", "protocol": "udp"},
        ),
        201,
    )
    ok(
        api.post(
            f"/api/v1/apps/{qa['id']}/segments",
            json={"type": "cidr", "destination": "10.0.0.0/8", "ports": "1-65535"},
        ),
        201,
    )
    err(
        api.post(
            f"/api/v1/apps/{hr['id']}/segments",
            json={"type": "cidr", "destination": "10.1.0.0/16", "ports": "80,443"},
        ),
        409,
        "duplicate_segment",
    )

    msg = err(
        api.post(
            f"/api/v1/apps/{hr['id']}/segments",
            json={"type": "cidr", "destination": "10.2.0.1/16", "ports": "22"},
        ),
        400,
        "invalid_request",
    )
    assert "host bits set" in msg
    msg = err(
        api.post(
            f"/api/v1/apps/{hr['id']}/segments",
            json={"type": "ip", "destination": "10.2.0.1", "ports": "0"},
        ),
        400,
        "invalid_request",
    )
    assert "0" in msg and "ports" in msg
    err(
        api.post(
            f"/api/v1/apps/{hr['id']}/segments",
            json={"type": "fqdn", "destination": "a..b", "ports": "22"},
        ),
        400,
        "invalid_request",
    )
    err(
        api.post(
            "/api/v1/apps/app_missing/segments",
            json={"type": "ip", "destination": "10.0.0.1", "ports": "22"},
        ),
        404,
        "not_found",
    )

    uid = ok(api.post("/api/v1/users", json={"username": "dave"}), 201)["id"]
    gid = ok(api.post("/api/v1/groups", json={"name": "staff"}), 201)["id"]
    ok(api.post(f"/api/v1/apps/{hr['id']}/assignments", json={"principal_id": uid}), 201)
    ok(api.post(f"/api/v1/apps/{hr['id']}/assignments", json={"principal_id": "staff"}), 201)
    err(
        api.post(f"/api/v1/apps/{hr['id']}/assignments", json={"principal_id": "dave"}),
        409,
        "already_assigned",
    )
    msg = err(
        api.post(f"/api/v1/apps/{hr['id']}/assignments", json={"principal_id": "usr_ghost"}),
        400,
        "unknown_principal",
    )
    assert "usr_ghost" in msg
    detail = ok(api.get(f"/api/v1/apps/{hr['id']}"))
    assert [s["id"] for s in detail["segments"]] == [seg["id"]]
    assert sorted(a["principal_id"] for a in detail["assignments"]) == sorted([uid, gid])

    ok(api.delete(f"/api/v1/apps/{hr['id']}/assignments/{gid}"), 204)
    err(api.delete(f"/api/v1/apps/{hr['id']}/assignments/{gid}"), 404, "not_found")
    err(api.delete(f"/api/v1/apps/{fin['id']}/segments/{seg['id']}"), 404, "not_found")
    ok(api.delete(f"/api/v1/apps/{hr['id']}/segments/{seg['id']}"), 204)
    # with HR's segment gone, Finance may take the range
    ok(
        api.post(
            f"/api/v1/apps/{fin['id']}/segments",
            json={"type": "ip_range", "destination": "10.1.0.0-10.1.255.255", "ports": "443"},
        ),
        201,
    )
    # deleting a user drops their assignments
    ok(api.delete(f"/api/v1/users/{uid}"), 204)
    assert ok(api.get(f"/api/v1/apps/{hr['id']}"))["assignments"] == []
    ok(api.delete(f"/api/v1/apps/{hr['id']}"), 204)
    assert sorted(a["name"] for a in ok(api.get("/api/v1/apps"))) == ["Finance", "QA"]

    with ctx.store.session() as s:
        actions = [r.action for r in s.scalars(select(AuditRecord).order_by(AuditRecord.at))]
        actors = {r.actor for r in s.scalars(select(AuditRecord))}
    assert actions[:2] == ["app.create", "app.create"]
    assert {
        "segment.create",
        "segment.delete",
        "assignment.create",
        "assignment.delete",
        "user.delete",
        "app.delete",
    } <= set(actions)
    assert actors == {"token:admin-t"}


def test_audit_listing_and_pagination(api: httpx.Client) -> None:
    ok(api.post("/api/v1/users", json={"username": "u1", "password": "secret-pw-1"}), 201)
    for i in range(4):
        ok(api.post("/api/v1/apps", json={"name": f"app{i}"}), 201)
    page = ok(api.get("/api/v1/audit?limit=3"))
    assert len(page["items"]) == 3 and page["next_cursor"]
    rest = ok(api.get(f"/api/v1/audit?limit=3&cursor={page['next_cursor']}"))
    assert len(rest["items"]) == 2 and rest["next_cursor"] is None
    actions = [r["action"] for r in page["items"] + rest["items"]]
    assert actions == ["app.create"] * 4 + ["user.create"]
    assert "secret-pw-1" not in api.get("/api/v1/audit").text
    assert ok(api.get(f"/api/v1/audit?since={time.time() + 60}"))["items"] == []


# --- traffic log --------------------------------------------------------------------------------


def add_traffic(ctx: ServiceContext) -> list[TrafficRecord]:
    rows = []
    base = 1_700_000_000.0
    for i in range(25):
        rows.append(
            TrafficRecord(
                flow_id=f"flw_{i:04d}",
                # pairs of flows share a start time: pagination must not lose or repeat them
                started_at=base + (i // 2),
                user_id="usr_a" if i % 3 else "usr_b",
                username="alice" if i % 3 else "bob",
                app_id="app_x" if i % 2 else "app_y",
                action="block" if i % 5 == 0 else "allow",
                dest_host="files.corp",
                dest_port=445,
            )
        )
    with ctx.store.session() as s:
        s.add_all(rows)
    return rows


def page_all(api: httpx.Client, query: str, limit: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        url = f"/api/v1/traffic?limit={limit}&{query}" + (f"&cursor={cursor}" if cursor else "")
        page = ok(api.get(url))
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def test_traffic_filters_and_keyset_pagination(api: httpx.Client, ctx: ServiceContext) -> None:
    rows = add_traffic(ctx)
    expected = sorted(rows, key=lambda r: (r.started_at, r.flow_id), reverse=True)
    items = page_all(api, "", 4)
    assert [i["flow_id"] for i in items] == [r.flow_id for r in expected]
    assert ok(api.get("/api/v1/traffic"))["next_cursor"] is None  # default 100 covers all
    bob = page_all(api, "user=bob", 3)
    assert {i["user_id"] for i in bob} == {"usr_b"} and len(bob) == 9
    assert len(page_all(api, "user=usr_b", 50)) == 9
    blocked_x = page_all(api, "app=app_x&action=block", 2)
    assert [i["flow_id"] for i in blocked_x] == ["flw_0015", "flw_0005"]
    window = page_all(api, "since=1700000002&until=1700000004", 10)
    assert [i["flow_id"] for i in window] == ["flw_0007", "flw_0006", "flw_0005", "flw_0004"]
    iso = page_all(api, "since=2023-11-14T22:13:22Z&until=2023-11-14T22:13:24", 10)
    assert [i["flow_id"] for i in iso] == [i["flow_id"] for i in window]
    err(api.get("/api/v1/traffic?limit=1001"), 400, "invalid_request")
    err(api.get("/api/v1/traffic?limit=0"), 400, "invalid_request")
    err(api.get("/api/v1/traffic?cursor=%%%"), 400, "invalid_request")
    err(api.get("/api/v1/traffic?action=maybe"), 400, "invalid_request")
    err(api.get("/api/v1/traffic?since=yesterday"), 400, "invalid_request")


def test_traffic_export_ndjson(api: httpx.Client, ctx: ServiceContext) -> None:
    add_traffic(ctx)
    r = api.get("/api/v1/traffic/export?action=allow")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert len(lines) == 20 and {x["action"] for x in lines} == {"allow"}
    assert lines[0]["started_at"] >= lines[-1]["started_at"]


def test_bootstrap_admin_token_file(ctx: ServiceContext, base_url: str, tmp_path: Path) -> None:
    path = tmp_path / "boot" / "admin-token"
    token = bootstrap_admin_token(ctx.store, path)
    assert token is not None and token.startswith("lat_")
    assert path.read_text().strip() == token
    assert path.stat().st_mode & 0o777 == 0o600
    assert bootstrap_admin_token(ctx.store, path) is None  # never overwritten
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}) as c:
        ok(c.post("/api/v1/users", json={"username": "first"}), 201)
