"""``python -m benchmarks.idle_flows``: memory per idle flow at the edge (issue 8, item 1).

Everything runs on 127.0.0.1 as real processes, set up exactly like the Limen path of the
suite (:class:`benchmarks.limen_path.LimenPath`): ``limen serve`` (identity, admin API and
edge in one process), a tenant built through the admin REST API, ``limen connector run`` and
``limen client login --password-stdin`` (the password grant). The target is a *sink* in its
own interpreter: it accepts connections, reads whatever arrives and never closes one.

This process then signs in with the saved client state (an :class:`EdgeSession`, the same
multiplexed client the ``limen client`` commands use) and opens ``--flows`` flows (10,000 by
default) to the sink, each sending a few bytes and then kept open, idle. Measured:

- the edge process's memory (``VmRSS`` from ``/proc/PID/status``; PSS and USS =
  Private_Clean + Private_Dirty from ``/proc/PID/smaps_rollup``) before opening, once every
  flow has delivered its bytes to the sink, and after every flow is closed again; the
  figure is (after opening - before) / flows, in KiB per flow (issue 8's bar: <= 64 KiB);
- the same for the connector (one socket to the sink per flow) and for this process (the
  client side: streams over two TLS connections);
- the time to open every flow (wall clock, ``--concurrency`` opens in flight) and the open
  latency p50/p99 under that load.

Every idle flow costs a socket at the connector and at the sink, so this process raises its
``RLIMIT_NOFILE`` (as root also the hard limit) before starting anything: the Limen processes
and the sink inherit it.

Results: a table, and JSON (``benchmarks/results/idle_flows.json``; ``--json`` to change).
The exit status is 1 when the run failed (the message says why).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from limen.client.profile import StateFile
from limen.client.tunnel import EdgeSession
from limen.net.mux import MuxStream

from .common import LOOPBACK, REPO_ROOT, BenchmarkError, wait_port
from .limen_path import LimenPath

#: Issue 8's bar: edge memory per idle flow with 10,000 open flows.
BAR_KIB_PER_FLOW = 64.0
PAYLOAD = b"hello idle"
# Bounds for the polling loops below (the whole run, not one flow).
DELIVERY_TIMEOUT = 120.0
# After the last byte arrives the edge may still be finishing per-flow work (traffic log,
# metrics): memory is read after this pause, and again until two readings agree.
SETTLE_SECONDS = 1.0


# ---------------------------------------------------------------------------------------------
# The sink: accepts, reads, never closes (its own interpreter, so it never takes this
# process's GIL). Counters are answered on stdout, one line per line read on stdin.


def serve_sink() -> None:
    """Run the sink on a free loopback port; print the port, then answer each stdin line
    with ``open accepted bytes``; exit when stdin closes (the benchmark is gone)."""
    counts = [0, 0, 0]  # open, accepted, bytes received

    class Sink(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            counts[0] += 1
            counts[1] += 1

        def data_received(self, data: bytes) -> None:
            counts[2] += len(data)

        def connection_lost(self, exc: Exception | None) -> None:
            counts[0] -= 1

    def answer() -> None:
        for _ in sys.stdin:
            print(f"{counts[0]} {counts[1]} {counts[2]}", flush=True)
        # The benchmark closed our stdin (or died): nothing else will stop this process.
        os._exit(0)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Sink, LOOPBACK, 0, backlog=4096)
        print(server.sockets[0].getsockname()[1], flush=True)
        threading.Thread(target=answer, name="sink-control", daemon=True).start()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class SinkProcess:
    """:func:`serve_sink` in a child interpreter, with its counters on request."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "src")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from benchmarks.idle_flows import serve_sink; serve_sink()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            env=env,
            cwd=REPO_ROOT,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None  # PIPEs
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise BenchmarkError("the sink did not start")
        self.port = int(line)
        wait_port(self.port, proc=self.proc)

    def counts(self) -> tuple[int, int, int]:
        """(open connections, connections accepted, bytes received) right now."""
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        fields = self.proc.stdout.readline().split()
        if len(fields) != 3:
            raise BenchmarkError("the sink stopped answering")
        return int(fields[0]), int(fields[1]), int(fields[2])

    def stop(self) -> None:
        """Close its stdin (it exits), then make sure it is gone."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


# ---------------------------------------------------------------------------------------------
# Memory of one process.


@dataclass(frozen=True, slots=True)
class Memory:
    """One reading of a process's memory (KiB) and open file descriptors."""

    rss_kib: int
    pss_kib: int
    uss_kib: int
    fds: int

    def minus(self, other: Memory) -> Memory:
        """The difference (self - other), field by field."""
        return Memory(
            self.rss_kib - other.rss_kib,
            self.pss_kib - other.pss_kib,
            self.uss_kib - other.uss_kib,
            self.fds - other.fds,
        )


