"""The ``limen`` command: ``up``, ``serve``, ``edge``, ``connector …``, ``client …``,
``admin …``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer

from limen import __version__
from limen.config import Settings, default_data_dir, load_settings
from limen.errors import LimenError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Limen: Zero Trust private access."
)
connector_app = typer.Typer(no_args_is_help=True, help="Run a connector in the private network.")
client_app = typer.Typer(no_args_is_help=True, help="Reach private apps from this device.")
app.add_typer(connector_app, name="connector")
app.add_typer(client_app, name="client")

from limen.cli.admin import app as admin_app  # noqa: E402
from limen.cli.policy import location_app, policy_app  # noqa: E402
from limen.cli.signals import signals_app, transmitter_app  # noqa: E402

admin_app.add_typer(policy_app, name="policy", help="Conditional-access policies.")
admin_app.add_typer(location_app, name="location", help="Named locations.")
admin_app.add_typer(signals_app, name="signal", help="The audit of signals.")
admin_app.add_typer(transmitter_app, name="transmitter", help="Shared Signals transmitters.")
app.add_typer(admin_app, name="admin", help="Administer users, apps, connectors, logs.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML settings file.")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Where state lives.")]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _settings(config: Path | None, data_dir: Path | None, **overrides: Any) -> Settings:
    settings = load_settings(config, data_dir=data_dir, **overrides)
    setup_logging(settings.log_level, settings.log_format)
    return settings


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` until it returns or SIGINT/SIGTERM arrives; errors print one clear line."""

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        from limen.net.tasks import spawn

        task = spawn(main(), name="main")
        waiter = spawn(stop.wait(), name="signal wait")
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        _event_loop_policy()
        asyncio.run(runner())
    except LimenError as exc:
        typer.echo(f"error: {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None


def _event_loop_policy() -> None:
    # uvloop is the default: measured on this project's benchmark (docs/performance.md), it
    # opens flows ~20% faster than the standard loop and moves as much or more per CPU
    # second. LIMEN_UVLOOP=0 selects the standard asyncio loop (also used when uvloop is
    # not installed).
    if os.environ.get("LIMEN_UVLOOP", "1") != "0":
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            pass


async def _forever() -> None:
    await asyncio.Event().wait()


# --- service --------------------------------------------------------------------------------


@app.command()
def up(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    api_port: Annotated[int | None, typer.Option(help="Identity/admin HTTPS port.")] = None,
    edge_port: Annotated[int | None, typer.Option(help="Edge TLS port.")] = None,
    demo: Annotated[bool, typer.Option(help="Create and run the demo tenant.")] = True,
) -> None:
    """Run everything in one process on SQLite: identity, admin API, edge, and a demo."""
    settings = _settings(config, data_dir, api_port=api_port, edge_port=edge_port)

    async def main() -> None:
        from limen.demo import admin_token, instructions, setup_demo
        from limen.runner import Service

        service = Service(settings)
        await service.start()
        try:
            token_path = settings.data_dir / "admin-token"
            admin_token(service)
            if demo:
                tenant = await setup_demo(service)
                typer.echo(instructions(service, tenant, settings.data_dir))
            else:
                typer.echo(
                    f"Limen is running: API {service.api_url}, edge "
                    f"{service.edge_address}; admin token in {token_path}"
                )
            await _forever()
        finally:
            await service.stop()

    _run(main)


@app.command()
def serve(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    api: Annotated[bool, typer.Option(help="Serve identity and the admin API.")] = True,
    edge: Annotated[bool, typer.Option(help="Serve the edge.")] = True,
) -> None:
    """Run service parts without a demo (production; several edges can share PostgreSQL)."""
    settings = _settings(config, data_dir)

    async def main() -> None:
        from limen.demo import admin_token
        from limen.runner import Service

        service = Service(settings, run_api=api, run_edge=edge)
        await service.start()
        try:
            if api:
                admin_token(service)
            await _forever()
        finally:
            await service.stop()

    _run(main)


@app.command("edge")
def edge_cmd(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Run only the edge (data plane) against the shared store."""
    serve(config=config, data_dir=data_dir, api=False, edge=True)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


# --- connector ------------------------------------------------------------------------------


def _connector_dir(data_dir: Path | None) -> Path:
    return data_dir or Path(os.environ.get("LIMEN_CONNECTOR_DIR", default_data_dir() / "connector"))


@connector_app.command("enroll")
def connector_enroll(
    token: Annotated[str, typer.Option(envvar="LIMEN_ENROLLMENT_TOKEN", help="One-time token.")],
    api: Annotated[str, typer.Option(envvar="LIMEN_API_URL", help="https://HOST:PORT of the API")],
    ca_file: Annotated[Path, typer.Option(envvar="LIMEN_CA_FILE", help="The service's CA.")],
    data_dir: DataDirOpt = None,
    name: Annotated[str, typer.Option(help="Connector name.")] = "",
    edge: Annotated[str, typer.Option(help="Edge HOST:PORT (default: as the API says).")] = "",
) -> None:
    """Enroll this connector: key, CSR, certificate from Limen's CA."""
    from limen.connector.agent import enroll

    setup_logging()
    directory = _connector_dir(data_dir)
    try:
        identity = enroll(api, token, directory, ca_pem=ca_file.read_text(), name=name, edge=edge)
    except (LimenError, OSError) as exc:
        typer.echo(f"error: enrollment failed: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"enrolled as {identity.connector_id}; state in {directory}; edge {identity.edge}")


@connector_app.command("run")
def connector_run(
    data_dir: DataDirOpt = None,
    edge: Annotated[str, typer.Option(help="Override the edge HOST:PORT.")] = "",
    connections: Annotated[int, typer.Option(help="Connections kept to the edge.")] = 2,
    dns_server: Annotated[
        list[str] | None,
        typer.Option(
            "--dns-server",
            help="Private DNS server IP[:PORT] (repeat; default: /etc/resolv.conf).",
            callback=lambda v: _connector_env("LIMEN_CONNECTOR_DNS_SERVERS", ",".join(v or [])),
        ),
    ] = None,
    proxy: Annotated[
        str,
        typer.Option(help="HTTP CONNECT proxy to the edge: http://HOST:PORT (or HTTPS_PROXY)."),
    ] = "",
    drain_grace: Annotated[
        float,
        typer.Option(
            envvar="LIMEN_CONNECTOR_DRAIN_GRACE",
            help="On SIGTERM, seconds to let current flows finish before exiting.",
        ),
    ] = 30.0,
    dial_source: Annotated[
        str, typer.Option(help="Local address dials to private targets leave from.")
    ] = "",
) -> None:
    """Keep outbound connections to the edge and serve flows (never listens). SIGTERM
    drains: the edge sends no new flows, the connector exits when its flows end."""
    from limen.connector.agent import ConnectorAgent, ConnectorIdentity
    from limen.net.tasks import spawn

    setup_logging(
        os.environ.get("LIMEN_LOG_LEVEL", "INFO"), os.environ.get("LIMEN_LOG_FORMAT", "text")
    )
    directory = _connector_dir(data_dir)
    identity = ConnectorIdentity.load(directory)

    async def main() -> None:
        agent = ConnectorAgent(
            identity,
            connections=connections,
            edge_override=edge or None,
            data_dir=directory,
            proxy=proxy or None,
            dial_source=dial_source or None,
        )
        drains: list[asyncio.Task[None]] = []

        def on_term() -> None:
            if not drains:
                drains.append(spawn(agent.drain(drain_grace), name="connector drain"))

        # Replaces _run's SIGTERM handler: drain first (SIGINT still stops at once).
        with contextlib.suppress(NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_term)
        try:
            await agent.run()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not drains or (task is not None and task.cancelling()):
                raise
        if drains:
            await drains[0]

    _run(main)


# --- client ---------------------------------------------------------------------------------


def _state_file() -> Any:
    from limen.client.profile import StateFile

    return StateFile()


@client_app.command("login")
def client_login(
    api: Annotated[str, typer.Option(envvar="LIMEN_API_URL", help="https://HOST:PORT")] = "",
    ca_file: Annotated[Path | None, typer.Option(envvar="LIMEN_CA_FILE")] = None,
    username: Annotated[str, typer.Option(help="For --password-stdin.")] = "",
    password_stdin: Annotated[bool, typer.Option("--password-stdin")] = False,
    edge: Annotated[str, typer.Option(help="Edge HOST:PORT (default: as the API says).")] = "",
    no_cae: Annotated[
        bool, typer.Option("--no-cae", help="Do not declare the cp1 capability.")
    ] = False,
    otp: Annotated[str, typer.Option(help="One-time code (TOTP or recovery code).")] = "",
    mfa: Annotated[bool, typer.Option("--mfa", help="Require a second factor (step-up).")] = False,
) -> None:
    """Sign in (device code by default; --password-stdin for scripts)."""
    from limen.client import auth
    from limen.client.profile import new_device_id

    setup_logging("WARNING")
    files = _state_file()
    state = files.load()
    if api:
        state.api_url = api.rstrip("/")
    if not state.api_url:
        typer.echo("error: --api https://HOST:PORT is required the first time", err=True)
        raise typer.Exit(2)
    if ca_file is not None:
        state.ca_pem = ca_file.read_text()
    state.capabilities = [] if no_cae else ["cp1"]
    if not state.device_id:
        state.device_id = new_device_id()
    try:
        with auth.http_client(state) as http:
            auth.discover(state, http)
            if edge:
                state.edge = edge
            else:
                info = http.get("/.well-known/limen-client").json()
                state.edge = str(info.get("edge") or state.edge)
            if password_stdin:
                if not username:
                    typer.echo("error: --username is required with --password-stdin", err=True)
                    raise typer.Exit(2)
                password = sys.stdin.readline().rstrip("\n")
                auth.password_login(
                    state,
                    http,
                    username,
                    password,
                    otp=otp,
                    acr_values=auth.ACR_MFA if mfa or otp else "",
                )
            else:

                def show(start: dict[str, Any]) -> None:
                    uri = start.get("verification_uri_complete") or start["verification_uri"]
                    typer.echo(
                        f"To sign in, open {uri}\nand confirm the code {start['user_code']}."
                    )

                auth.device_login(state, http, show)
    except LimenError as exc:
        typer.echo(f"error: {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None
    files.save(state)
    typer.echo(
        f"signed in; access token valid for {int(state.expires_at - time.time())} s; "
        f"edge {state.edge}"
    )


@client_app.command("logout")
def client_logout() -> None:
    """Forget the tokens on this device."""
    files = _state_file()
    state = files.load()
    state.access_token = state.refresh_token = ""
    state.expires_at = 0.0
    files.save(state)
    typer.echo("signed out")


@client_app.command("status")
def client_status() -> None:
    """Who is signed in, where the edge is, when the token expires."""
    files = _state_file()
    state = files.load()
    left = int(state.expires_at - time.time())
    typer.echo(
        json.dumps(
            {
                "signed_in": state.signed_in,
                "username": state.username,
                "api": state.api_url,
                "edge": state.edge,
                "device_id": state.device_id,
                "access_token_expires_in": max(left, 0),
                "capabilities": state.capabilities,
                "daemon": _daemon_status(files),
                "paused": _paused_processes(files),
            },
            indent=2,
        )
    )


def _paused_processes(files: Any) -> list[dict[str, Any]]:
    """Why access is paused in running ``forward`` / ``socks`` processes (a claims
    challenge they could not answer), from their pause files."""
    from limen.client.tunnel import read_pause_files

    return read_pause_files(files.directory)


def _reports_pauses(session: Any, files: Any, purpose: str) -> None:
    """Make ``session`` write its pause reason where ``status`` looks for it."""
    from limen.client.tunnel import pause_file

    session.pause_path = pause_file(files.directory)
    session.purpose = purpose


def _daemon_status(files: Any) -> dict[str, Any]:
    """The running daemon's status, or why there is none."""
    from limen.client.daemon import control_call, control_path

    try:
        answer = control_call(control_path(files.directory), "status", 5.0)
    except LimenError as exc:
        return {"running": False, "error": exc.code, "message": exc.message}
    answer.pop("ok", None)
    return {"running": True, **answer}


@client_app.command("token")
def client_token() -> None:
    """Print a fresh access token (for curl --proxy-header)."""
    from limen.client import auth

    files = _state_file()
    try:
        state = files.require()
        if not state.token_fresh():
            with auth.http_client(state) as http:
                auth.refresh(state, http)
            files.save(state)
    except LimenError as exc:
        typer.echo(f"error: {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(state.access_token)


def _split_target(text: str) -> tuple[str, int]:
    from limen.connector.agent import parse_hostport

    host, port = parse_hostport(text, default_port=0)
    if port <= 0:
        raise typer.BadParameter(f"{text!r}: expected HOST:PORT")
    return host, port


@client_app.command("forward")
def client_forward(
    target: Annotated[str, typer.Argument(help="Private HOST:PORT (TCP)")] = "",
    listen: Annotated[str, typer.Option(help="Local ADDR:PORT")] = "127.0.0.1:0",
    udp: Annotated[str, typer.Option("--udp", help="Private HOST:PORT to forward UDP to.")] = "",
) -> None:
    """Forward a local port to one private app (one flow per local connection, or with
    --udp one UDP flow per local source address)."""
    if udp:
        _client_forward_udp(udp, listen)
        return
    if not target:
        raise typer.BadParameter("expected a private HOST:PORT, or --udp HOST:PORT")
    from limen.client.tunnel import load_session, serve_forward

    setup_logging(os.environ.get("LIMEN_LOG_LEVEL", "INFO"))
    host, port = _split_target(target)
    lhost, lport = _split_target(listen) if not listen.endswith(":0") else (listen[:-2], 0)

    async def main() -> None:
        files = _state_file()
        session = load_session(files)
        session.reauthenticate = _reauthenticator(session.state)
        _reports_pauses(session, files, f"forward {host}:{port}")
        await session.warm_up()
        server = await serve_forward(session, host, port, lhost, lport, on_refused=_print_refusal)
        bound = server.sockets[0].getsockname()
        typer.echo(
            f"forwarding {bound[0]}:{bound[1]} -> {host}:{port} through {session.state.edge}",
            err=True,
        )
        try:
            await _forever()
        finally:
            server.close()
            session.set_paused("")
            await session.close()

    _run(main)


@client_app.command("socks")
def client_socks(
    listen: Annotated[str, typer.Option(help="Local ADDR:PORT")] = "127.0.0.1:1080",
) -> None:
    """A local SOCKS5 proxy whose connections become flows to private apps."""
    from limen.client.tunnel import load_session, serve_socks

    setup_logging(os.environ.get("LIMEN_LOG_LEVEL", "INFO"))
    lhost, lport = _split_target(listen) if not listen.endswith(":0") else (listen[:-2], 0)

    async def main() -> None:
        files = _state_file()
        session = load_session(files)
        session.reauthenticate = _reauthenticator(session.state)
        _reports_pauses(session, files, f"socks {lhost}:{lport}")
        await session.warm_up()
        server = await serve_socks(session, lhost, lport, on_refused=_print_refusal)
        bound = server.sockets[0].getsockname()
        typer.echo(f"SOCKS5 on {bound[0]}:{bound[1]} through {session.state.edge}", err=True)
        try:
            await _forever()
        finally:
            server.close()
            session.set_paused("")
            await session.close()

    _run(main)


# --- the transparent client (limen client up) -------------------------------------------------


@client_app.command("up")
def client_up(
    listen_port: Annotated[
        int, typer.Option(help="Loopback port of the transparent listener (0: any).")
    ] = 0,
    capture: Annotated[
        bool,
        typer.Option(
            help="Capture traffic with nftables (needs root); --no-capture runs the profile, "
            "status and control socket only."
        ),
    ] = True,
    poll_seconds: Annotated[
        float, typer.Option(help="How often to check for a new forwarding profile.")
    ] = 2.0,
) -> None:
    """Run the client: fetch the forwarding profile and capture private traffic
    transparently (Linux, root). Stop it with `limen client down`."""
    from limen.client.daemon import ClientDaemon
    from limen.client.transparent import has_net_admin

    setup_logging(
        os.environ.get("LIMEN_LOG_LEVEL", "INFO"), os.environ.get("LIMEN_LOG_FORMAT", "text")
    )
    if capture and not (sys.platform.startswith("linux") and has_net_admin()):
        typer.echo(
            "limen client up: transparent capture needs root (CAP_NET_ADMIN on Linux) to install "
            "nftables rules, and this process has not got it.\n"
            "  - run it as root:        sudo limen client up\n"
            "  - or, without root, use: limen client socks   (a SOCKS5 proxy on 127.0.0.1:1080)\n"
            "                           limen client forward HOST:PORT --listen 127.0.0.1:PORT\n"
            "  - `limen client up --no-capture` keeps the profile and status without capturing.",
            err=True,
        )
        raise typer.Exit(1)
    daemon = ClientDaemon(
        _state_file(), capture=capture, listen_port=listen_port, poll_interval=poll_seconds
    )

    async def main() -> None:
        await daemon.run(ready=lambda line: typer.echo(line, err=True))

    _run(main)


@client_app.command("down")
def client_down(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the daemon to exit.")] = 15,
) -> None:
    """Stop `limen client up` and remove every rule it installed (also after a crash)."""
    from limen.client.daemon import DaemonNotRunning, control_call, control_path
    from limen.client.transparent import NftTable, has_net_admin

    files = _state_file()
    path = control_path(files.directory)
    stopped = False
    try:
        control_call(path, "down", 5.0)
        stopped = True
    except DaemonNotRunning:
        pass
    except LimenError as exc:
        typer.echo(f"error: {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None
    deadline = time.monotonic() + timeout
    while stopped and path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the daemon removes its socket last-but-one, before it exits
    removed = False
    if has_net_admin():
        try:
            removed = NftTable().delete()
            if not stopped:
                # A daemon that died (SIGKILL, crash) left its resolver change behind.
                from limen.client.daemon import undo_stale_resolver

                for what in undo_stale_resolver(files.directory):
                    typer.echo(what)
                    removed = True
        except LimenError as exc:
            typer.echo(f"error: {exc.code}: {exc.message}", err=True)
            raise typer.Exit(1) from None
    if stopped:
        typer.echo("limen client stopped")
    elif removed:
        typer.echo("no client was running; removed a stale `inet limen` nftables table")
    else:
        typer.echo("no client was running")


def _control(command: str, **args: Any) -> dict[str, Any]:
    from limen.client.daemon import control_call, control_path

    try:
        return control_call(control_path(_state_file().directory), command, **args)
    except LimenError as exc:
        typer.echo(f"error: {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None


@client_app.command("pause")
def client_pause(
    reason: Annotated[str, typer.Option(help="Shown by `status`.")] = "paused by the user",
) -> None:
    """Stop capturing: private destinations go direct (unreachable off the network)."""
    status = _control("pause", reason=reason)
    typer.echo(f"paused: {status.get('paused_reason', '')}; `limen client resume` to resume")


@client_app.command("resume")
def client_resume() -> None:
    """Capture again after `pause`."""
    status = _control("resume")
    typer.echo(f"resumed; capture {status['capture']['state']}")


@client_app.command("traffic")
def client_traffic(
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Live and recent flows of `limen client up`: time, process, destination, rule, action,
    bytes."""
    flows = _control("traffic")["flows"]
    if as_json:
        typer.echo(json.dumps(flows, indent=2))
        return
    typer.echo(
        f"{'time':8} {'process':20} {'destination':28} {'rule':26} {'action':7} "
        f"{'state':8} {'up':>9} {'down':>9}"
    )
    for f in flows:
        proc = f"{f['process']} ({f['pid']})" if f["process"] else "?"
        typer.echo(
            f"{time.strftime('%H:%M:%S', time.localtime(f['time'])):8} {proc[:20]:20} "
            f"{f['destination'][:28]:28} {(f['rule'] or '-')[:26]:26} {f['action']:7} "
            f"{f['state']:8} {f['bytes_up']:>9} {f['bytes_down']:>9}"
        )


@client_app.command("doctor")
def client_doctor(
    test_flow: Annotated[bool, typer.Option(help="Open one test flow.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Health checks (sign-in, API, TLS trust, token, profile, edge, daemon, nftables, a test
    flow), each with what to fix."""
    from dataclasses import asdict

    from limen.client.diagnostics import FAIL, doctor

    setup_logging("WARNING")
    checks = doctor(_state_file(), test_flow=test_flow)
    if as_json:
        typer.echo(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        for c in checks:
            typer.echo(f"[{c.status:4}] {c.name:10} {c.detail}")
            if c.fix and c.status != "ok":
                typer.echo(f"{'':17} fix: {c.fix}")
    if any(c.status == FAIL for c in checks):
        raise typer.Exit(1)


@client_app.command("test-destination")
def client_test_destination(
    target: Annotated[str, typer.Argument(help="HOST:PORT[/udp]")],
) -> None:
    """Which forwarding-profile rule matches a destination, and what would happen to it."""
    from limen.client.diagnostics import current_profile, explain_destination

    setup_logging("WARNING")
    try:
        profile, source, edge_up, paused = current_profile(_state_file())
        result = explain_destination(profile, target, edge_up=edge_up, paused=paused)
    except LimenError as exc:
        typer.echo(f"error: {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from None
    result["profile_source"] = source
    typer.echo(json.dumps(result, indent=2))


@client_app.command("collect-logs")
def client_collect_logs(
    output: Annotated[Path | None, typer.Option(help="Where to write the bundle.")] = None,
) -> None:
    """Write a support bundle (tar.gz) without secrets: state without tokens, profile, daemon
    status, flows and log, nftables rules, doctor results."""
    from limen.client.diagnostics import collect_logs

    setup_logging("WARNING")
    out = output or Path(f"limen-support-{time.strftime('%Y%m%d-%H%M%S')}.tar.gz")
    names = collect_logs(_state_file(), out)
    typer.echo(f"wrote {out} ({', '.join(names)})")


def _reauthenticator(state: Any) -> Any:
    """What a running client does when the edge challenges a flow: prompt on a terminal,
    or say clearly what to run when there is none (scripts, services)."""
    from limen.client import auth

    def reauthenticate(refusal: Any) -> bool:
        step_up = refusal.code == "insufficient_user_authentication"
        hint = "limen client login" + (" --mfa --otp CODE" if step_up else "")
        typer.echo(f"limen: access paused: {refusal.message}", err=True)
        if not sys.stdin.isatty() or not state.username:
            # Unattended: refuse the flow and say what to run; a sign-in made by another
            # process is picked up by the next flow (EdgeSession adopts it).
            typer.echo(
                f"limen: sign in again with `{hint}`; flows are refused until then", err=True
            )
            return False
        import getpass

        password = getpass.getpass(f"Password for {state.username}: ")
        otp = getpass.getpass("One-time code: ") if step_up else ""
        try:
            with auth.http_client(state) as http:
                auth.password_login(
                    state,
                    http,
                    state.username,
                    password,
                    otp=otp,
                    acr_values=auth.ACR_MFA if step_up else "",
                )
        except LimenError as exc:
            typer.echo(f"limen: sign-in failed: {exc.code}: {exc.message}", err=True)
            return False
        typer.echo("limen: signed in again; resuming", err=True)
        return True

    return reauthenticate


def _connector_env(name: str, value: str) -> None:
    """A connector option that its agent reads from the environment (connector/dns.py)."""
    if value:
        os.environ[name] = value


def _client_forward_udp(target: str, listen: str) -> None:
    from limen.client.tunnel import load_session
    from limen.client.udp import serve_udp_forward

    setup_logging(os.environ.get("LIMEN_LOG_LEVEL", "INFO"))
    host, port = _split_target(target)
    lhost, lport = _split_target(listen) if not listen.endswith(":0") else (listen[:-2], 0)

    async def main() -> None:
        session = load_session(_state_file())
        await session.warm_up()
        forward = await serve_udp_forward(
            session, host, port, lhost, lport, on_refused=_print_refusal
        )
        bound = forward.sock.local_address if forward.sock else ("?", 0)
        typer.echo(
            f"forwarding udp {bound[0]}:{bound[1]} -> {host}:{port} through {session.state.edge}",
            err=True,
        )
        try:
            await _forever()
        finally:
            forward.close()
            await session.close()

    _run(main)


@client_app.command("dns")
def client_dns(
    listen: Annotated[str, typer.Option(help="Local ADDR:PORT (UDP and TCP)")] = "127.0.0.1:53",
    upstream: Annotated[
        list[str] | None,
        typer.Option(help="DNS server IP[:PORT] for public names (default: /etc/resolv.conf)."),
    ] = None,
) -> None:
    """A local DNS stub: private names through Limen, every other name to the system
    resolver."""
    from limen.client.dns import DnsStub
    from limen.client.tunnel import load_session
    from limen.net.resolver import DnsResolver, Upstream

    setup_logging(os.environ.get("LIMEN_LOG_LEVEL", "INFO"))
    lhost, lport = _split_target(listen) if not listen.endswith(":0") else (listen[:-2], 0)

    async def main() -> None:
        session = load_session(_state_file())
        await session.warm_up()
        resolver = DnsResolver([Upstream.parse(u) for u in upstream]) if upstream else None
        stub = DnsStub(session, upstream=resolver)
        bound = await stub.start(lhost, lport)
        typer.echo(
            f"DNS stub on {bound[0]}:{bound[1]} (private: {', '.join(stub.suffixes) or 'none'}) "
            f"through {session.state.edge}",
            err=True,
        )
        try:
            await _forever()
        finally:
            stub.close()
            await session.close()

    _run(main)


def _print_refusal(target: str, exc: Any) -> None:
    typer.echo(f"limen: flow to {target} refused: {exc.code}: {exc.message}", err=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
