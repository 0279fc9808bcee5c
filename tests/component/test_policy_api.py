"""Conditional-access policies, named locations and What-If through the admin REST API
(uvicorn on loopback, a real SQLite store)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from fastapi import FastAPI
from sqlalchemy import select
from typer.testing import CliRunner, Result

import limen.cli.admin as admin_cli
import limen.store.policy_models  # noqa: F401  (registers the tables on Base.metadata)
from limen.admin.api import build_router, install_error_handlers
from limen.admin.api_policies import add_policy_routes
from limen.admin.auth import create_admin_token
from limen.bus.inprocess import CONFIG_CHANGED, BusEvent
from limen.cli.policy import location_app, policy_app
from limen.config import load_settings
from limen.service import ServiceContext, open_context
from limen.store.models import AuditRecord, Device
from tests.serving import serve

API = "/api/v1"


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    context = open_context(load_settings(data_dir=tmp_path))
    # The policy tables are new: create them until the lead's migration includes them.
    context.store.create_all_for_tests()
    yield context
    context.store.dispose()


def make_app(ctx: ServiceContext) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    router = build_router(ctx)
    if not any(getattr(r, "path", "") == f"{API}/policies" for r in router.routes):
        add_policy_routes(router, ctx)
    app.include_router(router)
    return app


@pytest.fixture
def base_url(ctx: ServiceContext) -> Iterator[str]:
    with serve(make_app(ctx)) as url:
        yield url


def client_for(ctx: ServiceContext, base_url: str, role: str) -> httpx.Client:
    token = create_admin_token(ctx.store, f"{role}-t", role)
    return httpx.Client(
        base_url=base_url + API, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


@pytest.fixture
def api(ctx: ServiceContext, base_url: str) -> Iterator[httpx.Client]:
    with client_for(ctx, base_url, "admin") as c:
        yield c


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json() if response.content else None


def err(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    return str(body["message"])


@pytest.fixture
def tenant(api: httpx.Client) -> dict[str, str]:
    """alice in eng, eng nested in staff; bob in nothing; finance and wiki apps; an office
    location (trusted)."""
    ids = {
        "alice": ok(api.post("/users", json={"username": "alice"}), 201)["id"],
        "bob": ok(api.post("/users", json={"username": "bob"}), 201)["id"],
        "eng": ok(api.post("/groups", json={"name": "eng"}), 201)["id"],
        "staff": ok(api.post("/groups", json={"name": "staff"}), 201)["id"],
        "finance": ok(api.post("/apps", json={"name": "finance"}), 201)["id"],
        "wiki": ok(api.post("/apps", json={"name": "wiki"}), 201)["id"],
        "office": ok(
            api.post(
                "/locations", json={"name": "office", "cidrs": ["10.0.0.0/8"], "trusted": True}
            ),
            201,
        )["id"],
    }
    ok(api.post(f"/groups/{ids['eng']}/members", json={"member_id": ids["alice"]}), 201)
    ok(api.post(f"/groups/{ids['staff']}/members", json={"member_id": ids["eng"]}), 201)
    return ids


# --- named locations --------------------------------------------------------------------------


def test_location_crud_and_validation(api: httpx.Client, ctx: ServiceContext) -> None:
    events: list[BusEvent] = []
    ctx.bus.subscribe(events.append)
    before = ctx.store.config_version()
    loc = ok(api.post("/locations", json={"name": "hq", "cidrs": ["192.0.2.0/24", "2001:db8::1"]}),
             201)  # fmt: skip
    assert loc["id"].startswith("loc_") and loc["trusted"] is False
    assert loc["cidrs"] == ["192.0.2.0/24", "2001:db8::1/128"]
    assert ctx.store.config_version() > before
    assert [e.topic for e in events] == [CONFIG_CHANGED]

    msg = err(api.post("/locations", json={"name": "x", "cidrs": ["10.0.0.0/8", "10.0.0.1/8"]}),
              400, "invalid_location")  # fmt: skip
    assert msg.startswith("cidrs[1]: '10.0.0.1/8' is not a CIDR")
    assert err(api.post("/locations", json={"name": "x", "cidrs": []}), 400,
               "invalid_location").startswith("cidrs: empty")  # fmt: skip
    assert "reserved" in err(api.post("/locations", json={"name": "all_trusted",
                                                          "cidrs": ["10.0.0.0/8"]}),
                             400, "invalid_request")  # fmt: skip
    err(api.post("/locations", json={"name": "hq", "cidrs": ["10.0.0.0/8"]}), 409, "name_taken")

    updated = ok(
        api.put(f"/locations/{loc['id']}", json={"trusted": True, "cidrs": ["10.0.0.0/8"]})
    )
    assert updated["trusted"] is True and updated["cidrs"] == ["10.0.0.0/8"]
    assert [x["name"] for x in ok(api.get("/locations"))] == ["hq"]
    assert ok(api.get(f"/locations/{loc['id']}"))["trusted"] is True
    ok(api.delete(f"/locations/{loc['id']}"), 204)
    err(api.get(f"/locations/{loc['id']}"), 404, "not_found")
    with ctx.store.session() as s:
        actions = [a for (a,) in s.execute(select(AuditRecord.action).order_by(AuditRecord.at))]
    assert actions == ["location.create", "location.update", "location.delete"]


# --- policies ---------------------------------------------------------------------------------


def test_policy_crud_names_resolved_and_versions(
    api: httpx.Client, ctx: ServiceContext, tenant: dict[str, str]
) -> None:
    before = ctx.store.config_version()
    created = ok(
        api.post(
            "/policies",
            json={
                "name": "finance needs MFA",
                "users": {"include": ["alice"], "exclude": ["bob"]},
                "groups": {"include": ["staff"]},
                "target": {"apps": ["finance"]},
                "conditions": {"locations": {"include": ["all"], "exclude": ["office"]}},
                "grant": {"require": ["mfa"]},
            },
        ),
        201,
    )
    pid = created["id"]
    assert pid.startswith("pol_") and created["version"] == 1 and created["state"] == "on"
    assert created["users"] == {"include": [tenant["alice"]], "exclude": [tenant["bob"]]}
    assert created["groups"]["include"] == [tenant["staff"]]
    assert created["target"] == {"apps": [tenant["finance"]]}
    assert created["conditions"]["locations"]["exclude"] == [tenant["office"]]
    assert created["problems"] == []
    assert ctx.store.config_version() > before

    shown = ok(api.get(f"/policies/{pid}"))
    assert shown == created
    assert [p["id"] for p in ok(api.get("/policies"))] == [pid]

    # PUT the shown document back, edited: read-only keys are ignored, the version bumps.
    edited = {**shown, "grant": {"require": ["mfa", "compliant_device"], "operator": "one"}}
    v2 = ok(api.put(f"/policies/{pid}", json=edited))
    assert v2["version"] == 2 and v2["grant"]["operator"] == "one"
    v3 = ok(api.patch(f"/policies/{pid}", json={"state": "report-only"}))
    assert v3["version"] == 3 and v3["state"] == "report_only"

    versions = ok(api.get(f"/policies/{pid}/versions"))
    assert [v["version"] for v in versions] == [3, 2, 1]
    assert [v["state"] for v in versions] == ["report_only", "on", "on"]
    assert versions[2]["spec"]["grant"] == {"require": ["mfa"], "operator": "all"}
    assert versions[0]["actor"] == "token:admin-t"

    err(api.post("/policies", json={**edited, "name": "finance needs MFA"}), 409, "name_taken")
    ok(api.delete(f"/policies/{pid}"), 204)
    err(api.get(f"/policies/{pid}"), 404, "not_found")
    err(api.get(f"/policies/{pid}/versions"), 404, "not_found")
    with ctx.store.session() as s:
        audit = list(s.scalars(select(AuditRecord).where(AuditRecord.target == pid)))
    assert [a.action for a in sorted(audit, key=lambda a: a.at)] == [
        "policy.create", "policy.update", "policy.update", "policy.delete",
    ]  # fmt: skip
    assert sorted(audit, key=lambda a: a.at)[-1].details["spec"]["grant"]["operator"] == "one"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"users": {"include": ["all"]}, "target": "all_private", "grant": {"require": ["mfa"]}},
         "name: missing"),
        ({"name": "p", "state": "maybe", "users": {"include": ["all"]}, "target": "all_private",
          "grant": {"require": ["mfa"]}}, "state: must be one of"),
        ({"name": "p", "users": {"include": ["all"]}, "target": "all_private",
          "grant": {"require": ["mfa", "mfaa"]}}, "grant.require[1]: unknown control 'mfaa'"),
        ({"name": "p", "users": {"include": ["nobody"]}, "target": "all_private",
          "grant": {"block": True}}, "users.include[0]: no user named 'nobody'"),
        ({"name": "p", "users": {"include": ["all"]}, "groups": {"exclude": ["grp_0000"]},
          "target": "all_private", "grant": {"block": True}},
         "groups.exclude: grp_0000 does not exist"),
        ({"name": "p", "users": {"include": ["all"]}, "target": {"apps": ["payroll"]},
          "grant": {"block": True}}, "target.apps[0]: no application named 'payroll'"),
        ({"name": "p", "users": {"include": ["all"]}, "target": "all_private",
          "conditions": {"locations": ["mars"]}, "grant": {"block": True}},
         "conditions.locations.include[0]: no location named 'mars'"),
        ({"name": "p", "users": {"include": ["all"]}, "target": "all_private",
          "conditions": {"device_platforms": ["beos"]}, "grant": {"block": True}},
         "conditions.device_platforms.include[0]: unknown platform 'beos'"),
    ],
)  # fmt: skip
def test_bad_policies_are_refused_naming_the_field(
    api: httpx.Client, tenant: dict[str, str], body: dict[str, Any], message: str
) -> None:
    got = err(api.post("/policies", json=body), 400, "invalid_policy")
    assert got.startswith(message), got
    assert ok(api.get("/policies")) == []


def test_non_object_body_and_roles(
    ctx: ServiceContext, base_url: str, api: httpx.Client, tenant: dict[str, str]
) -> None:
    err(api.post("/policies", json=["x"]), 400, "invalid_request")
    doc = {"name": "p", "users": {"include": ["all"]}, "target": "all_private",
           "grant": {"block": True}}  # fmt: skip
    with client_for(ctx, base_url, "reader") as reader:
        err(reader.post("/policies", json=doc), 403, "insufficient_role")
        err(reader.post("/locations", json={"name": "n", "cidrs": ["10.0.0.0/8"]}), 403,
            "insufficient_role")  # fmt: skip
        what = ok(reader.post("/policies/what-if", json={"user_id": "alice", "app_id": "wiki"}))
        assert what["decision"]["action"] == "allow"
    with client_for(ctx, base_url, "operator") as operator:
        ok(operator.post("/policies", json=doc), 201)


def test_deleted_references_are_flagged(api: httpx.Client, tenant: dict[str, str]) -> None:
    pid = ok(api.post("/policies", json={
        "name": "eng blocked outside office",
        "groups": {"include": ["eng"]},
        "target": {"apps": ["finance", "wiki"]},
        "conditions": {"locations": {"include": ["all"], "exclude": ["office"]}},
        "grant": {"block": True},
    }), 201)["id"]  # fmt: skip
    ok(api.delete(f"/groups/{tenant['eng']}"), 204)
    ok(api.delete(f"/apps/{tenant['wiki']}"), 204)
    ok(api.delete(f"/locations/{tenant['office']}"), 204)
    expected = [
        f"groups.include: {tenant['eng']} does not exist",
        f"target.apps: {tenant['wiki']} does not exist",
        f"conditions.locations.exclude: {tenant['office']} does not exist",
    ]
    assert ok(api.get(f"/policies/{pid}"))["problems"] == expected
    assert ok(api.get("/policies"))[0]["problems"] == expected
    what = ok(api.post("/policies/what-if", json={"user_id": "alice", "app_id": "finance"}))
    assert what["policies"][0]["problems"] == expected
    # A stale document cannot be saved again as it is: the reference must be fixed.
    shown = ok(api.get(f"/policies/{pid}"))
    msg = err(api.put(f"/policies/{pid}", json=shown), 400, "invalid_policy")
    assert msg == f"groups.include: {tenant['eng']} does not exist"


# --- What-If ----------------------------------------------------------------------------------


def test_what_if_decisions(api: httpx.Client, ctx: ServiceContext, tenant: dict[str, str]) -> None:
    mfa = ok(
        api.post(
            "/policies",
            json={
                "name": "staff need MFA for finance",
                "groups": {"include": ["staff"]},
                "target": {"apps": ["finance"]},
                "grant": {"require": ["mfa"]},
            },
        ),
        201,
    )["id"]
    device = ok(
        api.post(
            "/policies",
            json={
                "name": "finance needs a compliant device",
                "users": {"include": ["all"]},
                "target": {"apps": ["finance"]},
                "grant": {"require": ["compliant_device"]},
            },
        ),
        201,
    )["id"]
    outside = ok(
        api.post(
            "/policies",
            json={
                "name": "outside the office",
                "users": {"include": ["all"]},
                "target": "all_private",
                "conditions": {"locations": {"include": ["all"], "exclude": ["all_trusted"]}},
                "grant": {"block": True},
                "state": "report_only",
            },
        ),
        201,
    )["id"]
    fresh = ok(
        api.post(
            "/policies",
            json={
                "name": "fresh sign-in for wiki",
                "users": {"include": ["bob"]},
                "target": {"apps": ["wiki"]},
                "grant": {"require": ["sign_in_frequency"], "max_age_minutes": 30},
            },
        ),
        201,
    )["id"]
    now = time.time()
    with ctx.store.session() as s:
        s.add(
            Device(
                id="dev_lap", user_id=tenant["alice"], os="Linux", compliant=True, created_at=now
            )
        )
        s.add(Device(id="dev_old", user_id=tenant["alice"], os="Windows 10", compliant=False,
                     created_at=now))  # fmt: skip

    def decide(**body: Any) -> Any:
        return ok(api.post("/policies/what-if", json=body))

    # Nested group: alice is in staff through eng. No MFA: challenged.
    out = decide(user_id="alice", app_id="finance", device={"id": "dev_lap"}, ip="10.1.2.3")
    assert out["context"]["group_ids"] == sorted([tenant["eng"], tenant["staff"]])
    assert out["context"]["device_platform"] == "linux"
    assert out["context"]["location_ids"] == sorted(["all_trusted", tenant["office"]])
    assert out["decision"]["action"] == "challenge"
    assert out["decision"]["acr_values"] == "urn:limen:acr:mfa"
    assert out["decision"]["policy_id"] == mfa
    by_id = {p["id"]: p for p in out["policies"]}
    assert by_id[mfa]["applies"] and by_id[mfa]["unmet"] == ["mfa"]
    assert by_id[device]["result"] == "allow"
    assert by_id[outside]["not_applied_because"].startswith("conditions.locations.exclude")
    assert by_id[fresh]["not_applied_because"].startswith("target: application")

    out = decide(user_id=tenant["alice"], app_id=tenant["finance"], device={"id": "dev_lap"},
                 ip="10.1.2.3", mfa=True)  # fmt: skip
    assert out["decision"]["action"] == "allow"
    assert out["decision"]["applied"] == [mfa, device]

    # A non-compliant device is blocked from finance, not from the wiki.
    out = decide(user_id="alice", app_id="finance", device={"id": "dev_old"}, mfa=True)
    assert out["decision"]["action"] == "block" and out["decision"]["policy_id"] == device
    assert "compliant_device" in out["decision"]["reason"]
    assert decide(user_id="alice", app_id="wiki", device={"id": "dev_old"})["decision"][
        "action"] == "allow"  # fmt: skip
    # Explicit device facts override the registered device.
    out = decide(user_id="alice", app_id="finance", mfa=True,
                 device={"id": "dev_old", "compliant": True, "platform": "Windows"})  # fmt: skip
    assert out["decision"]["action"] == "allow"

    # Report-only: outside the office the block is reported, not enforced.
    out = decide(user_id="alice", app_id="finance", mfa=True, device={"compliant": True},
                 ip="203.0.113.5")  # fmt: skip
    assert out["decision"]["action"] == "allow"
    assert out["decision"]["report_only"] == [{"policy_id": outside, "result": "block"}]
    ok(api.patch(f"/policies/{outside}", json={"state": "on"}))
    out = decide(user_id="alice", app_id="finance", mfa=True, device={"compliant": True},
                 ip="203.0.113.5")  # fmt: skip
    assert out["decision"]["action"] == "block" and out["decision"]["policy_id"] == outside

    # Sign-in frequency: an old sign-in is a step-up with max_age.
    out = decide(user_id="bob", app_id="wiki", ip="10.0.0.1", auth_age_minutes=45)
    assert out["decision"]["action"] == "challenge"
    assert (out["decision"]["max_age"], out["decision"]["acr_values"]) == (1800, None)
    assert decide(user_id="bob", app_id="wiki", ip="10.0.0.1",
                  auth_age_minutes=5)["decision"]["action"] == "allow"  # fmt: skip

    # Bad input names the field.
    assert err(api.post("/policies/what-if", json={"user_id": "carol", "app_id": "wiki"}),
               400, "unknown_user").startswith("user_id:")  # fmt: skip
    assert err(api.post("/policies/what-if", json={"user_id": "bob", "app_id": "nope"}),
               400, "unknown_application").startswith("app_id:")  # fmt: skip
    assert err(api.post("/policies/what-if", json={"user_id": "bob", "app_id": "wiki",
                                                   "ip": "10.0.0.300"}),
               400, "invalid_request").startswith("ip:")  # fmt: skip
    assert err(api.post("/policies/what-if", json={"user_id": "bob", "app_id": "wiki",
                                                   "device": {"platform": "beos"}}),
               400, "invalid_request").startswith("device.platform:")  # fmt: skip
    err(
        api.post(
            "/policies/what-if",
            json={"user_id": "bob", "app_id": "wiki", "device": {"id": "dev_nope"}},
        ),
        404,
        "not_found",
    )


def test_sign_in_policies_in_what_if(api: httpx.Client, tenant: dict[str, str]) -> None:
    pid = ok(api.post("/policies", json={
        "name": "sign-in only from the office", "users": {"include": ["all"]},
        "target": "sign_in",
        "conditions": {"locations": {"include": ["all"], "exclude": ["office"]}},
        "grant": {"block": True}}), 201)["id"]  # fmt: skip
    out = ok(api.post("/policies/what-if", json={"user_id": "bob", "app_id": "sign_in",
                                                 "ip": "198.51.100.1"}))  # fmt: skip
    assert out["decision"]["action"] == "block" and out["decision"]["policy_id"] == pid
    out = ok(api.post("/policies/what-if", json={"user_id": "bob", "app_id": "sign_in",
                                                 "ip": "10.9.9.9"}))  # fmt: skip
    assert out["decision"]["action"] == "allow"
    # A sign-in policy never judges flows.
    out = ok(api.post("/policies/what-if", json={"user_id": "bob", "app_id": "wiki",
                                                 "ip": "198.51.100.1"}))  # fmt: skip
    assert out["decision"]["action"] == "allow"


# --- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def cli(ctx: ServiceContext, base_url: str, tmp_path: Path) -> CliRunner:
    """A runner whose environment points ``limen admin`` at the test API."""
    token = create_admin_token(ctx.store, "cli", "admin")
    return CliRunner(env={"LIMEN_DATA_DIR": str(tmp_path / "cli"), "LIMEN_API_URL": base_url,
                          "LIMEN_ADMIN_TOKEN": token, "LIMEN_CA_FILE": None})  # fmt: skip


def _admin_root() -> typer.Typer:
    """``limen admin`` with this module's groups (the lead registers them on the real app)."""
    root = typer.Typer()
    root.callback()(admin_cli.main)
    root.add_typer(policy_app, name="policy")
    root.add_typer(location_app, name="location")
    return root