def _kib_fields(path: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            found[name.strip()] = int(parts[0])
    return found


def read_memory(pid: int) -> Memory:
    """``VmRSS``, PSS and USS (Private_Clean + Private_Dirty) of ``pid``, and its fd count."""
    proc = Path(f"/proc/{pid}")
    try:
        status = _kib_fields(proc / "status")
        rollup = _kib_fields(proc / "smaps_rollup")
        fds = len(os.listdir(proc / "fd"))
    except OSError as exc:
        raise BenchmarkError(f"cannot read the memory of process {pid}: {exc}") from exc
    uss = rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)
    return Memory(status["VmRSS"], rollup.get("Pss", 0), uss, fds)


def settled_memory(pid: int) -> Memory:
    """A reading after :data:`SETTLE_SECONDS`, repeated (bounded) until RSS stops moving."""
    time.sleep(SETTLE_SECONDS)
    last = read_memory(pid)
    for _ in range(10):
        time.sleep(0.5)
        now = read_memory(pid)
        if abs(now.rss_kib - last.rss_kib) <= 256:
            return now
        last = now
    return last


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit (inherited by everything it starts); the new
    soft limit. As root the hard limit is raised too; otherwise up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------------------------------------
# The flows.


class _Idle:
    """A stream receiver that keeps whatever arrives (nothing should: the sink never
    writes) and notes when the far side ends the flow."""

    __slots__ = ("ended",)

    def __init__(self) -> None:
        self.ended = False

    def on_data(self, data: Any) -> None:
        pass  # the sink never answers

    def on_eof(self) -> None:
        self.ended = True

    def on_closed(self, error: BaseException | None) -> None:
        self.ended = True

    def on_drained(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class OpenTimes:
    """How long opening the flows took."""

    seconds: float
    """First open started → last open answered by the edge."""
    delivered_seconds: float
    """First open started → the sink holds every flow and every byte."""
    p50_ms: float
    p99_ms: float


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def open_flows(
    session: EdgeSession, sink: SinkProcess, flows: int, concurrency: int
) -> tuple[list[MuxStream], OpenTimes]:
    """Open ``flows`` flows to the sink, ``concurrency`` at a time; each sends
    :data:`PAYLOAD` and stays open. Returns once the sink holds them all."""
    streams: list[MuxStream] = []
    latencies: list[float] = []
    remaining = flows
    _, accepted0, bytes0 = sink.counts()

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            stream, _ = await session.open("tcp", LOOPBACK, sink.port)
            latencies.append(time.perf_counter() - started)
            stream.attach(_Idle())
            stream.write(PAYLOAD)
            streams.append(stream)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, flows))))
    opened = time.perf_counter() - started
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while True:
        _, accepted, received = sink.counts()
        if accepted - accepted0 >= flows and received - bytes0 >= flows * len(PAYLOAD):
            break
        if time.monotonic() > deadline:
            raise BenchmarkError(
                f"after {DELIVERY_TIMEOUT:.0f} s the sink holds {accepted - accepted0} of "
                f"{flows} flows and {received - bytes0} of {flows * len(PAYLOAD)} bytes"
            )
        await asyncio.sleep(0.02)
    delivered = time.perf_counter() - started
    times = OpenTimes(
        seconds=opened,
        delivered_seconds=delivered,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=_quantile(latencies, 0.99) * 1000,
    )
    return streams, times


