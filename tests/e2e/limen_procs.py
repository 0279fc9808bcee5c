"""Real Limen processes (the venv's ``limen`` command) started inside the e2e namespaces.

- :func:`start_service` runs ``limen serve`` (identity, admin API and edge in one process) on
  a host, normally the edge; :class:`LimenService` runs ``limen admin …`` against it *inside
  that namespace*, since the test runner (root namespace) cannot reach the namespaces'
  addresses.
- :func:`enroll_connector` / :func:`start_connector` run ``limen connector enroll|run`` on the
  connector's host (the branch), which dials the edge outbound.
- :class:`ClientProfile` is one user's client state directory on a host (the laptop):
  ``limen client login|token|forward|socks`` with ``LIMEN_CLIENT_DIR`` pointing at it, so
  several users can be signed in on the same laptop at once.

Every process is a tracked process of its :class:`~.netns.Host` (killed at topology teardown
at the latest), writes its output to a log file in a private directory, and is waited for
with bounded readiness polls; a process that does not come up raises :class:`LimenStartError`
with the end of its log. Secrets (admin token, passwords) travel by environment or stdin,
never on a command line where ``ps`` would show them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .netns import Host

# Seconds a Limen process gets to come up. Generous: CI machines are slow, and the first start
# of the service creates its CA, its database and runs the migrations.
READY_TIMEOUT = 30.0
# Seconds between readiness polls that run a command (each poll starts a process).
_POLL_INTERVAL = 0.2


class LimenStartError(RuntimeError):
    """A Limen process failed to start; the message includes the end of its log."""


def limen_bin() -> str:
    """The ``limen`` console script of the interpreter running the tests (the repo's venv)."""
    candidates = [
        Path(sys.executable).parent / "limen",
        Path(__file__).resolve().parents[2] / ".venv" / "bin" / "limen",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("limen")
    if found is None:
        raise LimenStartError("no limen command: run scripts/install.sh (pip install -e .)")
    return found


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any ``LIMEN_*`` variable, plus ``extra``.

    Stray ``LIMEN_*`` settings of the developer's shell (a data dir, an API URL, a token) must
    not leak into the processes under test.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIMEN_")}
    env.update(extra or {})
    return env


def _tail(log: Path, limit: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


@dataclass(eq=False)
class LimenProcess:
    """One long-running ``limen`` process on :attr:`host`, its output in :attr:`log`."""

    host: Host
    argv: list[str]
    proc: subprocess.Popen[Any] = field(repr=False)
    log: Path

    def tail(self) -> str:
        """The end of the process's log (for failure messages)."""
        return _tail(self.log)

    def stop(self) -> None:
        """SIGTERM the process (SIGKILL after a grace period) and wait for it to exit."""
        self.host.stop(self.proc)

    def check_running(self) -> None:
        """Raise :class:`LimenStartError` if the process has exited."""
        status = self.proc.poll()
        if status is not None:
            raise LimenStartError(
                f"{' '.join(self.argv[:3])} on {self.host.name} exited with {status}: {self.tail()}"
            )


def spawn(host: Host, args: Sequence[str], env: Mapping[str, str], workdir: Path) -> LimenProcess:
    """Start ``limen *args`` on ``host`` in the background with output to a log in ``workdir``.

    Started in its own session so that teardown signals its whole process group.
    """
    argv = [limen_bin(), *args]
    name = "-".join(a for a in args[:2] if not a.startswith("-"))
    log = workdir / f"{name or 'limen'}-{time.monotonic_ns()}.log"
    logf: IO[bytes] = log.open("wb")
    try:
        proc = host.popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
        )
    finally:
        logf.close()  # the child holds its own descriptor
    return LimenProcess(host=host, argv=argv, proc=proc, log=log)


def run(
    host: Host,
    args: Sequence[str],
    env: Mapping[str, str],
    input: str | None = None,
    check: bool = True,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``limen *args`` on ``host`` to completion (output captured as text)."""
    argv = host.argv([limen_bin(), *args])
    proc = subprocess.run(
        argv, capture_output=True, text=True, input=input, env=dict(env), timeout=timeout
    )
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(
            proc.returncode,
            ["limen", *args],
            output=proc.stdout,
            stderr=f"[{host.name}] {proc.stderr}",
        )
    return proc


def _wait_until_running(lp: LimenProcess, addr: str, port: int, timeout: float) -> None:
    """Wait until ``addr:port`` accepts on the process's host, or fail with its log."""
    try:
        lp.host.wait_port(addr, port, timeout=timeout)
    except TimeoutError as exc:
        raise LimenStartError(
            f"{' '.join(lp.argv[1:3])} on {lp.host.name}: {addr}:{port} not accepting "
            f"(exit status {lp.proc.poll()}): {lp.tail()}"
        ) from exc
    lp.check_running()


# --- the service ------------------------------------------------------------------------------


@dataclass(eq=False)
class LimenService:
    """A running ``limen serve`` (identity + admin API + edge) and how to administer it."""

    process: LimenProcess
    data_dir: Path
    public_host: str
    """The address clients use (the certificate's subject; the issuer's host)."""
    api_port: int
    edge_port: int
    admin_token: str = field(repr=False)

    @property
    def host(self) -> Host:
        """Where the service runs."""
        return self.process.host

    @property
    def ca_file(self) -> Path:
        """The service's CA certificate (PEM), written by the service at start."""
        return self.data_dir / "ca.pem"

    @property
    def api_url(self) -> str:
        """``https://PUBLIC_HOST:API_PORT``."""
        return f"https://{self.public_host}:{self.api_port}"

    def edge_address(self, addr: str | None = None) -> str:
        """``HOST:PORT`` of the edge at ``addr`` (default: the public address)."""
        return f"{addr or self.public_host}:{self.edge_port}"

    def admin(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``limen admin --api … --ca-file … ARGS`` in the service's namespace.

        The admin token goes by ``LIMEN_ADMIN_TOKEN``, never on the command line.
        """
        env = base_env({"LIMEN_ADMIN_TOKEN": self.admin_token})
        argv = ["admin", "--api", self.api_url, "--ca-file", str(self.ca_file), *args]
        return run(self.host, argv, env, input=input, check=check)

    def admin_json(self, *args: str, input: str | None = None) -> Any:
        """:meth:`admin` with ``--json``; the parsed output."""
        return json.loads(self.admin("--json", *args, input=input).stdout)

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric from the API's ``/metrics`` (0 when absent)."""
        proc = self.host.run(
            ["curl", "-sS", "--max-time", "5", "--cacert", str(self.ca_file),
             f"{self.api_url}/metrics"],
        )  # fmt: skip
        m = re.search(rf"^{re.escape(name)} (\S+)$", proc.stdout, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    def wait_metric(self, name: str, at_least: float, timeout: float = READY_TIMEOUT) -> float:
        """Poll ``/metrics`` until ``name`` is at least ``at_least``; its value."""
        deadline = time.monotonic() + timeout
        while True:
            self.process.check_running()
            value = self.metric(name)
            if value >= at_least:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} stayed at {value} (< {at_least}) for {timeout}s")
            time.sleep(_POLL_INTERVAL)

    def stop(self) -> None:
        """Stop the service process."""
        self.process.stop()


def start_service(
    host: Host,
    public_host: str,
    extra_san: Sequence[str] = (),
    api_port: int = 9443,
    edge_port: int = 8443,
    settings: Mapping[str, str] | None = None,
) -> LimenService:
    """Start ``limen serve`` on ``host`` listening on every address of the namespace.

    ``public_host`` is what clients dial (and the certificate's subject); ``extra_san`` adds
    the other addresses peers use (e.g. the branch-facing one). ``settings`` are more
    ``LIMEN_*`` variables. Returns once the API and the edge accept connections and the admin
    token file exists.
    """
    workdir = host.tempdir("limen-serve")
    data_dir = workdir / "data"
    data_dir.mkdir()
    env = base_env(
        {
            "LIMEN_PUBLIC_HOST": public_host,
            "LIMEN_EXTRA_SAN": ",".join(extra_san),
            "LIMEN_API_HOST": "0.0.0.0",
            "LIMEN_API_PORT": str(api_port),
            "LIMEN_EDGE_HOST": "0.0.0.0",
            "LIMEN_EDGE_PORT": str(edge_port),
            **(settings or {}),
        }
    )
    lp = spawn(host, ["serve", "--data-dir", str(data_dir)], env, workdir)
    # The API answers only after the edge is up (runner.Service.start), so waiting for the
    # API first and the edge second costs nothing extra.
    _wait_until_running(lp, public_host, api_port, READY_TIMEOUT)
    _wait_until_running(lp, public_host, edge_port, READY_TIMEOUT)
    token_file = data_dir / "admin-token"
    deadline = time.monotonic() + READY_TIMEOUT
    # The bootstrap token is written just after the API starts serving.
    while not (token_file.is_file() and token_file.read_text().strip()):
        lp.check_running()
        if time.monotonic() > deadline:
            raise LimenStartError(f"no admin token in {token_file}: {lp.tail()}")
        time.sleep(0.05)
    return LimenService(
        process=lp,
        data_dir=data_dir,
        public_host=public_host,
        api_port=api_port,
        edge_port=edge_port,
        admin_token=token_file.read_text().strip(),
    )


# --- the connector ----------------------------------------------------------------------------


@dataclass(eq=False)
class LimenConnector:
    """An enrolled connector's state directory and, once started, its process."""

    host: Host
    data_dir: Path
    connector_id: str
    process: LimenProcess | None = None

    def stop(self) -> None:
        """Stop the connector process, if running."""
        if self.process is not None:
            self.process.stop()


def enroll_connector(
    host: Host, service: LimenService, token: str, api_addr: str, edge: str
) -> LimenConnector:
    """``limen connector enroll`` on ``host``, reaching the API at ``api_addr`` and told to
    use the edge at ``edge`` (``HOST:PORT``). The one-time token goes by environment."""
    workdir = host.tempdir("limen-connector")
    data_dir = workdir / "state"
    env = base_env({"LIMEN_ENROLLMENT_TOKEN": token})
    proc = run(
        host,
        ["connector", "enroll",
         "--api", f"https://{api_addr}:{service.api_port}",
         "--ca-file", str(service.ca_file),
         "--edge", edge,
         "--data-dir", str(data_dir)],
        env,
    )  # fmt: skip
    m = re.search(r"enrolled as (con_\S+);", proc.stdout)
    if m is None:
        raise LimenStartError(f"unexpected enroll output: {proc.stdout!r} {proc.stderr!r}")
    return LimenConnector(host=host, data_dir=data_dir, connector_id=m.group(1))


def spawn_connector(connector: LimenConnector, *args: str) -> LimenProcess:
    """``limen connector run ARGS`` in the background, without waiting for its link; the
    process is also stored as ``connector.process``."""
    connector.process = spawn(
        connector.host,
        ["connector", "run", "--data-dir", str(connector.data_dir), *args],
        base_env(),
        connector.data_dir.parent,
    )
    return connector.process


def start_connector(connector: LimenConnector, service: LimenService, *args: str) -> LimenConnector:
    """``limen connector run ARGS``; returns once the edge counts one more connector link."""
    before = service.metric("limen_connectors_connected")
    spawn_connector(connector, *args)
    assert connector.process is not None
    try:
        service.wait_metric("limen_connectors_connected", before + 1)
    except TimeoutError as exc:
        tail = connector.process.tail()
        raise LimenStartError(f"connector did not connect: {exc}: {tail}") from exc
    return connector


# --- clients ----------------------------------------------------------------------------------


@dataclass(eq=False)
class ClientProfile:
    """One user's Limen client on ``host``: a private ``LIMEN_CLIENT_DIR`` and its processes."""

    host: Host
    directory: Path
    processes: list[LimenProcess] = field(default_factory=list)

    @classmethod
    def create(cls, host: Host, label: str) -> ClientProfile:
        """A fresh, empty client directory on ``host`` (removed at teardown)."""
        return cls(host=host, directory=host.tempdir(f"client-{label}"))

    @property
    def env(self) -> dict[str, str]:
        """The environment of this profile's ``limen client`` commands."""
        return base_env({"LIMEN_CLIENT_DIR": str(self.directory)})

    def run(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``limen client ARGS`` to completion."""
        return run(self.host, ["client", *args], self.env, input=input, check=check)

    def login(
        self,
        service: LimenService,
        username: str,
        password: str,
        *extra: str,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Sign in with ``--password-stdin`` (the password never appears in an argv);
        ``extra`` are more ``limen client login`` options (``--mfa --otp CODE``)."""
        return self.run(
            "login", "--api", service.api_url, "--ca-file", str(service.ca_file),
            "--username", username, "--password-stdin", *extra,
            input=password + "\n",
            check=check,
        )  # fmt: skip

    def token(self) -> str:
        """A fresh access token (``limen client token``)."""
        return self.run("token").stdout.strip()

    def _start(self, args: Sequence[str], ready: str) -> LimenProcess:
        lp = spawn(self.host, ["client", *args], self.env, self.directory)
        self.processes.append(lp)
        # The process says when it listens. Waiting for that line rather than probing the
        # port keeps readiness checks from opening flows (and traffic-log records).
        deadline = time.monotonic() + READY_TIMEOUT
        while ready not in lp.tail():
            lp.check_running()
            if time.monotonic() > deadline:
                raise LimenStartError(f"{' '.join(args)}: not ready: {lp.tail()}")
            time.sleep(0.05)
        return lp

    def forward(self, target: str, port: int) -> LimenProcess:
        """``limen client forward TARGET --listen 127.0.0.1:PORT``, once it listens."""
        listen = f"127.0.0.1:{port}"
        return self._start(["forward", target, "--listen", listen], f"forwarding {listen} ")

    def forward_udp(self, target: str, port: int) -> LimenProcess:
        """``limen client forward --udp TARGET --listen 127.0.0.1:PORT``, once it listens."""
        listen = f"127.0.0.1:{port}"
        return self._start(
            ["forward", "--udp", target, "--listen", listen], f"forwarding udp {listen} "
        )

    def socks(self, port: int) -> LimenProcess:
        """``limen client socks --listen 127.0.0.1:PORT``, once it listens."""
        listen = f"127.0.0.1:{port}"
        return self._start(["socks", "--listen", listen], f"SOCKS5 on {listen} ")

    def dns(self, port: int) -> LimenProcess:
        """``limen client dns --listen 127.0.0.1:PORT``, once it listens."""
        listen = f"127.0.0.1:{port}"
        return self._start(["dns", "--listen", listen], f"DNS stub on {listen} ")

    def stop_process(self, lp: LimenProcess) -> None:
        """Stop one of this profile's processes (the others keep running)."""
        lp.stop()
        self.processes.remove(lp)

    def stop(self) -> None:
        """Stop every process of this profile."""
        for lp in self.processes:
            lp.stop()
        self.processes.clear()


def limen_pids(host: Host) -> list[int]:
    """Pids of processes in ``host``'s namespace whose command line runs ``limen``."""
    out = subprocess.run(
        ["ip", "netns", "pids", host.ns], capture_output=True, text=True, timeout=15
    )
    found: list[int] = []
    for tok in out.stdout.split():
        try:
            cmdline = Path(f"/proc/{tok}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile
        if any(arg.endswith(b"/limen") or arg == b"limen" for arg in cmdline[:3]):
            found.append(int(tok))
    return found
