"""Continuous access evaluation end to end: real ``limen`` processes in the namespaces.

``limen serve`` (strict enforcement on) runs on the edge, a connector on the branch, and
alice's ``limen client forward`` processes on the laptop carry a live ``ssh`` session and a
running ``iperf3 -t 30`` to the LAN host. ``limen admin user disable alice`` on the edge must
close both; the time from the admin command's return to each victim process's exit is
printed (asserted only against a generous bound). New flows then get the claims challenge,
``limen client status`` says why access is paused, and after ``user enable`` and a new
``limen client login`` the running forward works again.

Strict enforcement: alice's access token, copied to a second laptop namespace with another
address, is refused there and still accepted on her laptop.

The SET variants (a pushed and a polled SET from a test transmitter) run in the data-plane
component tests (tests/dataplane/test_cae.py): a transmitter process inside the edge
namespace is not built here.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .deployment import (
    LAN,
    add_user,
    curl,
    edge_proxy_args,
    edge_service,
    enroll_branch_connector,
    poll,
    proxy_header_file,
    publish_app,
    ssh_via_forward,
)
from .limen_procs import (
    ClientProfile,
    LimenConnector,
    LimenProcess,
    LimenService,
    start_connector,
)
from .netns import Host, Topology, _ip, _kill_ns_pids, require_root_and_tools
from .servers import Iperf3Info, SshdInfo

pytestmark = pytest.mark.e2e

# Not the ports of test_private_access's deployment: each module runs its own service.
API_PORT = 9643
EDGE_PORT = 8643
SSH_FWD_PORT = 2322
IPERF_FWD_PORT = 5301
#: Generous correctness bound for a cut (the bar is under 1 s; the figure is printed).
CUT_BOUND = 5.0
_WAIT = 20.0
# The second laptop: its own link to the edge.
LAPTOP2_ADDR = "198.18.4.2"
EDGE_FOR_LAPTOP2 = "198.18.4.1"


def _poll(what: str, probe: Callable[[], Any]) -> Any:
    return poll(what, probe, timeout=_WAIT, interval=0.05)


@dataclass
class Deployment:
    service: LimenService
    connector: LimenConnector
    alice_id: str
    password: str


@pytest.fixture(scope="module")
def deployment(topology: Topology) -> Iterator[Deployment]:
    require_root_and_tools("curl", "ssh", "iperf3")
    strict = {"LIMEN_CAE_STRICT_IP": "true"}
    with edge_service(topology, API_PORT, EDGE_PORT, strict) as service, ExitStack() as cleanup:
        password = secrets.token_urlsafe(16)
        alice = add_user(service, "alice", password)
        service.admin_json("connector-group", "add", "branch-cae")
        publish_app(service, "lan-cae", "branch-cae", "22,5201")
        service.admin_json("assign", "lan-cae", alice["id"])
        connector = enroll_branch_connector(topology, service, "branch-cae", "branch-cae-1")
        cleanup.callback(connector.stop)
        start_connector(connector, service)
        yield Deployment(service, connector, alice["id"], password)


@dataclass
class Alice:
    profile: ClientProfile
    ssh_forward: LimenProcess
    iperf_forward: LimenProcess


@pytest.fixture(scope="module")
def alice(topology: Topology, deployment: Deployment) -> Iterator[Alice]:
    profile = ClientProfile.create(topology.laptop, "alice-cae")
    try:
        profile.login(deployment.service, "alice", deployment.password)
        yield Alice(
            profile,
            profile.forward(f"{LAN}:22", SSH_FWD_PORT),
            profile.forward(f"{LAN}:5201", IPERF_FWD_PORT),
        )
    finally:
        profile.stop()


def _ssh(lan_sshd: SshdInfo, *command: str) -> list[str]:
    return ssh_via_forward(lan_sshd, SSH_FWD_PORT, *command)


class _ExitClock:
    """Notes the monotonic time a process exits, from a thread blocked in ``wait()``."""

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self.proc = proc
        self.at: float | None = None
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        self.proc.wait()
        self.at = time.monotonic()

    def result(self, timeout: float) -> float:
        self._thread.join(timeout)
        if self.at is None:
            raise AssertionError(f"{self.proc.args!r} still running after {timeout}s")
        return self.at


def _wait_line(proc: subprocess.Popen[str], marker: str) -> None:
    """Read ``proc``'s output until a line contains ``marker`` (iperf3 prints one a second,
    so this is bounded by the test's own duration); fail on EOF."""
    assert proc.stdout is not None
    seen: list[str] = []
    while line := proc.stdout.readline():
        if marker in line:
            return
        seen.append(line)
    err = proc.stderr.read() if proc.stderr else ""
    raise AssertionError(f"{proc.args!r} ended before {marker!r}: {''.join(seen)}{err}")


