"""The measuring half of the data-plane benchmarks: paths, workloads and process accounting.

A *path* is a way to get TCP bytes from a client on 127.0.0.1 to a target on 127.0.0.1:
directly, through socat, through ``ssh -L``, through stunnel, or through Limen. Every path is
measured the same way, by the same functions:

- :func:`iperf3_throughput`: one flow and eight parallel flows (``iperf3 -J``,
  ``end.sum_received``);
- :func:`new_flow_latencies`: sequential new flows, each connect → 1 byte out → 1 byte echoed →
  close, timed with :func:`time.perf_counter`;
- :func:`sustained_flow_rate`: the same flows back-to-back from several worker *processes*
  (so the Python load generator's GIL is not what gets measured) for a fixed duration;
- :func:`loaded_rtts`: 1-byte round trips on one open flow, idle and while bulk flows run
  through the same path (head-of-line blocking: does bulk traffic make a keystroke lag?);
- :class:`ProcessSampler`: peak resident memory and CPU time of the processes implementing a
  path (its :meth:`DataPath.pids` and their descendants).

Everything binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
# How long a freshly started helper (server, forwarder) gets to accept connections.
READY_TIMEOUT = 15.0


class BenchmarkError(RuntimeError):
    """A benchmark could not run (a tool failed, a path broke); the message says which."""


class DataPath(Protocol):
    """One way of carrying TCP flows from a loopback client to a loopback target.

    Lifecycle: :meth:`setup` once per target (it may be called again after :meth:`teardown`
    with another target port), the workloads connect to the returned port, then
    :meth:`teardown` stops everything the path started.
    """

    name: str
    """Short identifier used by ``--only`` and in the result tables."""

    def setup(self, target_port: int) -> int:
        """Make ``127.0.0.1:target_port`` reachable; return the port clients connect to."""
        ...

    def teardown(self) -> None:
        """Stop every process and close every socket :meth:`setup` started."""
        ...

    def pids(self) -> Sequence[int]:
        """Processes implementing the path (descendants are included automatically)."""
        ...


@runtime_checkable
class HopsPath(DataPath, Protocol):
    """A path that names its hops (optional: see :func:`path_hops` for the fallback)."""

    def hops(self) -> Mapping[str, int]:
        """Hop name -> root pid, in flow order; each hop is that pid's process tree.

        Every pid is one of :meth:`~DataPath.pids`; called after :meth:`~DataPath.setup`.
        """
        ...


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or str(pid)
    except OSError:
        return str(pid)  # exited: its pid is the only name left


def path_hops(path: DataPath) -> dict[str, int]:
    """Hop name -> root pid for a set-up ``path``, covering every root of ``pids()``.

    The path's own ``hops()`` names what it knows; any root it leaves out (or every root, for
    a path without ``hops()``) becomes a hop named by ``/proc/PID/comm`` (``comm/PID`` if that
    name is taken), so the hops always add up to the path's total.
    """
    roots = list(path.pids())
    named = dict(path.hops()) if isinstance(path, HopsPath) else {}
    strays = sorted(set(named.values()) - set(roots))
    if strays:
        raise BenchmarkError(f"{path.name}: hops name pids that are not its roots: {strays}")
    covered = set(named.values())
    for pid in roots:
        if pid in covered:
            continue
        name = _comm(pid)
        named[name if name not in named else f"{name}/{pid}"] = pid
        covered.add(pid)
    return named


@dataclass(frozen=True, slots=True)
class PathSpec:
    """A registered path: how to build it and what it needs."""

    name: str
    description: str
    factory: Callable[[Path], DataPath]
    """Builds the path given a private scratch directory (keys, configs, logs)."""
    tools: tuple[str, ...] = ()
    """Executables the path needs on PATH."""
    needs_root: bool = False
    baseline: bool = True
    """Baselines are what candidates (Limen) are compared against."""


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (the kernel's pick; a tiny race is acceptable here)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float = READY_TIMEOUT, proc: subprocess.Popen[Any] | None = None
) -> None:
    """Poll until ``127.0.0.1:port`` accepts; fail early if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.5).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise BenchmarkError(f"{proc.args!r} exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise BenchmarkError(f"port {port} not accepting after {timeout}s") from None
            time.sleep(0.05)


class Processes:
    """Helper processes started in their own sessions, all stopped by :meth:`stop_all`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], log_name: str, **kw: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` with stdout+stderr in ``workdir/log_name``."""
        log: IO[bytes] = (self.workdir / log_name).open("ab")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,
            )
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    def log_tail(self, log_name: str) -> str:
        """The end of a helper's log, for error messages."""
        path = self.workdir / log_name
        return path.read_text(errors="replace")[-1500:] if path.exists() else ""

    def stop_all(self) -> None:
        """SIGTERM each process group, then SIGKILL what is left after a grace period."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=3)
        self.procs.clear()


# ---------------------------------------------------------------------------------------------
# Targets: an iperf3 server and an echo server, both on loopback.


class Iperf3Server:
    """``iperf3 -s`` on a free loopback port (serves one test at a time)."""

    def __init__(self, procs: Processes) -> None:
        self.port = free_port()
        proc = procs.start(["iperf3", "-s", "-B", LOOPBACK, "-p", str(self.port)], "iperf3-s.log")
        wait_port(self.port, proc=proc)


def serve_echo() -> None:
    """Run an asyncio echo server on a free loopback port; print the port, serve forever.

    Runs in its own interpreter (see :class:`EchoServer`) so the measuring client never
    competes with it for the GIL.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass  # a client resetting its flow is normal under load
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, LOOPBACK, 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


