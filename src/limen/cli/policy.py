"""``limen admin policy ...`` and ``limen admin location ...``: conditional-access policies,
named locations and What-If, on the admin REST API.

Policies and locations may be named by id or by name. A policy file is the JSON document
described in ``docs/policy.md`` (with ``name`` and optionally ``state``); ``-`` reads it from
standard input. Errors print as ``error: <code>: <message>`` with exit status 1, as every
``limen admin`` command does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from limen.cli.admin import Api, JsonOpt, _api, _done, _emit, _fail

policy_app = typer.Typer(help="Conditional-access policies and What-If.", no_args_is_help=True)
location_app = typer.Typer(help="Named locations (IP ranges).", no_args_is_help=True)

POLICY_COLS = ("id", "name", "state", "version", "target", "grant", "problems")
LOCATION_COLS = ("id", "name", "cidrs", "trusted", "created_at")
WHAT_IF_COLS = ("name", "id", "state", "result", "unmet", "why", "problems")
STATES = ("on", "off", "report-only", "report_only")


def _read_document(path: str) -> dict[str, Any]:
    where = "standard input" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        _fail(f"error: invalid_request: cannot read {where}: {exc.strerror or exc}")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        _fail(f"error: invalid_request: {where}: not JSON ({exc})")
    if not isinstance(doc, dict):
        _fail(f"error: invalid_request: {where}: the policy must be a JSON object")
    return doc


def _policy_id(api: Api, ref: str) -> str:
    return api.resolve("/policies", "policy", ref)


def _location_id(api: Api, ref: str) -> str:
    return api.resolve("/locations", "location", ref)


def _summary(p: dict[str, Any]) -> dict[str, Any]:
    """A policy's row in ``list``: its target and grant in a few words."""
    target = p.get("target")
    grant = p.get("grant") or {}
    if grant.get("block"):
        grant_text = "block"
    else:
        joiner = " and " if grant.get("operator", "all") == "all" else " or "
        grant_text = joiner.join(grant.get("require", []))
        if grant.get("max_age_minutes"):
            grant_text += f" ({grant['max_age_minutes']} min)"
    return {
        **p,
        "target": ", ".join(target["apps"]) if isinstance(target, dict) else target,
        "grant": grant_text,
    }


# --- policies ---------------------------------------------------------------------------------


@policy_app.command("add")
def policy_add(
    ctx: typer.Context,
    file: Annotated[str, typer.Option("--file", "-f", help="Policy JSON file, or - for stdin.")],
    name: Annotated[str | None, typer.Option(help="Name (overrides the file's).")] = None,
    state: Annotated[
        str | None, typer.Option(help="on, off or report-only (overrides the file's).")
    ] = None,
) -> None:
    """Create a policy from a JSON document."""
    api = _api(ctx)
    doc = _read_document(file)
    if name is not None:
        doc["name"] = name
    if state is not None:
        doc["state"] = state
    _emit(api.opts, api.call("POST", "/policies", body=doc))


@policy_app.command("update")
def policy_update(
    ctx: typer.Context,
    policy: str,
    file: Annotated[str, typer.Option("--file", "-f", help="Policy JSON file, or - for stdin.")],
) -> None:
    """Replace a policy's document (a new version; name and state kept unless given)."""
    api = _api(ctx)
    doc = _read_document(file)
    _emit(api.opts, api.call("PUT", f"/policies/{_policy_id(api, policy)}", body=doc))


