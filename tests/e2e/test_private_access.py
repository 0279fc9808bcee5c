"""Private TCP access end to end: real ``limen`` processes in the namespace topology.

``limen serve`` runs on the edge, ``limen connector run`` on the branch (dialling the edge
outbound through 198.18.2.1), and ``limen client socks|forward`` on the laptop for two users:
alice, assigned to an application whose segment is the LAN host's ssh, http and iperf3 ports,
and mallory, who is not. Real ``ssh``, ``curl`` and ``iperf3`` on the laptop then reach the
real ``sshd``, ``nginx`` and ``iperf3`` servers of the LAN host, which the laptop cannot reach
otherwise (the first test shows that, before any Limen process exists). The traffic log is
read back with ``limen admin traffic list``.

The tests of this module share one deployment (module-scoped fixtures) and run in file order:
the traffic-log test at the end checks the records of the flows made before it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest

from .deployment import (
    CURL_CONNECT_FAILURES,
    LAN,
    add_user,
    curl,
    edge_proxy_args,
    edge_service,
    enroll_branch_connector,
    logs,
    poll,
    proxy_header_file,
    publish_app,
    ssh_via_forward,
    traffic_records,
)
from .limen_procs import (
    ClientProfile,
    LimenConnector,
    LimenProcess,
    LimenService,
    limen_pids,
    start_connector,
)
from .netns import Host, Topology, require_root_and_tools
from .servers import Iperf3Info, NginxInfo, SshdInfo

pytestmark = pytest.mark.e2e

API_PORT = 9443
EDGE_PORT = 8443
# Laptop-local ports of alice's client processes (and mallory's SOCKS proxy).
SOCKS_PORT = 1080
MALLORY_SOCKS_PORT = 1081
SSH_FWD_PORT = 2222
HTTP_FWD_PORT = 8080
IPERF_FWD_PORT = 5201
# Bounded waits for asynchronous effects (traffic-log batches, log lines).
_WAIT = 15.0


# --- the deployment ---------------------------------------------------------------------------


@dataclass
class Deployment:
    """The running Limen service, the tenant built in it and the connector serving it."""

    service: LimenService
    connector: LimenConnector
    app_id: str
    alice_password: str
    mallory_password: str

    def logs(self) -> str:
        """The ends of the service's and the connector's logs, for failure messages."""
        return logs(self.service, connector=self.connector.process)


@pytest.fixture(scope="module")
def deployment(topology: Topology) -> Iterator[Deployment]:
    """``limen serve`` on the edge, a tenant built with ``limen admin``, a connector on the
    branch. At teardown every Limen process is gone from every namespace."""
    require_root_and_tools("curl")
    with edge_service(topology, API_PORT, EDGE_PORT) as service, ExitStack() as cleanup:
        alice_pw, mallory_pw = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        alice = add_user(service, "alice", alice_pw)
        add_user(service, "mallory", mallory_pw)
        service.admin_json("connector-group", "add", "branch-office")
        app = publish_app(service, "lan-servers", "branch-office", "22,80,5201")
        service.admin_json("assign", "lan-servers", alice["id"])
        connector = enroll_branch_connector(topology, service, "branch-office", "branch-1")
        cleanup.callback(connector.stop)
        start_connector(connector, service)
        yield Deployment(service, connector, app["id"], alice_pw, mallory_pw)


@dataclass
class Alice:
    """alice's signed-in client on the laptop with her SOCKS proxy and port forwards."""

    profile: ClientProfile
    socks: LimenProcess
    forwards: dict[int, LimenProcess]


@pytest.fixture(scope="module")
def alice(topology: Topology, deployment: Deployment) -> Iterator[Alice]:
    """alice signed in on the laptop, ``socks`` on 1080, forwards for ssh, http and iperf3."""
    profile = ClientProfile.create(topology.laptop, "alice")
    try:
        profile.login(deployment.service, "alice", deployment.alice_password)
        socks = profile.socks(SOCKS_PORT)
        forwards = {
            SSH_FWD_PORT: profile.forward(f"{LAN}:22", SSH_FWD_PORT),
            HTTP_FWD_PORT: profile.forward(f"{LAN}:80", HTTP_FWD_PORT),
            IPERF_FWD_PORT: profile.forward(f"{LAN}:5201", IPERF_FWD_PORT),
        }
        yield Alice(profile, socks, forwards)
    finally:
        profile.stop()


@pytest.fixture(scope="module")
def mallory(topology: Topology, deployment: Deployment) -> Iterator[LimenProcess]:
    """mallory (not assigned) signed in on the same laptop, her SOCKS proxy on 1081."""
    profile = ClientProfile.create(topology.laptop, "mallory")
    try:
        profile.login(deployment.service, "mallory", deployment.mallory_password)
        yield profile.socks(MALLORY_SOCKS_PORT)
    finally:
        profile.stop()


