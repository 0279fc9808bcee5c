"""Smoke run of the revocation benchmark with tiny sizes, so it never rots: every run comes
out with its figures and every victim flow is closed. The figures themselves are never
asserted (they depend on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_revocation_bench_runs_with_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "revocation.json"
    argv = ["--victim-flows", "10", "--other-flows", "20", "--other-users", "2", "--runs", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.revocation_bench", *argv, "--json", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "signal published -> last victim socket close" in proc.stdout
    data = json.loads(out.read_text())
    assert data["params"]["victim_flows"] == 10
    assert len(data["runs"]) == 2
    assert all(run["victim_closed"] == 10 for run in data["runs"])
    assert data["others_cut"] == 0
    for key in ("publish_ms", "call_ms", "bulk_before_mbps", "bulk_during_mbps"):
        assert set(data["summary"][key]) >= {"p50", "p99"}
