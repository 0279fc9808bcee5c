"""``limen admin ...``: the admin CLI, a thin client of the REST API (``/api/v1``).

Where to reach the API and how to authenticate, first match wins:

* ``--api`` / ``LIMEN_API_URL`` / ``https://localhost:9443``;
* ``--token`` / ``LIMEN_ADMIN_TOKEN`` / the file ``<data dir>/admin-token`` written by
  ``limen up``;
* ``--ca-file`` / ``LIMEN_CA_FILE`` / ``<data dir>/ca.pem`` / the system trust store.

Users, groups, applications and connector groups may be named by id or by name. API errors
are printed as ``error: <code>: <message>`` on stderr, with exit status 1. ``--json`` prints
the API's JSON instead of tables.

Tests (and embedding programs) replace :data:`client_factory` to hand the commands an
``httpx.Client`` of their own.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.table import Table

from limen.config import default_data_dir
from limen.ids import kind_of

DEFAULT_API = "https://localhost:9443"


@dataclass
class Options:
    """The global options, as given on the command line or in the environment."""

    api: str = DEFAULT_API
    token: str | None = None
    ca_file: Path | None = None
    json: bool = False


def _fail(message: str) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(1)


def resolve_token(opts: Options) -> str:
    """``--token``/``LIMEN_ADMIN_TOKEN`` (already in ``opts``), else ``<data dir>/admin-token``."""
    if opts.token:
        return opts.token.strip()
    path = default_data_dir() / "admin-token"
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    if not token:
        _fail(f"error: no admin token: pass --token, set LIMEN_ADMIN_TOKEN or create {path}")
    return token


def resolve_verify(opts: Options) -> ssl.SSLContext:
    """Trust ``--ca-file``/``LIMEN_CA_FILE``, else ``<data dir>/ca.pem``, else the system."""
    cafile = opts.ca_file
    if cafile is None:
        candidate = default_data_dir() / "ca.pem"
        cafile = candidate if candidate.is_file() else None
    try:
        return ssl.create_default_context(cafile=str(cafile) if cafile else None)
    except (OSError, ssl.SSLError) as exc:
        _fail(f"error: cannot use CA file {cafile}: {exc}")


def default_client(opts: Options) -> httpx.Client:
    """An ``httpx.Client`` for the API named by ``opts``, with the admin token."""
    return httpx.Client(
        base_url=opts.api.rstrip("/"),
        headers={"Authorization": f"Bearer {resolve_token(opts)}"},
        verify=resolve_verify(opts),
        timeout=30.0,
    )


#: Builds the HTTP client of every command; replace it to inject another client.
client_factory: Callable[[Options], httpx.Client] = default_client


class Api:
    """Calls to ``/api/v1``, turning API errors into ``error: code: message`` + exit 1."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self._client: httpx.Client | None = None

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = client_factory(self.opts)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def call(
        self, method: str, path: str, *, body: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        url = "/api/v1" + path
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self.client.request(method, url, json=body, params=clean)
        except httpx.HTTPError as exc:
            _fail(f"error: cannot reach {self.opts.api}: {exc}")
        if response.status_code >= 400:
            try:
                data = response.json()
                code, message = data.get("error", "http_error"), data.get("message", "")
            except ValueError:
                code, message = "http_error", response.text.strip()[:200]
            _fail(f"error: {code}: {message or response.reason_phrase}")
        if not response.content:
            return None
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params=params)

    def resolve(self, collection: str, kind: str, ref: str, field: str = "name") -> str:
        """The id of ``ref``, which is an id (``usr_...``) or a name from the list."""
        if kind_of(ref) == kind:
            return ref
        matches = [x["id"] for x in self.get(collection) if x.get(field) == ref]
        if not matches:
            _fail(f"error: not_found: no {kind.replace('_', ' ')} named {ref!r}")
        if len(matches) > 1:
            _fail(f"error: ambiguous: several {collection.strip('/')} are named {ref!r}; use an id")
        return str(matches[0])

    def user_id(self, ref: str) -> str:
        return self.resolve("/users", "user", ref, "username")

    def group_id(self, ref: str) -> str:
        return self.resolve("/groups", "group", ref)

    def app_id(self, ref: str) -> str:
        return self.resolve("/apps", "application", ref)

    def connector_group_id(self, ref: str) -> str:
        return self.resolve("/connector-groups", "connector_group", ref)

    def connector_id(self, ref: str) -> str:
        return self.resolve("/connectors", "connector", ref)

    def principal_id(self, ref: str) -> str:
        """A user or a group, by id, username or group name."""
        if kind_of(ref) in ("user", "group"):
            return ref
        for u in self.get("/users"):
            if u["username"] == ref:
                return str(u["id"])
        return self.group_id(ref)


