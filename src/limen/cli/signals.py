"""``limen admin signal ...``, ``limen admin transmitter ...`` and the signal commands of
``limen admin user`` (``revoke-sessions``, ``set-risk``), on the admin REST API.

A transmitter's management token is a secret: it is read from standard input
(``--auth-token-stdin``) or from ``LIMEN_SSF_AUTH_TOKEN``, never from the command line
(which other users of the machine can read in ``ps``). The push token Limen issues for a
push transmitter is printed once, by ``transmitter add``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated

import typer

from limen.cli.admin import Api, JsonOpt, _api, _done, _emit, _fail, user_app

signals_app = typer.Typer(
    help="The audit of signals (continuous access evaluation).", no_args_is_help=True
)
transmitter_app = typer.Typer(help="Shared Signals (SSF) transmitters.", no_args_is_help=True)

SIGNAL_COLS = (
    "received_at", "source", "subject", "event_type", "action", "flows_cut", "time_to_cut_ms", "id",
)  # fmt: skip
TRANSMITTER_COLS = ("id", "name", "issuer", "delivery", "status", "verified", "last_event_at")


def _transmitter_id(api: Api, ref: str) -> str:
    if ref.startswith("ssf_"):
        return ref
    return api.resolve("/transmitters", "transmitter", ref)


@signals_app.command("list")
def signal_list(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option(help="User id or username.")] = None,
    source: Annotated[str | None, typer.Option(help="admin, scim, ssf: or ssf:<issuer>.")] = None,
    event: Annotated[
        str | None, typer.Option(help="Event type or its end (credential-change).")
    ] = None,
    action: Annotated[str | None, typer.Option(help="e.g. revoke_sessions, ignored.")] = None,
    since: Annotated[str | None, typer.Option(help="Epoch seconds or ISO 8601.")] = None,
    until: Annotated[str | None, typer.Option(help="Epoch seconds or ISO 8601.")] = None,
    limit: int = 100,
    json_output: JsonOpt = False,
) -> None:
    """Signals, newest first: source, subject, event, action, flows cut, time to cut."""
    api = _api(ctx, json_output)
    user_id = api.user_id(user) if user else None
    rows = api.get("/signals", user=user_id, source=source, event=event, action=action,
                   since=since, until=until, limit=limit)  # fmt: skip
    if not api.opts.json:
        for row in rows:
            row["event_type"] = str(row["event_type"]).rsplit("/", 1)[-1]
    _emit(api.opts, rows, SIGNAL_COLS)


@signals_app.command("show")
def signal_show(ctx: typer.Context, signal_id: str, json_output: JsonOpt = False) -> None:
    """One signal, with its detail."""
    api = _api(ctx, json_output)
    _emit(api.opts, api.get(f"/signals/{signal_id}"))


@transmitter_app.command("add")
def transmitter_add(
    ctx: typer.Context,
    name: str,
    issuer: str,
    delivery: Annotated[str, typer.Option(help="push or poll.")] = "push",
    auth_token_stdin: Annotated[
        bool, typer.Option(help="Read the transmitter's management token from stdin.")
    ] = False,
    audience: Annotated[
        str, typer.Option(help="aud required in SETs (default: the stream's).")
    ] = "",
    receiver_url: Annotated[
        str, typer.Option(help="Base URL the transmitter pushes to (default: the issuer URL).")
    ] = "",
    event: Annotated[list[str] | None, typer.Option(help="Event type to request (repeat).")] = None,
    no_stream: Annotated[
        bool, typer.Option(help="Only discover; the stream exists already.")
    ] = False,
    endpoint_url: Annotated[str, typer.Option(help="Poll endpoint, with --no-stream.")] = "",
    json_output: JsonOpt = False,
) -> None:
    """Discover a transmitter and create Limen's stream with it."""
    if delivery not in ("push", "poll"):
        _fail("error: invalid_request: --delivery must be push or poll")
    token = os.environ.get("LIMEN_SSF_AUTH_TOKEN", "")
    if auth_token_stdin:
        token = sys.stdin.readline().strip()
    api = _api(ctx, json_output)
    body: dict[str, object] = {
        "name": name, "issuer": issuer, "delivery": delivery, "auth_token": token,
        "audience": audience, "receiver_url": receiver_url, "create_stream": not no_stream,
        "endpoint_url": endpoint_url,
    }  # fmt: skip
    if event:
        body["events_requested"] = list(event)
    out = api.call("POST", "/transmitters", body=body)
    push_token = out.pop("push_token", None)
    _emit(api.opts, {**out, "push_token": push_token} if api.opts.json else out)
    if push_token and not api.opts.json:
        typer.echo(f"push token (shown once; the transmitter already has it): {push_token}")


