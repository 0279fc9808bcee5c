"""Revocation latency: how long from a revocation signal to the last live flow of the victim
being closed, with many other users' flows on the same edge, and what the cut costs them.

``.venv/bin/python -m benchmarks.revocation_bench`` (defaults: 1,000 victim flows, 10,000
flows of 10 other users, 20 runs). One process holds the service (API, edge, traffic log)
and the clients — every flow is a yamux stream over a few TLS connections, as real clients
do — while ``limen connector run`` and the target echo server run in child processes.

Each run: the victim signs in and opens its flows; a bulk flow of another user streams
through the edge all along; the admin API revokes the victim's sessions
(``POST /users/{id}/revoke-sessions``); the clock stops when the client has seen every victim
stream end. Figures per run:

- ``publish_ms``: from ``SUBJECT_REVOKED`` being published (the signal accepted and
  committed; a bus subscriber notes the instant) to the last victim stream closed;
- ``call_ms``: from the API call being made to the last victim stream closed;
- ``bulk_before`` / ``bulk_during``: the other user's bulk throughput (MB/s echoed back; it
  offers ``--bulk-mbps``, default 20) in the second before the call, and from the call to
  the last close.

p50/p99 over the runs are printed and written as JSON (``--json``, default
``benchmarks/results/revocation.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import EchoServer, Processes, percentile
from benchmarks.limen_path import limen_executable
from limen.bus.inprocess import SUBJECT_REVOKED, BusEvent
from limen.client.tunnel import EdgeSession
from limen.connector.agent import enroll
from limen.net.mux import MuxStream
from tests.support import Tenant, running_tenant

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "revocation.json"
#: Flows opened at once while setting up (more only queues at the connector's dials).
OPEN_CONCURRENCY = 64
#: Bulk-flow chunk: small enough to interleave with the cut, large enough to stream.
CHUNK = bytes(64 * 1024)
#: The bulk flow writes what it owes every this many seconds.
BULK_TICK = 0.005


@dataclass(frozen=True, slots=True)
class Params:
    victim_flows: int = 1000
    other_flows: int = 10_000
    other_users: int = 10
    runs: int = 20
    connections: int = 4
    #: The other user's bulk flow's offered rate (bytes/s).
    bulk_rate: float = 20e6


DEFAULTS = Params()


@dataclass
class RunResult:
    publish_ms: float
    call_ms: float
    return_ms: float
    victim_closed: int
    bulk_before_mbps: float
    bulk_during_mbps: float


@dataclass
class Report:
    params: Params
    runs: list[RunResult] = field(default_factory=list)
    others_cut: int = 0
    setup_seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        def stats(values: Sequence[float]) -> dict[str, float]:
            return {
                "p50": percentile(values, 50),
                "p99": percentile(values, 99),
                "max": max(values),
                "mean": statistics.fmean(values),
            }

        return {
            "publish_ms": stats([r.publish_ms for r in self.runs]),
            "call_ms": stats([r.call_ms for r in self.runs]),
            "bulk_before_mbps": stats([r.bulk_before_mbps for r in self.runs]),
            "bulk_during_mbps": stats([r.bulk_during_mbps for r in self.runs]),
        }


class _Watch:
    """Client-side receiver of one flow: notes when the stream ends."""

    __slots__ = ("closed", "on_close")

    def __init__(self, on_close: Any) -> None:
        self.closed = False
        self.on_close = on_close

    def on_data(self, data: Any) -> None:
        pass

    def on_eof(self) -> None:
        self._end()

    def on_closed(self, error: BaseException | None) -> None:
        self._end()

    def on_drained(self) -> None:
        pass

    def _end(self) -> None:
        if not self.closed:
            self.closed = True
            self.on_close()


class FlowSet:
    """Many live flows of one group of users, and when the last of them ended."""

    def __init__(self) -> None:
        self.open = 0
        self.closed = 0
        self.last_closed = 0.0
        self.all_closed = asyncio.Event()

    def _closed(self) -> None:
        self.closed += 1
        self.last_closed = time.perf_counter()
        if self.closed >= self.open:
            self.all_closed.set()

    async def add(self, session: EdgeSession, port: int, n: int) -> None:
        limit = asyncio.Semaphore(OPEN_CONCURRENCY)

        async def one() -> None:
            async with limit:
                stream, _ = await session.open("tcp", "127.0.0.1", port)
            self.open += 1
            stream.attach(_Watch(self._closed))

        await asyncio.gather(*(one() for _ in range(n)))


class Bulk:
    """One flow streaming at an offered rate (written and echoed back); counts the echoed
    bytes. Offered, not unbounded: a flow that saturates both event loops of a two-core
    machine measures the machine, and starves the edge's connector keep-alives (1.5 s)."""

    def __init__(self, stream: MuxStream, rate: float) -> None:
        self.stream = stream
        self.received = 0
        self.stopped = False
        self.per_tick = max(1, int(rate * BULK_TICK))
        self.owed = 0
        self._loop = asyncio.get_running_loop()
        stream.attach(self)
        self._tick()

    def _tick(self) -> None:
        if self.stopped:
            return
        # Bytes owed accumulate while the stream is full (bounded to one second's worth).
        self.owed = min(self.owed + self.per_tick, int(self.per_tick / BULK_TICK))
        self._pump()
        self._loop.call_later(BULK_TICK, self._tick)

    def _pump(self) -> None:
        while (
            self.owed > 0 and not self.stopped and not self.stream.full and not self.stream.closed
        ):
            n = min(self.owed, len(CHUNK))
            self.stream.write(CHUNK[:n])
            self.owed -= n

    def on_data(self, data: Any) -> None:
        self.received += len(data)

    def on_eof(self) -> None:
        self.stopped = True

    def on_closed(self, error: BaseException | None) -> None:
        self.stopped = True

    def on_drained(self) -> None:
        self._pump()

    def stop(self) -> None:
        self.stopped = True
        self.stream.abort()


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < needed:
        raise SystemExit(f"needs about {needed} file descriptors; the hard limit is {hard}")


