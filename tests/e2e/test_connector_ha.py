"""Connector high availability end to end: three ``limen connector run`` processes on the
branch host serving one application, real curl through ``limen client forward`` on the
laptop to the LAN's nginx.

Each connector dials the LAN from its own address on the branch's LAN interface
(``--dial-source``), so one connector's route to the LAN can be blocked with nftables while
its control channel to the edge stays up. A fourth connector reaches the edge through a real
tinyproxy started in the branch namespace.
"""

from __future__ import annotations

import collections
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .deployment import (
    EDGE_FOR_BRANCH,
    LAN,
    add_user,
    curl,
    edge_service,
    enroll_branch_connector,
    poll,
    publish_app,
    traffic_records,
)
from .limen_procs import ClientProfile, LimenConnector, LimenService, spawn_connector
from .netns import Host, Topology, require_root_and_tools
from .servers import NginxInfo

pytestmark = pytest.mark.e2e

#: Extra addresses of the branch on its LAN side, one per connector.
SOURCES = ["198.18.3.21", "198.18.3.22", "198.18.3.23"]
HTTP_FWD_PORT = 18080
PROXY_PORT = 8888
BOUND = 2.0
_WAIT = 20.0


def _poll(what: str, probe: Callable[[], Any], timeout: float = _WAIT) -> Any:
    return poll(what, probe, timeout=timeout, interval=0.05)


def _lan_ifname(branch: Host) -> str:
    out = branch.run(["ip", "-o", "-4", "addr", "show"]).stdout
    for line in out.splitlines():
        if " 198.18.3." in line:
            return line.split()[1]
    raise AssertionError(f"no LAN interface on the branch: {out}")


@dataclass
class Ha:
    service: LimenService
    connectors: list[LimenConnector]
    profile: ClientProfile
    nginx: NginxInfo
    app_id: str
    extra: list[LimenConnector] = field(default_factory=list)

    def status(self, connector_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.service.admin_json("connector", "show", connector_id)
        return result

    def curl(self) -> bool:
        proc = curl(
            self.profile.host,
            "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{HTTP_FWD_PORT}/",
            max_time=5, timeout=15,
        )  # fmt: skip
        return proc.returncode == 0 and proc.stdout.strip() == "200"

    def records(self, since: float) -> list[dict[str, Any]]:
        records = traffic_records(self.service, "--limit", "1000")
        return [r for r in records if r["started_at"] >= since]


def _at_least(ha: Ha, since: float, n: int) -> list[dict[str, Any]]:
    """The traffic records since ``since`` once there are ``n`` of them."""

    def probe() -> list[dict[str, Any]] | None:
        rows = ha.records(since)
        return rows if len(rows) >= n else None

    result: list[dict[str, Any]] = _poll(f"{n} traffic records", probe)
    return result


@pytest.fixture(scope="module")
def ha(topology: Topology, lan_nginx: NginxInfo) -> Iterator[Ha]:
    require_root_and_tools("curl", "nft", "tinyproxy")
    branch = topology.branch
    ifname = _lan_ifname(branch)
    for addr in SOURCES:
        branch.run(["ip", "addr", "add", f"{addr}/24", "dev", ifname])
    try:
        with (
            edge_service(topology, 9443, 8443, check_leftovers=False) as service,
            ExitStack() as cleanup,
        ):
            add_user(service, "alice", "ha-pass-1234")
            service.admin_json("connector-group", "add", "branch-ha")
            app = publish_app(service, "lan-web", "branch-ha", "80")
            alice = service.admin_json("user", "show", "alice")
            service.admin_json("assign", "lan-web", alice["id"])
            connectors: list[LimenConnector] = []
            for i, source in enumerate(SOURCES):
                connector = enroll_branch_connector(topology, service, "branch-ha", f"ha-{i}")
                cleanup.callback(connector.stop)
                spawn_connector(connector, "--dial-source", source)
                connectors.append(connector)
            ids = [c.connector_id for c in connectors]
            _poll(
                "three healthy connectors",
                lambda: all(
                    service.admin_json("connector", "show", i)["health"] == "healthy" for i in ids
                ),
            )
            profile = ClientProfile.create(topology.laptop, "ha")
            cleanup.callback(profile.stop)
            profile.login(service, "alice", "ha-pass-1234")
            profile.forward(f"{LAN}:80", HTTP_FWD_PORT)
            yield Ha(service, connectors, profile, lan_nginx, app["id"])
    finally:
        branch.run(["nft", "delete", "table", "inet", "limenha"], check=False)
        for addr in SOURCES:
            branch.run(["ip", "addr", "del", f"{addr}/24", "dev", ifname], check=False)


def _curls(ha: Ha, n: int, parallel: int = 3) -> list[tuple[float, bool]]:
    def one(_: int) -> tuple[float, bool]:
        started = time.time()
        return started, ha.curl()

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, range(n)))


