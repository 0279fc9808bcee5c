"""``python -m benchmarks``: measure every path the same way and compare them.

Installs missing tools with apt when run as root, then for each selected path measures
single- and 8-flow throughput, new-flow latency (p50/p99), sustained new flows per second,
an open flow's round trip while bulk flows share the path (p50/p99), peak RSS and CPU seconds
per GB of the path's own processes (in total and per hop); prints the figures and each
candidate's ratio to each baseline; writes everything as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import all_paths
from .common import (
    REPO_ROOT,
    BenchmarkError,
    DataPath,
    EchoServer,
    Iperf3Server,
    PathSpec,
    Processes,
    ProcessSampler,
    Throughput,
    have_tools,
    iperf3_ready,
    iperf3_throughput,
    loaded_rtts,
    new_flow_latencies,
    path_hops,
    percentile,
    sustained_flow_rate,
)

# Debian packages providing each tool the suite may need.
APT_PACKAGES = {
    "iperf3": "iperf3",
    "socat": "socat",
    "stunnel4": "stunnel4",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "sshd": "openssh-server",
}
TARGET_TOOLS = ("iperf3",)


@dataclass(frozen=True, slots=True)
class Params:
    """How much of each workload to run."""

    seconds: float
    samples: int
    flow_seconds: float
    workers: int
    busy_samples: int
    bulk_flows: int
    #: iperf3 runs per throughput figure (1 flow and 8 flows, alternating); the figure is
    #: their median, as a single run on a shared 2-core machine moves ±10% or more.
    repeats: int


QUICK = Params(
    seconds=1, samples=50, flow_seconds=1, workers=2, busy_samples=30, bulk_flows=2, repeats=1
)
FULL = Params(
    seconds=5, samples=1000, flow_seconds=5, workers=4, busy_samples=300, bulk_flows=4, repeats=3
)
# Seconds between two round trips of the interactive flow (someone typing, not a flood).
RTT_PACE = 0.01

# (key, column title, higher is better, format)
METRICS: list[tuple[str, str, bool, str]] = [
    ("throughput_1_gbps", "1 flow Gbit/s", True, "{:.2f}"),
    ("throughput_8_gbps", "8 flows Gbit/s", True, "{:.2f}"),
    ("latency_p50_ms", "new flow p50 ms", False, "{:.3f}"),
    ("latency_p99_ms", "new flow p99 ms", False, "{:.3f}"),
    ("flows_per_s", "new flows/s", True, "{:.0f}"),
    ("busy_rtt_p50_ms", "busy RTT p50 ms", False, "{:.2f}"),
    ("busy_rtt_p99_ms", "busy RTT p99 ms", False, "{:.2f}"),
    ("rss_peak_mb", "peak RSS MB", False, "{:.1f}"),
    ("cpu_s_per_gb", "CPU s/GB", False, "{:.3f}"),
]


def install_tools(tools: Sequence[str], console: Console) -> None:
    """apt-get install the packages for missing ``tools`` (root only; services not started)."""
    missing = have_tools(tools)
    packages = sorted({APT_PACKAGES[t] for t in missing if t in APT_PACKAGES})
    if not packages or os.geteuid() != 0:
        return
    console.print(f"installing {' '.join(packages)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    created = not policy.exists()
    if created:
        # Keep package scripts from starting system sshd/stunnel: we run private instances.
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
            check=True,
            env=env,
            timeout=1200,
        )
    finally:
        if created:
            policy.unlink(missing_ok=True)


def unavailable(spec: PathSpec) -> str | None:
    """Why ``spec`` cannot run here, or None."""
    if spec.needs_root and os.geteuid() != 0:
        return "needs root"
    missing = have_tools(spec.tools)
    return f"missing tools: {', '.join(missing)}" if missing else None


def measure(
    path: DataPath, iperf_port: int, echo_port: int, params: Params
) -> dict[str, float | int | list[float] | dict[str, float | None] | None]:
    """Every figure for one path: throughput, then the new-flow workloads, then an open
    flow's round trips under bulk load (all echo workloads on one setup of the path)."""
    port = path.setup(iperf_port)
    try:
        iperf3_ready(port)
        hops = path_hops(path)
        sampler = ProcessSampler(path.pids()).start()
        ones: list[Throughput] = []
        eights: list[Throughput] = []
        for _ in range(params.repeats):
            ones.append(iperf3_throughput(port, params.seconds, parallel=1))
            eights.append(iperf3_throughput(port, params.seconds, parallel=8))
        rss_a, cpu = sampler.stop()
        cpu_by_root = sampler.cpu_by_root
        has_procs = bool(sampler.roots)
    finally:
        path.teardown()
    port = path.setup(echo_port)
    try:
        sampler = ProcessSampler(path.pids()).start()
        lat = new_flow_latencies(port, params.samples)
        rate = sustained_flow_rate(port, params.flow_seconds, params.workers)
        loaded = loaded_rtts(port, params.bulk_flows, params.busy_samples, RTT_PACE)
        rss_b, _ = sampler.stop()
    finally:
        path.teardown()
    gigabytes = sum(run.bytes for run in (*ones, *eights)) / 1e9

    def per_gb(seconds: float) -> float | None:
        return seconds / gigabytes if has_procs and gigabytes > 0 else None

    return {
        "throughput_1_gbps": statistics.median(run.bits_per_second for run in ones) / 1e9,
        "throughput_8_gbps": statistics.median(run.bits_per_second for run in eights) / 1e9,
        # Every run, in order, so the spread behind each median is on record.
        "throughput_1_runs_gbps": [run.bits_per_second / 1e9 for run in ones],
        "throughput_8_runs_gbps": [run.bits_per_second / 1e9 for run in eights],
        "latency_p50_ms": percentile(lat, 50) * 1e3,
        "latency_p99_ms": percentile(lat, 99) * 1e3,
        "flows_per_s": rate.per_second,
        "flows_failed": rate.failed,
        # One open flow's 1-byte round trip, idle and while bulk flows run through the path.
        "idle_rtt_p50_ms": percentile(loaded.idle, 50) * 1e3,
        "busy_rtt_p50_ms": percentile(loaded.busy, 50) * 1e3,
        "busy_rtt_p99_ms": percentile(loaded.busy, 99) * 1e3,
        "bulk_flows": loaded.bulk_flows,
        "bulk_echo_gbps": loaded.bulk_bytes_per_second * 8 / 1e9,
        "rss_peak_mb": max(rss_a, rss_b) / 2**20 if has_procs else None,
        "cpu_s_per_gb": per_gb(cpu),
        # The same CPU split by hop (each hop's root process and its descendants); the hops
        # cover every root, so they add up to cpu_s_per_gb. {} for a path without processes.
        "cpu_s_per_gb_by_hop": {hop: per_gb(cpu_by_root[pid]) for hop, pid in hops.items()},
    }