# --- the tests, in order ----------------------------------------------------------------------


def test_laptop_cannot_reach_the_lan_without_limen(
    topology: Topology, lan_nginx: NginxInfo, lan_sshd: SshdInfo
) -> None:
    # The premise of everything below; runs before any Limen process exists.
    assert all(not limen_pids(h) for h in topology)
    proc = curl(topology.laptop, "--max-time", "2", lan_nginx.url)
    assert proc.returncode in CURL_CONNECT_FAILURES, (proc.returncode, proc.stderr)
    assert lan_nginx.marker not in proc.stdout
    # (ssh_argv sets ConnectTimeout=5; ssh keeps the first value of an option.)
    proc = topology.laptop.run(lan_sshd.ssh_argv("echo", "ok"), check=False)
    assert proc.returncode == 255, (proc.returncode, proc.stderr)
    assert "ok" not in proc.stdout


def test_ssh_through_forward(topology: Topology, alice: Alice, lan_sshd: SshdInfo) -> None:
    proc = topology.laptop.run(
        ssh_via_forward(lan_sshd, SSH_FWD_PORT, "echo", "ok"), check=False, timeout=30
    )
    assert proc.returncode == 0, proc.stderr + alice.forwards[SSH_FWD_PORT].tail()
    assert proc.stdout.strip() == "ok"


def test_ssh_through_socks(topology: Topology, alice: Alice, lan_sshd: SshdInfo) -> None:
    require_root_and_tools("nc")  # netcat-openbsd: the SOCKS5 ProxyCommand
    proxy = f"ProxyCommand=nc -X 5 -x 127.0.0.1:{SOCKS_PORT} %h %p"
    proc = topology.laptop.run(
        lan_sshd.ssh_argv("echo", "ok", extra=["-o", proxy]), check=False, timeout=30
    )
    assert proc.returncode == 0, proc.stderr + alice.socks.tail()
    assert proc.stdout.strip() == "ok"


def test_curl_through_forward_and_socks(
    topology: Topology, deployment: Deployment, alice: Alice, lan_nginx: NginxInfo
) -> None:
    via_forward = f"http://127.0.0.1:{HTTP_FWD_PORT}{lan_nginx.path}"
    proc = curl(topology.laptop, via_forward)
    assert proc.returncode == 0, proc.stderr + alice.forwards[HTTP_FWD_PORT].tail()
    assert lan_nginx.marker in proc.stdout

    socks = ["--socks5-hostname", f"127.0.0.1:{SOCKS_PORT}"]
    proc = curl(topology.laptop, *socks, lan_nginx.url, noproxy=None)
    assert proc.returncode == 0, proc.stderr + alice.socks.tail() + deployment.logs()
    assert lan_nginx.marker in proc.stdout

    # 4 MiB down each path: many flow-control windows, byte-exact.
    expected = hashlib.sha256((lan_nginx.root / lan_nginx.big_path.lstrip("/")).read_bytes())
    for args, proxied in (
        ([f"http://127.0.0.1:{HTTP_FWD_PORT}{lan_nginx.big_path}"], False),
        ([*socks, f"http://{LAN}{lan_nginx.big_path}"], True),
    ):
        got = _download(topology.laptop, args, proxied)
        assert got == (lan_nginx.big_size, expected.hexdigest()), args


def _download(host: Host, curl_args: list[str], proxied: bool = False) -> tuple[int, str]:
    """Size and sha256 of what curl downloads (to a file: namespaces share the filesystem)."""
    out = host.tempdir("download") / "body"
    noproxy = None if proxied else "*"
    proc = curl(host, "-f", "-o", str(out), *curl_args, noproxy=noproxy, timeout=40)
    assert proc.returncode == 0, (curl_args, proc.stderr)
    body = out.read_bytes()
    return len(body), hashlib.sha256(body).hexdigest()


def test_standard_client_connect_through_the_edge(
    topology: Topology, deployment: Deployment, alice: Alice, lan_nginx: NginxInfo
) -> None:
    # curl's own HTTPS-proxy CONNECT with a bearer token from `limen client token`: no Limen
    # code on this path but the edge. The header goes by file, not on curl's command line.
    token = alice.profile.token()
    assert token.count(".") == 2  # a JWT
    header_file = proxy_header_file(alice.profile.directory, token)
    proxy = edge_proxy_args(deployment.service, header_file)
    proc = curl(topology.laptop, *proxy, lan_nginx.url, noproxy=None)
    assert proc.returncode == 0, proc.stderr + deployment.logs()
    assert lan_nginx.marker in proc.stdout
    # Without the token the edge refuses the CONNECT: curl reports the proxy's 401.
    proc = curl(topology.laptop, *edge_proxy_args(deployment.service), lan_nginx.url, noproxy=None)
    assert proc.returncode != 0
    assert "401" in proc.stderr, proc.stderr
    assert lan_nginx.marker not in proc.stdout


