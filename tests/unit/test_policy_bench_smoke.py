"""Smoke run of the policy benchmark, so it never rots: tiny sizes, every figure present,
the decisions' mix plausible. The timings themselves are never asserted (machine-dependent).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.policy_bench import Sizes, build_tenant, flows

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_tenant_flows_reach_policy_evaluation() -> None:
    sizes = Sizes(policies=30, segments=50, users=40, decisions=100, groups=8, locations=4)
    tenant = build_tenant(sizes, now=1_700_000_000.0)
    assert len(tenant.entries) == 30
    assert len(tenant.snapshot.segments) == 50
    assert len(tenant.snapshot.users) == 40
    workload = flows(tenant, 100)
    assert len(workload) == 100
    # Every generated flow goes to a segment of an application its user is assigned to.
    for request, _source in workload:
        seg = tenant.snapshot.segments.match(request.host, request.port, request.protocol)
        assert seg is not None, request
        token = request.bearer_token
        assert token is not None
        user = next(uid for uid, t in tenant.tokens.items() if t == token)
        assert user in tenant.snapshot.assigned[seg.app_id]


def test_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "policy.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.policy_bench",
            "--policies", "20", "--segments", "100", "--users", "50", "--groups", "10",
            "--decisions", "200", "--sign-in-seconds", "1", "--sign-in-workers", "2",
            "--json", str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=100,  # under pytest's own 120 s
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bar: warm p99 < 50 µs" in proc.stdout
    result = json.loads(out.read_text())
    decisions = result["decisions"]
    assert decisions["sizes"]["policies"] == 20 and decisions["sizes"]["segments"] == 100
    for key in ("warm", "default_cache", "cold", "policy_only"):
        figures = decisions[key]
        assert figures["n"] > 0
        assert 0 < figures["p50_us"] <= figures["p99_us"] <= figures["max_us"]
    # Flows of assigned users to published segments: every refusal is a policy's.
    assert set(decisions["actions"]) <= {
        "allow",
        "block:policy_blocked",
        "challenge:insufficient_user_authentication",
    }
    assert sum(decisions["actions"].values()) == 200
    sign_in = result["sign_in"]
    assert sign_in["requests"] > 0 and sign_in["failures"] == 0
    assert sign_in["argon2"]["variant"] == "argon2id"
    assert sign_in["argon2"]["memory_cost_kib"] > 0
