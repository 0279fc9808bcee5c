"""The Limen path: ``limen client forward`` → edge → ``limen connector run`` → target.

Everything runs as the real commands, each in its own process, on 127.0.0.1:

1. ``limen serve`` (identity, admin API and edge in one process) with a fresh data directory;
2. a tenant built through the admin REST API: a user, an application with an ``ip`` segment
   ``127.0.0.1`` for the target's port, the user assigned, a one-time enrollment token;
3. ``limen connector enroll`` then ``limen connector run`` (its own state directory);
4. ``limen client login --password-stdin`` then
   ``limen client forward 127.0.0.1:TARGET --listen 127.0.0.1:PORT``.

Readiness is proved by a real flow before the workloads start: the segment also covers a
private probe echo port served by this process, and a plain CONNECT through the edge to it
(with the client's own token, after the connector has registered) must echo a byte; the
forward is ready once it reports its listening socket. The probe never touches the target,
which for throughput is an iperf3 server that takes any stray connection for a test.

The processes measured (memory, CPU) are the three Limen hops, in flow order: ``client``
(``limen client forward``), ``edge`` (``limen serve``: edge + API) and ``connector``
(``limen connector run``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .common import (
    LOOPBACK,
    BenchmarkError,
    Processes,
    free_port,
    wait_port,
)

USERNAME = "bench"
APP_NAME = "bench-target"
# Limen's first start creates its CA, migrates SQLite and hashes the bootstrap token: slower
# than the baselines' helpers, so it gets a longer bound.
START_TIMEOUT = 60.0
# The hops of the path in flow order (see LimenPath.hops).
HOP_ROLES = ("client", "edge", "connector")


def limen_executable() -> str:
    """The ``limen`` console script of the interpreter running the benchmarks (the venv's)."""
    beside = Path(sys.executable).parent / "limen"
    if beside.exists():
        return str(beside)
    found = shutil.which("limen")
    if found is None:
        raise BenchmarkError(f"no limen command beside {sys.executable} nor on PATH")
    return found


class ProbeEcho:
    """A tiny echo server in a thread: the readiness probe's destination (never the target)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="limen-probe-echo", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by stop()
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    while data := conn.recv(4096):
                        conn.sendall(data)

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _connect_probe(edge_port: int, ca_pem: str, token: str, probe_port: int) -> str:
    """One plain CONNECT flow through the edge to the probe; "" on success, else why not."""
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.set_alpn_protocols(["http/1.1"])
    head = (
        f"CONNECT {LOOPBACK}:{probe_port} HTTP/1.1\r\nHost: {LOOPBACK}:{probe_port}\r\n"
        f"Proxy-Authorization: Bearer {token}\r\n\r\n"
    ).encode()
    try:
        with (
            socket.create_connection((LOOPBACK, edge_port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=LOOPBACK) as tls,
        ):
            tls.sendall(head)
            response = b""
            while b"\r\n\r\n" not in response:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                response += chunk
            status = response.split(b"\r\n", 1)[0].decode(errors="replace")
            if " 200 " not in f"{status} ":
                return f"edge answered {status!r}"
            tls.sendall(b"x")
            if tls.recv(1) != b"x":
                return "no echo through the edge"
            return ""
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class Deployment:
    """One run's Limen service: its directories, environment and addresses."""

    data: Path
    connector_dir: Path
    client_dir: Path
    env: dict[str, str]
    api_url: str
    edge_port: int


class LimenPath:
    """``limen client forward`` → edge (``limen serve``) → ``limen connector run`` → target.

    ``uvloop``: None runs the commands as shipped (uvloop, unless ``LIMEN_UVLOOP`` says
    otherwise in the environment); True forces uvloop
    (``LIMEN_UVLOOP=1``) and False the asyncio loop in all three processes.
    """

    def __init__(self, workdir: Path, name: str = "limen", uvloop: bool | None = None) -> None:
        self.name = name
        self.uvloop = uvloop
        self.workdir = workdir
        self.procs = Processes(workdir)
        self.limen = limen_executable()
        self.probe: ProbeEcho | None = None
        self._round = 0
        # Role -> pid of the long-running processes, recorded as each starts: teardown
        # reorders self.procs.procs, so the list's order says nothing about roles.
        self.role_pids: dict[str, int] = {}

    # --- helpers -------------------------------------------------------------------------

    def _run(self, argv: list[str], env: dict[str, str], stdin: str = "") -> str:
        """Run a short ``limen`` command to completion; its output, or a clear error."""
        proc = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=START_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0:
            raise BenchmarkError(
                f"{' '.join(argv[1:3])} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}"
            )
        return proc.stdout

    def _log(self, role: str) -> str:
        # One log per process and setup round: readiness is read from the logs.
        return f"run{self._round}-{role}.log"

    def _fail(self, message: str, log_name: str) -> BenchmarkError:
        return BenchmarkError(f"{message}: {self.procs.log_tail(log_name)}")

    @staticmethod
    def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if proc.poll() is not None:
                raise BenchmarkError(f"{proc.args!r} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"{path} not written after {timeout}s")
            time.sleep(0.05)

    def _wait_log(self, log_name: str, needle: str, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        path = self.workdir / log_name
        while not (path.exists() and needle in path.read_text(errors="replace")):
            if proc.poll() is not None:
                raise self._fail(f"{proc.args!r} exited with {proc.returncode}", log_name)
            if time.monotonic() > deadline:
                raise self._fail(f"no {needle!r} from {proc.args!r}", log_name)
            time.sleep(0.05)

    @staticmethod
    def _call(http: httpx.Client, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        response = http.request(method, url, json=body)
        if response.status_code >= 400:
            raise BenchmarkError(f"{method} {url}: {response.status_code} {response.text[:300]}")
        return response.json() if response.content else {}

    @staticmethod
    @contextlib.contextmanager
    def _admin(api_url: str, data: Path) -> Iterator[httpx.Client]:
        """An admin API client with the service's bootstrap token, trusting its CA."""
        token = (data / "admin-token").read_text().strip()
        verify = ssl.create_default_context(cadata=(data / "ca.pem").read_text())
        with httpx.Client(
            base_url=api_url,
            verify=verify,
            timeout=30,
            headers={"Authorization": f"Bearer {token}"},
        ) as http:
            yield http

    def _user_and_group(
        self, http: httpx.Client, password: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The benchmark user, and the connector group its apps use (the default one)."""
        user = self._call(
            http, "POST", "/api/v1/users", {"username": USERNAME, "password": password}
        )
        groups = self._call(http, "GET", "/api/v1/connector-groups")
        items = groups["items"] if isinstance(groups, dict) else groups
        group = next((g for g in items if g.get("is_default")), None)
        if group is None:
            group = self._call(http, "POST", "/api/v1/connector-groups", {"name": "bench"})
        return user, group

    def _enrollment_token(self, http: httpx.Client, group: dict[str, Any]) -> str:
        """A one-time enrollment token for a connector of ``group``."""
        enrollment = self._call(
            http,
            "POST",
            f"/api/v1/connector-groups/{group['id']}/enrollment-tokens",
            {"name": "bench-connector"},
        )
        return str(enrollment["token"])

    # --- the steps -----------------------------------------------------------------------

    def _tenant(
        self, api_url: str, data: Path, ports: str, password: str
    ) -> str:  # the one-time enrollment token
        with self._admin(api_url, data) as http:
            user, group = self._user_and_group(http, password)
            app = self._call(
                http, "POST", "/api/v1/apps", {"name": APP_NAME, "connector_group_id": group["id"]}
            )
            segment = {"type": "ip", "destination": LOOPBACK, "ports": ports, "protocol": "tcp"}
            self._call(http, "POST", f"/api/v1/apps/{app['id']}/segments", segment)
            assignment = {"principal_id": user["id"]}
            self._call(http, "POST", f"/api/v1/apps/{app['id']}/assignments", assignment)
            return self._enrollment_token(http, group)

    def _wait_flow(self, edge_port: int, ca_pem: str, client_dir: Path) -> None:
        """Bounded poll: a plain CONNECT with the client's token reaches the probe echo."""
        assert self.probe is not None
        access_token = json.loads((client_dir / "client.json").read_text())["access_token"]
        deadline = time.monotonic() + START_TIMEOUT
        why = ""
        while time.monotonic() < deadline:
            why = _connect_probe(edge_port, ca_pem, access_token, self.probe.port)
            if not why:
                return
            time.sleep(0.1)
        raise self._fail(
            f"no flow through the edge after {START_TIMEOUT}s ({why})", self._log("serve")
        )

    def setup(self, target_port: int) -> int:
        """Start the service, build the tenant, run a connector and a client forward."""
        try:
            return self._setup(target_port)
        except BaseException:
            # The suite only tears down a path whose setup succeeded: leave nothing running.
            self.teardown()
            raise

    def _start_service(self) -> Deployment:
        """A fresh run directory, the environment every Limen process of this run gets, and
        `limen serve` up (API answering, admin token written)."""
        self._round += 1
        base = self.workdir / f"run{self._round}"
        data, connector_dir, client_dir = base / "data", base / "connector", base / "client"
        for d in (data, connector_dir, client_dir):
            d.mkdir(parents=True, mode=0o700)
        api_port, edge_port = free_port(), free_port()
        env = dict(
            os.environ,
            LIMEN_DATA_DIR=str(data),
            LIMEN_API_HOST=LOOPBACK,
            LIMEN_EDGE_HOST=LOOPBACK,
            LIMEN_PUBLIC_HOST=LOOPBACK,
            LIMEN_API_PORT=str(api_port),
            LIMEN_EDGE_PORT=str(edge_port),
            LIMEN_LOG_LEVEL="WARNING",
            LIMEN_CONNECTOR_DIR=str(connector_dir),
            LIMEN_CLIENT_DIR=str(client_dir),
        )
        if self.uvloop is not None:
            env["LIMEN_UVLOOP"] = "1" if self.uvloop else "0"
        serve = self.procs.start([self.limen, "serve"], self._log("serve"), env=env)
        self.role_pids["edge"] = serve.pid
        try:
            wait_port(api_port, timeout=START_TIMEOUT, proc=serve)
            self._wait_file(data / "admin-token", serve, START_TIMEOUT)
        except BenchmarkError as exc:
            raise self._fail(str(exc), self._log("serve")) from exc
        return Deployment(
            data, connector_dir, client_dir, env, f"https://{LOOPBACK}:{api_port}", edge_port
        )

    def _connect(
        self, dep: Deployment, enrollment: str, password: str, connector_args: Sequence[str] = ()
    ) -> None:
        """Enroll and run the connector, sign the client in, and wait until a flow gets
        through the edge (to the probe echo, never to the measured target)."""
        ca_file = dep.data / "ca.pem"
        self._run(
            [
                *(self.limen, "connector", "enroll", "--api", dep.api_url),
                *("--ca-file", str(ca_file), "--data-dir", str(dep.connector_dir)),
                *("--name", "bench-connector"),
            ],
            dict(dep.env, LIMEN_ENROLLMENT_TOKEN=enrollment),
        )
        connector = self.procs.start(
            [self.limen, "connector", "run", "--data-dir", str(dep.connector_dir), *connector_args],
            self._log("connector"),
            env=dep.env,
        )
        self.role_pids["connector"] = connector.pid
        self._run(
            [
                *(self.limen, "client", "login", "--api", dep.api_url, "--ca-file", str(ca_file)),
                *("--username", USERNAME, "--password-stdin"),
            ],
            dep.env,
            stdin=password + "\n",
        )
        self._wait_flow(dep.edge_port, ca_file.read_text(), dep.client_dir)
        if self.probe is not None:
            self.probe.stop()
            self.probe = None

    def _setup(self, target_port: int) -> int:
        dep = self._start_service()
        self.probe = ProbeEcho()
        password = secrets.token_urlsafe(18)
        enrollment = self._tenant(
            dep.api_url, dep.data, f"{target_port},{self.probe.port}", password
        )
        self._connect(dep, enrollment, password)
        listen_port = free_port()
        env = dep.env
        forward = self.procs.start(
            [
                *(self.limen, "client", "forward", f"{LOOPBACK}:{target_port}"),
                *("--listen", f"{LOOPBACK}:{listen_port}"),
            ],
            self._log("client"),
            env=env,
        )
        self.role_pids["client"] = forward.pid
        # Printed once the session to the edge is up and the local socket listens.
        self._wait_log(self._log("client"), "forwarding ", forward)
        return listen_port

    def teardown(self) -> None:
        """Stop the client, the connector and the service (SIGTERM, then SIGKILL)."""
        if self.probe is not None:
            self.probe.stop()
            self.probe = None
        # Reverse order: the client and connector first, so the service sees clean closes.
        self.procs.procs.reverse()
        self.procs.stop_all()
        self.role_pids.clear()

    def pids(self) -> Sequence[int]:
        """The three Limen hops: service (edge + API), connector, client."""
        return [p.pid for p in self.procs.procs]

    def hops(self) -> Mapping[str, int]:
        """``client`` (forward), ``edge`` (serve: edge + API), ``connector``: those running."""
        return {role: self.role_pids[role] for role in HOP_ROLES if role in self.role_pids}


def limen_asyncio(workdir: Path) -> LimenPath:
    """The Limen path with the standard asyncio loop in every process (the default is
    uvloop)."""
    return LimenPath(workdir, name="limen-asyncio", uvloop=False)