async def _setup(
    tenant: Tenant, echo_port: int, params: Params, procs: Processes
) -> dict[str, str]:
    users = {"victim": (await tenant.user("victim"))["id"]}
    for i in range(params.other_users):
        users[f"user{i}"] = (await tenant.user(f"user{i}"))["id"]
    await tenant.app("echo", [("ip", "127.0.0.1", str(echo_port))], list(users.values()))
    await _start_connector(tenant, params, procs)
    await tenant.wait_config()
    return users


async def _start_connector(tenant: Tenant, params: Params, procs: Processes) -> None:
    """Enroll a connector and run it as ``limen connector run`` in its own process, as in
    a deployment: its sockets to the target, one per flow, are not the edge's burden."""
    group = await tenant.default_group()
    enrollment = await tenant.call(
        "POST", f"/api/v1/connector-groups/{group}/enrollment-tokens", {"name": "bench"}
    )
    directory = tenant.tmp / "connector"
    await asyncio.to_thread(
        enroll,
        tenant.service.api_url,
        enrollment["token"],
        directory,
        ca_pem=tenant.ca_pem,
        name="bench",
        edge=tenant.service.edge_address,
    )
    argv = [limen_executable(), "connector", "run", "--data-dir", str(directory)]
    procs.start([*argv, "--connections", str(params.connections)], "connector.log")
    await tenant.wait_edge_sees(lambda edge: len(edge.connectors.links) > 0)


async def _one_run(
    tenant: Tenant, users: dict[str, str], echo_port: int, params: Params, bulk: Bulk
) -> RunResult:
    assert tenant.service.ctx is not None
    victim = await tenant.login("victim")
    victim.max_connections = params.connections
    flows = FlowSet()
    await flows.add(victim, echo_port, params.victim_flows)
    published: list[float] = []

    def on_bus(event: BusEvent) -> None:
        if event.topic == SUBJECT_REVOKED and event.payload.get("user_id") == users["victim"]:
            published.append(time.perf_counter())

    unsubscribe = tenant.service.ctx.bus.subscribe(on_bus)
    try:
        # Uses the admin client's connection now, so that the timed call does not meet a
        # keep-alive connection the server has just closed.
        await tenant.call("GET", f"/api/v1/users/{users['victim']}")
        before_bytes, before_t = bulk.received, time.perf_counter()
        await asyncio.sleep(1.0)  # the bulk flow's steady rate before the signal
        call_bytes, call_t = bulk.received, time.perf_counter()
        before = (call_bytes - before_bytes) / (call_t - before_t)
        await tenant.call("POST", f"/api/v1/users/{users['victim']}/revoke-sessions")
        returned = time.perf_counter()
        async with asyncio.timeout(60):
            await flows.all_closed.wait()
        end_t = flows.last_closed
        during_bytes = bulk.received - call_bytes
        during = during_bytes / max(end_t - call_t, 1e-6)
    finally:
        unsubscribe()
    await victim.close()
    return RunResult(
        publish_ms=(end_t - published[0]) * 1000 if published else float("nan"),
        call_ms=(end_t - call_t) * 1000,
        return_ms=(end_t - returned) * 1000,
        victim_closed=flows.closed,
        bulk_before_mbps=before / 1e6,
        bulk_during_mbps=during / 1e6,
    )