async def close_flows(session: EdgeSession, sink: SinkProcess, streams: list[MuxStream]) -> float:
    """Close every flow (FIN); wait until the sink and this session hold none. Seconds."""
    started = time.perf_counter()
    for stream in streams:
        stream.close()
    streams.clear()
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while True:
        open_at_sink = sink.counts()[0]
        # The control stream of each connection stays open: only flows must be gone.
        live = sum(max(0, len(c.streams) - 1) for c in session.conns)
        if open_at_sink == 0 and live == 0:
            return time.perf_counter() - started
        if time.monotonic() > deadline:
            raise BenchmarkError(
                f"after {DELIVERY_TIMEOUT:.0f} s of closing, the sink still holds "
                f"{open_at_sink} flows and the session {live} streams"
            )
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# The run.


def _pid_of(path: LimenPath, word: str) -> int:
    for proc in path.procs.procs:
        args = proc.args if isinstance(proc.args, list) else [str(proc.args)]
        if word in [str(a) for a in args]:
            return proc.pid
    raise BenchmarkError(f"no {word!r} process among the Limen processes")


def _per_flow(after: Memory, before: Memory, flows: int) -> dict[str, float]:
    delta = after.minus(before)
    return {
        "rss_kib": round(delta.rss_kib / flows, 2),
        "pss_kib": round(delta.pss_kib / flows, 2),
        "uss_kib": round(delta.uss_kib / flows, 2),
        "fds": round(delta.fds / flows, 3),
    }


async def _measure(
    state_dir: Path, sink: SinkProcess, pids: dict[str, int], flows: int, concurrency: int
) -> dict[str, Any]:
    state_file = StateFile(state_dir)
    session = EdgeSession(state_file.require(), state_file=state_file)
    try:
        await session.warm_up()
        # Warm-up flows: lazy imports, first-flow caches and pools are paid before "before".
        warm, _ = await open_flows(session, sink, min(200, flows), concurrency)
        await close_flows(session, sink, warm)
        before = {role: settled_memory(pid) for role, pid in pids.items()}
        streams, times = await open_flows(session, sink, flows, concurrency)
        after_open = {role: settled_memory(pid) for role, pid in pids.items()}
        ended = sum(1 for s in streams if isinstance(s.receiver, _Idle) and s.receiver.ended)
        close_seconds = await close_flows(session, sink, streams)
        after_close = {role: settled_memory(pid) for role, pid in pids.items()}
        # A second round of the same flows: memory that grows again would be a leak; memory
        # that was kept after closing and is reused is the allocator's (pymalloc arenas).
        streams, _ = await open_flows(session, sink, flows, concurrency)
        after_reopen = {role: settled_memory(pid) for role, pid in pids.items()}
        await close_flows(session, sink, streams)
    finally:
        await session.close()
    processes: dict[str, Any] = {}
    for role in pids:
        processes[role] = {
            "before": asdict(before[role]),
            "after_open": asdict(after_open[role]),
            "after_close": asdict(after_close[role]),
            "per_flow": _per_flow(after_open[role], before[role], flows),
            "after_reopen": asdict(after_reopen[role]),
            "retained_after_close_kib": after_close[role].rss_kib - before[role].rss_kib,
            "growth_on_reopen_kib": after_reopen[role].rss_kib - after_open[role].rss_kib,
        }
    edge_per_flow = processes["edge"]["per_flow"]["rss_kib"]
    return {
        "processes": processes,
        "open": {
            **asdict(times),
            "flows_per_second": round(flows / times.seconds, 1),
            "close_seconds": close_seconds,
            "ended_early": ended,
        },
        "bar": {
            "edge_kib_per_flow_max": BAR_KIB_PER_FLOW,
            "edge_rss_kib_per_flow": edge_per_flow,
            "met": edge_per_flow <= BAR_KIB_PER_FLOW,
        },
    }


