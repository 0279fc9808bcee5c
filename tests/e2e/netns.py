"""A small network-namespace test topology for Limen's end-to-end tests.

Four hosts, each its own network namespace, joined by veth pairs::

    laptop 198.18.1.2 ── .1.1 edge .2.1 ── .2.2 branch .3.1 ── .3.10 lan   (198.18.x.y/24)

- ``laptop`` is the user's device, ``edge`` runs the Limen service, ``branch`` is the
  connector's host (it dials the edge outbound) and ``lan`` is the private network with the
  servers. ``laptop`` and ``branch`` route everything via the edge, ``lan`` via the branch.
- Neither the edge nor the branch forwards packets (``ip_forward=0``): the laptop can reach
  only edge addresses, and only the branch can reach the LAN. So any laptop→LAN traffic that
  succeeds went through Limen.
- Addresses come from the benchmarking range 198.18.0.0/15 (RFC 2544) only: never the
  RFC 1918 ranges, which this workplace's monitoring flags.

Names are unique per run (``lm<pid><n>-<role>``) and everything is torn down on
:meth:`Topology.destroy`, on leaving the context manager and, as a backstop, at interpreter
exit: every process started in the namespaces is killed, then the namespaces are deleted.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

# How long a process gets to exit after SIGTERM before it is SIGKILLed at teardown.
_TERM_GRACE = 3.0
_ETC_NETNS = Path("/etc/netns")
_counter = itertools.count()
_live: set[Topology] = set()
_live_lock = threading.Lock()


def require_root_and_tools(*tools: str) -> None:
    """Skip the calling test unless running as root with every tool on PATH.

    In CI (``CI=true``) nothing may be skipped for a missing prerequisite: the test fails
    instead, so a broken CI image cannot pass silently.
    """
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("not running as root")
    missing = [t for t in ("ip", *tools) if shutil.which(t) is None]
    if missing:
        problems.append(f"missing tools: {', '.join(missing)}")
    if not problems:
        return
    reason = "e2e prerequisites: " + "; ".join(problems)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " (CI=true: run scripts/install.sh as root)", pytrace=False)
    pytest.skip(reason)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=15)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete namespaces left by earlier runs whose process died without tearing down.

    Only names this module creates (``lm<pid><n>-<role>``) with a dead owner pid are touched.
    Returns the deleted names.
    """
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=15)
    removed: list[str] = []
    for line in out.stdout.splitlines():
        name = line.split(" ", 1)[0]
        m = re.fullmatch(r"lm(\d+)_\d+-(laptop|edge|branch|lan)", name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        _kill_ns_pids(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=15)
        shutil.rmtree(_ETC_NETNS / name, ignore_errors=True)
        removed.append(name)
    return removed


def _kill_ns_pids(ns: str) -> None:
    """SIGKILL whatever still runs in namespace ``ns`` (daemons that forked, stray clients)."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=15)
    for tok in out.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(tok), signal.SIGKILL)


@dataclass(eq=False)
class Host:
    """One namespace of the topology: the place to run commands and start servers."""

    name: str
    """Role in the topology: ``laptop``, ``edge``, ``branch`` or ``lan``."""
    ns: str
    """The network namespace name (unique per run)."""
    addr: str
    """Primary IPv4 address (the one its peers normally use)."""
    addrs: list[str] = field(default_factory=list)
    """Every IPv4 address of the host, primary first."""
    procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)
    cleanups: list[Callable[[], None]] = field(default_factory=list, repr=False)
    """Called (last added first) at teardown, after the processes are gone."""

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace to completion, capturing text output.

        With ``check`` a non-zero exit raises :class:`subprocess.CalledProcessError` whose
        message includes stderr, so failing tests say why.
        """
        proc = subprocess.run(
            self.argv(argv), capture_output=True, text=True, timeout=timeout, input=input
        )
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(
                proc.returncode,
                list(argv),
                output=proc.stdout,
                stderr=f"[{self.name}] {proc.stderr}",
            )
        return proc

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the namespace; it is killed when the topology is destroyed.

        Pass ``start_new_session=True`` for daemons that signal their own process group, so
        teardown can kill the whole group without touching the test runner.
        """
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(argv), **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any]) -> None:
        """Terminate one process started with :meth:`popen` (SIGTERM, then SIGKILL)."""
        _terminate(proc)
        if proc in self.procs:
            self.procs.remove(proc)

    def wait_port(self, addr: str, port: int, timeout: float = 10.0) -> None:
        """Wait until a TCP connect from this host to ``addr:port`` succeeds.

        A bounded readiness poll run by one interpreter inside the namespace; raises
        :class:`TimeoutError` when the port is not accepting within ``timeout`` seconds.
        """
        script = (
            "import socket, sys, time\n"
            "addr, port, deadline = sys.argv[1], int(sys.argv[2]), "
            "time.monotonic() + float(sys.argv[3])\n"
            "while True:\n"
            "    try:\n"
            "        socket.create_connection((addr, port), timeout=0.5).close()\n"
            "        sys.exit(0)\n"
            "    except OSError:\n"
            "        if time.monotonic() > deadline:\n"
            "            sys.exit(1)\n"
            "        time.sleep(0.05)\n"
        )
        proc = self.run(
            [sys.executable, "-c", script, addr, str(port), str(timeout)],
            check=False,
            timeout=timeout + 15,
        )
        if proc.returncode != 0:
            raise TimeoutError(f"{self.name}: {addr}:{port} not accepting after {timeout}s")

    def tempdir(self, purpose: str) -> Path:
        """A fresh private directory for this host's files, removed at teardown."""
        path = Path(tempfile.mkdtemp(prefix=f"{self.ns}-{purpose}-"))
        self.cleanups.append(lambda: shutil.rmtree(path, ignore_errors=True))
        return path

    def set_resolv_conf(self, content: str) -> Path:
        """Give commands run in this namespace their own ``/etc/resolv.conf``.

        ``ip netns exec`` bind-mounts ``/etc/netns/<ns>/resolv.conf`` over ``/etc/resolv.conf``
        when that file exists; the directory is removed at teardown.
        """
        d = _ETC_NETNS / self.ns
        d.mkdir(parents=True, exist_ok=True)
        path = d / "resolv.conf"
        path.write_text(content)
        return path

    def stop_processes(self) -> None:
        """Terminate every tracked process, SIGKILL whatever remains, then run the cleanups."""
        for proc in self.procs:
            _terminate(proc)
            # A test that failed midway never read or closed its pipes.
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        self.procs.clear()
        _kill_ns_pids(self.ns)
        while self.cleanups:
            self.cleanups.pop()()


def _terminate(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return

    def signal_it(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # A process started with start_new_session leads its own group: signal the group
            # so its children go too; never signal our own group.
            if os.getpgid(proc.pid) == proc.pid != os.getpgrp():
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    signal_it(signal.SIGTERM)
    try:
        proc.wait(timeout=_TERM_GRACE)
    except subprocess.TimeoutExpired:
        signal_it(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_TERM_GRACE)


# (name, veth name on the left side, left address, right host, veth name on the right, right
# address): one row per link; the veth names live inside the namespaces, so they need not be
# unique across runs.
_LINKS = (
    ("laptop", "to-edge", "198.18.1.2", "edge", "to-laptop", "198.18.1.1"),
    ("branch", "to-edge", "198.18.2.2", "edge", "to-branch", "198.18.2.1"),
    ("lan", "to-branch", "198.18.3.10", "branch", "to-lan", "198.18.3.1"),
)
_DEFAULT_ROUTES = {"laptop": "198.18.1.1", "branch": "198.18.2.1", "lan": "198.18.3.1"}
_PRIMARY = {
    "laptop": "198.18.1.2",
    "edge": "198.18.1.1",
    "branch": "198.18.2.2",
    "lan": "198.18.3.10",
}


class Topology:
    """The laptop / edge / branch / LAN namespaces. Use :meth:`create` or ``with Topology():``."""

    def __init__(self) -> None:
        self.prefix = f"lm{os.getpid()}_{next(_counter)}"
        self.hosts: dict[str, Host] = {}
        for role in ("laptop", "edge", "branch", "lan"):
            self.hosts[role] = Host(name=role, ns=f"{self.prefix}-{role}", addr=_PRIMARY[role])
        self._created: list[str] = []

    @property
    def laptop(self) -> Host:
        """The user's device: reaches only edge addresses."""
        return self.hosts["laptop"]

    @property
    def edge(self) -> Host:
        """The Limen service: reachable by laptop and branch, cannot reach the LAN."""
        return self.hosts["edge"]

    @property
    def branch(self) -> Host:
        """The connector's host: reaches the edge outbound and the LAN."""
        return self.hosts["branch"]

    @property
    def lan(self) -> Host:
        """The private network with the servers: reachable from the branch only."""
        return self.hosts["lan"]

    @classmethod
    def create(cls) -> Topology:
        """Build a fresh topology; on any error, whatever was built is torn down."""
        topo = cls()
        with _live_lock:
            _live.add(topo)
        try:
            topo._build()
        except BaseException:
            topo.destroy()
            raise
        return topo

    def _build(self) -> None:
        cleanup_stale()
        for host in self.hosts.values():
            _ip("netns", "add", host.ns)
            self._created.append(host.ns)
            _ip("-n", host.ns, "link", "set", "lo", "up")
        for left, lname, laddr, right, rname, raddr in _LINKS:
            lh, rh = self.hosts[left], self.hosts[right]
            # Created directly inside both namespaces: the root namespace never sees the names.
            _ip("link", "add", lname, "netns", lh.ns, "type", "veth", "peer", rname, "netns", rh.ns)
            for h, ifname, addr in ((lh, lname, laddr), (rh, rname, raddr)):
                _ip("-n", h.ns, "addr", "add", f"{addr}/24", "dev", ifname)
                _ip("-n", h.ns, "link", "set", ifname, "up")
                if addr not in h.addrs:
                    h.addrs.append(addr)
        for role, gw in _DEFAULT_ROUTES.items():
            _ip("-n", self.hosts[role].ns, "route", "add", "default", "via", gw)
        for host in self.hosts.values():
            # Explicit, whatever the kernel's default for new namespaces: no host forwards, so
            # the only way from laptop to LAN is a Limen tunnel.
            host.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
            host.addrs.sort(key=lambda a: a != host.addr)

    def destroy(self) -> None:
        """Kill every process in the namespaces and delete them. Safe to call twice."""
        errors: list[str] = []
        for host in self.hosts.values():
            try:
                if host.ns in self._created:
                    host.stop_processes()
                else:
                    for proc in host.procs:
                        _terminate(proc)
            except Exception as exc:  # keep tearing down the rest; report at the end
                errors.append(f"{host.ns}: {exc}")
        for ns in self._created:
            # ip netns del fails while a process still holds the namespace; retry briefly.
            for _ in range(20):
                res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=15)
                if res.returncode == 0 or not Path(f"/run/netns/{ns}").exists():
                    break
                _kill_ns_pids(ns)
                time.sleep(0.05)
            else:
                errors.append(f"{ns}: could not delete namespace")
            shutil.rmtree(_ETC_NETNS / ns, ignore_errors=True)
        self._created.clear()
        with _live_lock:
            _live.discard(self)
        if errors:
            raise RuntimeError("topology teardown: " + "; ".join(errors))

    def namespaces(self) -> list[str]:
        """Names of the namespaces currently created by this topology."""
        return list(self._created)

    def __enter__(self) -> Topology:
        if not self._created:
            with _live_lock:
                _live.add(self)
            try:
                self._build()
            except BaseException:
                self.destroy()
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())


@atexit.register
def _destroy_leftovers() -> None:
    # Backstop for a test runner that dies between create() and its teardown.
    with _live_lock:
        leftovers = list(_live)
    for topo in leftovers:
        with contextlib.suppress(Exception):
            topo.destroy()
