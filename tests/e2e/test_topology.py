"""The e2e topology itself: the LAN is private to the branch, and teardown leaves nothing.

These tests are the premise of every Limen e2e test: without Limen, the laptop (and the edge)
cannot reach the LAN servers, while the branch (the connector's host) can.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from .netns import Host, Topology, require_root_and_tools
from .servers import (
    Iperf3Info,
    NginxInfo,
    SrvRecord,
    SshdInfo,
    start_dnsmasq,
    start_nginx,
    start_sshd,
)

# curl exit codes for "could not connect" (7), "timed out" (28) and "no route" variants.
_CURL_CONNECT_FAILURES = {7, 28}


def _curl(host: Host, url: str) -> subprocess.CompletedProcess[str]:
    return host.run(
        ["curl", "-sS", "--noproxy", "*", "--max-time", "3", url], check=False, timeout=15
    )


def test_laptop_reaches_the_edge(topology: Topology) -> None:
    # Positive control: the failures below are isolation, not a broken laptop.
    web = start_nginx(topology.edge, port=8080)
    try:
        proc = _curl(topology.laptop, f"http://{topology.edge.addr}:8080{web.path}")
        assert proc.returncode == 0, proc.stderr
        assert web.marker in proc.stdout
        # The edge's branch-facing address is reachable too (it is local to the edge).
        proc = _curl(topology.laptop, f"http://198.18.2.1:8080{web.path}")
        assert proc.returncode == 0, proc.stderr
    finally:
        web.stop()


def test_laptop_cannot_reach_lan_http(topology: Topology, lan_nginx: NginxInfo) -> None:
    proc = _curl(topology.laptop, lan_nginx.url)
    assert proc.returncode in _CURL_CONNECT_FAILURES, (proc.returncode, proc.stderr)
    assert lan_nginx.marker not in proc.stdout


def test_laptop_cannot_reach_lan_ssh(topology: Topology, lan_sshd: SshdInfo) -> None:
    proc = topology.laptop.run(
        lan_sshd.ssh_argv("echo", "ok", extra=["-o", "ConnectTimeout=3"]), check=False
    )
    assert proc.returncode == 255, (proc.returncode, proc.stderr)
    assert "ok" not in proc.stdout


def test_laptop_cannot_reach_branch(topology: Topology, lan_nginx: NginxInfo) -> None:
    # The edge does not forward, so the connector's host is not reachable from the laptop.
    proc = _curl(topology.laptop, f"http://{topology.branch.addr}:80/")
    assert proc.returncode in _CURL_CONNECT_FAILURES, (proc.returncode, proc.stderr)


def test_edge_cannot_reach_lan(topology: Topology, lan_nginx: NginxInfo) -> None:
    proc = _curl(topology.edge, lan_nginx.url)
    assert proc.returncode in _CURL_CONNECT_FAILURES, (proc.returncode, proc.stderr)
    assert lan_nginx.marker not in proc.stdout


def test_branch_reaches_lan_http(topology: Topology, lan_nginx: NginxInfo) -> None:
    proc = _curl(topology.branch, lan_nginx.url)
    assert proc.returncode == 0, proc.stderr
    assert lan_nginx.marker in proc.stdout


def test_branch_reaches_lan_ssh(topology: Topology, lan_sshd: SshdInfo) -> None:
    proc = topology.branch.run(lan_sshd.ssh_argv("echo", "ok"), check=False, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_branch_reaches_edge(topology: Topology) -> None:
    # The connector dials the edge outbound: this path must work.
    web = start_nginx(topology.edge, port=8081)
    try:
        proc = _curl(topology.branch, f"http://198.18.2.1:8081{web.path}")
        assert proc.returncode == 0, proc.stderr
        assert web.marker in proc.stdout
    finally:
        web.stop()


def test_iperf3_branch_to_lan(topology: Topology, lan_iperf3: Iperf3Info) -> None:
    proc = topology.branch.run(
        ["iperf3", "-c", lan_iperf3.addr, "-p", str(lan_iperf3.port), "-t", "1", "-J"],
        check=False,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stdout[-500:] + proc.stderr
    report = json.loads(proc.stdout)
    assert report["end"]["sum_received"]["bits_per_second"] > 0


def test_teardown_removes_namespaces_and_processes(topology: Topology) -> None:
    require_root_and_tools("sshd")
    with Topology() as topo:
        names = topo.namespaces()
        assert len(names) == 4
        assert all(n.startswith(f"lm{os.getpid()}_") for n in names)
        # A daemon that forks a child outside our tracking: both must die at teardown.
        stray = topo.lan.popen(["sh", "-c", "sleep 300 & exec sleep 300"], start_new_session=True)
        info = start_sshd(topo.lan, port=2222)
        topo.lan.set_resolv_conf("nameserver 198.18.3.10\n")
        resolv_dir = f"/etc/netns/{topo.lan.ns}"
        assert os.path.isdir(resolv_dir)
        workdir = info.workdir
        assert workdir.is_dir()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    for n in names:
        assert n not in listed.stdout
    assert stray.poll() is not None
    assert info.proc.poll() is not None
    assert not os.path.exists(resolv_dir)
    assert not workdir.exists()
    # The session topology is untouched by another topology's teardown.
    assert topology.laptop.ns in listed.stdout


def test_prerequisites_fail_in_ci_and_skip_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-xyz"):
        require_root_and_tools("no-such-tool-xyz")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no-such-tool-xyz"):
        require_root_and_tools("no-such-tool-xyz")


def test_private_dns_answers_branch_only(topology: Topology) -> None:
    require_root_and_tools("dnsmasq", "dig")
    dns = start_dnsmasq(
        topology.lan,
        {"app.corp.test": "198.18.3.10"},
        txt={"app.corp.test": "limen-e2e"},
        srv=[SrvRecord("_http._tcp.corp.test", "app.corp.test", 80)],
    )
    try:
        dig = ["dig", f"@{dns.addr}", "+short", "+time=1", "+tries=1"]
        assert topology.branch.run([*dig, "app.corp.test"]).stdout.strip() == "198.18.3.10"
        assert topology.branch.run([*dig, "TXT", "app.corp.test"]).stdout.strip() == '"limen-e2e"'
        srv = topology.branch.run([*dig, "SRV", "_http._tcp.corp.test"]).stdout.split()
        assert srv == ["0", "0", "80", "app.corp.test."]
        # Nothing upstream: an unknown name does not resolve.
        assert topology.branch.run([*dig, "example.com"], check=False).stdout.strip() == ""
        # And the laptop cannot query the LAN resolver at all.
        proc = topology.laptop.run([*dig, "app.corp.test"], check=False)
        assert proc.returncode != 0
        assert "no servers could be reached" in proc.stdout
    finally:
        dns.stop()