def test_iperf3_through_forward(topology: Topology, alice: Alice, lan_iperf3: Iperf3Info) -> None:
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(IPERF_FWD_PORT), "-t", "2", "-J"]
    try:
        proc = topology.laptop.run(argv, check=False, timeout=20)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"iperf3 hung: {exc.stdout!r}\n{alice.forwards[IPERF_FWD_PORT].tail()}"
        ) from None
    assert proc.returncode == 0, proc.stdout[-800:] + proc.stderr
    report = json.loads(proc.stdout)
    sent = report["end"]["sum_sent"]["bits_per_second"]
    received = report["end"]["sum_received"]["bits_per_second"]
    assert received > 0 and sent > 0
    # A figure for the record, not a bar: no timing asserts in tests.
    print(f"\niperf3 through limen client forward: {received / 1e6:.0f} Mbit/s received")


def test_unassigned_user_is_refused(
    topology: Topology, deployment: Deployment, mallory: LimenProcess, lan_nginx: NginxInfo
) -> None:
    socks = ["--socks5-hostname", f"127.0.0.1:{MALLORY_SOCKS_PORT}"]
    proc = curl(topology.laptop, *socks, lan_nginx.url, noproxy=None)
    assert proc.returncode != 0, proc.stdout
    assert lan_nginx.marker not in proc.stdout
    # The client says why on its stderr: the edge's refusal code.
    poll(
        "mallory's client to report the refusal",
        lambda: "not_assigned" in mallory.tail(),
        timeout=_WAIT,
    )

    def blocked() -> list[dict[str, Any]]:
        records = traffic_records(deployment.service, "--user", "mallory")
        return [r for r in records if r["action"] == "block"]

    records = poll("mallory's blocked flow in the traffic log", blocked, timeout=_WAIT)
    assert {r["code"] for r in records} == {"not_assigned"}
    assert all(r["username"] == "mallory" and r["dest_port"] == 80 for r in records)
    assert all(r["bytes_up"] == 0 and r["bytes_down"] == 0 for r in records)


def test_traffic_log_has_alices_flows(
    topology: Topology,
    deployment: Deployment,
    alice: Alice,
    lan_sshd: SshdInfo,
    lan_nginx: NginxInfo,
) -> None:
    # Flows of its own, so that this test stands alone: one ssh session and one 4 MiB
    # download through the forwards. (Records are written when a flow ends.)
    proc = topology.laptop.run(ssh_via_forward(lan_sshd, SSH_FWD_PORT, "true"), check=False)
    assert proc.returncode == 0, proc.stderr
    got = _download(topology.laptop, [f"http://127.0.0.1:{HTTP_FWD_PORT}{lan_nginx.big_path}"])
    assert got[0] == lan_nginx.big_size

    def allowed() -> list[dict[str, Any]] | None:
        records = traffic_records(deployment.service, "--user", "alice", "--limit", "500")
        rows = [r for r in records if r["action"] == "allow"]
        ssh = any(r["dest_port"] == 22 for r in rows)
        big = any(r["dest_port"] == 80 and r["bytes_down"] >= lan_nginx.big_size for r in rows)
        return rows if ssh and big else None

    rows = poll("alice's ssh session and download in the traffic log", allowed, timeout=_WAIT)
    # Every allowed flow of alice's, these and those of the tests before, is fully described.
    for r in rows:
        assert r["dest_ip"] == LAN and r["dest_port"] in (22, 80, 5201), r
        assert r["username"] == "alice" and r["user_id"].startswith("usr_"), r
        assert r["device_id"].startswith("dev_"), r
        assert r["app_id"] == deployment.app_id, r
        assert r["segment_id"].startswith("seg_"), r
        assert r["connector_id"] == deployment.connector.connector_id, r
        assert r["transport"] == "tcp", r
        assert r["close_reason"] in ("client_closed", "target_closed"), r
        assert r["started_at"] <= r["ended_at"], r
        # Readiness checks open no flows, so every flow carried data; ssh and http both ways
        # (an iperf3 data connection may carry data one way only).
        assert r["bytes_up"] + r["bytes_down"] > 0, r
        if r["dest_port"] in (22, 80):
            assert r["bytes_up"] > 0 and r["bytes_down"] > 0, r