def _status(profile: ClientProfile) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(profile.run("status").stdout)
    return data


def test_disable_closes_live_ssh_and_iperf3_and_sign_in_resumes(
    topology: Topology,
    deployment: Deployment,
    alice: Alice,
    lan_sshd: SshdInfo,
    lan_iperf3: Iperf3Info,
) -> None:
    laptop = topology.laptop
    service = deployment.service
    assert laptop.run(_ssh(lan_sshd, "echo", "ok"), check=False).stdout.strip() == "ok"

    # The victims: a live ssh session and a running iperf3 test.
    ssh = laptop.popen(
        _ssh(lan_sshd, "echo ready; sleep 60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert ssh.stdout is not None
    assert ssh.stdout.readline().strip() == "ready", ssh.stderr
    iperf = laptop.popen(
        # --forceflush: each interval line now, not when the (piped) output's buffer fills
        [
            "iperf3",
            "-c",
            "127.0.0.1",
            "-p",
            str(IPERF_FWD_PORT),
            "-t",
            "30",
            "-i",
            "1",
            "--forceflush",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    # Data is flowing once iperf3 reports its first one-second interval ("0.00-1.00 sec",
    # or "0.00-1.01 sec" when its timer fires a little late).
    _wait_line(iperf, "0.00-1.")
    if iperf.poll() is not None or ssh.poll() is not None:
        out = iperf.stdout.read() if iperf.stdout else ""
        err = iperf.stderr.read() if iperf.stderr else ""
        raise AssertionError(f"a victim ended before the signal: iperf3 {out[-800:]} {err}")
    clocks = {"ssh": _ExitClock(ssh), "iperf3": _ExitClock(iperf)}

    started = time.monotonic()
    service.admin("user", "disable", "alice")
    returned = time.monotonic()
    gone = {name: clock.result(CUT_BOUND + 5) for name, clock in clocks.items()}
    # The CLI process's start-up is part of the call; the edge cuts before the API answers,
    # so "after the return" is often negative: the victims were gone by then.
    print(
        "\nadmin user disable ("
        + ", ".join(
            f"{name} exited {(t - returned) * 1000:+.0f} ms after the command returned, "
            f"{(t - started) * 1000:.0f} ms after it started"
            for name, t in gone.items()
        )
        + ")"
    )
    assert all(t - returned < CUT_BOUND for t in gone.values())
    assert ssh.returncode == 255  # "Connection closed by remote host"
    assert max(gone.values()) - started < 25  # iperf3 -t 30 was cut, not finished
    for victim in (ssh, iperf):
        for pipe in (victim.stdout, victim.stderr):
            if pipe is not None:
                pipe.close()

    # New flows get the claims challenge; the forward says so, and `status` says why.
    proc = laptop.run(_ssh(lan_sshd, "echo", "ok"), check=False)
    assert proc.returncode == 255 and "ok" not in proc.stdout
    _poll(
        "the forward to report the challenge", lambda: "access paused" in alice.ssh_forward.tail()
    )
    paused = _poll("a paused client in status", lambda: _status(alice.profile)["paused"])
    assert any(p["paused_reason"].startswith(("user_disabled", "session_revoked")) for p in paused)
    assert any(p["purpose"] == f"forward {LAN}:22" for p in paused)

    def audited() -> list[dict[str, Any]]:
        out = service.admin_json("signal", "list", "--user", deployment.alice_id)
        rows = out["items"] if isinstance(out, dict) else out
        return [r for r in rows if (r.get("flows_cut") or 0) >= 2]

    (signal, *_) = _poll("the signal audit with the flows cut", audited)
    print(f"signal audit: {signal['flows_cut']} flows cut in {signal['time_to_cut_ms']:.1f} ms")

    # Enabled again: the old sign-in stays revoked (whether or not the edge has seen the
    # enable yet: user_disabled before, session_revoked after) until alice signs in again.
    service.admin("user", "enable", "alice")
    proc = laptop.run(_ssh(lan_sshd, "echo", "ok"), check=False)
    assert proc.returncode == 255
    alice.profile.login(service, "alice", deployment.password)
    proc = _poll(
        "ssh through the running forward after the new sign-in",
        lambda: (p := laptop.run(_ssh(lan_sshd, "echo", "ok"), check=False)).returncode == 0 and p,
    )
    assert proc.stdout.strip() == "ok"
    assert _status(alice.profile)["paused"] == []


# --- strict enforcement -------------------------------------------------------------------------


@pytest.fixture
def laptop2(topology: Topology) -> Iterator[Host]:
    """A second laptop namespace (198.18.4.2, its own link to the edge); removed after."""
    host = Host(name="laptop2", ns=f"{topology.prefix}-laptop2", addr=LAPTOP2_ADDR)
    _ip("netns", "add", host.ns)
    try:
        _ip("-n", host.ns, "link", "set", "lo", "up")
        _ip(
            "link", "add", "to-edge", "netns", host.ns,
            "type", "veth", "peer", "to-laptop2", "netns", topology.edge.ns,
        )  # fmt: skip
        for ns, ifname, addr in (
            (host.ns, "to-edge", LAPTOP2_ADDR),
            (topology.edge.ns, "to-laptop2", EDGE_FOR_LAPTOP2),
        ):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")
        _ip("-n", host.ns, "route", "add", "default", "via", EDGE_FOR_LAPTOP2)
        host.addrs.append(LAPTOP2_ADDR)
        yield host
    finally:
        host.stop_processes()
        _kill_ns_pids(host.ns)
        # Deleting the namespace deletes its veth pair, the edge's end included.
        subprocess.run(["ip", "netns", "del", host.ns], capture_output=True, timeout=15)


def _connect_with(
    host: Host, service: LimenService, token_file: Path
) -> subprocess.CompletedProcess[str]:
    """curl's own HTTPS-proxy CONNECT to the LAN ssh port with the token in ``token_file``
    (through the tunnel curl then speaks HTTP to sshd, which fails: only the CONNECT's
    answer matters)."""
    proxy = edge_proxy_args(service, token_file)
    return curl(host, *proxy, f"http://{LAN}:22/", noproxy="", max_time=5, timeout=20)


def test_strict_mode_refuses_a_copied_token_on_another_address(
    topology: Topology, deployment: Deployment, alice: Alice, laptop2: Host
) -> None:
    service = deployment.service
    token = alice.profile.token()
    header = proxy_header_file(laptop2.tempdir("stolen"), token)
    proc = _connect_with(laptop2, service, header)
    assert "401" in proc.stderr, (proc.returncode, proc.stderr)

    # The copied client directory, without the refresh token: the forward is refused too.
    copy = ClientProfile.create(laptop2, "stolen")
    state = json.loads((alice.profile.directory / "client.json").read_text())
    state["refresh_token"] = ""
    (copy.directory / "client.json").write_text(json.dumps(state))
    try:
        forward = copy.forward(f"{LAN}:22", SSH_FWD_PORT)
        proc = curl(laptop2, f"telnet://127.0.0.1:{SSH_FWD_PORT}", max_time=3, timeout=20)
        assert "SSH-" not in proc.stdout
        _poll(
            "the copy's forward to report the refusal",
            lambda: "address_mismatch" in forward.tail(),
        )
    finally:
        copy.stop()

    # On alice's own laptop the same token still works: the CONNECT is answered 200.
    own = proxy_header_file(alice.profile.directory, token)
    proc = _connect_with(topology.laptop, service, own)
    assert "401" not in proc.stderr and "CONNECT tunnel failed" not in proc.stderr, proc.stderr
