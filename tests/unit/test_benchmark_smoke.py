"""Smoke run of the data-plane benchmark suite, so it never rots.

Runs ``python -m benchmarks --quick --only direct,<limen path> --json <tmp>`` (tiny sizes)
as a subprocess and checks that every figure came out for both paths. The figures themselves
are never asserted: they depend on the machine.

Needs ``iperf3`` on PATH: skipped without it, except in CI (``CI=true``), where a missing
prerequisite fails the test so a broken image cannot pass silently.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

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


@pytest.mark.parametrize("limen_path", ["limen", "limen-uvloop"])
def test_quick_run_measures_direct_and_limen(tmp_path: Path, limen_path: str) -> None:
    _require_iperf3()
    out_json = tmp_path / "bench.json"
    paths = ["direct", limen_path]
    done = _run_suite(
        ["--quick", "--no-install", "--only", ",".join(paths), "--json", str(out_json)]
    )
    assert done.returncode == 0, done.stdout[-4000:]

    report: dict[str, Any] = json.loads(out_json.read_text())
    assert report["meta"]["quick"] is True
    results = report["results"]
    assert set(results) == set(paths)
    for name in paths:
        figures = results[name]
        assert "error" not in figures and "skipped" not in figures, (name, figures)
        assert figures["throughput_1_gbps"] > 0, name
        assert figures["throughput_8_gbps"] > 0, name
        # Latency percentiles come from the samples: present means samples were taken.
        assert figures["latency_p50_ms"] > 0, name
        assert figures["latency_p99_ms"] >= figures["latency_p50_ms"], name
        assert figures["flows_per_s"] > 0, name
    # The Limen hops are real processes: memory and CPU are accounted for them.
    assert results[limen_path]["rss_peak_mb"] > 0
    assert results[limen_path]["cpu_s_per_gb"] > 0
    assert results["direct"]["rss_peak_mb"] is None
    # Limen is the candidate: its ratio to the baseline is reported.
    assert any(
        row["path"] == limen_path and row["baseline"] == "direct" for row in report["ratios"]
    )
