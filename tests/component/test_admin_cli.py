"""``limen admin ...`` against the real admin API (uvicorn on loopback, SQLite store)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from typer.testing import CliRunner, Result

import limen.cli.admin as admin_cli
from limen.admin.api import build_router, install_error_handlers
from limen.admin.auth import create_admin_token
from limen.bus.inprocess import SUBJECT_REVOKED, BusEvent
from limen.config import load_settings
from limen.pki import make_csr, new_key
from limen.service import ServiceContext, open_context
from limen.store.models import TrafficRecord
from tests.serving import serve


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    context = open_context(load_settings(data_dir=tmp_path / "server"))
    yield context
    context.store.dispose()


@pytest.fixture
def base_url(ctx: ServiceContext) -> Iterator[str]:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(build_router(ctx))
    with serve(app) as url:
        yield url


@pytest.fixture
def cli(ctx: ServiceContext, base_url: str, tmp_path: Path) -> CliRunner:
    """A runner whose data dir holds an admin token, as ``limen up`` leaves it."""
    data_dir = tmp_path / "cli"
    data_dir.mkdir()
    (data_dir / "admin-token").write_text(create_admin_token(ctx.store, "cli", "admin") + "\n")
    return CliRunner(env={"LIMEN_DATA_DIR": str(data_dir), "LIMEN_API_URL": base_url,
                          "LIMEN_ADMIN_TOKEN": None, "LIMEN_CA_FILE": None})  # fmt: skip


def run(cli: CliRunner, *args: str, stdin: str | None = None, code: int = 0) -> Result:
    result = cli.invoke(admin_cli.app, list(args), input=stdin)
    assert result.exit_code == code, (result.output, result.stderr, result.exception)
    return result


def run_json(cli: CliRunner, *args: str, stdin: str | None = None) -> Any:
    return json.loads(run(cli, "--json", *args, stdin=stdin).stdout)


def test_users_and_groups_by_name(cli: CliRunner, ctx: ServiceContext) -> None:
    events: list[BusEvent] = []
    ctx.bus.subscribe(events.append)
    user = run_json(cli, "user", "add", "alice", "--password-stdin", "--display-name", "Alice",
                    stdin="pw-alice\n")  # fmt: skip
    assert user["username"] == "alice" and user["has_password"] is True
    out = run(cli, "user", "list").stdout
    assert "alice" in out and "Alice" in out
    assert run_json(cli, "user", "show", "alice")["id"] == user["id"]
    assert run_json(cli, "user", "show", user["id"])["username"] == "alice"

    run(cli, "user", "disable", "alice")
    assert run_json(cli, "user", "show", "alice")["enabled"] is False
    assert [e.payload["user_id"] for e in events if e.topic == SUBJECT_REVOKED] == [user["id"]]
    assert "enabled user alice" in run(cli, "user", "enable", "alice").stdout
    run(cli, "user", "set-password", "alice", "--password-stdin", stdin="pw-2\n")
    assert len([e for e in events if e.topic == SUBJECT_REVOKED]) == 2

    run(cli, "group", "add", "eng")
    run(cli, "group", "add", "all-staff")
    run(cli, "group", "add-member", "eng", "alice")
    run(cli, "group", "add-member", "all-staff", "eng")
    groups = {g["name"]: g for g in run_json(cli, "group", "list")}
    assert groups["eng"]["members"] == [user["id"]]
    assert groups["all-staff"]["members"] == [groups["eng"]["id"]]
    cycle = run(cli, "group", "add-member", "eng", "all-staff", code=1)
    assert cycle.stderr.startswith("error: group_cycle: ")
    run(cli, "group", "remove-member", "eng", "alice")
    assert run_json(cli, "group", "show", "eng")["members"] == []
    run(cli, "group", "delete", "all-staff")
    run(cli, "user", "delete", "alice")
    missing = run(cli, "user", "show", "alice", code=1)
    assert missing.stderr == "error: not_found: no user named 'alice'\n"


def test_apps_segments_assignments_and_connectors(cli: CliRunner, base_url: str) -> None:
    run(cli, "connector-group", "add", "dc1", "--region", "eu")
    cgroups = {g["name"]: g for g in run_json(cli, "connector-group", "list")}
    assert set(cgroups) == {"Default", "dc1"}
    run(cli, "app", "add", "wiki", "--connector-group", "dc1", "--dns-suffix", "corp.example")
    run(cli, "app", "add", "erp")
    seg = run_json(cli, "segment", "add", "wiki", "--type", "cidr", "--destination",
                   "10.0.0.0/24", "--ports", "80,443")  # fmt: skip
    overlap = run(cli, "segment", "add", "erp", "--type", "ip_range", "--destination",
                  "10.0.0.0-10.0.0.255", "--ports", "443", code=1)  # fmt: skip
    assert overlap.stderr.startswith("error: segment_overlap: ")
    assert "'wiki'" in overlap.stderr and seg["id"] in overlap.stderr
    bad = run(cli, "segment", "add", "erp", "--type", "cidr", "--destination", "10.9.0.1/16",
              "--ports", "22", code=1)  # fmt: skip
    assert "host bits set" in bad.stderr
    run(cli, "user", "add", "bob")
    run(cli, "assign", "wiki", "bob")
    shown = run_json(cli, "app", "show", "wiki")
    assert shown["connector_group_id"] == cgroups["dc1"]["id"]
    assert [s["destination"] for s in shown["segments"]] == ["10.0.0.0/24"]
    assert len(shown["assignments"]) == 1
    table = run(cli, "app", "show", "wiki").stdout
    assert "10.0.0.0/24" in table and "segments" in table
    run(cli, "unassign", "wiki", "bob")
    run(cli, "segment", "delete", "wiki", seg["id"])
    assert run_json(cli, "app", "show", "wiki")["segments"] == []

    # enrollment: the token is the only thing on stdout
    token = run(cli, "connector", "enrollment-token", "--group", "dc1", "--ttl", "600").stdout
    token = token.strip()
    assert token.startswith("enr_")
    with httpx.Client(base_url=base_url) as anon:
        r = anon.post(
            "/api/v1/connectors/enroll",
            json={"token": token, "csr_pem": make_csr(new_key(), "x"), "name": "c1"},
        )
        assert r.status_code == 201, r.text
    connectors = run_json(cli, "connector", "list", "--group", "dc1")
    assert [c["name"] for c in connectors] == ["c1"]
    run(cli, "connector", "move", "c1", "Default")
    assert run_json(cli, "connector", "show", "c1")["group_id"] == cgroups["Default"]["id"]
    run(cli, "connector", "delete", "c1")
    assert run_json(cli, "connector", "show", "c1")["state"] == "revoked"
    in_use = run(cli, "connector-group", "delete", "dc1", code=1)
    assert in_use.stderr.startswith("error: in_use: ")
    run(cli, "app", "delete", "wiki")
    run(cli, "connector-group", "delete", "dc1")
    assert [a["name"] for a in run_json(cli, "app", "list")] == ["erp"]

    audit = run_json(cli, "audit", "list", "--limit", "500")
    actions = {r["action"] for r in audit["items"]}
    assert {"app.create", "segment.create", "connector.enroll", "connector.revoke"} <= actions
    assert token not in json.dumps(audit)


def test_traffic_list(cli: CliRunner, ctx: ServiceContext) -> None:
    with ctx.store.session() as s:
        for i in range(5):
            s.add(TrafficRecord(flow_id=f"flw_{i}", started_at=1_700_000_000.0 + i,
                                user_id="usr_a", username="alice", dest_host="files.corp",
                                dest_port=445, action="block" if i == 4 else "allow"))  # fmt: skip
    page = run_json(cli, "traffic", "list", "--limit", "2")
    assert [x["flow_id"] for x in page["items"]] == ["flw_4", "flw_3"]
    nxt = run_json(cli, "traffic", "list", "--limit", "2", "--cursor", page["next_cursor"])
    assert [x["flow_id"] for x in nxt["items"]] == ["flw_2", "flw_1"]
    blocked = run(cli, "traffic", "list", "--action", "block", "--json")
    assert [x["flow_id"] for x in json.loads(blocked.stdout)["items"]] == ["flw_4"]
    table = run(cli, "traffic", "list", "--user", "alice").stdout
    assert "files.corp" in table and "block" in table
    err = run(cli, "traffic", "list", "--action", "maybe", code=1)
    assert err.stderr.startswith("error: invalid_request: ")


def test_token_sources_and_errors(
    cli: CliRunner, ctx: ServiceContext, base_url: str, tmp_path: Path
) -> None:
    reader = create_admin_token(ctx.store, "ro", "reader")
    denied = run(cli, "--token", reader, "user", "add", "mallory", code=1)
    assert denied.stderr.startswith("error: insufficient_role: ")
    assert run(cli, "--token", reader, "user", "list").exit_code == 0
    bad = run(cli, "--token", "lat_wrong", "user", "list", code=1)
    assert bad.stderr.startswith("error: invalid_token: ")
    empty = tmp_path / "empty"
    empty.mkdir()
    runner = CliRunner(env={"LIMEN_DATA_DIR": str(empty), "LIMEN_API_URL": base_url,
                            "LIMEN_ADMIN_TOKEN": None})  # fmt: skip
    missing = run(runner, "user", "list", code=1)
    assert missing.stderr.startswith("error: no admin token")
    env_token = CliRunner(env={"LIMEN_DATA_DIR": str(empty), "LIMEN_API_URL": base_url,
                               "LIMEN_ADMIN_TOKEN": reader})  # fmt: skip
    assert run(env_token, "user", "list").exit_code == 0
    down = run(cli, "--api", "http://127.0.0.1:9", "user", "list", code=1)
    assert down.stderr.startswith("error: cannot reach http://127.0.0.1:9")


def test_injected_client(
    cli: CliRunner, ctx: ServiceContext, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = create_admin_token(ctx.store, "injected", "admin")
    made: list[admin_cli.Options] = []

    def factory(opts: admin_cli.Options) -> httpx.Client:
        made.append(opts)
        return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"})

    monkeypatch.setattr(admin_cli, "client_factory", factory)
    run(cli, "--api", "https://elsewhere.invalid", "group", "add", "ops")
    assert made and made[0].api == "https://elsewhere.invalid"
    audit = run_json(cli, "audit", "list")
    assert audit["items"][0]["actor"] == "token:injected"
