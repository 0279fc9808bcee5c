"""Private names in transparent mode end to end: ``limen client up`` on the laptop makes its DNS
stub the resolver, answers ``intranet.corp.example`` with a synthetic address, and the
listener carries unmodified ``curl`` and ``ssh`` to that *name* through Limen — the connector
resolves it with the LAN's dnsmasq. No proxy setting anywhere.

Topology (netns.py): laptop 198.18.1.2 → edge 198.18.1.1 ← branch 198.18.2.2 → LAN
198.18.3.10 (dnsmasq, nginx, sshd). The laptop's /etc/resolv.conf is its own file
(``/etc/netns/<ns>/resolv.conf``, Host.set_resolv_conf): the test never touches the real
machine's. The branch resolves with the LAN's dnsmasq the same way.

The tests share one deployment and run in file order.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .limen_procs import (
    READY_TIMEOUT,
    ClientProfile,
    LimenConnector,
    LimenProcess,
    LimenService,
    LimenStartError,
    base_env,
    enroll_connector,
    spawn,
    start_service,
)
from .netns import Host, Topology, require_root_and_tools
from .servers import DnsmasqInfo, NginxInfo, SshdInfo, start_dnsmasq

pytestmark = pytest.mark.e2e

LAN = "198.18.3.10"
EDGE_FOR_LAPTOP = "198.18.1.1"
EDGE_FOR_BRANCH = "198.18.2.1"
NAME = "intranet.corp.example"
SYNTHETIC = ipaddress.ip_network("100.80.0.0/16")
# Not the ports of the other modules (their deployments may still be winding down).
API_PORT = 9447
EDGE_PORT = 8447
#: The laptop's own resolv.conf: a public resolver that is not there (public names are not
#: under test), a search list and options that must survive the takeover.
LAPTOP_RESOLV = "# e2e laptop\nnameserver 198.18.1.1\nsearch lan.example\noptions ndots:1 edns0\n"
_WAIT = 15.0


def _poll(what: str, probe: Callable[[], Any], timeout: float = _WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _limen_tables(host: Host) -> list[str]:
    out = host.run(["nft", "list", "tables"]).stdout
    return [line for line in out.splitlines() if line.split()[-1:] == ["limen"]]


def _limen_ip_rules(host: Host) -> list[str]:
    out = host.run(["ip", "rule", "list"]).stdout
    return [line for line in out.splitlines() if "0x4c4d0002" in line]


def _own_resolv_conf(host: Host, content: str) -> Iterator[Path]:
    """Give ``host`` its own resolv.conf for the module; put back what was there before."""
    path = Path("/etc/netns") / host.ns / "resolv.conf"
    before = path.read_bytes() if path.exists() else None
    host.set_resolv_conf(content)
    try:
        yield path
    finally:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(before)


@dataclass
class Lab:
    service: LimenService
    connector: LimenConnector
    dnsmasq: DnsmasqInfo
    laptop_resolv: Path
    password: str

    def records(self, port: int) -> list[dict[str, Any]]:
        page = self.service.admin_json("traffic", "list", "--user", "alice", "--limit", "500")
        return [r for r in page["items"] if r["dest_port"] == port]


@pytest.fixture(scope="module")
def branch_resolv(topology: Topology) -> Iterator[Path]:
    # The connector dials names with the system resolver: the LAN's dnsmasq.
    yield from _own_resolv_conf(topology.branch, f"nameserver {LAN}\n")


@pytest.fixture(scope="module")
def laptop_resolv(topology: Topology) -> Iterator[Path]:
    yield from _own_resolv_conf(topology.laptop, LAPTOP_RESOLV)


@pytest.fixture(scope="module")
def lab(topology: Topology, branch_resolv: Path, laptop_resolv: Path) -> Iterator[Lab]:
    require_root_and_tools("curl", "nft", "dnsmasq", "getent")
    dnsmasq = start_dnsmasq(topology.lan, {NAME: LAN})
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
    try:
        password = secrets.token_urlsafe(16)
        alice = service.admin_json("user", "add", "alice", "--password-stdin", input=password)
        service.admin_json("connector-group", "add", "branch-office")
        service.admin_json(
            "app", "add", "corp", "--connector-group", "branch-office",
            "--dns-suffix", "corp.example",
        )  # fmt: skip
        service.admin_json(
            "segment", "add", "corp", "--type", "dns_suffix", "--destination", "corp.example",
            "--ports", "22,80",
        )  # fmt: skip
        service.admin_json(
            "segment", "add", "corp", "--type", "ip", "--destination", LAN,
            "--ports", "53", "--protocol", "udp",
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
        yield Lab(service, connector, dnsmasq, laptop_resolv, password)
    finally:
        if connector is not None:
            connector.stop()
        service.stop()
        dnsmasq.stop()  # the next module starts its own on the same port


@dataclass
class Client:
    profile: ClientProfile
    daemon: LimenProcess | None = None

    def up(self) -> LimenProcess:
        lp = spawn(
            self.profile.host,
            ["client", "up", "--poll-seconds", "0.5"],
            self.profile.env,
            self.profile.directory,
        )
        self.profile.processes.append(lp)
        deadline = time.monotonic() + READY_TIMEOUT
        while "limen client up:" not in lp.tail():
            lp.check_running()
            if time.monotonic() > deadline:
                raise LimenStartError(f"client up: not ready: {lp.tail()}")
            time.sleep(0.05)
        self.daemon = lp
        return lp

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.profile.run("status").stdout)["daemon"]
        return out

    def logs(self) -> str:
        return self.daemon.tail() if self.daemon is not None else ""


@pytest.fixture(scope="module")
def client(topology: Topology, lab: Lab) -> Iterator[Client]:
    profile = ClientProfile.create(topology.laptop, "alice-names")
    c = Client(profile)
    try:
        profile.login(lab.service, "alice", lab.password)
        c.up()
        yield c
    finally:
        profile.run("down", check=False)
        profile.stop()
        assert not _limen_tables(topology.laptop)
        assert lab.laptop_resolv.read_text() == LAPTOP_RESOLV


def _getent(host: Host, name: str) -> subprocess.CompletedProcess[str]:
    return host.run(["getent", "ahostsv4", name], check=False, timeout=20)


# --- the tests, in order ------------------------------------------------------------------------


def test_the_stub_is_the_resolver_and_answers_a_synthetic_address(
    topology: Topology, lab: Lab, client: Client
) -> None:
    conf = lab.laptop_resolv.read_text()
    assert "nameserver 127.0.53.1" in conf and "198.18.1.1" not in conf
    assert "search lan.example" in conf and "options ndots:1 edns0" in conf
    status = client.status()
    assert status["dns"]["mode"] == "resolv.conf"
    assert "corp.example" in status["dns"]["suffixes"]
    hosts = topology.laptop.run(["getent", "hosts", NAME], check=False, timeout=20)
    assert hosts.returncode == 0, hosts.stderr + client.logs()
    address = hosts.stdout.split()[0]
    assert ipaddress.ip_address(address) in SYNTHETIC, hosts.stdout
    # Stable while in use; another private name gets another address.
    assert _getent(topology.laptop, NAME).stdout.split()[0] == address
    other = _getent(topology.laptop, "git.corp.example").stdout.split()[0]
    assert ipaddress.ip_address(other) in SYNTHETIC and other != address


def test_unmodified_curl_and_ssh_reach_the_name(
    topology: Topology, lab: Lab, client: Client, lan_nginx: NginxInfo, lan_sshd: SshdInfo
) -> None:
    page = topology.laptop.run(
        ["curl", "-sS", "--noproxy", "*", "--max-time", "10", f"http://{NAME}{lan_nginx.path}"],
        check=False,
        timeout=30,
    )
    assert page.returncode == 0, page.stderr + client.logs()
    assert lan_nginx.marker in page.stdout
    ssh = topology.laptop.run(lan_sshd.ssh_argv("echo", "ok", addr=NAME), check=False, timeout=30)
    assert ssh.returncode == 0, ssh.stderr + client.logs()
    assert ssh.stdout.strip() == "ok"
    flows = json.loads(client.profile.run("traffic", "--json").stdout)
    assert any(f["destination"] == f"{NAME}:80" and f["action"] == "tunnel" for f in flows), flows


def test_the_traffic_log_records_the_name(lab: Lab, client: Client) -> None:
    rows = _poll(
        "the name flows in the traffic log",
        lambda: [r for r in lab.records(80) + lab.records(22) if r["dest_host"] == NAME],
    )
    assert {r["dest_port"] for r in rows} <= {22, 80}
    assert all(r["action"] == "allow" for r in rows), rows


def test_udp_to_a_tunneled_address_is_captured(
    topology: Topology, lab: Lab, client: Client
) -> None:
    # dig straight at the LAN's dnsmasq (UDP 53): the laptop has no path to the LAN, so an
    # answer came through Limen (tproxy → connect-udp → connector).
    assert client.status()["capture"]["udp_listen"]
    dig = topology.laptop.run(
        ["dig", "+short", "+time=3", "+tries=2", f"@{LAN}", NAME, "A"], check=False, timeout=30
    )
    assert dig.returncode == 0 and dig.stdout.split() == [LAN], dig.stdout + client.logs()
    rows = _poll(
        "the UDP flow in the traffic log",
        lambda: [r for r in lab.records(53) if r["dest_host"] == "" and r["transport"] == "udp"],
        timeout=30.0,  # a UDP flow's record is written when it ends (5 s idle for port 53)
    )
    assert all(r["action"] == "allow" for r in rows), rows


def test_doctor_checks_the_stub(client: Client) -> None:
    doctor = client.profile.run("doctor", "--json", check=False)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    assert checks["dns"]["status"] == "ok", doctor.stdout
    assert "100.80." in checks["dns"]["detail"]


def test_with_the_edge_unreachable_a_block_name_fails_fast(
    topology: Topology, lab: Lab, client: Client, lan_nginx: NginxInfo
) -> None:
    laptop = topology.laptop
    laptop.run(["nft", "-f", "-"], input=(
        "table inet e2ecut {\n chain out {\n  type filter hook output priority -10;\n"
        f"  ip daddr {EDGE_FOR_LAPTOP} tcp dport {EDGE_PORT} reject with tcp reset\n"
        " }\n}\n"
    ))  # fmt: skip
    try:
        _poll("the client to notice", lambda: client.status()["health"]["edge"] != "up")
        # Hardening "block": the name still resolves (synthetic), the connection is reset at
        # once by the listener — never sent anywhere else.
        address = _getent(laptop, NAME).stdout.split()[0]
        assert ipaddress.ip_address(address) in SYNTHETIC
        started = time.monotonic()
        blocked = laptop.run(
            ["curl", "-sS", "--noproxy", "*", "--max-time", "10", f"http://{NAME}/"],
            check=False,
            timeout=30,
        )
        assert blocked.returncode != 0 and lan_nginx.marker not in blocked.stdout
        assert time.monotonic() - started < 3.0
        flows = json.loads(client.profile.run("traffic", "--json").stdout)
        assert any(f["destination"] == f"{NAME}:80" and f["action"] == "block" for f in flows)
    finally:
        laptop.run(["nft", "delete", "table", "inet", "e2ecut"], check=False)
    _poll("the edge back up", lambda: client.status()["health"]["edge"] == "up")


def test_down_and_crash_recovery_restore_the_resolver(
    topology: Topology, lab: Lab, client: Client
) -> None:
    laptop = topology.laptop
    client.profile.run("down")
    assert client.daemon is not None
    client.daemon.proc.wait(timeout=10)
    assert lab.laptop_resolv.read_text() == LAPTOP_RESOLV
    assert not _limen_tables(laptop) and not _limen_ip_rules(laptop)
    # Killed outright: the stub's resolv.conf stays; the next start restores it first.
    lp = client.up()
    assert "127.0.53.1" in lab.laptop_resolv.read_text()
    lp.proc.send_signal(signal.SIGKILL)
    lp.proc.wait(timeout=10)
    assert "127.0.53.1" in lab.laptop_resolv.read_text()
    assert len(_limen_ip_rules(laptop)) == 1
    restarted = client.up()
    assert "restored" in restarted.tail()
    assert len(_limen_ip_rules(laptop)) == 1  # the stale rule replaced, not doubled
    assert _getent(laptop, NAME).returncode == 0
    client.profile.run("down")
    restarted.proc.wait(timeout=10)
    assert lab.laptop_resolv.read_text() == LAPTOP_RESOLV
    assert not _limen_tables(laptop)
    assert not _limen_ip_rules(laptop)
