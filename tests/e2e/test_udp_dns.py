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
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest

from .deployment import (
    LAN,
    add_user,
    edge_service,
    enroll_branch_connector,
    logs,
    poll,
    publish_app,
    traffic_records,
)
from .limen_procs import (
    ClientProfile,
    LimenConnector,
    LimenProcess,
    LimenService,
    start_connector,
)
from .netns import Topology, require_root_and_tools
from .servers import DnsmasqInfo, Iperf3Info, SrvRecord, start_dnsmasq

pytestmark = pytest.mark.e2e

# Not the ports of test_private_access (its module deployment may still be winding down).
API_PORT = 9445
EDGE_PORT = 8445
ALICE_DNS = 5353
MALLORY_DNS = 5354
IPERF_LOCAL = 5211
_WAIT = 15.0


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
        return logs(self.service, connector=self.connector.process, alice_dns=self.alice_dns)


@pytest.fixture(scope="module")
def deployment(topology: Topology) -> Iterator[Deployment]:
    require_root_and_tools("dnsmasq", "dig")
    dnsmasq = start_dnsmasq(
        topology.lan,
        {"www.corp.example": LAN, "db.corp.example": "198.18.3.20"},
        txt={"corp.example": "limen-private"},
        srv=[SrvRecord("_ldap._tcp.corp.example", "db.corp.example", 389)],
    )
    try:
        with edge_service(topology, API_PORT, EDGE_PORT) as service, ExitStack() as cleanup:
            alice_pw, mallory_pw = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
            alice = add_user(service, "alice", alice_pw)
            add_user(service, "mallory", mallory_pw)
            service.admin_json("connector-group", "add", "branch-office")
            publish_app(
                service, "corp", "branch-office", "5201",
                app_args=["--dns-suffix", "corp.example"],
                segment_args=["--protocol", "tcp,udp"],
            )  # fmt: skip
            service.admin_json("assign", "corp", alice["id"])
            connector = enroll_branch_connector(topology, service, "branch-office", "branch-1")
            cleanup.callback(connector.stop)
            start_connector(connector, service, "--dns-server", f"{dnsmasq.addr}:{dnsmasq.port}")
            alice_p = ClientProfile.create(topology.laptop, "alice-dns")
            mallory_p = ClientProfile.create(topology.laptop, "mallory-dns")
            cleanup.callback(mallory_p.stop)
            cleanup.callback(alice_p.stop)
            alice_p.login(service, "alice", alice_pw)
            mallory_p.login(service, "mallory", mallory_pw)
            alice_dns = alice_p.dns(ALICE_DNS)
            mallory_dns = mallory_p.dns(MALLORY_DNS)
            yield Deployment(
                service, connector, dnsmasq, alice_p, mallory_p, alice_dns, mallory_dns
            )
    finally:
        topology.lan.stop(dnsmasq.proc)


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
        records = traffic_records(deployment.service, "--user", "alice", "--limit", "500")
        rows = [r for r in records if r["transport"] == "dns"]
        return rows if len(rows) >= 5 else None

    rows = poll("alice's DNS queries in the traffic log", records, timeout=_WAIT)
    assert all(r["dest_host"].endswith("corp.example") for r in rows), rows
    assert not any(r["dest_host"].endswith("example.com") for r in rows)
    assert "www.example.com" not in deployment.dnsmasq.log.read_text()


def test_unassigned_user_is_refused(topology: Topology, deployment: Deployment) -> None:
    proc = _dig(topology, MALLORY_DNS, "www.corp.example", "A")
    assert "status: REFUSED" in proc.stdout, proc.stdout + deployment.logs()
    assert LAN not in proc.stdout

    def blocked() -> list[dict[str, Any]]:
        records = traffic_records(deployment.service, "--user", "mallory")
        return [r for r in records if r["transport"] == "dns"]

    rows = poll("mallory's refused query in the traffic log", blocked, timeout=_WAIT)
    assert {(r["action"], r["code"]) for r in rows} == {("block", "not_assigned")}


def test_iperf3_udp_through_a_udp_forward(
    topology: Topology, deployment: Deployment, lan_iperf3: Iperf3Info
) -> None:
    # iperf3 runs its control connection over TCP and its data over UDP on the same port:
    # a TCP forward and a UDP forward on one local port number.
    alice = deployment.alice
    alice.forward(f"{LAN}:5201", IPERF_LOCAL)
    alice.forward_udp(f"{LAN}:5201", IPERF_LOCAL)
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
        records = traffic_records(deployment.service, "--user", "alice", "--limit", "500")
        rows = [r for r in records if r["transport"] == "udp" and r["dest_port"] == 5201]
        return rows or None

    alice.stop()  # ends the flows: records are written when a flow ends
    rows = poll("the UDP flow in the traffic log", logged, timeout=_WAIT)
    assert max(r["datagrams_up"] for r in rows) > 1000
    assert all(r["action"] == "allow" for r in rows)