@policy_app.command("list")
def policy_list(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """List policies, with problems (references to deleted objects)."""
    api = _api(ctx, json_output)
    policies = api.get("/policies")
    _emit(api.opts, policies if api.opts.json else [_summary(p) for p in policies], POLICY_COLS)


@policy_app.command("show")
def policy_show(ctx: typer.Context, policy: str, json_output: JsonOpt = False) -> None:
    """Show one policy (name or id) as JSON."""
    api = _api(ctx, json_output)
    data = api.get(f"/policies/{_policy_id(api, policy)}")
    # The document is nested: JSON is its readable form even without --json.
    typer.echo(json.dumps(data, indent=2))


@policy_app.command("versions")
def policy_versions(ctx: typer.Context, policy: str, json_output: JsonOpt = False) -> None:
    """List a policy's versions, newest first."""
    api = _api(ctx, json_output)
    rows = api.get(f"/policies/{_policy_id(api, policy)}/versions")
    _emit(api.opts, rows, ("version", "name", "state", "changed_at", "actor"))


@policy_app.command("delete")
def policy_delete(ctx: typer.Context, policy: str) -> None:
    """Delete a policy."""
    api = _api(ctx)
    pid = _policy_id(api, policy)
    api.call("DELETE", f"/policies/{pid}")
    _done(api.opts, f"deleted policy {pid}", {"deleted": pid})


@policy_app.command("set-state")
def policy_set_state(
    ctx: typer.Context,
    policy: str,
    state: Annotated[str, typer.Argument(help="on, off or report-only.")],
) -> None:
    """Turn a policy on, off, or to report-only."""
    api = _api(ctx)
    if state not in STATES:
        _fail(f"error: invalid_request: state: must be on, off or report-only, not {state!r}")
    out = api.call("PATCH", f"/policies/{_policy_id(api, policy)}", body={"state": state})
    _done(api.opts, f"policy {out['name']} ({out['id']}) is {out['state']}", out)


@policy_app.command("what-if")
def policy_what_if(
    ctx: typer.Context,
    user: Annotated[str, typer.Option(help="User (name or id).")],
    app: Annotated[str, typer.Option(help="Application (name or id), or sign_in.")],
    device: Annotated[str | None, typer.Option(help="A registered device id.")] = None,
    device_platform: Annotated[
        str | None, typer.Option(help="linux, windows, macos, ios or android.")
    ] = None,
    compliant: Annotated[
        bool | None, typer.Option("--compliant/--not-compliant", help="Device compliance.")
    ] = None,
    ip: Annotated[str | None, typer.Option(help="Source address.")] = None,
    mfa: Annotated[bool, typer.Option(help="The sign-in used MFA.")] = False,
    auth_age: Annotated[float, typer.Option(help="Minutes since the user signed in.", min=0)] = 0.0,
    risk: Annotated[str | None, typer.Option(help="low, medium or high.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """What would each policy decide for this user, app, device and address, and why."""
    api = _api(ctx, json_output)
    body: dict[str, Any] = {
        "user_id": user,
        "app_id": app,
        "ip": ip,
        "mfa": mfa,
        "auth_age_minutes": auth_age,
        "risk": risk,
    }
    if device is not None or device_platform is not None or compliant is not None:
        body["device"] = {"id": device, "platform": device_platform, "compliant": compliant}
    out = api.call("POST", "/policies/what-if", body=body)
    if api.opts.json:
        _emit(api.opts, out)
        return
    rows = [
        {**p, "why": p["not_applied_because"] or "", "result": p["result"].replace("_", " ")}
        for p in out["policies"]
    ]
    _emit(api.opts, rows, WHAT_IF_COLS, title="What-If")
    decision = out["decision"]
    line = f"decision: {decision['action']}: {decision['reason']}"
    if decision.get("acr_values"):
        line += f" (acr_values={decision['acr_values']})"
    if decision.get("max_age") is not None:
        line += f" (max_age={decision['max_age']})"
    typer.echo(line)


# --- named locations --------------------------------------------------------------------------


@location_app.command("add")
def location_add(
    ctx: typer.Context,
    name: str,
    cidr: Annotated[list[str], typer.Option(help="An IP range (repeat for more).")],
    trusted: Annotated[bool, typer.Option(help="A trusted location.")] = False,
) -> None:
    """Create a named location."""
    api = _api(ctx)
    body = {"name": name, "cidrs": cidr, "trusted": trusted}
    _emit(api.opts, api.call("POST", "/locations", body=body))


@location_app.command("list")
def location_list(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """List named locations."""
    api = _api(ctx, json_output)
    _emit(api.opts, api.get("/locations"), LOCATION_COLS)


@location_app.command("delete")
def location_delete(ctx: typer.Context, location: str) -> None:
    """Delete a named location (policies naming it then show a problem)."""
    api = _api(ctx)
    lid = _location_id(api, location)
    api.call("DELETE", f"/locations/{lid}")
    _done(api.opts, f"deleted location {lid}", {"deleted": lid})


__all__ = ["location_app", "policy_app"]
