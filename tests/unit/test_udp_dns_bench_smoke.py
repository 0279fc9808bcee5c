"""Smoke run of the UDP and DNS benchmark (``python -m benchmarks.udp_dns --quick``).

Runs it as a subprocess (real ``limen serve``, connector, ``client forward --udp`` and
``client dns`` on loopback) and checks that every figure came out for both paths. The figures
themselves are never asserted: they depend on the machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench_runs import run_quick

# The quick run takes ~25 s; a hung run is interrupted (SIGINT, so the benchmark's cleanup
# stops every helper it started) and reported, not left running.
RUN_TIMEOUT = 120.0


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_quick_run_reports_udp_and_dns_figures_for_both_paths(tmp_path: Path) -> None:
    out, report = run_quick("benchmarks.udp_dns", tmp_path / "udp_dns.json", RUN_TIMEOUT)

    assert report["meta"]["quick"] is True
    udp = report["udp"]
    # Both sizes, paced and flood, on both paths.
    assert {(r["path"], r["size"], r["mode"]) for r in udp} == {
        (p, s, m) for p in ("direct", "limen") for s in (100, 1200) for m in ("paced", "flood")
    }
    for row in udp:
        assert row["sent"] > 0, row
        assert row["delivered_per_s"] >= 0 and 0 <= row["loss_pct"] <= 100, row
    # The paced runs through Limen delivered something (the flow works end to end).
    assert all(r["received"] > 0 for r in udp if r["mode"] == "paced"), udp

    cases = {(r["path"], r["case"]) for r in report["dns"]}
    for path in ("direct", "limen"):
        for case in ("private, first", "private, repeated", "passthrough, first"):
            assert (path, case) in cases
    for row in report["dns"]:
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"], row
        assert row["failed"] < row["queries"], row

    ratios = report["ratios"]
    assert len(ratios["udp"]) == 4 and all(r["delivered_per_s"] is not None for r in ratios["udp"])
    assert {r["case"] for r in ratios["dns"]} >= {"private, first", "private, repeated"}
    # The printed tables carry the ratios too.
    assert "Ratios: limen / direct" in out and "private, repeated" in out