def run(cli: CliRunner, *args: str, stdin: str | None = None, code: int = 0) -> Result:
    result = cli.invoke(_admin_root(), list(args), input=stdin)
    assert result.exit_code == code, (result.output, result.stderr, result.exception)
    return result


def test_cli_policies_locations_and_what_if(
    cli: CliRunner, api: httpx.Client, tenant: dict[str, str], tmp_path: Path
) -> None:
    run(cli, "location", "add", "branch", "--cidr", "192.0.2.0/24", "--cidr", "198.51.100.0/24")
    locations = json.loads(run(cli, "--json", "location", "list").stdout)
    assert {x["name"]: x["trusted"] for x in locations} == {"branch": False, "office": True}
    bad = run(cli, "location", "add", "x", "--cidr", "300.0.0.0/8", code=1)
    assert bad.stderr.startswith("error: invalid_location: cidrs[0]:")

    path = tmp_path / "policy.json"
    path.write_text(json.dumps({
        "name": "finance MFA", "state": "report_only", "groups": {"include": ["staff"]},
        "target": {"apps": ["finance"]}, "grant": {"require": ["mfa"]},
    }))  # fmt: skip
    created = json.loads(run(cli, "--json", "policy", "add", "--file", str(path)).stdout)
    assert created["state"] == "report_only" and created["groups"]["include"] == [tenant["staff"]]
    listed = run(cli, "policy", "list").stdout
    assert "finance MFA" in listed and "report_only" in listed and "mfa" in listed
    shown = json.loads(run(cli, "policy", "show", "finance MFA").stdout)
    assert shown["id"] == created["id"]

    out = run(cli, "policy", "what-if", "--user", "alice", "--app", "finance").stdout
    assert "decision: allow" in out and "challenge" in out  # reported, not enforced
    assert "is on" in run(cli, "policy", "set-state", "finance MFA", "on").stdout
    out = run(cli, "policy", "what-if", "--user", "alice", "--app", "finance").stdout
    assert "decision: challenge" in out and "acr_values=urn:limen:acr:mfa" in out
    out = run(
        cli,
        "policy",
        "what-if",
        "--user",
        "alice",
        "--app",
        "finance",
        "--mfa",
        "--device-platform",
        "linux",
        "--not-compliant",
        "--ip",
        "10.0.0.1",
    ).stdout
    assert "decision: allow" in out
    what = json.loads(run(cli, "--json", "policy", "what-if", "--user", "bob", "--app",
                          "finance").stdout)  # fmt: skip
    assert what["policies"][0]["not_applied_because"].startswith("users.include")

    versions = json.loads(run(cli, "--json", "policy", "versions", created["id"]).stdout)
    assert [v["state"] for v in versions] == ["on", "report_only"]
    bad_state = run(cli, "policy", "set-state", "finance MFA", "maybe", code=1)
    assert bad_state.stderr.startswith("error: invalid_request: state:")

    typo = tmp_path / "typo.json"
    typo.write_text(
        json.dumps(
            {
                "name": "t",
                "users": {"include": ["all"]},
                "target": "all_private",
                "grant": {"require": ["mfaa"]},
            }
        )
    )
    failed = run(cli, "policy", "add", "--file", str(typo), code=1)
    assert failed.stderr.startswith("error: invalid_policy: grant.require[0]: unknown control")
    not_json = run(cli, "policy", "add", "--file", "-", stdin="{nope", code=1)
    assert "not JSON" in not_json.stderr

    run(cli, "policy", "delete", "finance MFA")
    assert ok(api.get("/policies")) == []
    run(cli, "location", "delete", "branch")
    assert [x["name"] for x in ok(api.get("/locations"))] == ["office"]
