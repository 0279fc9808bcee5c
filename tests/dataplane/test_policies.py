"""Conditional access on every new flow, end to end on loopback: step-up to MFA with a real
TOTP enrolment, device compliance, named locations, report-only — each visible in the
traffic log with the policy and the reason."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
from sqlalchemy import select

from limen.client import auth
from limen.client.tunnel import EdgeSession, FlowRefused
from limen.store.models import TrafficRecord
from tests.support import EchoServer, Tenant, echo_roundtrip, running_tenant


@pytest.fixture
async def tenant(tmp_path: Path) -> AsyncIterator[Tenant]:
    async with running_tenant(tmp_path) as t:
        yield t


@pytest.fixture
async def wiki() -> AsyncIterator[EchoServer]:
    server = await EchoServer().start()
    yield server
    await server.stop()


@pytest.fixture
async def finance() -> AsyncIterator[EchoServer]:
    server = await EchoServer().start()
    yield server
    await server.stop()


async def _apps(tenant: Tenant, **servers: EchoServer) -> dict[str, Any]:
    """alice, assigned to one app per server (an ip segment for its port), a connector."""
    alice = await tenant.user("alice")
    made: dict[str, Any] = {"alice": alice}
    for name, server in servers.items():
        made[name] = await tenant.app(name, [("ip", "127.0.0.1", str(server.port))], [alice["id"]])
    await tenant.connector()
    return made


async def _policy(tenant: Tenant, doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = await tenant.call("POST", "/api/v1/policies", doc)
    await tenant.wait_config()
    return result


async def _last_record(
    tenant: Tenant, port: int, after: float, action: str | None = None
) -> TrafficRecord:
    """The newest record for ``port`` since ``after`` (with ``action``, if given); records
    are written when a flow ends, in batches, so poll (bounded)."""
    assert tenant.service.ctx is not None
    store = tenant.service.ctx.store
    for _ in range(500):
        with store.session() as s:
            query = select(TrafficRecord).where(
                TrafficRecord.dest_port == port, TrafficRecord.started_at >= after
            )
            if action is not None:
                query = query.where(TrafficRecord.action == action)
            row = s.scalars(query.order_by(TrafficRecord.started_at.desc())).first()
        if row is not None:
            return row
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {action or ''} traffic record for port {port}")


async def test_mfa_policy_challenges_then_totp_step_up_succeeds(
    tenant: Tenant, wiki: EchoServer
) -> None:
    made = await _apps(tenant, wiki=wiki)
    policy = await _policy(
        tenant,
        {
            "name": "wiki needs MFA",
            "users": {"include": ["all"]},
            "target": {"apps": [made["wiki"]["id"]]},
            "grant": {"require": ["mfa"]},
        },
    )
    session = await tenant.login("alice")
    started = time.time()
    with pytest.raises(FlowRefused) as challenged:
        await session.open("tcp", "127.0.0.1", wiki.port)
    assert challenged.value.status == 401
    assert challenged.value.code == "insufficient_user_authentication"
    assert 'acr_values="urn:limen:acr:mfa"' in challenged.value.www_authenticate
    record = await _last_record(tenant, wiki.port, started)
    assert record.action == "challenge"
    assert record.policy_ids == [policy["id"]]
    assert "mfa" in record.reason.lower()

    # alice registers an authenticator app (self-service, with her own token)…
    token = await session.access_token()
    bearer = {"Authorization": f"Bearer {token}"}
    begin = await tenant.admin.post("/oauth2/mfa/totp", headers=bearer)
    assert begin.status_code == 200, begin.text
    totp = pyotp.TOTP(begin.json()["secret"])
    confirm = await tenant.admin.post(
        "/oauth2/mfa/totp/confirm", json={"code": totp.now()}, headers=bearer
    )
    assert confirm.status_code == 200, confirm.text

    # …and the client answers the next challenge by signing in with the second factor.
    asked: list[str] = []

    def reauthenticate(refusal: FlowRefused) -> bool:
        asked.append(refusal.code)
        with auth.http_client(session.state) as http:
            # the next time step: the confirmation already used the current one
            auth.password_login(
                session.state,
                http,
                "alice",
                "correct horse battery",
                otp=totp.at(time.time() + 30),
                acr_values=auth.ACR_MFA,
            )
        return True

    session.reauthenticate = reauthenticate
    assert await echo_roundtrip(session, wiki.port) == b"ping"
    # Registering MFA revoked the old sign-in (a CAE signal), so the first challenge is the
    # revocation or the step-up; one sign-in with the factor answers both.
    assert asked and asked[0] in ("insufficient_user_authentication", "session_revoked")
    allowed = await _last_record(tenant, wiki.port, started, "allow")
    assert "mfa" in allowed.reason or allowed.code == ""
    await session.close()


async def test_non_compliant_device_blocked_from_finance_not_wiki(
    tenant: Tenant, wiki: EchoServer, finance: EchoServer
) -> None:
    made = await _apps(tenant, wiki=wiki, finance=finance)
    policy = await _policy(
        tenant,
        {
            "name": "finance needs a compliant device",
            "users": {"include": ["all"]},
            "target": {"apps": [made["finance"]["id"]]},
            "grant": {"require": ["compliant_device"]},
        },
    )
    session = await tenant.login("alice")
    device_id = session.state.device_id
    assert await echo_roundtrip(session, wiki.port) == b"ping"
    started = time.time()
    with pytest.raises(FlowRefused) as blocked:
        await session.open("tcp", "127.0.0.1", finance.port)
    assert (blocked.value.status, blocked.value.code) == (403, "policy_blocked")
    record = await _last_record(tenant, finance.port, started)
    assert record.action == "block" and record.policy_ids == [policy["id"]]
    assert record.device_id == device_id

    device = await tenant.call("GET", f"/api/v1/devices/{device_id}")
    assert device["os"] == "linux" and device["hostname"]  # the client said what it is
    await tenant.call("POST", f"/api/v1/devices/{device_id}/compliance", {"compliant": True})
    await tenant.wait_config()
    assert await echo_roundtrip(session, finance.port) == b"ping"
    await session.close()


async def test_untrusted_location_blocked_and_report_only_never_enforced(
    tenant: Tenant, wiki: EchoServer
) -> None:
    made = await _apps(tenant, wiki=wiki)
    office = await tenant.call(
        "POST",
        "/api/v1/locations",
        {"name": "office", "cidrs": ["198.51.100.0/24"], "trusted": True},
    )
    watch = await _policy(
        tenant,
        {
            "name": "watch only",
            "state": "report_only",
            "users": {"include": ["all"]},
            "target": "all_private",
            "grant": {"block": True},
        },
    )
    session = await tenant.login("alice")
    assert await echo_roundtrip(session, wiki.port) == b"ping"  # report-only: allowed
    record = await _last_record(tenant, wiki.port, 0, "allow")
    assert f"{watch['id']}:block" in record.policy_ids

    block = await _policy(
        tenant,
        {
            "name": "only from the office",
            "users": {"include": ["all"]},
            "target": {"apps": [made["wiki"]["id"]]},
            "conditions": {"locations": {"include": ["all"], "exclude": ["all_trusted"]}},
            "grant": {"block": True},
        },
    )
    started = time.time()
    with pytest.raises(FlowRefused) as outside:
        await session.open("tcp", "127.0.0.1", wiki.port)
    assert (outside.value.status, outside.value.code) == (403, "policy_blocked")
    record = await _last_record(tenant, wiki.port, started)
    assert record.policy_ids[0] == block["id"]
    assert record.source_ip == "127.0.0.1"

    # Loopback becomes part of the trusted office: the same flow is allowed.
    await tenant.call(
        "PUT",
        f"/api/v1/locations/{office['id']}",
        {"name": "office", "cidrs": ["198.51.100.0/24", "127.0.0.0/8"], "trusted": True},
    )
    await tenant.wait_config()
    assert await echo_roundtrip(session, wiki.port) == b"ping"
    await session.close()


async def test_no_policy_means_assignment_decides(tenant: Tenant, wiki: EchoServer) -> None:
    await _apps(tenant, wiki=wiki)
    session: EdgeSession = await tenant.login("alice")
    assert await echo_roundtrip(session, wiki.port) == b"ping"
    await session.close()
