"""UDP flows and private DNS end to end: real ``limen`` processes in the namespace topology.

``limen serve`` on the edge; ``limen connector run --dns-server`` on the branch, pointing at a
real ``dnsmasq`` in the LAN that serves ``corp.example``; on the laptop, alice's and
mallory's ``limen client dns`` stubs queried with real ``dig``, and alice's TCP and UDP
forwards carrying a real ``iperf3 -u`` run to the LAN's iperf3 server. mallory is not
assigned to the application that owns ``corp.example``.

The tests share one deployment (module-scoped) and run in file order.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from .limen_procs import (
    ClientProfile,
    LimenConnector,
    LimenProcess,
    LimenService,
    base_env,
    enroll_connector,
    limen_pids,
    spawn,
    start_service,
)
from .netns import Topology, require_root_and_tools
from .servers import DnsmasqInfo, Iperf3Info, SrvRecord, start_dnsmasq

pytestmark = pytest.mark.e2e

LAN = "198.18.3.10"
EDGE_FOR_LAPTOP = "198.18.1.1"
EDGE_FOR_BRANCH = "198.18.2.1"
# Not the ports of test_private_access (its module deployment may still be winding down).
API_PORT = 9445
EDGE_PORT = 8445
ALICE_DNS = 5353
MALLORY_DNS = 5354
IPERF_LOCAL = 5211
_WAIT = 15.0


def _poll(what: str, probe: Callable[[], Any], timeout: float = _WAIT) -> Any:
    """Call ``probe`` until it returns something truthy; that value. Bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Deployment:
    service: LimenService
    connector: LimenConnector
    dnsmasq: DnsmasqInfo
    alice: ClientProfile
    mallory: ClientProfile
    alice_dns: LimenProcess
    mallory_dns: LimenProcess

    def logs(self) -> str:
        con = self.connector.process.tail() if self.connector.process is not None else ""
        return (
            f"\n--- service:\n{self.service.process.tail()}\n--- connector:\n{con}"
            f"\n--- alice dns:\n{self.alice_dns.tail()}"
        )


@pytest.fixture(scope="module")
def deployment(topology: Topology) -> Iterator[Deployment]:
    require_root_and_tools("dnsmasq", "dig")
    dnsmasq = start_dnsmasq(
        topology.lan,
        {"www.corp.example": LAN, "db.corp.example": "198.18.3.20"},
        txt={"corp.example": "limen-private"},
        srv=[SrvRecord("_ldap._tcp.corp.example", "db.corp.example", 389)],
    )
    service = start_service(
        topology.edge,
        public_host=EDGE_FOR_LAPTOP,
        extra_san=[EDGE_FOR_BRANCH],
        api_port=API_PORT,
        edge_port=EDGE_PORT,
        settings={
            "LIMEN_TRAFFIC_LOG_FLUSH_SECONDS": "0.2",
            "LIMEN_CONFIG_POLL_SECONDS": "0.2",
        },
    )
    connector: LimenConnector | None = None
    profiles: list[ClientProfile] = []
    try:
        alice_pw, mallory_pw = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        alice = service.admin_json("user", "add", "alice", "--password-stdin", input=alice_pw)
        service.admin_json("user", "add", "mallory", "--password-stdin", input=mallory_pw)
        service.admin_json("connector-group", "add", "branch-office")
        service.admin_json(
            "app", "add", "corp", "--connector-group", "branch-office",
            "--dns-suffix", "corp.example",
        )  # fmt: skip
        service.admin_json(
            "segment", "add", "corp", "--type", "ip", "--destination", LAN,
            "--ports", "5201", "--protocol", "tcp,udp",
        )  # fmt: skip
        service.admin_json("assign", "corp", alice["id"])
        enrollment = service.admin_json(
            "connector", "enrollment-token", "--group", "branch-office", "--name", "branch-1"
        )
        connector = enroll_connector(
            topology.branch,
            service,
            enrollment["token"],
            api_addr=EDGE_FOR_BRANCH,
            edge=service.edge_address(EDGE_FOR_BRANCH),
        )
        before = service.metric("limen_connectors_connected")
        connector.process = spawn(
            topology.branch,
            ["connector", "run", "--data-dir", str(connector.data_dir),
             "--dns-server", f"{dnsmasq.addr}:{dnsmasq.port}"],
            base_env(),
            connector.data_dir.parent,
        )  # fmt: skip
        service.wait_metric("limen_connectors_connected", before + 1)
        alice_p = ClientProfile.create(topology.laptop, "alice-dns")
        mallory_p = ClientProfile.create(topology.laptop, "mallory-dns")
        profiles += [alice_p, mallory_p]
        alice_p.login(service, "alice", alice_pw)
        mallory_p.login(service, "mallory", mallory_pw)
        ready = "DNS stub on 127.0.0.1:{} "
        alice_dns = alice_p._start(
            ["dns", "--listen", f"127.0.0.1:{ALICE_DNS}"], ready.format(ALICE_DNS)
        )
        mallory_dns = mallory_p._start(
            ["dns", "--listen", f"127.0.0.1:{MALLORY_DNS}"], ready.format(MALLORY_DNS)
        )
        yield Deployment(service, connector, dnsmasq, alice_p, mallory_p, alice_dns, mallory_dns)
    finally:
        for p in profiles:
            p.stop()
        if connector is not None:
            connector.stop()
        service.stop()
        topology.lan.stop(dnsmasq.proc)
        left = {h.name: limen_pids(h) for h in topology}
        assert not any(left.values()), f"Limen processes left behind: {left}"


