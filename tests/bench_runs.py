"""Running a benchmark module as a subprocess from a smoke test, the same way every time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(module: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m <module> <argv>`` from the repository root, output merged. A hung run is
    interrupted with SIGINT (so the benchmark's own cleanup stops every helper it started)
    and the test fails with the end of its output, rather than leaving it running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, COLUMNS="200"),
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"{module} did not finish in {timeout:.0f} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def run_quick(module: str, json_path: Path, timeout: float) -> tuple[str, dict[str, Any]]:
    """``python -m <module> --quick --json <json_path>``, which must succeed: its printed
    output and its JSON report."""
    proc = run_benchmark(module, ["--quick", "--json", str(json_path)], timeout)
    assert proc.returncode == 0, proc.stdout[-3000:]
    report: dict[str, Any] = json.loads(json_path.read_text())
    return proc.stdout, report