def ratios(results: dict[str, dict[str, Any]], specs: Sequence[PathSpec]) -> list[dict[str, Any]]:
    """Each candidate's figures divided by each baseline's (candidate / baseline).

    Candidates are the non-baseline paths; with none (Limen not plugged in yet), each
    baseline is compared with ``direct``.
    """
    ok = {n for n, r in results.items() if "error" not in r and "skipped" not in r}
    baselines = [s.name for s in specs if s.baseline and s.name in ok]
    candidates = [s.name for s in specs if not s.baseline and s.name in ok]
    pairs = [(c, b) for c in candidates for b in baselines]
    if not candidates and "direct" in ok:
        pairs = [(b, "direct") for b in baselines if b != "direct"]
    out: list[dict[str, Any]] = []
    for cand, base in pairs:
        row: dict[str, Any] = {"path": cand, "baseline": base}
        for key, *_ in METRICS:
            a, b = results[cand].get(key), results[base].get(key)
            row[key] = (
                a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None
            )
        out.append(row)
    return out


def _fmt(value: Any, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def print_report(
    console: Console, results: dict[str, dict[str, Any]], ratio_rows: list[dict[str, Any]]
) -> None:
    """Figures per path, then the ratios."""
    table = Table(title="Data-plane benchmarks (127.0.0.1)")
    table.add_column("path")
    for _, title, better_high, _ in METRICS:
        table.add_column(f"{title} {'↑' if better_high else '↓'}", justify="right")
    for name, res in results.items():
        if "error" in res:
            table.add_row(name, "[red]failed (see above)[/red]")
            continue
        if "skipped" in res:
            table.add_row(name, f"skipped: {res['skipped']}")
            continue
        table.add_row(name, *(_fmt(res.get(k), f) for k, _, _, f in METRICS))
    console.print(table)
    for name, res in results.items():
        by_hop = res.get("cpu_s_per_gb_by_hop")
        if by_hop:
            figures = " · ".join(f"{hop} {_fmt(v, '{:.3f}')}" for hop, v in by_hop.items())
            # markup=False: a hop named after its process (e.g. "comm/PID") is plain text.
            console.print(f"CPU s/GB by hop — {name}: {figures}", markup=False)
    for name, res in results.items():
        if "busy_rtt_p50_ms" in res:
            console.print(
                f"RTT under load — {name}: idle p50 {res['idle_rtt_p50_ms']:.2f} ms; with "
                f"{res['bulk_flows']} bulk flows echoing {res['bulk_echo_gbps']:.2f} Gbit/s, "
                f"p50 {res['busy_rtt_p50_ms']:.2f} ms, p99 {res['busy_rtt_p99_ms']:.2f} ms",
                markup=False,
            )
    for name, res in results.items():
        if res.get("flows_failed"):
            console.print(f"[yellow]{name}: {res['flows_failed']} new flows failed[/yellow]")
        if "error" in res:
            console.print(f"[red]{name}: {res['error']}[/red]")
    if not ratio_rows:
        return
    rt = Table(title="Ratios: path / baseline (↑ columns: >1 is better; ↓ columns: <1 is better)")
    rt.add_column("path")
    rt.add_column("vs")
    for _, title, _, _ in METRICS:
        rt.add_column(title, justify="right")
    for row in ratio_rows:
        rt.add_row(row["path"], row["baseline"], *(_fmt(row[k], "{:.2f}x") for k, *_ in METRICS))
    console.print(rt)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the benchmarks, print and save the results; 1 if any path failed."""
    specs = all_paths()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny runs (smoke test)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only these paths (repeatable or comma-separated): "
        + ", ".join(s.name for s in specs),
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=REPO_ROOT / "benchmarks" / "results" / "latest.json",
        help="where to write the results (default: benchmarks/results/latest.json)",
    )
    parser.add_argument("--seconds", type=float, help="iperf3 duration per run")
    parser.add_argument(
        "--repeats", type=int, help="iperf3 runs per throughput figure (the median is shown)"
    )
    parser.add_argument("--samples", type=int, help="new-flow latency samples")
    parser.add_argument("--flow-seconds", type=float, help="sustained new-flow duration")
    parser.add_argument("--workers", type=int, help="sustained new-flow worker processes")
    parser.add_argument(
        "--busy-samples", type=int, help="interactive round trips, idle and under bulk load"
    )
    parser.add_argument("--bulk-flows", type=int, help="bulk flows sharing the path meanwhile")
    parser.add_argument("--no-install", action="store_true", help="never call apt-get")
    args = parser.parse_args(argv)

    base = QUICK if args.quick else FULL
    params = Params(
        seconds=args.seconds or base.seconds,
        samples=args.samples or base.samples,
        flow_seconds=args.flow_seconds or base.flow_seconds,
        workers=args.workers or base.workers,
        busy_samples=args.busy_samples or base.busy_samples,
        bulk_flows=args.bulk_flows or base.bulk_flows,
        repeats=args.repeats or base.repeats,
    )
    if params.busy_samples < 1 or params.bulk_flows < 1 or params.repeats < 1:
        parser.error("--busy-samples, --bulk-flows and --repeats must be positive")
    selected = specs
    if args.only:
        names = [n.strip() for group in args.only for n in group.split(",") if n.strip()]
        unknown = sorted(set(names) - {s.name for s in specs})
        if unknown:
            parser.error(f"unknown path(s): {', '.join(unknown)}")
        selected = [s for s in specs if s.name in names]

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and CI: do not wrap the tables at 80 columns
    if not args.no_install:
        install_tools([*TARGET_TOOLS, *(t for s in selected for t in s.tools)], console)
    if have_tools(TARGET_TOOLS):
        console.print("[red]iperf3 is required (run as root to install it, or apt-get it)[/red]")
        return 1

    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="limen-bench-") as tmp:
        workdir = Path(tmp)
        targets = Processes(workdir)
        try:
            iperf = Iperf3Server(targets)
            echo = EchoServer(targets)
            for spec in selected:
                reason = unavailable(spec)
                if reason:
                    results[spec.name] = {"skipped": reason}
                    console.print(f"{spec.name}: skipped ({reason})")
                    continue
                console.print(f"{spec.name}: {spec.description} …")
                pathdir = workdir / spec.name
                pathdir.mkdir()
                try:
                    results[spec.name] = measure(
                        spec.factory(pathdir), iperf.port, echo.port, params
                    )
                except (BenchmarkError, OSError, subprocess.SubprocessError) as exc:
                    results[spec.name] = {"error": str(exc)}
                    console.print(f"[red]{spec.name} failed: {exc}[/red]")
        finally:
            targets.stop_all()

    ratio_rows = ratios(results, selected)
    print_report(console, results, ratio_rows)
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "quick": args.quick,
            "params": {
                "seconds": params.seconds,
                "samples": params.samples,
                "flow_seconds": params.flow_seconds,
                "workers": params.workers,
                "busy_samples": params.busy_samples,
                "bulk_flows": params.bulk_flows,
                "repeats": params.repeats,
                "rtt_pace_s": RTT_PACE,
            },
            "elapsed_s": round(time.monotonic() - started, 1),
        },
        "results": results,
        "ratios": ratio_rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"results written to {args.json}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
