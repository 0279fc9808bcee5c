"""Conditional access end to end: real ``limen`` processes in the namespace topology.

``limen serve`` runs on the edge, ``limen connector run`` on the branch, and alice's
``limen client`` on the laptop (198.18.1.2). Two applications publish the LAN host's
servers: **wiki** (nginx, port 80) and **finance** (sshd, port 22), both assigned to alice.
Policies are made with ``limen admin policy add``; every decision is read back from
``limen admin traffic list --json`` with its action, code, policies and reason:

(a) wiki requires MFA: ``limen client forward`` is refused with the step-up challenge and,
    being non-interactive, says what to run; alice enrols TOTP through the self-service API
    with her own token (curl on the laptop), signs in with ``--mfa --otp``, and the flow
    succeeds;
(b) finance requires a compliant device: ssh to finance is blocked, the wiki is not; once an
    admin marks alice's device compliant, ssh works;
(c) wiki is blocked outside trusted locations: 198.18.1.2 is in none, so the flow is
    blocked; once the office (198.18.1.0/24) is a trusted location, it is allowed;
(d) a ``sign_in`` policy blocks sign-in itself from outside a trusted location:
    ``limen client login`` prints ``error: sign_in_blocked: …``.

Each test removes its policies at the end; the tests share one deployment (module scope) and
alice's client directory, and run in file order.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pyotp
import pytest

from .deployment import (
    LAN,
    LAPTOP,
    add_user,
    curl,
    edge_service,
    enroll_branch_connector,
    logs,
    poll,
    publish_app,
    secret_file,
    ssh_via_forward,
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
from .servers import NginxInfo, SshdInfo

pytestmark = pytest.mark.e2e

API_PORT = 9443
EDGE_PORT = 8443
# Laptop-local ports of alice's forwards (other modules' forwards are gone by now, but
# distinct ports make a leftover impossible to confuse with these).
WIKI_FWD_PORT = 8181
FINANCE_FWD_PORT = 2323
# Bounded waits for asynchronous effects (configuration reloads, traffic-log batches).
_WAIT = 20.0
_INTERVAL = 0.2


# --- the deployment ---------------------------------------------------------------------------


@dataclass
class Deployment:
    """The service, the tenant (alice, wiki, finance) and alice's client profile."""

    service: LimenService
    connector: LimenConnector
    alice: ClientProfile
    alice_password: str
    wiki_id: str
    finance_id: str

    def logs(self) -> str:
        """The end of the service's log, for failure messages."""
        return logs(self.service)

    def policy(self, doc: dict[str, Any]) -> dict[str, Any]:
        """``limen admin policy add --file -``; the stored policy."""
        result: dict[str, Any] = self.service.admin_json(
            "policy", "add", "--file", "-", input=json.dumps(doc)
        )
        return result

    def delete_policy(self, policy: dict[str, Any]) -> None:
        """``limen admin policy delete``."""
        self.service.admin("policy", "delete", policy["id"])

    def admin_api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """An admin API call made with curl in the service's namespace (for what the admin
        CLI has no command for). The token goes in a header file."""
        svc = self.service
        header = secret_file(
            svc.data_dir, "admin-header", f"Authorization: Bearer {svc.admin_token}\n"
        )
        args = ["-f", "-X", method, "--cacert", str(svc.ca_file), "-H", f"@{header}"]
        if body is not None:
            args += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        proc = curl(svc.host, *args, f"{svc.api_url}/api/v1{path}")
        assert proc.returncode == 0, (method, path, proc.stderr)
        return json.loads(proc.stdout)

    def records(self, app_id: str, action: str | None = None) -> list[dict[str, Any]]:
        """alice's traffic-log records for ``app_id`` (newest first), via the admin CLI."""
        args = ["--user", "alice", "--app", app_id, "--limit", "200"]
        if action is not None:
            args += ["--action", action]
        return traffic_records(self.service, *args)

    def record_for(self, app_id: str, action: str, policy_id: str, after: float) -> dict[str, Any]:
        """Wait (bounded) for a record of ``action`` naming ``policy_id``, newer than
        ``after``."""

        def found() -> dict[str, Any] | None:
            for r in self.records(app_id, action):
                if r["started_at"] >= after and policy_id in r["policy_ids"]:
                    return r
            return None

        record: dict[str, Any] = _poll(f"a {action} record of {policy_id}", found)
        return record