@transmitter_app.command("list")
def transmitter_list(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """Transmitters and their streams."""
    api = _api(ctx, json_output)
    _emit(api.opts, api.get("/transmitters"), TRANSMITTER_COLS)


@transmitter_app.command("show")
def transmitter_show(ctx: typer.Context, transmitter: str, json_output: JsonOpt = False) -> None:
    """One transmitter."""
    api = _api(ctx, json_output)
    _emit(api.opts, api.get(f"/transmitters/{_transmitter_id(api, transmitter)}"))


@transmitter_app.command("delete")
def transmitter_delete(
    ctx: typer.Context,
    transmitter: str,
    keep_stream: Annotated[bool, typer.Option(help="Leave the stream at the transmitter.")] = False,
) -> None:
    """Delete the stream at the transmitter and forget the transmitter."""
    api = _api(ctx)
    tid = _transmitter_id(api, transmitter)
    api.call("DELETE", f"/transmitters/{tid}", params={"keep_stream": keep_stream or None})
    _done(api.opts, f"deleted transmitter {transmitter}", {"deleted": tid})


@transmitter_app.command("status")
def transmitter_status(ctx: typer.Context, transmitter: str, status: str, reason: str = "") -> None:
    """Set the stream's status: enabled, paused or disabled."""
    api = _api(ctx)
    tid = _transmitter_id(api, transmitter)
    out = api.call("POST", f"/transmitters/{tid}/status", body={"status": status, "reason": reason})
    _done(api.opts, f"stream of {transmitter} is {status}", out)


@transmitter_app.command("verify")
def transmitter_verify(
    ctx: typer.Context,
    transmitter: str,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the verification event.")] = 10.0,
) -> None:
    """Ask for a verification event and wait until it arrives (exit 1 if it does not)."""
    api = _api(ctx)
    tid = _transmitter_id(api, transmitter)
    asked = api.call("POST", f"/transmitters/{tid}/verify")
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        shown = api.get(f"/transmitters/{tid}")
        if shown.get("verified") and shown.get("verified_at", 0) >= asked["requested_at"]:
            _done(api.opts, f"verified: the event from {shown['issuer']} arrived", shown)
            return
        if time.monotonic() >= deadline:
            _fail(
                f"error: not_verified: no verification event from {transmitter} within {wait:.0f}s"
            )
        time.sleep(0.2)  # polling the API for the event's arrival, bounded by --wait


@user_app.command("revoke-sessions")
def user_revoke_sessions(ctx: typer.Context, user: str, reason: str = "") -> None:
    """Revoke every session and token of a user now and cut their live flows."""
    api = _api(ctx)
    uid = api.user_id(user)
    out = api.call("POST", f"/users/{uid}/revoke-sessions", body={"reason": reason})
    _done(api.opts, f"revoked the sessions of {user} (signal {out['signal_id']})", out)


@user_app.command("set-risk")
def user_set_risk(ctx: typer.Context, user: str, level: str) -> None:
    """Set a user's risk level: low, medium or high (high also revokes their sessions)."""
    api = _api(ctx)
    uid = api.user_id(user)
    out = api.call("POST", f"/users/{uid}/risk", body={"level": level})
    _done(api.opts, f"risk of {user} is {out['risk_level']} (signal {out['signal_id']})", out)


__all__ = ["signals_app", "transmitter_app"]