# --- output -----------------------------------------------------------------------------------

#: Width of tables written to a pipe or file: wide enough that ids and names are not cut.
PIPE_WIDTH = 200


def _console() -> Console:
    # A terminal gets Rich's own width; a pipe gets a fixed wide one (Rich would pick 80).
    return Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)


def _fmt(value: Any, key: str = "") -> str:
    if isinstance(value, float) and (
        key.endswith(("_at", "not_after")) or key in ("at", "last_heartbeat")
    ):
        if value <= 0:
            return "-"
        return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return "" if value is None else str(value)


def _emit(opts: Options, data: Any, columns: Iterable[str] = (), title: str = "") -> None:
    """JSON when ``--json``; else a table of ``columns`` (lists) or of fields (one object)."""
    if opts.json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    if isinstance(data, list):
        cols = list(columns)
        table = Table(*cols, title=title or None)
        for row in data:
            table.add_row(*(_fmt(row.get(c), c) for c in cols))
        _console().print(table)
        return
    table = Table("field", "value", title=title or None, show_header=False)
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            continue  # nested lists get their own tables
        table.add_row(key, _fmt(value, key))
    _console().print(table)


def _done(opts: Options, message: str, data: Any = None) -> None:
    if opts.json:
        typer.echo(json.dumps(data if data is not None else {"ok": True}, indent=2))
    else:
        typer.echo(message)


# --- the app ----------------------------------------------------------------------------------

app = typer.Typer(help="Administer Limen through its REST API.", no_args_is_help=True)
user_app = typer.Typer(help="Users.", no_args_is_help=True)
group_app = typer.Typer(help="Groups and their members.", no_args_is_help=True)
cgroup_app = typer.Typer(help="Connector groups.", no_args_is_help=True)
connector_app = typer.Typer(help="Connectors and enrollment tokens.", no_args_is_help=True)
app_app = typer.Typer(help="Applications.", no_args_is_help=True)
segment_app = typer.Typer(help="Application segments.", no_args_is_help=True)
traffic_app = typer.Typer(help="The traffic log.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log.", no_args_is_help=True)
token_app = typer.Typer(help="Admin API tokens.", no_args_is_help=True)
for sub, name in [
    (user_app, "user"), (group_app, "group"), (cgroup_app, "connector-group"),
    (connector_app, "connector"), (app_app, "app"), (segment_app, "segment"),
    (traffic_app, "traffic"), (audit_app, "audit"), (token_app, "token"),
]:  # fmt: skip
    app.add_typer(sub, name=name)