def test_300_flows_spread_over_three_connectors(ha: Ha) -> None:
    since = time.time()
    outcomes = _curls(ha, 300)
    assert all(ok for _, ok in outcomes)
    rows = _at_least(ha, since, 300)
    counts = collections.Counter(r["connector_id"] for r in rows if r["action"] == "allow")
    assert set(counts) == {c.connector_id for c in ha.connectors}, counts
    total = sum(counts.values())
    for n in counts.values():
        assert 0.20 * total <= n <= 0.45 * total, counts


def test_blocked_lan_route_takes_a_connector_out_within_the_bound(
    ha: Ha, topology: Topology
) -> None:
    victim = ha.connectors[2]
    branch = topology.branch
    branch.run(["nft", "add", "table", "inet", "limenha"])
    branch.run(["nft", "add", "chain", "inet", "limenha", "out",
                "{ type filter hook output priority 0 ; }"])  # fmt: skip
    branch.run(["nft", "add", "rule", "inet", "limenha", "out",
                "ip", "saddr", SOURCES[2], "drop"])  # fmt: skip
    blocked_at = time.monotonic()
    try:
        _poll(
            "the blocked connector unhealthy",
            lambda: ha.status(victim.connector_id)["health"] == "unhealthy",
            timeout=10,
        )
        # The admin CLI takes time of its own; the edge's judgement is within the bound.
        assert time.monotonic() - blocked_at < BOUND + 1.5
        assert ha.status(victim.connector_id)["connections"] == 2  # control channel up
        since = time.time()
        assert all(ok for _, ok in _curls(ha, 30))
        rows = _at_least(ha, since, 30)
        assert victim.connector_id not in {r["connector_id"] for r in rows}
    finally:
        branch.run(["nft", "delete", "table", "inet", "limenha"], check=False)
    _poll(
        "the connector healthy again",
        lambda: ha.status(victim.connector_id)["health"] == "healthy",
        timeout=10,
    )


def test_sigkill_one_connector_while_flows_run(ha: Ha) -> None:
    victim = ha.connectors[0]
    assert victim.process is not None
    since = time.time()
    until = time.time() + 6.0

    def worker() -> list[tuple[float, bool]]:
        out: list[tuple[float, bool]] = []
        while time.time() < until:
            started = time.time()
            out.append((started, ha.curl()))
        return out

    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(worker) for _ in range(3)]
        time.sleep(1.0)  # let flows run before the kill
        victim.process.proc.kill()
        killed = time.time()
        outcomes = [o for r in running for o in r.result()]
    after = [ok for started, ok in outcomes if started > killed + BOUND]
    assert len(after) > 20 and all(after), (len(after), after.count(False))
    rows = _poll("records", lambda: ha.records(since) or None)
    assert all(
        r["connector_id"] != victim.connector_id for r in rows if r["started_at"] > killed + BOUND
    )
    # Restart it: it is used again.
    spawn_connector(victim, "--dial-source", SOURCES[0])
    _poll(
        "restarted connector healthy", lambda: ha.status(victim.connector_id)["health"] == "healthy"
    )
    since = time.time()
    assert all(ok for _, ok in _curls(ha, 60))
    rows = _at_least(ha, since, 60)
    assert victim.connector_id in {r["connector_id"] for r in rows}


def test_connector_through_tinyproxy_and_sigterm_drain(ha: Ha, topology: Topology) -> None:
    branch = topology.branch
    workdir: Path = branch.tempdir("tinyproxy")
    conf = workdir / "tinyproxy.conf"
    conf.write_text(
        f"Port {PROXY_PORT}\nListen 127.0.0.1\nTimeout 600\nAllow 127.0.0.1\n"
        f'ConnectPort 8443\nLogFile "{workdir / "tinyproxy.log"}"\nLogLevel Connect\n'
        "MaxClients 50\n"
    )
    proxy = branch.popen(["tinyproxy", "-d", "-c", str(conf)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    branch.wait_port("127.0.0.1", PROXY_PORT)
    try:
        proxied = enroll_branch_connector(topology, ha.service, "branch-ha", "ha-proxied")
        ha.extra.append(proxied)
        spawn_connector(proxied, "--proxy", f"http://127.0.0.1:{PROXY_PORT}")
        _poll(
            "the proxied connector connected",
            lambda: ha.status(proxied.connector_id)["connections"] == 2,
        )
        log = (workdir / "tinyproxy.log").read_text()
        assert f"{EDGE_FOR_BRANCH}:8443" in log or "CONNECT" in log, log[-2000:]

        # SIGTERM the three others: they drain and exit; flows go through the proxied one.
        for connector in ha.connectors:
            assert connector.process is not None
            connector.process.proc.terminate()
        for connector in ha.connectors:
            assert connector.process is not None
            connector.process.proc.wait(timeout=40)
        since = time.time()
        assert all(ok for _, ok in _curls(ha, 10))
        rows = _at_least(ha, since, 10)
        assert {r["connector_id"] for r in rows} == {proxied.connector_id}
    finally:
        for connector in ha.extra:
            connector.stop()
        branch.stop(proxy)