async def run(
    params: Params, workdir: Path, echo_port: int, procs: Processes, progress: Any = None
) -> Report:
    report = Report(params)
    async with running_tenant(workdir) as tenant:
        started = time.perf_counter()
        users = await _setup(tenant, echo_port, params, procs)
        others = FlowSet()
        sessions: list[EdgeSession] = []
        per_user = max(1, params.other_flows // max(1, params.other_users))
        for i in range(params.other_users):
            session = await tenant.login(f"user{i}")
            session.max_connections = params.connections
            sessions.append(session)
            await others.add(session, echo_port, per_user)
        bulk_stream, _ = await sessions[0].open("tcp", "127.0.0.1", echo_port)
        bulk = Bulk(bulk_stream, params.bulk_rate)
        report.setup_seconds = time.perf_counter() - started
        if progress:
            progress(f"setup: {others.open} flows of {params.other_users} other users, "
                     f"{report.setup_seconds:.1f} s")  # fmt: skip
        # One warm-up run, not counted: the first revocation pays one-time costs (the
        # signal audit's first writes, worker threads starting).
        await _one_run(tenant, users, echo_port, params, bulk)
        for i in range(params.runs):
            result = await _one_run(tenant, users, echo_port, params, bulk)
            report.runs.append(result)
            if progress:
                progress(
                    f"run {i + 1}/{params.runs}: {result.victim_closed} victim flows closed "
                    f"{result.publish_ms:.1f} ms after the publish "
                    f"({result.call_ms:.1f} ms after the call); bulk "
                    f"{result.bulk_before_mbps:.0f} -> {result.bulk_during_mbps:.0f} MB/s"
                )
        report.others_cut = others.closed
        bulk.stop()
        for session in sessions:
            await session.close()
    return report


def print_report(report: Report) -> None:
    s = report.summary()
    p = report.params
    print()
    print(
        f"Revocation latency: {p.victim_flows} victim flows, {p.other_flows} flows of "
        f"{p.other_users} other users, {len(report.runs)} runs (setup {report.setup_seconds:.1f} s)"
    )
    print(f"{'figure':<44} {'p50':>9} {'p99':>9} {'max':>9}")
    rows = [
        ("signal published -> last victim socket closed (ms)", "publish_ms"),
        ("admin API call -> last victim socket closed (ms)", "call_ms"),
        ("other user's bulk MB/s, 1 s before the call", "bulk_before_mbps"),
        ("other user's bulk MB/s, call -> last close", "bulk_during_mbps"),
    ]
    for label, key in rows:
        v = s[key]
        print(f"{label:<44.44} {v['p50']:>9.1f} {v['p99']:>9.1f} {v['max']:>9.1f}")
    print(f"other users' flows cut by the revocations: {report.others_cut}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victim-flows", type=int, default=DEFAULTS.victim_flows)
    parser.add_argument("--other-flows", type=int, default=DEFAULTS.other_flows)
    parser.add_argument("--other-users", type=int, default=DEFAULTS.other_users)
    parser.add_argument("--runs", type=int, default=DEFAULTS.runs)
    parser.add_argument("--connections", type=int, default=DEFAULTS.connections)
    parser.add_argument("--bulk-mbps", type=float, default=DEFAULTS.bulk_rate / 1e6)
    parser.add_argument(
        "--json", type=Path, default=REPO_ROOT / "benchmarks/results/revocation.json"
    )
    args = parser.parse_args(argv)
    params = Params(
        victim_flows=args.victim_flows,
        other_flows=args.other_flows,
        other_users=max(1, args.other_users),
        runs=args.runs,
        connections=args.connections,
        bulk_rate=args.bulk_mbps * 1e6,
    )
    logging.basicConfig(level=logging.WARNING)
    # Writes to sockets the cut (or the teardown) reset are expected here, by the thousand.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    # Our connector's sockets to the echo server, plus headroom (the echo server, a child,
    # inherits the raised limit for its side).
    _raise_fd_limit(params.victim_flows + params.other_flows + 512)
    with tempfile.TemporaryDirectory(prefix="limen-revocation-") as tmp:
        procs = Processes(Path(tmp))
        try:
            echo = EchoServer(procs)
            report = asyncio.run(
                run(params, Path(tmp), echo.port, procs, progress=lambda m: print(m, flush=True))
            )
        finally:
            procs.stop_all()
    report.meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "setup": "service and clients in one process; connector and echo server in others",
    }
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "meta": report.meta,
        "params": asdict(report.params),
        "summary": report.summary(),
        "others_cut": report.others_cut,
        "setup_seconds": report.setup_seconds,
        "runs": [asdict(r) for r in report.runs],
    }
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
