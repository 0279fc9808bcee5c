"""Sign-in policies on a real SQLite store, then through the real service on loopback.

First :class:`SignInPolicy` against stored policies, locations, nested groups and devices
(compiled once per configuration version, failing closed on a broken policy, auditing a
refused sign-in); then the whole service (``running_tenant``): a policy made through the
admin API blocks the password grant and the refresh grant from outside a trusted location
with ``sign_in_blocked`` (``limen client login`` prints it), and a sign-in policy requiring
MFA refuses a password alone and accepts password + TOTP.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
from sqlalchemy import select

from limen.client import auth
from limen.client.profile import ClientState, new_device_id
from limen.config import load_settings
from limen.errors import AuthError, PolicyDenied
from limen.identity.service import SECOND_FACTOR_REQUIRED, SignInAttempt
from limen.policy.conditional import parse_policy, spec_to_dict
from limen.policy.sign_in import SIGN_IN_BLOCKED, SignInPolicy
from limen.service import ServiceContext, open_context
from limen.store.db import bump_config_version
from limen.store.models import AuditRecord, Device, Group, GroupMember, User
from limen.store.policy_models import AccessPolicy, NamedLocation
from tests.support import Tenant, running_tenant

PASSWORD = "correct horse battery"
OUTSIDE = "203.0.113.9"
OFFICE_IP = "198.18.1.2"


# --- the check on a real store ------------------------------------------------------------------


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    context = open_context(load_settings(data_dir=tmp_path / "svc"))
    yield context
    context.store.dispose()


def add_user(ctx: ServiceContext, name: str, risk: str = "low") -> User:
    now = time.time()
    user = User(
        id=f"usr_{name}",
        username=name,
        password_hash="",
        risk_level=risk,
        created_at=now,
        updated_at=now,
    )
    with ctx.store.session() as s:
        s.add(user)
    return user


def add_policy(ctx: ServiceContext, pid: str, doc: dict[str, Any], state: str = "on") -> None:
    """A stored policy (canonical document), and a new configuration version."""
    base: dict[str, Any] = {"users": {"include": ["all"]}, "target": "sign_in"}
    base.update(doc)
    now = time.time()
    with ctx.store.session() as s:
        s.add(
            AccessPolicy(
                id=pid,
                name=pid,
                state=state,
                version=1,
                spec=spec_to_dict(parse_policy(base)),
                created_at=now,
                updated_at=now,
            )
        )
        bump_config_version(s)


def add_location(ctx: ServiceContext, lid: str, cidrs: list[str], trusted: bool) -> None:
    with ctx.store.session() as s:
        s.add(NamedLocation(id=lid, name=lid, cidrs=cidrs, trusted=trusted, created_at=0.0))
        bump_config_version(s)


def add_group(ctx: ServiceContext, gid: str, members: list[str]) -> None:
    with ctx.store.session() as s:
        s.add(Group(id=gid, name=gid, created_at=0.0))
        s.flush()
        for member in members:
            s.add(GroupMember(group_id=gid, member_id=member))
        bump_config_version(s)


def add_device(
    ctx: ServiceContext, did: str, user_id: str, os_name: str = "Linux", compliant: bool = False
) -> None:
    with ctx.store.session() as s:
        s.add(
            Device(
                id=did,
                user_id=user_id,
                os=os_name,
                compliant=compliant,
                enabled=True,
                created_at=0.0,
            )
        )


def attempt(
    user: User,
    ip: str = OUTSIDE,
    amr: tuple[str, ...] = ("pwd",),
    device: str | None = None,
    grant: str = "password",
) -> SignInAttempt:
    return SignInAttempt(
        user=user,
        grant_type=grant,
        amr=amr,
        ip_address=ip,
        device_id=device,
        client_id="limen-client",
    )


def refused(check: SignInPolicy, a: SignInAttempt) -> str:
    """The code of the refusal ("" when the sign-in is allowed)."""
    try:
        check(a)
    except (PolicyDenied, AuthError) as exc:
        return exc.code
    return ""


def test_compiled_once_per_configuration_version(ctx: ServiceContext) -> None:
    alice = add_user(ctx, "alice")
    check = SignInPolicy(ctx.store)
    assert refused(check, attempt(alice)) == ""
    first = check.compiled()
    assert check.compiled() is first  # same version: nothing recompiled
    assert first.policies.size == 0

    # A flow policy never judges a sign-in, even a block for everyone.
    add_policy(ctx, "pol_flows", {"target": "all_private", "grant": {"block": True}})
    assert refused(check, attempt(alice)) == ""
    second = check.compiled()
    assert second is not first and second.version > first.version
    assert second.policies.size == 0

    add_policy(ctx, "pol_signin", {"grant": {"block": True}})
    assert refused(check, attempt(alice)) == SIGN_IN_BLOCKED
    assert check.compiled().policies.size == 1


def test_block_outside_trusted_locations(ctx: ServiceContext) -> None:
    alice = add_user(ctx, "alice")
    add_location(ctx, "loc_guest", ["203.0.113.0/24"], trusted=False)
    add_policy(
        ctx,
        "pol_outside",
        {
            "conditions": {"locations": {"include": ["all"], "exclude": ["all_trusted"]}},
            "grant": {"block": True},
        },
    )
    check = SignInPolicy(ctx.store)
    with pytest.raises(PolicyDenied) as blocked:
        check(attempt(alice, ip=OUTSIDE))
    assert blocked.value.code == SIGN_IN_BLOCKED
    assert blocked.value.message == (
        f"sign-in from {OUTSIDE} refused: blocked by policy 'pol_outside' (pol_outside)"
    )
    assert refused(check, attempt(alice, ip=OFFICE_IP)) == SIGN_IN_BLOCKED
    # A trusted location takes the office out of the policy's scope.
    add_location(ctx, "loc_office", ["198.18.1.0/24"], trusted=True)
    assert refused(check, attempt(alice, ip=OFFICE_IP)) == ""
    assert refused(check, attempt(alice, ip=OUTSIDE)) == SIGN_IN_BLOCKED
    # An IPv4-mapped IPv6 source (a dual-stack listener) is the same address.
    assert refused(check, attempt(alice, ip=f"::ffff:{OFFICE_IP}")) == ""


def test_nested_groups_include_and_exclude(ctx: ServiceContext) -> None:
    alice, bob, carol = (add_user(ctx, n) for n in ("alice", "bob", "carol"))
    add_group(ctx, "grp_eng", [alice.id, carol.id])
    add_group(ctx, "grp_staff", ["grp_eng"])  # eng is nested in staff
    add_group(ctx, "grp_oncall", [carol.id])
    add_group(ctx, "grp_breakglass", ["grp_oncall"])
    add_policy(
        ctx,
        "pol_staff",
        {
            "users": {"include": []},
            "groups": {"include": ["grp_staff"], "exclude": ["grp_breakglass"]},
            "grant": {"block": True},
        },
    )
    check = SignInPolicy(ctx.store)
    assert check.compiled().needs_groups
    assert refused(check, attempt(alice)) == SIGN_IN_BLOCKED  # staff through eng
    assert refused(check, attempt(bob)) == ""  # in no group
    assert refused(check, attempt(carol)) == ""  # excluded through oncall


def test_device_compliance_and_platform(ctx: ServiceContext) -> None:
    alice, bob = add_user(ctx, "alice"), add_user(ctx, "bob")
    add_device(ctx, "dev_aaaa0000aaaa0000aaaa", alice.id, "Linux", compliant=False)
    add_device(ctx, "dev_bbbb0000bbbb0000bbbb", alice.id, "Windows 11", compliant=True)
    add_device(ctx, "dev_cccc0000cccc0000cccc", bob.id, "Linux", compliant=True)
    add_policy(ctx, "pol_compliant", {"grant": {"require": ["compliant_device"]}})
    check = SignInPolicy(ctx.store)
    # No device, or one not registered yet (a first sign-in): not compliant.
    assert refused(check, attempt(alice)) == SIGN_IN_BLOCKED
    assert refused(check, attempt(alice, device="dev_dddd0000dddd0000dddd")) == SIGN_IN_BLOCKED
    assert refused(check, attempt(alice, device="dev_aaaa0000aaaa0000aaaa")) == SIGN_IN_BLOCKED
    assert refused(check, attempt(alice, device="dev_bbbb0000bbbb0000bbbb")) == ""
    # bob's compliant device says nothing about alice.
    assert refused(check, attempt(alice, device="dev_cccc0000cccc0000cccc")) == SIGN_IN_BLOCKED

    with ctx.store.session() as s:
        s.delete(s.get(AccessPolicy, "pol_compliant"))
        bump_config_version(s)
    add_policy(
        ctx,
        "pol_windows",
        {"conditions": {"device_platforms": ["windows"]}, "grant": {"block": True}},
    )
    assert refused(check, attempt(alice, device="dev_aaaa0000aaaa0000aaaa")) == ""
    assert refused(check, attempt(alice, device="dev_bbbb0000bbbb0000bbbb")) == SIGN_IN_BLOCKED
    assert refused(check, attempt(alice)) == ""  # unknown platform matches only "all"


def test_user_risk(ctx: ServiceContext) -> None:
    low, high = add_user(ctx, "low"), add_user(ctx, "high", risk="high")
    add_policy(ctx, "pol_risky", {"conditions": {"user_risk": ["high"]}, "grant": {"block": True}})
    check = SignInPolicy(ctx.store)
    assert refused(check, attempt(low)) == ""
    assert refused(check, attempt(high)) == SIGN_IN_BLOCKED


def test_mfa_and_sign_in_frequency(ctx: ServiceContext) -> None:
    alice = add_user(ctx, "alice")
    add_policy(ctx, "pol_mfa", {"grant": {"require": ["mfa"]}})
    check = SignInPolicy(ctx.store)
    with pytest.raises(AuthError) as challenged:
        check(attempt(alice))
    assert challenged.value.code == "invalid_grant"
    assert challenged.value.message.startswith(f"{SECOND_FACTOR_REQUIRED}: policy 'pol_mfa'")
    check(attempt(alice, amr=("pwd", "otp", "mfa")))
    check(attempt(alice, amr=("pwd", "otp", "mfa"), grant="refresh_token"))

    add_policy(
        ctx,
        "pol_fresh",
        {"grant": {"require": ["sign_in_frequency"], "max_age_minutes": 60}},
    )
    mfa = ("pwd", "otp", "mfa")
    assert refused(check, attempt(alice, amr=mfa)) == ""  # a password sign-in is fresh
    # A refresh cannot show how old its sign-in is: re-authentication (fail closed).
    with pytest.raises(AuthError) as stale:
        check(attempt(alice, amr=mfa, grant="refresh_token"))
    assert stale.value.message.startswith("re-authentication required: policy 'pol_fresh'")


def test_report_only_and_off_never_refuse(ctx: ServiceContext) -> None:
    alice = add_user(ctx, "alice")
    add_policy(ctx, "pol_report", {"grant": {"block": True}}, state="report_only")
    add_policy(ctx, "pol_off", {"grant": {"block": True}}, state="off")
    check = SignInPolicy(ctx.store)
    decision = check.decide(attempt(alice))
    assert decision.action == "allow"
    assert decision.report_only == (("pol_report", "block"),)
    assert check.compiled().policies.size == 1
    check(attempt(alice))


def test_a_broken_stored_policy_fails_closed(ctx: ServiceContext) -> None:
    alice = add_user(ctx, "alice")
    now = time.time()
    with ctx.store.session() as s:
        s.add(
            AccessPolicy(
                id="pol_broken",
                name="broken",
                state="on",
                version=1,
                spec={"users": {"include": ["all"]}, "grant": {"require": ["mfaa"]}},
                created_at=now,
                updated_at=now,
            )
        )
        bump_config_version(s)
    check = SignInPolicy(ctx.store)
    with pytest.raises(PolicyDenied) as blocked:
        check(attempt(alice))
    assert blocked.value.code == SIGN_IN_BLOCKED
    assert "cannot be evaluated (invalid_policy)" in blocked.value.message
    with ctx.store.session() as s:
        row = s.get(AccessPolicy, "pol_broken")
        assert row is not None
        fixed = {"users": {"include": ["all"]}, "target": "all_private", "grant": {"block": True}}
        row.spec = spec_to_dict(parse_policy(fixed))
        bump_config_version(s)
    check(attempt(alice))  # fixed, and a flow policy: it never judges a sign-in


def test_refused_interactive_sign_in_is_audited(ctx: ServiceContext) -> None:
    alice = add_user(ctx, "alice")
    add_policy(ctx, "pol_all", {"grant": {"block": True}})
    check = SignInPolicy(ctx.store, audit=ctx.audit)
    assert refused(check, attempt(alice, device="dev_aaaa0000aaaa0000aaaa")) == SIGN_IN_BLOCKED
    # A refresh runs inside the identity service's unit of work: logged, not audited.
    assert refused(check, attempt(alice, grant="refresh_token")) == SIGN_IN_BLOCKED
    with ctx.store.session() as s:
        rows = list(s.scalars(select(AuditRecord).where(AuditRecord.action == "sign_in.refused")))
    assert len(rows) == 1
    record = rows[0]
    assert (record.actor, record.target) == ("user:alice", alice.id)
    assert record.details["policy_id"] == "pol_all"
    assert record.details["policy_ids"] == ["pol_all"]
    assert record.details["ip"] == OUTSIDE
    assert record.details["device_id"] == "dev_aaaa0000aaaa0000aaaa"
    assert record.details["code"] == SIGN_IN_BLOCKED
    assert "pol_all" in record.details["reason"]


# --- through the real service -------------------------------------------------------------------


@pytest.fixture
async def tenant(tmp_path: Path) -> AsyncIterator[Tenant]:
    async with running_tenant(tmp_path) as t:
        yield t


def _state(tenant: Tenant) -> ClientState:
    return ClientState(
        api_url=tenant.service.api_url,
        edge=tenant.service.edge_address,
        ca_pem=tenant.ca_pem,
        device_id=new_device_id(),
        capabilities=["cp1"],
    )


async def _password_login(state: ClientState, username: str, otp: str = "") -> None:
    def run() -> None:
        with auth.http_client(state) as http:
            auth.password_login(state, http, username, PASSWORD, otp=otp)

    await asyncio.to_thread(run)


async def _refresh(state: ClientState) -> None:
    def run() -> None:
        with auth.http_client(state) as http:
            auth.refresh(state, http)

    await asyncio.to_thread(run)


async def _cli_login(
    tenant: Tenant, username: str, client_dir: Path
) -> subprocess.CompletedProcess[str]:
    """The real ``limen client login --password-stdin`` (a child process; the service runs in
    this test's event loop, so the child is waited for in a thread)."""
    ca_file = tenant.tmp / "ca.pem"
    ca_file.write_text(tenant.ca_pem)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIMEN_")}
    env["LIMEN_CLIENT_DIR"] = str(client_dir)
    argv = [
        str(Path(sys.executable).parent / "limen"), "client", "login",
        "--api", tenant.service.api_url, "--ca-file", str(ca_file),
        "--username", username, "--password-stdin",
    ]  # fmt: skip
    return await asyncio.to_thread(
        subprocess.run,
        argv,
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


async def test_sign_in_blocked_outside_a_named_location(tenant: Tenant) -> None:
    await tenant.user("alice")
    early = _state(tenant)
    await _password_login(early, "alice")  # before any policy: a refresh token to try later
    office = await tenant.call(
        "POST", "/api/v1/locations", {"name": "office", "cidrs": ["198.18.1.0/24"], "trusted": True}
    )
    policy = await tenant.call(
        "POST",
        "/api/v1/policies",
        {
            "name": "sign in only from the office",
            "users": {"include": ["alice"]},
            "target": "sign_in",
            "conditions": {"locations": {"include": ["all"], "exclude": ["all_trusted"]}},
            "grant": {"block": True},
        },
    )

    # The service sees this test's requests from 127.0.0.1: not in the office.
    state = _state(tenant)
    with pytest.raises(AuthError) as blocked:
        await _password_login(state, "alice")
    assert blocked.value.code == SIGN_IN_BLOCKED
    assert policy["id"] in blocked.value.message
    assert "sign in only from the office" in blocked.value.message
    assert blocked.value.message.startswith("sign-in from 127.0.0.1 refused")
    assert not state.access_token
    # A refresh is a sign-in too, and a refused one does not spend the refresh token.
    refresh_token = early.refresh_token
    with pytest.raises(AuthError) as refresh_blocked:
        await _refresh(early)
    assert refresh_blocked.value.code == SIGN_IN_BLOCKED
    assert early.refresh_token == refresh_token

    # What an operator sees: the CLI's error line, and the audit record.
    proc = await _cli_login(tenant, "alice", tenant.tmp / "client-alice")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: {SIGN_IN_BLOCKED}: sign-in from 127.0.0.1 refused")
    assert policy["id"] in proc.stderr
    audit = await tenant.call("GET", "/api/v1/audit?limit=50")
    refusals = [r for r in audit["items"] if r["action"] == "sign_in.refused"]
    assert len(refusals) == 2  # the two password sign-ins; the refresh is only logged
    assert all(r["details"]["policy_id"] == policy["id"] for r in refusals)

    # Loopback joins the office: both grants work again, without restarting anything.
    await tenant.call(
        "PUT",
        f"/api/v1/locations/{office['id']}",
        {"cidrs": ["198.18.1.0/24", "127.0.0.0/8"]},
    )
    await _password_login(state, "alice")
    assert state.access_token
    await _refresh(early)
    assert early.refresh_token != refresh_token
    proc = await _cli_login(tenant, "alice", tenant.tmp / "client-alice")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("signed in;")


async def test_mfa_required_at_sign_in(tenant: Tenant) -> None:
    await tenant.user("alice")
    state = _state(tenant)
    await _password_login(state, "alice")
    # alice registers an authenticator app with her token (before the policy exists: a
    # user without a factor could not sign in to register one afterwards).
    bearer = {"Authorization": f"Bearer {state.access_token}"}
    begin = await tenant.admin.post("/oauth2/mfa/totp", headers=bearer)
    assert begin.status_code == 200, begin.text
    totp = pyotp.TOTP(begin.json()["secret"])
    confirm = await tenant.admin.post(
        "/oauth2/mfa/totp/confirm", json={"code": totp.now()}, headers=bearer
    )
    assert confirm.status_code == 200, confirm.text
    policy = await tenant.call(
        "POST",
        "/api/v1/policies",
        {
            "name": "sign-in needs MFA",
            "users": {"include": ["all"]},
            "target": "sign_in",
            "grant": {"require": ["mfa"]},
        },
    )

    with pytest.raises(AuthError) as challenged:
        await _password_login(_state(tenant), "alice")
    assert challenged.value.code == "invalid_grant"
    assert challenged.value.message.startswith(SECOND_FACTOR_REQUIRED)
    assert policy["id"] in challenged.value.message

    fresh = _state(tenant)
    # The next time step: the confirmation spent the current one.
    await _password_login(fresh, "alice", otp=totp.at(time.time() + 30))
    assert fresh.access_token
    await _refresh(fresh)  # the session has mfa: its refreshes pass the policy