@app.callback()
def main(
    ctx: typer.Context,
    api: Annotated[str, typer.Option(envvar="LIMEN_API_URL", help="Admin API URL.")] = (
        DEFAULT_API
    ),
    token: Annotated[
        str | None, typer.Option(envvar="LIMEN_ADMIN_TOKEN", help="Admin API token.")
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option(envvar="LIMEN_CA_FILE", help="CA certificate (PEM).")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Administer Limen through its REST API."""
    ctx.obj = Api(Options(api=api, token=token, ca_file=ca_file, json=json_output))
    ctx.call_on_close(ctx.obj.close)


def _api(ctx: typer.Context, json_output: bool = False) -> Api:
    """The command's :class:`Api` (click hands the group callback's ``obj`` down)."""
    api = ctx.obj
    if not isinstance(api, Api):
        api = Api(Options())
        ctx.obj = api
        ctx.call_on_close(api.close)
    if json_output:
        api.opts.json = True
    return api


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            _fail("error: invalid_request: no password on standard input")
        return password
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
USER_COLS = ("id", "username", "display_name", "email", "enabled", "has_password")


# --- users ------------------------------------------------------------------------------------


@user_app.command("add")
def user_add(
    ctx: typer.Context,
    name: str,
    password_stdin: Annotated[bool, typer.Option(help="Read the password from stdin.")] = False,
    display_name: str = "",
    email: str = "",
) -> None:
    """Create a user (without --password-stdin: no password, for federated sign-in)."""
    api = _api(ctx)
    body: dict[str, Any] = {"username": name, "display_name": display_name, "email": email}
    if password_stdin:
        body["password"] = _read_password(True)
    _emit(api.opts, api.call("POST", "/users", body=body))


@user_app.command("list")
def user_list(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """List users."""
    api = _api(ctx, json_output)
    _emit(api.opts, api.get("/users"), USER_COLS)


@user_app.command("show")
def user_show(ctx: typer.Context, user: str, json_output: JsonOpt = False) -> None:
    """Show one user (name or id)."""
    api = _api(ctx, json_output)
    _emit(api.opts, api.get(f"/users/{api.user_id(user)}"))


@user_app.command("delete")
def user_delete(ctx: typer.Context, user: str) -> None:
    """Delete a user; their live flows are cut."""
    api = _api(ctx)
    uid = api.user_id(user)
    api.call("DELETE", f"/users/{uid}")
    _done(api.opts, f"deleted user {uid}", {"deleted": uid})


@user_app.command("disable")
def user_disable(ctx: typer.Context, user: str) -> None:
    """Disable a user; their tokens are void and live flows are cut at once."""
    api = _api(ctx)
    out = api.call("POST", f"/users/{api.user_id(user)}/disable")
    _done(api.opts, f"disabled user {out['username']} ({out['id']})", out)


@user_app.command("enable")
def user_enable(ctx: typer.Context, user: str) -> None:
    """Enable a disabled user."""
    api = _api(ctx)
    out = api.call("POST", f"/users/{api.user_id(user)}/enable")
    _done(api.opts, f"enabled user {out['username']} ({out['id']})", out)


@user_app.command("set-password")
def user_set_password(
    ctx: typer.Context,
    user: str,
    password_stdin: Annotated[bool, typer.Option(help="Read the password from stdin.")] = False,
) -> None:
    """Set a user's password; their existing sessions are revoked."""
    api = _api(ctx)
    uid = api.user_id(user)
    password = _read_password(password_stdin)
    out = api.call("PUT", f"/users/{uid}/password", body={"password": password})
    _done(api.opts, f"password set for {out['username']} ({uid})", out)


# --- groups -----------------------------------------------------------------------------------


@group_app.command("add")
def group_add(ctx: typer.Context, name: str, description: str = "") -> None:
    """Create a group."""
    api = _api(ctx)
    _emit(api.opts, api.call("POST", "/groups", body={"name": name, "description": description}))


@group_app.command("list")
def group_list(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """List groups with their members."""
    api = _api(ctx, json_output)
    _emit(api.opts, api.get("/groups"), ("id", "name", "description", "members"))


@group_app.command("show")
def group_show(ctx: typer.Context, group: str, json_output: JsonOpt = False) -> None:
    """Show one group."""
    api = _api(ctx, json_output)
    _emit(api.opts, api.get(f"/groups/{api.group_id(group)}"))


@group_app.command("delete")
def group_delete(ctx: typer.Context, group: str) -> None:
    """Delete a group (its memberships and assignments go with it)."""
    api = _api(ctx)
    gid = api.group_id(group)
    api.call("DELETE", f"/groups/{gid}")
    _done(api.opts, f"deleted group {gid}", {"deleted": gid})


@group_app.command("add-member")
def group_add_member(ctx: typer.Context, group: str, member: str) -> None:
    """Add a user or a group (by id or name) to a group."""
    api = _api(ctx)
    gid = api.group_id(group)
    out = api.call("POST", f"/groups/{gid}/members", body={"member_id": member})
    _done(api.opts, f"added {member} to {out['name']}", out)


@group_app.command("remove-member")
def group_remove_member(ctx: typer.Context, group: str, member: str) -> None:
    """Remove a user or group from a group."""
    api = _api(ctx)
    gid = api.group_id(group)
    mid = api.principal_id(member)
    api.call("DELETE", f"/groups/{gid}/members/{mid}")
    _done(api.opts, f"removed {member} from {group}", {"group_id": gid, "removed": mid})


# --- connector groups and connectors ------------------------------------------------------------


@cgroup_app.command("add")
def cgroup_add(ctx: typer.Context, name: str, region: str = "") -> None:
    """Create a connector group."""
    api = _api(ctx)
    _emit(api.opts, api.call("POST", "/connector-groups", body={"name": name, "region": region}))


@cgroup_app.command("list")
def cgroup_list(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """List connector groups."""
    api = _api(ctx, json_output)
    cols = ("id", "name", "region", "is_default", "connectors")
    _emit(api.opts, api.get("/connector-groups"), cols)


@cgroup_app.command("delete")
def cgroup_delete(ctx: typer.Context, group: str) -> None:
    """Delete an unused connector group."""
    api = _api(ctx)
    gid = api.connector_group_id(group)
    api.call("DELETE", f"/connector-groups/{gid}")
    _done(api.opts, f"deleted connector group {gid}", {"deleted": gid})


CONNECTOR_COLS = (
    "id",
    "name",
    "group_name",
    "state",
    "health",
    "version",
    "address",
    "last_seen_at",
    "active_flows",
    "bytes_up",
    "bytes_down",
    "cert_not_after",
)


@connector_app.command("list")
def connector_list(
    ctx: typer.Context, group: str | None = None, json_output: JsonOpt = False
) -> None:
    """List connectors."""
    api = _api(ctx, json_output)
    gid = api.connector_group_id(group) if group else None
    _emit(api.opts, api.get("/connectors", group_id=gid), CONNECTOR_COLS)


@connector_app.command("show")
def connector_show(ctx: typer.Context, connector: str, json_output: JsonOpt = False) -> None:
    """Show one connector (name or id)."""
    api = _api(ctx, json_output)
    _emit(api.opts, api.get(f"/connectors/{api.connector_id(connector)}"))


@connector_app.command("delete")
def connector_delete(ctx: typer.Context, connector: str) -> None:
    """Revoke a connector: the edge stops accepting its certificate."""
    api = _api(ctx)
    cid = api.connector_id(connector)
    api.call("DELETE", f"/connectors/{cid}")
    _done(api.opts, f"revoked connector {cid}", {"revoked": cid})


@connector_app.command("revoke")
def connector_revoke(ctx: typer.Context, connector: str) -> None:
    """Revoke a connector: the edge refuses its certificate and closes its links."""
    api = _api(ctx)
    cid = api.connector_id(connector)
    out = api.call("POST", f"/connectors/{cid}/revoke")
    _done(api.opts, f"revoked connector {cid}", out)


@connector_app.command("drain")
def connector_drain(ctx: typer.Context, connector: str) -> None:
    """Send no new flows to a connector; its current flows finish (before an upgrade)."""
    api = _api(ctx)
    cid = api.connector_id(connector)
    out = api.call("POST", f"/connectors/{cid}/drain")
    _done(api.opts, f"draining connector {cid}: no new flows", out)


@connector_app.command("resume")
def connector_resume(ctx: typer.Context, connector: str) -> None:
    """Undo a drain: the connector receives new flows again."""
    api = _api(ctx)
    cid = api.connector_id(connector)
    out = api.call("POST", f"/connectors/{cid}/resume")
    _done(api.opts, f"connector {cid} is active again", out)


@connector_app.command("move")
def connector_move(ctx: typer.Context, connector: str, group: str) -> None:
    """Move a connector to another connector group."""
    api = _api(ctx)
    cid = api.connector_id(connector)
    out = api.call("POST", f"/connectors/{cid}/move", body={"group_id": group})
    _done(api.opts, f"moved connector {cid} to {out['group_id']}", out)


@connector_app.command("enrollment-token")
def connector_enrollment_token(
    ctx: typer.Context,
    group: Annotated[str, typer.Option(help="Connector group (name or id).")] = "",
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 3600,
    name: Annotated[str, typer.Option(help="Name for the connector.")] = "",
) -> None:
    """Create a one-time enrollment token; prints only the token (shown once)."""
    api = _api(ctx)
    if group:
        gid = api.connector_group_id(group)
    else:
        gid = next(g["id"] for g in api.get("/connector-groups") if g["is_default"])
    out = api.call(
        "POST",
        f"/connector-groups/{gid}/enrollment-tokens",
        body={"ttl_seconds": ttl, "name": name},
    )
    if api.opts.json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(out["token"])
    typer.echo(f"expires {_fmt(out['expires_at'], 'expires_at')}", err=True)


# --- applications, segments, assignments ------------------------------------------------------


@app_app.command("add")
def app_add(
    ctx: typer.Context,
    name: str,
    connector_group: Annotated[str | None, typer.Option(help="Name or id.")] = None,
    kind: Annotated[str, typer.Option(help="enterprise or quick_access.")] = "enterprise",
    dns_suffix: Annotated[list[str] | None, typer.Option(help="Private DNS suffix.")] = None,
) -> None:
    """Create an application (enterprise or quick_access)."""
    api = _api(ctx)
    body = {
        "name": name,
        "connector_group_id": connector_group,
        "kind": kind,
        "dns_suffixes": dns_suffix or [],
    }
    _emit(api.opts, api.call("POST", "/apps", body=body))


@app_app.command("list")
def app_list(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """List applications."""
    api = _api(ctx, json_output)
    apps = api.get("/apps")
    if not api.opts.json:
        for a in apps:
            a["segments"] = len(a["segments"])
            a["assignments"] = len(a["assignments"])
    cols = ("id", "name", "kind", "connector_group_id", "segments", "assignments")
    _emit(api.opts, apps, cols)


@app_app.command("show")
def app_show(ctx: typer.Context, application: str, json_output: JsonOpt = False) -> None:
    """Show an application with its segments and assignments."""
    api = _api(ctx, json_output)
    out = api.get(f"/apps/{api.app_id(application)}")
    _emit(api.opts, out, title=out["name"])
    if not api.opts.json:
        _emit(api.opts, out["segments"], ("id", "type", "destination", "ports", "protocol"),
              title="segments")  # fmt: skip
        _emit(api.opts, out["assignments"], ("principal_id", "created_at"), title="assignments")


@app_app.command("delete")
def app_delete(ctx: typer.Context, application: str) -> None:
    """Delete an application."""
    api = _api(ctx)
    aid = api.app_id(application)
    api.call("DELETE", f"/apps/{aid}")
    _done(api.opts, f"deleted application {aid}", {"deleted": aid})


@segment_app.command("add")
def segment_add(
    ctx: typer.Context,
    application: str,
    type_: Annotated[
        str, typer.Option("--type", help="ip, ip_range, cidr, fqdn, wildcard or dns_suffix.")
    ],
    destination: Annotated[str, typer.Option(help="e.g. 10.0.0.0/16, *.corp.example.")],
    ports: Annotated[str, typer.Option(help="e.g. 22 or 80,443 or 8000-8100.")],
    protocol: Annotated[str, typer.Option(help="tcp, udp or tcp,udp.")] = "tcp",
) -> None:
    """Add a segment to an application; overlaps with other applications are refused."""
    api = _api(ctx)
    aid = api.app_id(application)
    body = {"type": type_, "destination": destination, "ports": ports, "protocol": protocol}
    _emit(api.opts, api.call("POST", f"/apps/{aid}/segments", body=body))


@segment_app.command("delete")
def segment_delete(ctx: typer.Context, application: str, segment: str) -> None:
    """Delete a segment of an application."""
    api = _api(ctx)
    aid = api.app_id(application)
    api.call("DELETE", f"/apps/{aid}/segments/{segment}")
    _done(api.opts, f"deleted segment {segment}", {"deleted": segment})


@app.command("assign")
def assign(ctx: typer.Context, application: str, principal: str) -> None:
    """Assign a user or group (id or name) to an application."""
    api = _api(ctx)
    aid = api.app_id(application)
    out = api.call("POST", f"/apps/{aid}/assignments", body={"principal_id": principal})
    _done(api.opts, f"assigned {principal} to {application}", out)


@app.command("unassign")
def unassign(ctx: typer.Context, application: str, principal: str) -> None:
    """Remove an assignment."""
    api = _api(ctx)
    aid = api.app_id(application)
    pid = api.principal_id(principal)
    api.call("DELETE", f"/apps/{aid}/assignments/{pid}")
    _done(api.opts, f"unassigned {principal} from {application}", {"app_id": aid, "removed": pid})


# --- logs and tokens ----------------------------------------------------------------------------

TRAFFIC_COLS = (
    "started_at", "username", "destination", "dest_port", "transport", "app_id", "action",
    "code", "bytes_up", "bytes_down", "close_reason",
)  # fmt: skip


@traffic_app.command("list")
def traffic_list(
    ctx: typer.Context,
    user: str | None = None,
    app_: Annotated[str | None, typer.Option("--app", help="Application name or id.")] = None,
    action: Annotated[str | None, typer.Option(help="allow, block or challenge.")] = None,
    since: Annotated[str | None, typer.Option(help="Epoch seconds or ISO 8601.")] = None,
    until: Annotated[str | None, typer.Option(help="Epoch seconds or ISO 8601.")] = None,
    limit: int = 100,
    cursor: str | None = None,
    json_output: JsonOpt = False,
) -> None:
    """Flows, newest first. With --json the output carries next_cursor for the next page."""
    api = _api(ctx, json_output)
    app_id = api.app_id(app_) if app_ else None
    page = api.get("/traffic", user=user, app=app_id, action=action, since=since, until=until,
                   limit=limit, cursor=cursor)  # fmt: skip
    if api.opts.json:
        _emit(api.opts, page)
        return
    # One destination column: the name the client asked for, else the address.
    rows = [{**r, "destination": r.get("dest_host") or r.get("dest_ip", "")} for r in page["items"]]
    _emit(api.opts, rows, TRAFFIC_COLS)
    if page["next_cursor"]:
        typer.echo(f"more: --cursor {page['next_cursor']}", err=True)


@audit_app.command("list")
def audit_list(
    ctx: typer.Context,
    limit: int = 100,
    since: str | None = None,
    cursor: str | None = None,
    json_output: JsonOpt = False,
) -> None:
    """Admin actions, newest first."""
    api = _api(ctx, json_output)
    page = api.get("/audit", limit=limit, since=since, cursor=cursor)
    if api.opts.json:
        _emit(api.opts, page)
        return
    _emit(api.opts, page["items"], ("at", "actor", "action", "target", "details"))
    if page["next_cursor"]:
        typer.echo(f"more: --cursor {page['next_cursor']}", err=True)


@token_app.command("add")
def token_add(
    ctx: typer.Context,
    name: str,
    role: Annotated[str, typer.Option(help="admin, operator or reader.")] = "reader",
) -> None:
    """Create an admin API token; prints only the token (shown once)."""
    api = _api(ctx)
    out = api.call("POST", "/admin-tokens", body={"name": name, "role": role})
    typer.echo(json.dumps(out, indent=2) if api.opts.json else out["token"])


@token_app.command("list")
def token_list(ctx: typer.Context, json_output: JsonOpt = False) -> None:
    """List admin API tokens."""
    api = _api(ctx, json_output)
    _emit(api.opts, api.get("/admin-tokens"), ("id", "name", "role", "revoked", "created_at"))


@token_app.command("revoke")
def token_revoke(ctx: typer.Context, token_id: str) -> None:
    """Revoke an admin API token."""
    api = _api(ctx)
    api.call("DELETE", f"/admin-tokens/{token_id}")
    _done(api.opts, f"revoked token {token_id}", {"revoked": token_id})


__all__ = ["Api", "Options", "app", "client_factory", "default_client"]