class EchoServer:
    """:func:`serve_echo` in a child interpreter."""

    def __init__(self, procs: Processes) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        code = "from benchmarks.common import serve_echo; serve_echo()"
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=REPO_ROOT,
        )
        procs.procs.append(proc)
        assert proc.stdout is not None  # set by stdout=PIPE
        line = proc.stdout.readline()
        proc.stdout.close()  # the port is all it prints; an open pipe would leak a file
        if not line.strip().isdigit():
            raise BenchmarkError("echo server did not start")
        self.port = int(line)
        wait_port(self.port, proc=proc)


# ---------------------------------------------------------------------------------------------
# Workloads.


@dataclass(frozen=True, slots=True)
class Throughput:
    """One iperf3 run: receiver-side rate and bytes."""

    bits_per_second: float
    bytes: int


def _iperf3(argv: list[str], timeout: float) -> tuple[dict[str, Any] | None, str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return None, (proc.stdout[-300:] + proc.stderr[-300:]).strip()
    error = str(report.get("error", ""))
    if proc.returncode != 0 or error:
        return None, error or proc.stderr.strip()
    return report, ""


def iperf3_ready(port: int, attempts: int = 20) -> None:
    """Wait until a tiny iperf3 test through ``port`` succeeds end to end.

    A forwarder's own readiness probe (connect, close) reaches the iperf3 server, which takes
    it for a test's control connection and refuses or resets the next client until it has
    cleaned up; this bounded retry loop also warms the path up.
    """
    argv = ["iperf3", "-c", LOOPBACK, "-p", str(port), "-n", "64K", "-J"]
    last = ""
    for _ in range(attempts):
        report, last = _iperf3(argv, timeout=30)
        if report is not None:
            return
        time.sleep(0.25)
    raise BenchmarkError(f"iperf3 via port {port} never worked: {last}")


# What iperf3 clients print when its server is between two tests (see iperf3_throughput).
_BETWEEN_TESTS = ("busy", "Connection refused", "control socket has closed unexpectedly")


def iperf3_throughput(port: int, seconds: float, parallel: int = 1) -> Throughput:
    """Run ``iperf3 -c 127.0.0.1 -p port -t seconds -P parallel -J``; receiver-side figures.

    Retries (at most 4 times) only while the server is between tests: it says it is busy
    (still closing the previous test), or its listener refuses for a moment (iperf3 reopens
    it after a test). Through a forwarder that refusal reaches the client as its control
    connection closing at once, so that is retried too.
    """
    argv = ["iperf3", "-c", LOOPBACK, "-p", str(port), "-t", str(seconds), "-J"]
    argv += ["-P", str(parallel)]
    last = ""
    for _attempt in range(5):
        report, last = _iperf3(argv, timeout=seconds + 60)
        if report is not None:
            received = report["end"]["sum_received"]
            return Throughput(float(received["bits_per_second"]), int(received["bytes"]))
        if not any(sign in last for sign in _BETWEEN_TESTS):
            break
        time.sleep(0.5)
    raise BenchmarkError(f"iperf3 -P {parallel} via port {port} failed: {last}")


def _one_flow(port: int) -> None:
    with socket.create_connection((LOOPBACK, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise BenchmarkError(f"flow via port {port}: no echo")


def new_flow_latencies(port: int, samples: int, warmup: int = 5) -> list[float]:
    """Seconds per new flow (connect, 1 byte each way, close), ``samples`` sequential flows."""
    for _ in range(warmup):
        _one_flow(port)
    out: list[float] = []
    for _ in range(samples):
        t0 = time.perf_counter()
        _one_flow(port)
        out.append(time.perf_counter() - t0)
    return out


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) by linear interpolation between closest ranks."""
    if not values:
        raise ValueError("no values")
    if len(values) == 1:
        return values[0]
    qs = statistics.quantiles(values, n=100, method="inclusive")
    if p <= 0:
        return min(values)
    if p >= 100:
        return max(values)
    return qs[round(p) - 1]


def _flow_worker(port: int, start_at: float, duration: float) -> tuple[int, int, float]:
    # Runs in a child process: (completed flows, failed flows, seconds actually measured).
    while time.monotonic() < start_at:
        time.sleep(0.005)
    t0 = time.monotonic()
    end = t0 + duration
    ok = failed = 0
    while time.monotonic() < end:
        try:
            _one_flow(port)
            ok += 1
        except (OSError, BenchmarkError):
            failed += 1
    return ok, failed, time.monotonic() - t0


@dataclass(frozen=True, slots=True)
class FlowRate:
    """Sustained new flows per second and how many failed."""

    per_second: float
    completed: int
    failed: int


def sustained_flow_rate(port: int, duration: float, workers: int) -> FlowRate:
    """New flows per second from ``workers`` processes running flows back to back."""
    ctx = multiprocessing.get_context("spawn")
    # Workers start together once all are up (spawning takes a while); each reports its own
    # measured time, so a late starter does not skew the rate.
    start_at = time.monotonic() + 1.0 + 0.2 * workers
    with ctx.Pool(workers) as pool:
        results = pool.starmap(_flow_worker, [(port, start_at, duration)] * workers)
    rate = sum(ok / elapsed for ok, _, elapsed in results if elapsed > 0)
    return FlowRate(
        per_second=rate,
        completed=sum(r[0] for r in results),
        failed=sum(r[1] for r in results),
    )


# Interactive round trips under bulk load (head-of-line blocking in multiplexed paths).

BULK_CHUNK = 65536
# How long one blocking socket call in a bulk thread may wait before it rechecks the stop
# flag, and how long a round trip of the interactive flow may take before the path counts as
# stalled.
_BULK_POLL = 0.5
_RTT_TIMEOUT = 10.0
_JOIN_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class LoadedRtt:
    """Round trips of one interactive flow, idle and while bulk flows share the path."""

    idle: list[float]
    """Seconds per 1-byte round trip before any bulk flow starts."""
    busy: list[float]
    """Seconds per 1-byte round trip while the bulk flows run."""
    bulk_flows: int
    bulk_bytes_per_second: float
    """Bytes per second the bulk flows got back from the echo server while ``busy`` was
    measured (sum over the flows)."""


class _BulkFlow:
    """One bulk flow: a sender thread writing chunks flat out, a drainer counting echoes."""

    def __init__(self, port: int, index: int, stop: threading.Event) -> None:
        self.stop = stop
        self.received = 0  # written by the drainer only
        self.failure: str | None = None
        self.sock = socket.create_connection((LOOPBACK, port), timeout=READY_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(_BULK_POLL)
        self.threads = [
            threading.Thread(target=self._send, name=f"bulk-send-{index}", daemon=True),
            threading.Thread(target=self._drain, name=f"bulk-drain-{index}", daemon=True),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _fail(self, why: str) -> None:
        # After stop, a shut-down socket failing is how the threads are told to end.
        if not self.stop.is_set() and self.failure is None:
            self.failure = why

    def _send(self) -> None:
        chunk = b"b" * BULK_CHUNK
        while not self.stop.is_set():
            try:
                self.sock.sendall(chunk)
            except TimeoutError:
                continue  # the path pushes back; a partial chunk is fine for bulk bytes
            except OSError as exc:
                self._fail(f"send: {exc}")
                return

    def _drain(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as exc:
                self._fail(f"recv: {exc}")
                return
            if not data:
                self._fail("closed by the path")
                return
            self.received += len(data)

    def shut(self) -> None:
        """Wake both threads at once: a blocked send or recv fails on a shut-down socket."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


def _round_trips(sock: socket.socket, samples: int, pace: float) -> list[float]:
    out: list[float] = []
    for _ in range(samples):
        t0 = time.perf_counter()
        sock.sendall(b"p")
        if sock.recv(1) != b"p":
            raise BenchmarkError("interactive flow: no echo")
        out.append(time.perf_counter() - t0)
        time.sleep(pace)  # pacing, as keystrokes are: never a queue of pings behind pings
    return out


def loaded_rtts(
    port: int, bulk_flows: int, samples: int, pace: float = 0.01, settle: float = 1.0
) -> LoadedRtt:
    """1-byte round trips on one flow to the echo server, idle and under bulk load.

    Opens the interactive flow, takes ``samples`` round trips ``pace`` seconds apart, then
    opens ``bulk_flows`` more flows through the same path, each sending
    :data:`BULK_CHUNK`-byte chunks flat out while another thread drains the echoes. Once every
    bulk flow has had bytes echoed and ``settle`` seconds have passed, takes ``samples``
    round trips again and counts the bulk bytes echoed meanwhile. A bulk flow failing, or a
    round trip taking over 10 s, is a :class:`BenchmarkError`. On the way out every bulk
    socket is shut down and closed and every thread joined; a thread still running after
    that is an error too, so none lives on into the next path.
    """
    if bulk_flows < 1 or samples < 1:
        raise ValueError("bulk_flows and samples must be positive")
    stop = threading.Event()
    flows: list[_BulkFlow] = []
    with socket.create_connection((LOOPBACK, port), timeout=_RTT_TIMEOUT) as interactive:
        interactive.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            idle = _round_trips(interactive, samples, pace)
            for index in range(bulk_flows):
                flows.append(_BulkFlow(port, index, stop))
            for flow in flows:
                flow.start()
            deadline = time.monotonic() + READY_TIMEOUT
            while not all(flow.received for flow in flows):
                _raise_bulk_failure(flows)
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"bulk flows via port {port}: no echo in {READY_TIMEOUT}s")
                time.sleep(0.01)
            time.sleep(settle)  # let the bulk flows fill the path's buffers: steady state
            before = sum(flow.received for flow in flows)
            t0 = time.monotonic()
            busy = _round_trips(interactive, samples, pace)
            elapsed = time.monotonic() - t0
            echoed = sum(flow.received for flow in flows) - before
            _raise_bulk_failure(flows)
        finally:
            stop.set()
            for flow in flows:
                flow.shut()
            join_by = time.monotonic() + _JOIN_TIMEOUT
            for flow in flows:
                for thread in flow.threads:
                    if thread.ident is not None:
                        thread.join(max(0.0, join_by - time.monotonic()))
                flow.sock.close()
    stuck = [t.name for flow in flows for t in flow.threads if t.is_alive()]
    if stuck:
        raise BenchmarkError(f"bulk threads did not stop: {', '.join(stuck)}")
    return LoadedRtt(idle, busy, bulk_flows, echoed / elapsed)


def _raise_bulk_failure(flows: Sequence[_BulkFlow]) -> None:
    failed = [f"flow {i}: {flow.failure}" for i, flow in enumerate(flows) if flow.failure]
    if failed:
        raise BenchmarkError(f"bulk flow failed under load: {'; '.join(failed)}")


# ---------------------------------------------------------------------------------------------
# Accounting of the processes implementing a path.

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited while we looked
        # Field 4 (ppid) follows the parenthesised command name, which may contain spaces.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(roots: Sequence[int]) -> list[int]:
    """``roots`` and all their live descendants."""
    return [pid for tree in process_trees(roots).values() for pid in tree]


def process_trees(roots: Sequence[int]) -> dict[int, list[int]]:
    """Each root with its live descendants (one read of ``/proc``); a process reachable from
    two roots belongs to the first."""
    children = _children_map()
    seen: set[int] = set()
    out: dict[int, list[int]] = {}
    for root in roots:
        tree = out.setdefault(root, [])
        todo = [root]
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            tree.append(pid)
            todo.extend(children.get(pid, ()))
    return out


def _cpu_seconds(pid: int) -> float:
    # utime + stime + cutime + cstime: a reaped child's time is in its parent's c* fields and
    # a live child is counted on its own, so summing over the live tree counts each tick once.
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / _CLK_TCK


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass  # exited: contributes nothing
    return 0


class ProcessSampler:
    """Peak total RSS and CPU time of a path's process trees while a workload runs.

    A background thread samples the trees every ``interval`` seconds; :meth:`stop` returns
    (peak RSS bytes, CPU seconds consumed since :meth:`start`), and :attr:`cpu_by_root` then
    holds those CPU seconds per root (its tree), which add up to the total.
    """

    def __init__(self, roots: Sequence[int], interval: float = 0.1) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.peak_rss = 0
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        trees = process_trees(self.roots)
        self.peak_rss = max(
            self.peak_rss, sum(_rss_bytes(p) for tree in trees.values() for p in tree)
        )
        self._cpu_last = {root: sum(_cpu_seconds(p) for p in tree) for root, tree in trees.items()}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> ProcessSampler:
        """Take the first sample and start sampling in the background."""
        self._sample()
        self._cpu_start = dict(self._cpu_last)
        self._thread.start()
        return self

    @property
    def cpu_by_root(self) -> dict[int, float]:
        """CPU seconds per root's tree between :meth:`start` and the latest sample.

        Clamped at 0 per root: a root that exited reads as 0, and must not cancel another
        root's time.
        """
        return {
            root: max(0.0, self._cpu_last.get(root, 0.0) - self._cpu_start.get(root, 0.0))
            for root in self.roots
        }

    def stop(self) -> tuple[int, float]:
        """Stop sampling; return (peak RSS bytes, CPU seconds used meanwhile, all roots)."""
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.peak_rss, sum(self.cpu_by_root.values())


def have_tools(tools: Sequence[str]) -> list[str]:
    """The tools of ``tools`` missing from PATH."""
    return [t for t in tools if shutil.which(t) is None]
