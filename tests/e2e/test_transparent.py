"""The transparent client end to end: ``limen client up`` in the laptop namespace, with no proxy
setting anywhere, captures unmodified ``curl`` and ``ssh`` to the private LAN through Limen.

Topology (netns.py): laptop 198.18.1.2 → edge 198.18.1.1 (``limen serve``) ← branch (connector)
→ LAN 198.18.3.10 (sshd, nginx, iperf3). The laptop cannot reach the LAN on its own, so a
working ``curl http://198.18.3.10/`` went through Limen. A small HTTP server on the edge's
laptop-facing address (198.18.1.1:8081) is reachable both directly and through the connector:
it shows where a connection came from (bypass and hardening ``pass`` must arrive from the
laptop, 198.18.1.2, never from the connector).

The tests share one deployment and run in file order.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import tarfile
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
    enroll_connector,
    limen_bin,
    limen_pids,
    spawn,
    start_connector,
    start_service,
)
from .netns import Host, Topology, require_root_and_tools
from .servers import Iperf3Info, NginxInfo, SshdInfo

pytestmark = pytest.mark.e2e

LAN = "198.18.3.10"
EDGE_FOR_LAPTOP = "198.18.1.1"
EDGE_FOR_BRANCH = "198.18.2.1"
LAPTOP = "198.18.1.2"
SIDE_PORT = 8081
_CURL_CONNECT_FAILURES = {7, 28}
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


def _curl(host: Host, url: str, max_time: float = 10) -> subprocess.CompletedProcess[str]:
    # --noproxy '*': no proxy from the runner's environment either. Nothing names Limen.
    return host.run(
        ["curl", "-sS", "--noproxy", "*", "--max-time", str(max_time), url],
        check=False,
        timeout=max_time + 20,
    )


def _limen_tables(host: Host) -> list[str]:
    out = host.run(["nft", "list", "tables"]).stdout
    return [line for line in out.splitlines() if line.split()[-1:] == ["limen"]]


@dataclass
class Lab:
    service: LimenService
    connector: LimenConnector
    app_id: str
    password: str
    side_log: Path

    def put_profile(self, body: dict[str, Any]) -> dict[str, Any]:
        """PUT the private-access settings (admin token on stdin, not in an argv)."""
        proc = self.service.host.run(
            [
                "curl", "-sS", "--fail-with-body", "--max-time", "10",
                "--cacert", str(self.service.ca_file),
                "-X", "PUT", "-H", "@-", "-H", "Content-Type: application/json",
                "--data", json.dumps(body),
                f"{self.service.api_url}/api/v1/forwarding-profiles/private-access",
            ],
            input=f"Authorization: Bearer {self.service.admin_token}\n",
        )  # fmt: skip
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def records(self, port: int) -> list[dict[str, Any]]:
        page = self.service.admin_json("traffic", "list", "--user", "alice", "--limit", "500")
        return [r for r in page["items"] if r["dest_port"] == port]

    def side_sources(self) -> list[str]:
        """Client addresses in the side server's access log."""
        return [line.split()[0] for line in self.side_log.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def lab(topology: Topology) -> Iterator[Lab]:
    require_root_and_tools("curl", "nft", "nc")
    service = start_service(
        topology.edge,
        public_host=EDGE_FOR_LAPTOP,
        extra_san=[EDGE_FOR_BRANCH],
        settings={
            "LIMEN_TRAFFIC_LOG_FLUSH_SECONDS": "0.2",
            "LIMEN_CONFIG_POLL_SECONDS": "0.2",
        },
    )
    connector: LimenConnector | None = None
    try:
        side_dir = topology.edge.tempdir("side")
        side_log = side_dir / "access.log"
        (side_dir / "index.html").write_text("side server\n")
        with side_log.open("wb") as logf:
            topology.edge.popen(
                [sys.executable, "-m", "http.server", str(SIDE_PORT),
                 "--bind", EDGE_FOR_LAPTOP, "--directory", str(side_dir)],
                stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        topology.edge.wait_port(EDGE_FOR_LAPTOP, SIDE_PORT)
        password = secrets.token_urlsafe(16)
        alice = service.admin_json("user", "add", "alice", "--password-stdin", input=password)
        service.admin_json("connector-group", "add", "branch-office")
        app = service.admin_json("app", "add", "lan", "--connector-group", "branch-office")
        for dest_type, dest, ports in (
            ("ip", LAN, "22,80"),
            ("cidr", "198.18.1.0/24", str(SIDE_PORT)),
        ):
            service.admin_json(
                "segment", "add", "lan", "--type", dest_type, "--destination", dest,
                "--ports", ports,
            )  # fmt: skip
        service.admin_json("assign", "lan", alice["id"])
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
        start_connector(connector, service)
        yield Lab(service, connector, app["id"], password, side_log)
    finally:
        if connector is not None:
            connector.stop()
        service.stop()


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


LAPTOP_RESOLV = "# e2e laptop\nnameserver 198.18.1.1\n"


@pytest.fixture(scope="module")
def laptop_resolv(topology: Topology) -> Iterator[Path]:
    """The laptop's own resolv.conf: `limen client up` makes its DNS stub the resolver, and
    must do so in the namespace's file, never in the real machine's."""
    path = Path("/etc/netns") / topology.laptop.ns / "resolv.conf"
    before = path.read_bytes() if path.exists() else None
    topology.laptop.set_resolv_conf(LAPTOP_RESOLV)
    try:
        yield path
    finally:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(before)


@pytest.fixture(scope="module")
def client(topology: Topology, lab: Lab, laptop_resolv: Path) -> Iterator[Client]:
    profile = ClientProfile.create(topology.laptop, "alice")
    c = Client(profile)
    try:
        profile.login(lab.service, "alice", lab.password)
        c.up()
        yield c
    finally:
        profile.run("down", check=False)
        profile.stop()
        assert not _limen_tables(topology.laptop)
        assert laptop_resolv.read_text() == LAPTOP_RESOLV


# --- the tests, in order ------------------------------------------------------------------------


def test_curl_and_ssh_work_unmodified(
    topology: Topology, lab: Lab, client: Client, lan_nginx: NginxInfo, lan_sshd: SshdInfo
) -> None:
    assert _limen_tables(topology.laptop), "no inet limen table while the client runs"
    page = _curl(topology.laptop, lan_nginx.url)
    assert page.returncode == 0, page.stderr + (client.daemon.tail() if client.daemon else "")
    assert lan_nginx.marker in page.stdout
    ssh = topology.laptop.run(lan_sshd.ssh_argv("echo", "ok"), check=False, timeout=30)
    assert ssh.returncode == 0, ssh.stderr
    assert ssh.stdout.strip() == "ok"
    status = client.status()
    assert status["running"] and status["user"] == "alice"
    assert status["mode"] == "transparent" and status["capture"]["state"] == "active"
    assert status["health"]["edge"] == "up" and status["profile"]["ip_rules"] == 2
    flows = json.loads(client.profile.run("traffic", "--json").stdout)
    assert any(f["destination"] == f"{LAN}:80" and f["process"] == "curl" for f in flows)


def test_the_traffic_log_names_curl(lab: Lab, client: Client) -> None:
    records = _poll("the curl flow in the traffic log", lambda: lab.records(80))
    assert all(r["action"] == "allow" for r in records)
    assert any(r["process_name"].startswith("curl (") for r in records), records


def test_test_destination_and_doctor(client: Client) -> None:
    out = json.loads(client.profile.run("test-destination", f"{LAN}:22").stdout)
    assert out["outcome"] == "tunnel" and out["rule"]["app_name"] == "lan"
    none = json.loads(client.profile.run("test-destination", "198.18.9.9:22").stdout)
    assert none["outcome"] == "direct" and none["rule"] is None
    doctor = client.profile.run("doctor", "--json", check=False)
    checks = {c["name"]: c["status"] for c in json.loads(doctor.stdout)}
    assert doctor.returncode == 0, doctor.stdout
    for name in ("signed_in", "api", "token", "profile", "edge", "daemon", "nftables"):
        assert checks[name] == "ok", (name, doctor.stdout)
    assert checks["test_flow"] == "ok"


def test_support_bundle_has_no_secrets(client: Client) -> None:
    state = json.loads((client.profile.directory / "client.json").read_text())
    secrets_ = [state["access_token"], state["refresh_token"], client.profile.token()]
    out = client.profile.directory / "bundle.tar.gz"
    client.profile.run("collect-logs", "--output", str(out))
    assert out.stat().st_mode & 0o777 == 0o600
    with tarfile.open(out) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers()}
        texts = [tar.extractfile(m).read().decode() for m in tar.getmembers()]  # type: ignore[union-attr]
    assert {"client-state.json", "daemon-status.json", "daemon-log.txt", "nftables.txt"} <= names
    assert any("redirect" in t for t in texts)  # the nftables rules are in
    for text in texts:
        for secret in secrets_:
            assert secret and secret not in text


def test_without_root_it_says_so(topology: Topology, client: Client) -> None:
    require_root_and_tools("capsh")
    proc = topology.laptop.run(
        ["capsh", "--drop=cap_net_admin", "--", "-c", f"{limen_bin()} client up"],
        check=False,
    )
    assert proc.returncode == 1
    assert "needs root" in proc.stderr and "limen client socks" in proc.stderr


def test_a_bypassed_destination_does_not_touch_the_edge(
    topology: Topology, lab: Lab, client: Client, lan_sshd: SshdInfo
) -> None:
    before = len(lab.side_sources())
    tunneled = _curl(topology.laptop, f"http://{EDGE_FOR_LAPTOP}:{SIDE_PORT}/")
    assert tunneled.returncode == 0, tunneled.stderr
    # Through Limen, the connector (branch) made the connection.
    _poll("the tunneled request in the side log", lambda: len(lab.side_sources()) > before)
    assert lab.side_sources()[-1] == "198.18.2.2"
    records_before = len(_poll("the tunneled record", lambda: lab.records(SIDE_PORT)))

    lab.put_profile({"bypass": [{"type": "ip", "destination": EDGE_FOR_LAPTOP}]})
    _poll(
        "the bypass rule at the client",
        lambda: (
            json.loads(
                client.profile.run("test-destination", f"{EDGE_FOR_LAPTOP}:{SIDE_PORT}").stdout
            )["outcome"]
            == "direct"
        ),
    )
    direct = _curl(topology.laptop, f"http://{EDGE_FOR_LAPTOP}:{SIDE_PORT}/")
    assert direct.returncode == 0, direct.stderr
    _poll("the direct request in the side log", lambda: lab.side_sources()[-1] == LAPTOP)
    # A tunneled flow after the direct one: once its record is in, the log is written past
    # the moment a record of the bypassed request would have been.
    marker = len(lab.records(22))
    ssh = topology.laptop.run(lan_sshd.ssh_argv("true"), check=False, timeout=30)
    assert ssh.returncode == 0, ssh.stderr
    _poll("the later tunneled record", lambda: len(lab.records(22)) > marker)
    assert len(lab.records(SIDE_PORT)) == records_before
    lab.put_profile({"bypass": []})


def test_pause_and_resume(
    topology: Topology, lab: Lab, client: Client, lan_nginx: NginxInfo
) -> None:
    paused = client.profile.run("pause")
    assert "paused" in paused.stdout
    assert client.status()["capture"]["state"] == "paused"
    blocked = _curl(topology.laptop, lan_nginx.url, max_time=3)
    assert blocked.returncode in _CURL_CONNECT_FAILURES
    client.profile.run("resume")
    page = _curl(topology.laptop, lan_nginx.url)
    assert page.returncode == 0 and lan_nginx.marker in page.stdout


def test_a_new_segment_is_tunneled_within_five_seconds(
    topology: Topology, lab: Lab, client: Client, lan_iperf3: Iperf3Info
) -> None:
    probe = ["nc", "-z", "-w", "2", LAN, str(lan_iperf3.port)]
    assert topology.laptop.run(probe, check=False).returncode != 0
    lab.service.admin_json(
        "segment", "add", "lan", "--type", "ip", "--destination", LAN,
        "--ports", str(lan_iperf3.port),
    )  # fmt: skip
    added = time.monotonic()
    _poll(
        "the new segment to be tunneled",
        lambda: topology.laptop.run(probe, check=False).returncode == 0,
        timeout=8.0,
    )
    assert time.monotonic() - added < 5.0 + 2.0  # 5 s, plus one nc attempt in flight


def test_hardening_with_the_edge_unreachable(
    topology: Topology, lab: Lab, client: Client, lan_nginx: NginxInfo
) -> None:
    laptop = topology.laptop
    # Cut the laptop off the edge port (the API on 9443 stays reachable).
    laptop.run(["nft", "-f", "-"], input=(
        "table inet e2ecut {\n chain out {\n  type filter hook output priority -10;\n"
        f"  ip daddr {EDGE_FOR_LAPTOP} tcp dport {lab.service.edge_port} reject with tcp reset\n"
        " }\n}\n"
    ))  # fmt: skip
    try:
        _poll("the client to notice", lambda: client.status()["health"]["edge"] != "up")
        started = time.monotonic()
        blocked = _curl(laptop, lan_nginx.url, max_time=10)
        assert blocked.returncode == 7, blocked.stderr  # refused at once: hardening "block"
        assert time.monotonic() - started < 3.0
        assert client.status()["capture"]["state"] == "edge_down"

        lab.put_profile({"hardening": "pass"})
        before = len(lab.side_sources())
        _poll(
            "the pass rule to go direct",
            lambda: _curl(laptop, f"http://{EDGE_FOR_LAPTOP}:{SIDE_PORT}/", 3).returncode == 0,
        )
        assert len(lab.side_sources()) > before and lab.side_sources()[-1] == LAPTOP
    finally:
        laptop.run(["nft", "delete", "table", "inet", "e2ecut"], check=False)
        lab.put_profile({"hardening": "block"})
    _poll("the edge back up", lambda: client.status()["health"]["edge"] == "up")
    page = _curl(laptop, lan_nginx.url)
    assert page.returncode == 0 and lan_nginx.marker in page.stdout


def test_down_and_crash_recovery_leave_no_table(
    topology: Topology, lab: Lab, client: Client, laptop_resolv: Path
) -> None:
    laptop = topology.laptop
    down = client.profile.run("down")
    assert "stopped" in down.stdout
    assert not _limen_tables(laptop)
    assert client.daemon is not None
    client.daemon.proc.wait(timeout=10)
    # A daemon killed outright leaves its table; the next start removes it, down removes all.
    lp = client.up()
    assert _limen_tables(laptop)
    lp.proc.send_signal(signal.SIGKILL)
    lp.proc.wait(timeout=10)
    assert _limen_tables(laptop), "the killed daemon's table should still be there"
    restarted = client.up()
    assert "removed a stale" in restarted.tail()
    assert len(_limen_tables(laptop)) == 1
    client.profile.run("down")
    restarted.proc.wait(timeout=10)
    assert not _limen_tables(laptop)
    # down with nothing running, after another kill: removes the stale table and restores
    # the resolver the killed daemon had taken over.
    lp = client.up()
    assert "127.0.53.1" in laptop_resolv.read_text()
    lp.proc.send_signal(signal.SIGKILL)
    lp.proc.wait(timeout=10)
    assert "stale" in client.profile.run("down").stdout
    assert not _limen_tables(laptop)
    assert laptop_resolv.read_text() == LAPTOP_RESOLV
    assert not [p for p in limen_pids(laptop) if p in (lp.proc.pid, restarted.proc.pid)]
