"""Continuous access evaluation from Shared Signals, end to end in the namespaces.

``limen serve`` runs on the edge; a test SSF transmitter (tests/ssf_transmitter.py, its own
signing key) runs as a process in the edge namespace on 127.0.0.1 and is registered with
``limen admin transmitter add``, once for push (RFC 8935) and once for poll (RFC 8936). A
live ``ssh`` session of alice through ``limen client forward`` on the laptop must end when
the transmitter sends a CAEP session-revoked SET for her; the time from the delivery
returning (the receiver's 202 for push; the SET being queued for poll) to the ssh process's
exit is printed and checked against a generous bound. The running forward hears the claims
challenge on its control stream without opening a flow, and ``limen client status`` says
why access is paused; a new sign-in resumes it.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.ssf_transmitter import MGMT_TOKEN

from .limen_procs import (
    ClientProfile,
    LimenConnector,
    LimenProcess,
    LimenService,
    base_env,
    enroll_connector,
    limen_pids,
    start_connector,
    start_service,
)
from .netns import Host, Topology, require_root_and_tools
from .servers import SshdInfo

pytestmark = pytest.mark.e2e

LAN = "198.18.3.10"
EDGE_FOR_LAPTOP = "198.18.1.1"
EDGE_FOR_BRANCH = "198.18.2.1"
# Ports of this module's own deployment (other modules run theirs).
API_PORT = 9743
EDGE_PORT = 8743
SSH_FWD_PORT = 2422
TRANSMITTER_PORTS = {"push": 9761, "poll": 9762}
#: Generous correctness bound for a cut (the bar is under 1 s; the figure is printed).
CUT_BOUND = 5.0
_WAIT = 20.0
_REPO = Path(__file__).resolve().parents[2]


def _poll(what: str, probe: Any, timeout: float = _WAIT, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Deployment:
    service: LimenService
    connector: LimenConnector
    alice_id: str
    password: str


@pytest.fixture(scope="module")
def deployment(topology: Topology) -> Iterator[Deployment]:
    require_root_and_tools("curl", "ssh")
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
        service.admin_json("connector-group", "add", "branch-ssf")
        service.admin_json("app", "add", "lan-ssf", "--connector-group", "branch-ssf")
        service.admin_json(
            "segment", "add", "lan-ssf", "--type", "ip", "--destination", LAN, "--ports", "22"
        )
        service.admin_json("assign", "lan-ssf", alice["id"])
        enrollment = service.admin_json(
            "connector", "enrollment-token", "--group", "branch-ssf", "--name", "branch-ssf-1"
        )
        connector = enroll_connector(
            topology.branch,
            service,
            enrollment["token"],
            api_addr=EDGE_FOR_BRANCH,
            edge=service.edge_address(EDGE_FOR_BRANCH),
        )
        start_connector(connector, service)
        yield Deployment(service, connector, alice["id"], password)
    finally:
        if connector is not None:
            connector.stop()
        service.stop()
        left = {h.name: limen_pids(h) for h in topology}
        assert not any(left.values()), f"Limen processes left behind: {left}"


@dataclass
class Alice:
    profile: ClientProfile
    forward: LimenProcess


@pytest.fixture(scope="module")
def alice(topology: Topology, deployment: Deployment) -> Iterator[Alice]:
    profile = ClientProfile.create(topology.laptop, "alice-ssf")
    try:
        profile.login(deployment.service, "alice", deployment.password)
        yield Alice(profile, profile.forward(f"{LAN}:22", SSH_FWD_PORT))
    finally:
        profile.stop()


class TransmitterProcess:
    """tests/ssf_transmitter.py as a process on 127.0.0.1 in ``host``'s namespace, driven
    with curl from the same namespace."""

    def __init__(self, host: Host, port: int, ca_file: Path) -> None:
        self.host = host
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.issuer = f"{self.base}/tenant1"
        self.log = host.tempdir(f"transmitter-{port}") / "transmitter.log"
        with self.log.open("wb") as out:
            self.proc = host.popen(
                [sys.executable, "-m", "tests.ssf_transmitter", "--port", str(port),
                 "--ca-file", str(ca_file)],
                cwd=_REPO,
                env=base_env({"PYTHONPATH": str(_REPO)}),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        _poll(f"the transmitter on port {port}", self._up)

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"transmitter exited: {self.log.read_text(errors='replace')}")
        return self._curl("GET", "/test/state", check=False).returncode == 0

    def _curl(
        self, method: str, path: str, body: dict[str, Any] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = ["curl", "-sS", "--fail", "--max-time", "10", "-X", method, f"{self.base}{path}"]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        return self.host.run(argv, check=check, timeout=20)

    def state(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._curl("GET", "/test/state").stdout)
        return result

    def emit(self, sub: str) -> dict[str, Any]:
        """A session-revoked SET for ``sub`` (iss_sub); its jti and when delivery returned."""
        result: dict[str, Any] = json.loads(self._curl("POST", "/test/emit", {"sub": sub}).stdout)
        return result

    def stop(self) -> None:
        self.host.stop(self.proc)


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


def _ssh(lan_sshd: SshdInfo, *command: str) -> list[str]:
    return dataclasses.replace(lan_sshd, port=SSH_FWD_PORT).ssh_argv(*command, addr="127.0.0.1")


def _log(process: LimenProcess) -> str:
    """The whole log of a Limen process (``tail`` keeps only its end)."""
    return process.log.read_text(errors="replace")


def _status(profile: ClientProfile) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(profile.run("status").stdout)
    return data


@pytest.mark.parametrize("delivery", ["push", "poll"])
def test_set_from_a_transmitter_closes_a_live_ssh_session(
    topology: Topology,
    deployment: Deployment,
    alice: Alice,
    lan_sshd: SshdInfo,
    delivery: str,
) -> None:
    laptop = topology.laptop
    service = deployment.service
    # A fresh sign-in: the other variant's revocation must not be what cuts this session.
    alice.profile.login(service, "alice", deployment.password)
    _poll(
        "ssh through the forward",
        lambda: laptop.run(_ssh(lan_sshd, "echo", "ok"), check=False).stdout.strip() == "ok",
    )
    seen_before = _log(alice.forward).count("access paused")

    transmitter = TransmitterProcess(topology.edge, TRANSMITTER_PORTS[delivery], service.ca_file)
    try:
        added = service.admin_json(
            "transmitter", "add", f"idp-{delivery}", transmitter.issuer,
            "--delivery", delivery, "--receiver-url", service.api_url, "--auth-token-stdin",
            input=MGMT_TOKEN + "\n",
        )  # fmt: skip
        assert added["issuer"] == transmitter.issuer
        assert transmitter.state()["stream"]
        if delivery == "poll":
            _poll("the receiver's first poll", lambda: transmitter.state()["polls"] > 0)

        ssh = laptop.popen(
            _ssh(lan_sshd, "echo ready; sleep 60"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert ssh.stdout is not None
        assert ssh.stdout.readline().strip() == "ready", ssh.stderr
        clock = _ExitClock(ssh)

        started = time.monotonic()
        emitted = transmitter.emit("alice")
        returned = time.monotonic()
        gone = clock.result(CUT_BOUND + 5)
        delivered = float(emitted["delivered_at"])
        print(
            f"\nSET by {delivery}: ssh exited {(gone - delivered) * 1000:+.0f} ms after the "
            f"delivery returned ({(gone - started) * 1000:.0f} ms after the test asked the "
            f"transmitter, {(gone - returned) * 1000:+.0f} ms after curl returned)"
        )
        assert gone - delivered < CUT_BOUND
        assert ssh.returncode == 255  # "Connection closed by remote host"
        for pipe in (ssh.stdout, ssh.stderr):
            if pipe is not None:
                pipe.close()

        if delivery == "poll":
            _poll(
                "the SET to be acknowledged", lambda: emitted["jti"] in transmitter.state()["acked"]
            )

        # The forward heard the claims challenge on its control stream (no flow opened
        # since the cut), and `status` says why access is paused.
        _poll(
            "the forward to report the challenge",
            lambda: _log(alice.forward).count("access paused") > seen_before,
        )
        paused = _poll("a paused client in status", lambda: _status(alice.profile)["paused"])
        assert any(p["paused_reason"].startswith("session_revoked") for p in paused)

        def audited() -> list[dict[str, Any]]:
            out = service.admin_json("signal", "list", "--user", deployment.alice_id)
            rows = out["items"] if isinstance(out, dict) else out
            return [
                r for r in rows
                if r.get("source") == f"ssf:{transmitter.issuer}" and (r.get("flows_cut") or 0) >= 1
            ]  # fmt: skip

        (signal, *_) = _poll("the signal audit with the flow cut", audited)
        print(f"signal audit: {signal['flows_cut']} flows cut in {signal['time_to_cut_ms']:.1f} ms")

        # New flows are challenged until alice signs in again; then the forward resumes.
        proc = laptop.run(_ssh(lan_sshd, "echo", "ok"), check=False)
        assert proc.returncode == 255
        alice.profile.login(service, "alice", deployment.password)
        _poll(
            "ssh through the running forward after the new sign-in",
            lambda: laptop.run(_ssh(lan_sshd, "echo", "ok"), check=False).stdout.strip() == "ok",
        )
        assert _status(alice.profile)["paused"] == []
    finally:
        service.admin("transmitter", "delete", f"idp-{delivery}", check=False)
        transmitter.stop()