def _dig(topology: Topology, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return topology.laptop.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+time=5", "+tries=1", *args],
        check=False,
        timeout=30,
    )


def test_dig_gets_private_answers_through_the_stub(
    topology: Topology, deployment: Deployment
) -> None:
    a = _dig(topology, ALICE_DNS, "+short", "www.corp.example", "A")
    assert a.stdout.split() == [LAN], a.stdout + a.stderr + deployment.logs()
    txt = _dig(topology, ALICE_DNS, "+short", "corp.example", "TXT")
    assert txt.stdout.strip() == '"limen-private"', txt.stdout
    srv = _dig(topology, ALICE_DNS, "+short", "_ldap._tcp.corp.example", "SRV")
    assert srv.stdout.split()[2:] == ["389", "db.corp.example."], srv.stdout
    tcp = _dig(topology, ALICE_DNS, "+tcp", "+short", "db.corp.example", "A")
    assert tcp.stdout.split() == ["198.18.3.20"], tcp.stdout
    # An unknown name: the stub's answer has the status dnsmasq itself gives (it is not
    # authoritative for the zone, so REFUSED; an authoritative server says NXDOMAIN).
    missing = _dig(topology, ALICE_DNS, "nothere.corp.example", "A")
    at_source = topology.branch.run(
        ["dig", f"@{deployment.dnsmasq.addr}", "+time=5", "+tries=1", "nothere.corp.example"],
        check=False,
        timeout=15,
    )
    status = re.search(r"status: (\w+)", at_source.stdout)
    assert status is not None and status.group(1) in ("NXDOMAIN", "REFUSED"), at_source.stdout
    assert f"status: {status.group(1)}" in missing.stdout, missing.stdout
    # The laptop cannot reach the LAN's DNS server itself: the answers came through Limen.
    direct = topology.laptop.run(
        ["dig", f"@{LAN}", "+time=1", "+tries=1", "www.corp.example"], check=False, timeout=15
    )
    assert direct.returncode != 0 and "ANSWER SECTION" not in direct.stdout, direct.stdout


def test_public_name_is_not_sent_through_the_tunnel(
    topology: Topology, deployment: Deployment
) -> None:
    # Whatever the laptop's system resolver says (in the namespace it may be unreachable),
    # the name must not reach the edge.
    _dig(topology, ALICE_DNS, "www.example.com", "A")

    def records() -> list[dict[str, Any]] | None:
        page = deployment.service.admin_json("traffic", "list", "--user", "alice", "--limit", "500")
        rows = [r for r in page["items"] if r["transport"] == "dns"]
        return rows if len(rows) >= 5 else None

    rows = _poll("alice's DNS queries in the traffic log", records)
    assert all(r["dest_host"].endswith("corp.example") for r in rows), rows
    assert not any(r["dest_host"].endswith("example.com") for r in rows)
    assert "www.example.com" not in deployment.dnsmasq.log.read_text()


def test_unassigned_user_is_refused(topology: Topology, deployment: Deployment) -> None:
    proc = _dig(topology, MALLORY_DNS, "www.corp.example", "A")
    assert "status: REFUSED" in proc.stdout, proc.stdout + deployment.logs()
    assert LAN not in proc.stdout

    def blocked() -> list[dict[str, Any]]:
        page = deployment.service.admin_json("traffic", "list", "--user", "mallory")
        return [r for r in page["items"] if r["transport"] == "dns"]

    rows = _poll("mallory's refused query in the traffic log", blocked)
    assert {(r["action"], r["code"]) for r in rows} == {("block", "not_assigned")}


def test_iperf3_udp_through_a_udp_forward(
    topology: Topology, deployment: Deployment, lan_iperf3: Iperf3Info
) -> None:
    # iperf3 runs its control connection over TCP and its data over UDP on the same port:
    # a TCP forward and a UDP forward on one local port number.
    alice = deployment.alice
    alice.forward(f"{LAN}:5201", IPERF_LOCAL)
    alice._start(
        ["forward", "--udp", f"{LAN}:5201", "--listen", f"127.0.0.1:{IPERF_LOCAL}"],
        f"forwarding udp 127.0.0.1:{IPERF_LOCAL} ",
    )
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(IPERF_LOCAL),
            "-u", "-b", "20M", "-t", "2", "-l", "1400", "-J"]  # fmt: skip
    proc = topology.laptop.run(argv, check=False, timeout=30)
    assert proc.returncode == 0, proc.stdout[-800:] + proc.stderr + deployment.logs()
    report = json.loads(proc.stdout)
    summary = report["end"]["sum"]
    lost = float(summary["lost_percent"])
    mbits = summary["bits_per_second"] / 1e6
    print(f"\niperf3 -u -b 20M -l 1400 through limen client forward --udp: {mbits:.1f} Mbit/s, "
          f"{lost:.2f}% lost ({summary['lost_packets']}/{summary['packets']})")  # fmt: skip
    assert summary["packets"] > 1000
    assert lost < 1.0

    def logged() -> list[dict[str, Any]] | None:
        page = deployment.service.admin_json("traffic", "list", "--user", "alice", "--limit", "500")
        rows = [r for r in page["items"] if r["transport"] == "udp" and r["dest_port"] == 5201]
        return rows or None

    alice.stop()  # ends the flows: records are written when a flow ends
    rows = _poll("the UDP flow in the traffic log", logged)
    assert max(r["datagrams_up"] for r in rows) > 1000
    assert all(r["action"] == "allow" for r in rows)