@pytest.fixture(scope="module")
def deployment(topology: Topology) -> Iterator[Deployment]:
    """``limen serve`` on the edge, alice with wiki and finance, a connector on the branch,
    alice signed in (password only) on the laptop."""
    require_root_and_tools("curl", "ssh")
    with edge_service(topology, API_PORT, EDGE_PORT) as service, ExitStack() as cleanup:
        password = secrets.token_urlsafe(16)
        user = add_user(service, "alice", password)
        service.admin_json("connector-group", "add", "branch-office")
        apps = {}
        for name, port in (("wiki", "80"), ("finance", "22")):
            apps[name] = publish_app(service, name, "branch-office", port)
            service.admin_json("assign", name, user["id"])
        connector = enroll_branch_connector(topology, service, "branch-office", "branch-1")
        cleanup.callback(connector.stop)
        start_connector(connector, service)
        alice = ClientProfile.create(topology.laptop, "alice-ca")
        cleanup.callback(alice.stop)
        alice.login(service, "alice", password)
        yield Deployment(
            service, connector, alice, password, apps["wiki"]["id"], apps["finance"]["id"]
        )


def _forward(d: Deployment, target: str, port: int) -> LimenProcess:
    return d.alice.forward(target, port)


def _poll(what: str, probe: Callable[[], Any]) -> Any:
    return poll(what, probe, timeout=_WAIT, interval=_INTERVAL)


def _wiki(topology: Topology, nginx: NginxInfo) -> subprocess.CompletedProcess[str]:
    return curl(topology.laptop, f"http://127.0.0.1:{WIKI_FWD_PORT}{nginx.path}")


def _finance(topology: Topology, sshd: SshdInfo) -> subprocess.CompletedProcess[str]:
    argv = ssh_via_forward(sshd, FINANCE_FWD_PORT, "echo", "ok")
    return topology.laptop.run(argv, check=False, timeout=30)


# --- the tests, in order ----------------------------------------------------------------------


def test_mfa_step_up_through_forward(
    topology: Topology, deployment: Deployment, lan_nginx: NginxInfo
) -> None:
    d = deployment
    started = time.time()
    policy = d.policy(
        {
            "name": "wiki needs MFA",
            "users": {"include": ["alice"]},
            "target": {"apps": ["wiki"]},
            "grant": {"require": ["mfa"]},
        }
    )
    forward = _forward(d, f"{LAN}:80", WIKI_FWD_PORT)
    # The policy reaches the edge within a configuration poll: refused from then on.
    _poll(
        "the wiki flow to be challenged",
        lambda: lan_nginx.marker not in _wiki(topology, lan_nginx).stdout,
    )
    proc = _wiki(topology, lan_nginx)
    assert proc.returncode != 0 and lan_nginx.marker not in proc.stdout, proc.stdout
    # Non-interactive: the client says access is paused, why, and what to run.
    _poll("the forward to report the step-up", lambda: "access paused" in forward.tail())
    log = forward.tail()
    assert "requires mfa" in log, log
    assert "limen client login --mfa --otp CODE" in log, log
    assert "insufficient_user_authentication" in log, log
    record = d.record_for(d.wiki_id, "challenge", policy["id"], started)
    assert record["code"] == "insufficient_user_authentication"
    assert record["policy_ids"] == [policy["id"]]
    assert "wiki needs MFA" in record["reason"] and "mfa" in record["reason"]
    assert record["source_ip"] == LAPTOP and record["bytes_up"] == 0

    # alice registers an authenticator app herself, with her own bearer token.
    header = secret_file(d.alice.directory, "bearer", f"Authorization: Bearer {d.alice.token()}\n")
    api = d.service.api_url
    common = ["-f", "-X", "POST", "--cacert", str(d.service.ca_file), "-H", f"@{header}"]
    begin = curl(topology.laptop, *common, f"{api}/oauth2/mfa/totp")
    assert begin.returncode == 0, begin.stderr
    enrolment = json.loads(begin.stdout)
    assert enrolment["otpauth_uri"].startswith("otpauth://totp/")
    totp = pyotp.TOTP(enrolment["secret"])
    confirm = curl(
        topology.laptop,
        *common,
        "-H", "Content-Type: application/json",
        "-d", json.dumps({"code": totp.now()}),
        f"{api}/oauth2/mfa/totp/confirm",
    )  # fmt: skip
    assert confirm.returncode == 0, confirm.stderr
    assert len(json.loads(confirm.stdout)["recovery_codes"]) > 0

    # Sign in with the second factor (the next time step: confirming spent the current one).
    out = d.alice.login(
        d.service, "alice", d.alice_password, "--mfa", "--otp", totp.at(time.time() + 30)
    )
    assert out.stdout.startswith("signed in;"), out.stdout + out.stderr
    # A running forward keeps the tokens it started with: start it again on the new sign-in.
    d.alice.stop_process(forward)
    forward = _forward(d, f"{LAN}:80", WIKI_FWD_PORT)
    proc = _wiki(topology, lan_nginx)
    assert proc.returncode == 0, proc.stderr + forward.tail() + d.logs()
    assert lan_nginx.marker in proc.stdout
    allowed = d.record_for(d.wiki_id, "allow", policy["id"], started)
    assert allowed["code"] == "" and allowed["bytes_down"] > 0
    d.delete_policy(policy)


