"""Smoke run of the idle-flows benchmark (``python -m benchmarks.idle_flows --quick``).

Runs it as a subprocess (real ``limen serve`` and ``limen connector run`` on loopback, 500
idle flows to a sink) and checks that every figure came out. The figures themselves are
never asserted: they depend on the machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench_runs import run_quick

# The quick run takes ~25 s; a hung run is interrupted (SIGINT, so the benchmark's cleanup
# stops every helper it started) and reported, not left running.
RUN_TIMEOUT = 120.0


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_quick_run_reports_memory_per_flow_for_every_hop(tmp_path: Path) -> None:
    out, report = run_quick("benchmarks.idle_flows", tmp_path / "idle_flows.json", RUN_TIMEOUT)

    assert report["meta"]["quick"] is True
    assert report["meta"]["flows"] == 500
    results = report["results"]
    assert set(results["processes"]) == {"edge", "connector", "client"}
    for role, figures in results["processes"].items():
        for reading in ("before", "after_open", "after_close", "after_reopen"):
            assert figures[reading]["rss_kib"] > 0, (role, reading)
            assert figures[reading]["pss_kib"] > 0, (role, reading)
            assert figures[reading]["uss_kib"] > 0, (role, reading)
        assert set(figures["per_flow"]) == {"rss_kib", "pss_kib", "uss_kib", "fds"}
    # Each idle flow holds one socket at the connector while open (fds are counts, not
    # timings: this is behaviour, not a figure).
    connector = results["processes"]["connector"]
    assert connector["after_open"]["fds"] - connector["before"]["fds"] >= 500
    opened = results["open"]
    assert opened["seconds"] > 0 and opened["flows_per_second"] > 0
    assert opened["p50_ms"] > 0 and opened["p99_ms"] >= opened["p50_ms"]
    assert opened["ended_early"] == 0
    assert results["bar"]["edge_kib_per_flow_max"] == 64.0
    assert isinstance(results["bar"]["met"], bool)
    # The table names every hop and the bar.
    assert "edge" in out and "connector" in out and "bar: edge <= 64 KiB per flow" in out
