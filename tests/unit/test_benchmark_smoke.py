"""Smoke run of the data-plane benchmark suite, so it never rots.

Runs ``python -m benchmarks --quick --only direct,<limen path> --json <tmp>`` (tiny sizes)
as a subprocess and checks that every figure came out for both paths, the Limen path's CPU
split by hop and its round trips under bulk load included. The figures themselves are never
asserted: they depend on the machine. The per-hop CPU accounting (process trees, the fallback
hop names) is also checked directly, on processes of known cost, and so is the bulk-load
workload's shutdown (no thread outlives it, even when a bulk flow breaks).

Needs ``iperf3`` on PATH: skipped without it, except in CI (``CI=true``), where a missing
prerequisite fails the test so a broken image cannot pass silently.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from benchmarks.common import (
    BenchmarkError,
    EchoServer,
    Processes,
    ProcessSampler,
    loaded_rtts,
    path_hops,
)
from tests.bench_runs import run_benchmark

# Well under pytest's own timeout: the run takes ~25 s; a hung path is interrupted (SIGINT,
# so the suite's cleanup stops every helper it started) and reported, not left running.
RUN_TIMEOUT = 90.0


def _require_iperf3() -> None:
    if shutil.which("iperf3") is not None:
        return
    reason = "benchmark smoke test needs iperf3 (apt-get install iperf3)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " (CI=true: run scripts/install.sh as root)", pytrace=False)
    pytest.skip(reason)


def _run_suite(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return run_benchmark("benchmarks", argv, RUN_TIMEOUT)


@pytest.mark.parametrize("limen_path", ["limen", "limen-asyncio"])
def test_quick_run_measures_direct_and_limen(tmp_path: Path, limen_path: str) -> None:
    _require_iperf3()
    out_json = tmp_path / "bench.json"
    paths = ["direct", limen_path]
    done = _run_suite(
        [
            *("--quick", "--no-install", "--repeats", "2"),
            *("--only", ",".join(paths), "--json", str(out_json)),
        ]
    )
    assert done.returncode == 0, done.stdout[-4000:]

    report: dict[str, Any] = json.loads(out_json.read_text())
    assert report["meta"]["quick"] is True
    assert report["meta"]["params"]["repeats"] == 2
    results = report["results"]
    assert set(results) == set(paths)
    for name in paths:
        figures = results[name]
        assert "error" not in figures and "skipped" not in figures, (name, figures)
        assert figures["throughput_1_gbps"] > 0, name
        assert figures["throughput_8_gbps"] > 0, name
        # Each throughput figure is the median of its runs, every run kept.
        for flows in (1, 8):
            runs = figures[f"throughput_{flows}_runs_gbps"]
            assert len(runs) == 2 and all(r > 0 for r in runs), (name, runs)
            assert figures[f"throughput_{flows}_gbps"] == pytest.approx(statistics.median(runs))
        # Latency percentiles come from the samples: present means samples were taken.
        assert figures["latency_p50_ms"] > 0, name
        assert figures["latency_p99_ms"] >= figures["latency_p50_ms"], name
        assert figures["flows_per_s"] > 0, name
        # Round trips of an open flow, idle and beside the bulk flows (2 in --quick).
        assert figures["idle_rtt_p50_ms"] > 0, name
        assert figures["busy_rtt_p50_ms"] > 0, name
        assert figures["busy_rtt_p99_ms"] >= figures["busy_rtt_p50_ms"], name
        assert figures["bulk_flows"] == 2, name
        assert figures["bulk_echo_gbps"] > 0, name
    assert f"RTT under load — {limen_path}: idle p50 " in done.stdout, done.stdout[-4000:]
    # The Limen hops are real processes: memory and CPU are accounted for them.
    assert results[limen_path]["rss_peak_mb"] > 0
    assert results[limen_path]["cpu_s_per_gb"] > 0
    assert results["direct"]["rss_peak_mb"] is None
    # CPU per hop: Limen's three processes, named by role, adding up to the path's total.
    by_hop = results[limen_path]["cpu_s_per_gb_by_hop"]
    assert set(by_hop) == {"client", "edge", "connector"}, by_hop
    assert all(isinstance(v, int | float) and v >= 0 for v in by_hop.values()), by_hop
    assert sum(by_hop.values()) == pytest.approx(results[limen_path]["cpu_s_per_gb"])
    assert results["direct"]["cpu_s_per_gb_by_hop"] == {}
    assert f"CPU s/GB by hop — {limen_path}: client " in done.stdout, done.stdout[-4000:]
    # Limen is the candidate: its ratio to the baseline is reported.
    limen_vs_direct = [
        row for row in report["ratios"] if row["path"] == limen_path and row["baseline"] == "direct"
    ]
    assert len(limen_vs_direct) == 1, report["ratios"]
    assert limen_vs_direct[0]["busy_rtt_p50_ms"] > 0
    assert limen_vs_direct[0]["busy_rtt_p99_ms"] > 0


def _bulk_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("bulk-")]


def test_loaded_rtts_measures_and_leaves_no_thread_behind(tmp_path: Path) -> None:
    procs = Processes(tmp_path)
    try:
        echo = EchoServer(procs)
        loaded = loaded_rtts(echo.port, bulk_flows=2, samples=5, pace=0, settle=0)
    finally:
        procs.stop_all()
    assert len(loaded.idle) == len(loaded.busy) == 5
    assert all(rtt > 0 for rtt in [*loaded.idle, *loaded.busy])
    assert loaded.bulk_flows == 2
    assert loaded.bulk_bytes_per_second > 0
    assert _bulk_threads() == []


class _EchoFirstCloseRest(socketserver.ThreadingTCPServer):
    """Echoes the first connection (the interactive flow); closes every later one at once,
    as a path dropping the bulk flows would."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoFirstCloseRestHandler)
        self.accepted = 0
        self.lock = threading.Lock()