def test_non_compliant_device_blocked_from_finance_not_wiki(
    topology: Topology, deployment: Deployment, lan_nginx: NginxInfo, lan_sshd: SshdInfo
) -> None:
    d = deployment
    started = time.time()
    policy = d.policy(
        {
            "name": "finance needs a compliant device",
            "users": {"include": ["alice"]},
            "target": {"apps": ["finance"]},
            "grant": {"require": ["compliant_device"]},
        }
    )
    _forward(d, f"{LAN}:22", FINANCE_FWD_PORT)

    def finance_refused() -> bool:
        proc = _finance(topology, lan_sshd)
        return proc.returncode != 0 and "ok" not in proc.stdout

    _poll("finance to be blocked", finance_refused)
    record = d.record_for(d.finance_id, "block", policy["id"], started)
    assert record["code"] == "policy_blocked"
    assert "compliant_device" in record["reason"], record
    assert record["device_id"].startswith("dev_")
    # The wiki does not ask for a compliant device.
    proc = _wiki(topology, lan_nginx)
    assert proc.returncode == 0 and lan_nginx.marker in proc.stdout, proc.stderr

    # The device the client registered at sign-in, as the client and the admin API see it.
    status = json.loads(d.alice.run("status").stdout)
    device_id = status["device_id"]
    assert device_id == record["device_id"]
    device = d.admin_api("GET", f"/devices/{device_id}")
    assert device["compliant"] is False and device["enabled"] is True, device
    assert device["user_id"] == record["user_id"], device
    marked = d.admin_api("POST", f"/devices/{device_id}/compliance", {"compliant": True})
    assert marked["compliant"] is True

    def finance_works() -> bool:
        proc = _finance(topology, lan_sshd)
        return proc.returncode == 0 and proc.stdout.strip() == "ok"

    _poll("finance to allow the compliant device", finance_works)
    allowed = d.record_for(d.finance_id, "allow", policy["id"], started)
    assert allowed["device_id"] == device_id
    d.delete_policy(policy)


def test_flow_from_outside_a_trusted_location_is_blocked(
    topology: Topology, deployment: Deployment, lan_nginx: NginxInfo
) -> None:
    d = deployment
    started = time.time()
    policy = d.policy(
        {
            "name": "wiki only from trusted locations",
            "users": {"include": ["alice"]},
            "target": {"apps": ["wiki"]},
            "conditions": {"locations": {"include": ["all"], "exclude": ["all_trusted"]}},
            "grant": {"block": True},
        }
    )
    _poll(
        "the wiki flow to be blocked",
        lambda: lan_nginx.marker not in _wiki(topology, lan_nginx).stdout,
    )
    record = d.record_for(d.wiki_id, "block", policy["id"], started)
    assert record["code"] == "policy_blocked"
    assert record["source_ip"] == LAPTOP
    assert (
        record["reason"] == f"blocked by policy 'wiki only from trusted locations' ({policy['id']})"
    )

    location = d.service.admin_json(
        "location", "add", "office", "--cidr", "198.18.1.0/24", "--trusted"
    )
    _poll(
        "the wiki flow to be allowed from the office",
        lambda: lan_nginx.marker in _wiki(topology, lan_nginx).stdout,
    )
    # Out of the policy's scope now: an allowed flow that no enforced policy applied to.
    newer = time.time() - 5
    assert any(
        r["started_at"] >= newer and r["policy_ids"] == [] for r in d.records(d.wiki_id, "allow")
    )
    d.delete_policy(policy)
    d.service.admin("location", "delete", location["id"])


def test_sign_in_blocked_from_outside_a_named_location(deployment: Deployment) -> None:
    d = deployment
    policy = d.policy(
        {
            "name": "sign in only from the office",
            "users": {"include": ["alice"]},
            "target": "sign_in",
            "conditions": {"locations": {"include": ["all"], "exclude": ["all_trusted"]}},
            "grant": {"block": True},
        }
    )
    proc = d.alice.login(d.service, "alice", d.alice_password, check=False)
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.startswith(
        f"error: sign_in_blocked: sign-in from {LAPTOP} refused: "
        f"blocked by policy 'sign in only from the office' ({policy['id']})"
    ), proc.stderr
    audit = d.service.admin_json("audit", "list", "--limit", "20")
    refused = [r for r in audit["items"] if r["action"] == "sign_in.refused"]
    assert refused and refused[0]["details"]["ip"] == LAPTOP

    location = d.service.admin_json("location", "add", "hq", "--cidr", "198.18.1.0/24", "--trusted")
    proc = d.alice.login(d.service, "alice", d.alice_password)
    assert proc.stdout.startswith("signed in;"), proc.stdout + proc.stderr
    d.delete_policy(policy)
    d.service.admin("location", "delete", location["id"])