def run(flows: int, concurrency: int, uvloop: bool | None, keep: bool) -> dict[str, Any]:
    """Set up Limen and the sink, measure, tear everything down; the results."""
    nofile = raise_nofile(max(65536, 2 * flows + 4096))
    if nofile < flows + 1024:
        raise BenchmarkError(
            f"the open-file limit is {nofile}; {flows} flows need more (run as root, or "
            "raise the hard limit: ulimit -Hn)"
        )
    workdir = Path(tempfile.mkdtemp(prefix="limen-idle-flows-"))
    sink = SinkProcess()
    path = LimenPath(workdir, uvloop=uvloop)
    try:
        path.setup(sink.port)
        pids = {
            "edge": _pid_of(path, "serve"),
            "connector": _pid_of(path, "connector"),
            "client": os.getpid(),
        }
        # ``limen client forward`` (started by the shared setup) stays idle: no flow uses it.
        state_dir = workdir / f"run{path._round}" / "client"
        results = asyncio.run(_measure(state_dir, sink, pids, flows, concurrency))
        results["nofile_limit"] = nofile
        return results
    finally:
        path.teardown()
        sink.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _table(report: dict[str, Any]) -> str:
    flows = report["meta"]["flows"]
    res = report["results"]
    lines = [
        f"{flows:,} idle flows through one edge (KiB per flow = (after open - before) / flows;",
        "reopen +MB: RSS with the same flows opened again after closing, minus the first time)",
        "",
        f"{'process':<10} {'RSS before MB':>13} {'RSS open MB':>12} {'RSS closed MB':>13} "
        f"{'RSS KiB/flow':>12} {'PSS KiB/flow':>12} {'USS KiB/flow':>12} {'fds/flow':>8} "
        f"{'reopen +MB':>10}",
    ]
    for role, p in res["processes"].items():
        per = p["per_flow"]
        lines.append(
            f"{role:<10} {p['before']['rss_kib'] / 1024:>13.1f} "
            f"{p['after_open']['rss_kib'] / 1024:>12.1f} "
            f"{p['after_close']['rss_kib'] / 1024:>13.1f} {per['rss_kib']:>12.1f} "
            f"{per['pss_kib']:>12.1f} {per['uss_kib']:>12.1f} {per['fds']:>8.2f} "
            f"{p['growth_on_reopen_kib'] / 1024:>10.1f}"
        )
    o = res["open"]
    bar = res["bar"]
    lines += [
        "",
        f"open {flows:,} flows: {o['seconds']:.2f} s ({o['flows_per_second']:.0f}/s, "
        f"{report['meta']['concurrency']} in flight; p50 {o['p50_ms']:.2f} ms, "
        f"p99 {o['p99_ms']:.2f} ms); all delivered at the sink after "
        f"{o['delivered_seconds']:.2f} s; closing all took {o['close_seconds']:.2f} s",
        f"bar: edge <= {bar['edge_kib_per_flow_max']:.0f} KiB per flow: "
        f"{bar['edge_rss_kib_per_flow']:.1f} KiB -> {'met' if bar['met'] else 'NOT met'}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run, print the table, write the JSON; the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.idle_flows",
        description="Memory per idle flow at the edge (issue 8).",
    )
    parser.add_argument("--flows", type=int, default=None, help="flows to hold (10,000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 500 flows")
    parser.add_argument("--concurrency", type=int, default=64, help="opens in flight at once (64)")
    parser.add_argument(
        "--uvloop",
        choices=("default", "on", "off"),
        default="default",
        help="event loop of the Limen processes (default: as shipped)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=REPO_ROOT / "benchmarks" / "results" / "idle_flows.json",
        help="where to write the results (default: benchmarks/results/idle_flows.json)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    flows = args.flows if args.flows is not None else (500 if args.quick else 10_000)
    if flows < 1 or args.concurrency < 1:
        parser.error("--flows and --concurrency must be positive")
    uvloop = {"default": None, "on": True, "off": False}[args.uvloop]
    try:
        results = run(flows, args.concurrency, uvloop, args.keep)
    except BenchmarkError as exc:
        print(f"idle-flows benchmark failed: {exc}", file=sys.stderr)
        return 1
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "flows": flows,
            "concurrency": args.concurrency,
            "payload_bytes": len(PAYLOAD),
            "uvloop": args.uvloop,
            "quick": args.quick,
        },
        "results": results,
    }
    print(_table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