class _EchoFirstCloseRestHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _EchoFirstCloseRest)
        sock: socket.socket = self.request
        with server.lock:
            server.accepted += 1
            first = server.accepted == 1
        if not first:
            return  # socketserver closes it
        while data := sock.recv(65536):
            sock.sendall(data)


def test_loaded_rtts_fails_when_a_bulk_flow_breaks_and_stops_its_threads() -> None:
    server = _EchoFirstCloseRest()
    serving = threading.Thread(target=server.serve_forever, name="close-rest-server")
    serving.start()
    try:
        port = server.server_address[1]
        with pytest.raises(BenchmarkError, match="bulk flow failed"):
            loaded_rtts(port, bulk_flows=2, samples=3, pace=0, settle=0)
    finally:
        server.shutdown()
        serving.join(timeout=10)
        server.server_close()
    assert _bulk_threads() == []


# Roots that say "ready" once running: one whose child burns CPU once told to (a line on
# stdin), then says "done"; one idle. Both wait for EOF.
BURN_CPU_S = 0.3
BURNER = f"""
import subprocess, sys
burn = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < {BURN_CPU_S}: pass"
print("ready", flush=True)
sys.stdin.readline()
subprocess.run([sys.executable, "-c", burn], check=True)
print("done", flush=True)
sys.stdin.read()
"""
IDLE = "import sys; print('ready', flush=True); sys.stdin.read()"


class _UnnamedPath:
    """A path without hops(): its hops fall back to the roots' command names."""

    name = "unnamed"

    def __init__(self, roots: Sequence[int]) -> None:
        self.roots = list(roots)

    def setup(self, target_port: int) -> int:
        return target_port

    def teardown(self) -> None:
        pass

    def pids(self) -> Sequence[int]:
        return self.roots


@pytest.fixture
def burner_and_idle() -> Iterator[tuple[subprocess.Popen[str], subprocess.Popen[str]]]:
    def child(code: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    with child(BURNER) as burner, child(IDLE) as idle:
        try:
            for proc in (burner, idle):
                assert proc.stdout is not None  # PIPE
                # Running its own code: /proc/PID/comm is no longer the forking parent's.
                assert proc.stdout.readline().strip() == "ready"
            yield burner, idle
        finally:
            # Leaving the with block closes the pipes and reaps both.
            burner.kill()
            idle.kill()


def test_cpu_is_split_by_root_tree_and_unnamed_roots_are_named_by_command(
    burner_and_idle: tuple[subprocess.Popen[str], subprocess.Popen[str]],
) -> None:
    burner, idle = burner_and_idle
    path = _UnnamedPath([burner.pid, idle.pid])
    hops = path_hops(path)
    comm = Path(f"/proc/{burner.pid}/comm").read_text().strip()
    # Two roots with one command name: the second is told apart by its pid.
    assert hops == {comm: burner.pid, f"{comm}/{idle.pid}": idle.pid}

    sampler = ProcessSampler(path.pids()).start()
    assert burner.stdin is not None and burner.stdout is not None  # PIPEs
    burner.stdin.write("go\n")
    burner.stdin.flush()
    assert burner.stdout.readline().strip() == "done"  # the child has burned and been reaped
    _, total = sampler.stop()

    by_root = sampler.cpu_by_root
    # The burning grandchild's time counts for its root (reaped: in the root's cutime).
    assert by_root[burner.pid] >= BURN_CPU_S * 0.9, by_root
    assert by_root[idle.pid] < 0.05, by_root
    assert total == pytest.approx(sum(by_root.values()))
