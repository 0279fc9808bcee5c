"""The Shared Signals receiver against a small test transmitter, both served by uvicorn on
loopback: discovery, stream creation, verification, push (RFC 8935) and poll (RFC 8936)
delivery, SET refusals with their RFC 8935 codes, the revocation rule (a late event does
not invalidate a fresh sign-in), and the signal audit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from limen.admin.app import create_app
from limen.admin.auth import create_admin_token
from limen.bus.inprocess import SUBJECT_REVOKED, BusEvent
from limen.config import load_settings
from limen.edge.admission import admit
from limen.edge.snapshot import load_snapshot
from limen.identity.passwords import hash_password
from limen.identity.service import IdentityService
from limen.identity.tokens import EDGE_AUDIENCE, AccessTokenIssuer, TokenVerifier
from limen.service import ServiceContext, open_context
from limen.signals import SIGNAL_ENFORCED
from limen.signals import events as ev
from limen.signals.receiver import SignalReceiver
from limen.store.models import SignInSession, User
from limen.store.signal_models import ExternalIdentity, SignalRecord
from limen.wire.connect import FlowRequest
from tests.ssf_transmitter import MGMT_TOKEN, Transmitter, serve


@dataclass
class Limen:
    ctx: ServiceContext
    base: str
    admin: httpx.AsyncClient
    events: list[BusEvent]

    async def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        response = await self.admin.request(method, "/api/v1" + path, json=body, params=params)
        assert response.status_code < 400, f"{method} {path}: {response.text}"
        return response.json() if response.content else None

    def user(self, name: str, email: str = "") -> User:
        now = time.time()
        user = User(
            id=f"usr_{name}",
            username=name,
            email=email,
            password_hash=hash_password("pw-pw-pw-pw"),
            created_at=now,
            updated_at=now,
        )
        with self.ctx.store.session() as s:
            s.add(user)
        return user

    def get_user(self, user_id: str) -> User:
        with self.ctx.store.session() as s:
            user = s.get(User, user_id)
            assert user is not None
            return user

    def signals(self, **where: Any) -> list[SignalRecord]:
        from sqlalchemy import select

        with self.ctx.store.session() as s:
            q = select(SignalRecord).filter_by(**where).order_by(SignalRecord.received_at)
            return list(s.scalars(q))

    def sign_in(self, user: User, at: float) -> tuple[SignInSession, str]:
        """A session authenticated at ``at`` and an access token for it."""
        session = IdentityService(self.ctx.store, self.ctx.settings).start_session(
            user,
            client_id="limen-client",
            amr=["pwd"],
            ip_address="127.0.0.1",
            capabilities=["cp1"],
            now=at,
        )
        token, _ = AccessTokenIssuer(self.ctx.store, self.ctx.settings).issue(
            user,
            session,
            client_id="limen-client",
            capabilities=["cp1"],
            device_id=None,
            ip_address="127.0.0.1",
            now=at,
        )
        return session, token

    def admission_code(self, token: str) -> str:
        """The edge's decision code for a flow with ``token`` (``no_segment`` means the token
        passed every identity check, revocation included)."""
        snapshot = load_snapshot(self.ctx.store)
        verifier = TokenVerifier(
            snapshot.keys, issuer=self.ctx.settings.resolved_issuer, audience=EDGE_AUDIENCE
        )
        request = FlowRequest("tcp", "10.9.9.9", 22, {"proxy-authorization": f"Bearer {token}"})
        return admit(request, snapshot=snapshot, verifier=verifier, now=time.time()).code


@pytest.fixture
async def limen(tmp_path: Path) -> AsyncIterator[Limen]:
    ctx = open_context(load_settings(data_dir=tmp_path, issuer="https://limen.test"))
    seen: list[BusEvent] = []
    ctx.bus.subscribe(seen.append)
    token = create_admin_token(ctx.store, "test", "admin")
    async with (
        serve(create_app(ctx)) as base,
        httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as admin,
    ):
        yield Limen(ctx, base, admin, seen)
    ctx.store.dispose()


@pytest.fixture
async def transmitter() -> AsyncIterator[Transmitter]:
    t = Transmitter()
    async with serve(t.app()) as base:
        t.base = base + "/tenant1"
        yield t


async def add_transmitter(limen: Limen, t: Transmitter, delivery: str) -> dict[str, Any]:
    body = {
        "name": f"idp-{delivery}",
        "issuer": t.base,
        "delivery": delivery,
        "auth_token": MGMT_TOKEN,
        "receiver_url": limen.base,
    }
    result: dict[str, Any] = await limen.call("POST", "/transmitters", body)
    return result


async def wait_for(predicate: Any, what: str, seconds: float = 15.0) -> None:
    """Bounded polling for something another task or thread does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def revocations(limen: Limen) -> list[dict[str, Any]]:
    return [e.payload for e in limen.events if e.topic == SUBJECT_REVOKED]


# --- push -------------------------------------------------------------------------------------


async def test_discovery_stream_creation_and_verification(
    limen: Limen, transmitter: Transmitter
) -> None:
    out = await add_transmitter(limen, transmitter, "push")
    assert out["stream_id"] == "str_1"
    assert out["jwks_uri"] == transmitter.base.rsplit("/", 1)[0] + "/jwks"
    assert out["audience"] == "https://limen.test"  # adopted from the stream's aud
    assert out["has_auth_token"] is True and "auth_token" not in out
    assert transmitter.stream is not None
    delivery = transmitter.stream["delivery"]
    assert delivery["method"] == "urn:ietf:rfc:8935"
    assert delivery["endpoint_url"] == f"{limen.base}/ssf/push/{out['id']}"
    assert delivery["authorization_header"] == f"Bearer {out['push_token']}"
    assert ev.CREDENTIAL_CHANGE in transmitter.stream["events_requested"]
    listed = await limen.call("GET", "/transmitters")
    assert [t["id"] for t in listed] == [out["id"]] and "push_token" not in listed[0]

    verify = await limen.call("POST", f"/transmitters/{out['id']}/verify")
    shown = await limen.call("GET", f"/transmitters/{out['id']}")
    assert shown["verified"] is True and shown["verified_at"] >= verify["requested_at"]
    (record,) = limen.signals(event_type=ev.VERIFICATION)
    assert record.action == "verification: state matches"
    assert record.source == f"ssf:{transmitter.base}"

    remote = await limen.call("GET", f"/transmitters/{out['id']}/stream")
    assert remote["stream_id"] == "str_1"
    await limen.call("DELETE", f"/transmitters/{out['id']}")
    assert transmitter.stream is None
    assert await limen.call("GET", "/transmitters") == []


async def test_pushed_credential_change_revokes_at_event_time(
    limen: Limen, transmitter: Transmitter
) -> None:
    alice = limen.user("alice", "Alice@Example.com")
    now = time.time()
    old_session, old_token = limen.sign_in(alice, now - 600)
    assert limen.admission_code(old_token) == "no_segment"
    await add_transmitter(limen, transmitter, "push")
    event_time = now - 120
    token, jti = transmitter.make_set(
        ev.CREDENTIAL_CHANGE,
        {"credential_type": "password", "change_type": "update", "event_timestamp": event_time},
        {"format": "email", "email": "alice@example.com"},
    )
    response = await transmitter.push(token)
    assert response.status_code == 202 and response.content == b""

    assert limen.get_user(alice.id).revoked_before == event_time
    (payload,) = revocations(limen)
    assert payload["user_id"] == alice.id and payload["at"] == event_time
    assert payload["reason"] == "credential_change:password:update"
    (record,) = limen.signals(jti=jti)
    assert payload["signal_id"] == record.id
    assert (record.action, record.user_id, record.event_timestamp) == (
        "revoke_sessions",
        alice.id,
        event_time,
    )
    assert record.subject == "email:alice@example.com" and record.detail["sessions_revoked"] == 1
    with limen.ctx.store.session() as s:
        session = s.get(SignInSession, old_session.id)
        assert session is not None and session.revoked_at is not None
    assert limen.admission_code(old_token) == "session_revoked"

    # The edge reports what it cut; the record shows it through the API.
    limen.ctx.bus.publish(
        SIGNAL_ENFORCED,
        signal_id=record.id,
        user_id=alice.id,
        at=event_time,
        flows_cut=3,
        done_at=record.received_at + 0.004,
        node="edge-1",
    )
    await wait_for(lambda: limen.signals(jti=jti)[0].flows_cut == 3, "the enforcement report")
    (shown,) = await limen.call("GET", "/signals", user=alice.id, event="credential-change")
    assert shown["flows_cut"] == 3 and shown["time_to_cut_ms"] == pytest.approx(4.0, abs=0.5)
    assert shown["source"] == f"ssf:{transmitter.base}"


async def test_push_refusals_and_acknowledged_ignores(
    limen: Limen, transmitter: Transmitter
) -> None:
    limen.user("dave", "dave@example.com")
    await add_transmitter(limen, transmitter, "push")
    subject = {"format": "email", "email": "dave@example.com"}

    async def refused(response: httpx.Response, err: str) -> None:
        assert response.status_code == 400, response.text
        assert response.json()["err"] == err and response.json()["description"]

    token, _ = transmitter.make_set(ev.SESSION_REVOKED, {}, subject)
    await refused(await transmitter.push(token, auth="Bearer wrong"), "authentication_failed")
    await refused(await transmitter.push(token, content_type="application/json"), "invalid_request")
    assert (await transmitter.push(token)).status_code == 202
    await refused(await transmitter.push(token), "invalid_request")  # replayed jti
    assert len(limen.signals(user_id="usr_dave")) == 1

    await refused(
        await transmitter.push(
            transmitter.make_set(ev.SESSION_REVOKED, {}, subject, aud="https://other")[0]
        ),
        "invalid_audience",
    )
    await refused(
        await transmitter.push(
            transmitter.make_set(ev.SESSION_REVOKED, {}, subject, iss="https://evil")[0]
        ),
        "invalid_issuer",
    )
    await refused(
        await transmitter.push(
            transmitter.make_set(ev.SESSION_REVOKED, {}, subject, exp=time.time() + 60)[0]
        ),
        "invalid_request",
    )
    await refused(
        await transmitter.push(transmitter.make_set(ev.SESSION_REVOKED, {}, None)[0]),
        "invalid_request",
    )
    await refused(
        await transmitter.push(
            transmitter.make_set(ev.RISK_LEVEL_CHANGE, {"current_level": "X"}, subject)[0]
        ),
        "invalid_request",
    )
    hs256, _ = transmitter.make_set(ev.SESSION_REVOKED, {}, subject, _alg="HS256")
    await refused(await transmitter.push(hs256), "invalid_key")
    forged = token.rsplit(".", 1)[0] + "." + token.rsplit(".", 1)[1][::-1]
    await refused(await transmitter.push(forged), "invalid_key")

    # Key rotation: the unknown kid makes Limen fetch the JWKS again.
    transmitter.rotate()
    rotated, rotated_jti = transmitter.make_set(ev.SESSION_REVOKED, {}, subject)
    assert (await transmitter.push(rotated)).status_code == 202
    assert limen.signals(jti=rotated_jti)[0].action == "revoke_sessions"
    # A kid the JWKS does not have, even after a refetch.
    published = transmitter.kid
    transmitter.kid = "unpublished"
    await refused(
        await transmitter.push(transmitter.make_set(ev.SESSION_REVOKED, {}, subject)[0]),
        "invalid_key",
    )
    transmitter.kid = published

    unknown, unknown_jti = transmitter.make_set(
        "https://example.com/event-type/unheard-of", {"x": 1}, subject
    )
    assert (await transmitter.push(unknown)).status_code == 202
    assert limen.signals(jti=unknown_jti)[0].action == "ignored: unsupported event type"

    ghost, ghost_jti = transmitter.make_set(
        ev.ACCOUNT_DISABLED, {}, {"format": "email", "email": "nobody@example.com"}
    )
    assert (await transmitter.push(ghost)).status_code == 202
    (record,) = limen.signals(jti=ghost_jti)
    assert (record.action, record.user_id, record.subject) == (
        "ignored: subject not found",
        "",
        "email:nobody@example.com",
    )


async def test_late_event_does_not_invalidate_a_fresh_sign_in(
    limen: Limen, transmitter: Transmitter
) -> None:
    carol = limen.user("carol", "carol@example.com")
    now = time.time()
    old_session, old_token = limen.sign_in(carol, now - 300)
    fresh_session, fresh_token = limen.sign_in(carol, now)
    await add_transmitter(limen, transmitter, "push")
    # The IdP revoked carol's sessions a minute ago; the SET arrives only now.
    late, _ = transmitter.make_set(
        ev.SESSION_REVOKED,
        {"event_timestamp": now - 60},
        {"format": "email", "email": "carol@example.com"},
    )
    assert (await transmitter.push(late)).status_code == 202
    assert limen.get_user(carol.id).revoked_before == now - 60
    assert limen.admission_code(fresh_token) == "no_segment"  # passed the revocation check
    assert limen.admission_code(old_token) == "session_revoked"
    with limen.ctx.store.session() as s:
        old = s.get(SignInSession, old_session.id)
        fresh = s.get(SignInSession, fresh_session.id)
        assert old is not None and old.revoked_at is not None
        assert fresh is not None and fresh.revoked_at is None


# --- poll -------------------------------------------------------------------------------------


async def test_polled_session_revoked_is_applied_and_acked(
    limen: Limen, transmitter: Transmitter
) -> None:
    bob = limen.user("bob")
    with limen.ctx.store.session() as s:
        s.add(
            ExternalIdentity(
                issuer=transmitter.base, subject="00u42", user_id=bob.id, created_at=time.time()
            )
        )
    out = await add_transmitter(limen, transmitter, "poll")
    assert out["endpoint_url"] == transmitter.base.rsplit("/", 1)[0] + "/ssf/poll"
    assert "push_token" not in out
    receiver = SignalReceiver(limen.ctx, refresh_seconds=0.2, long_poll=1.0)
    await receiver.start()
    try:
        await wait_for(lambda: transmitter.polls > 0, "the first poll")
        await limen.call("POST", f"/transmitters/{out['id']}/verify")
        event_time = time.time() - 30
        token, jti = transmitter.make_set(
            ev.SESSION_REVOKED,
            {"event_timestamp": event_time},
            {"format": "iss_sub", "iss": transmitter.base, "sub": "00u42"},
        )
        await transmitter.deliver(token, jti)
        await wait_for(
            lambda: limen.get_user(bob.id).revoked_before == event_time, "the polled revocation"
        )
        await wait_for(lambda: jti in transmitter.acked, "the ack of the polled SET")
        assert jti not in transmitter.pending
        (payload,) = revocations(limen)
        assert payload["user_id"] == bob.id and payload["at"] == event_time
        (record,) = limen.signals(jti=jti)
        assert (record.action, record.subject) == (
            "revoke_sessions",
            f"iss_sub:{transmitter.base}|00u42",
        )
        shown = await limen.call("GET", f"/transmitters/{out['id']}")
        assert shown["verified"] is True

        bad, bad_jti = transmitter.make_set(
            ev.SESSION_REVOKED, {}, {"format": "email", "email": "x@y"}, aud="https://other"
        )
        await transmitter.deliver(bad, bad_jti)
        await wait_for(lambda: bad_jti in transmitter.set_errs, "the setErr of a refused SET")
        assert transmitter.set_errs[bad_jti]["err"] == "invalid_audience"
    finally:
        await receiver.stop()


# --- admin signals ------------------------------------------------------------------------------


async def test_admin_signals_are_recorded(limen: Limen) -> None:
    erin = limen.user("erin")
    now = time.time()
    _, token = limen.sign_in(erin, now - 10)
    result = await limen.call(
        "POST", f"/users/{erin.id}/revoke-sessions", {"reason": "lost laptop"}
    )
    assert result["action"] == "revoke_sessions"
    assert limen.get_user(erin.id).revoked_before == result["revoked_before"]
    assert limen.admission_code(token) == "session_revoked"
    risk = await limen.call("POST", f"/users/{erin.id}/risk", {"level": "HIGH"})
    assert risk["risk_level"] == "high" and limen.get_user(erin.id).risk_level == "high"
    assert [p["signal_id"] for p in revocations(limen)] == [result["signal_id"], risk["signal_id"]]
    medium = await limen.call("POST", f"/users/{erin.id}/risk", {"level": "medium"})
    assert len(revocations(limen)) == 2 and medium["action"] == "set_risk"
    bad = await limen.admin.post(f"/api/v1/users/{erin.id}/risk", json={"level": "extreme"})
    assert bad.status_code == 400
    missing = await limen.admin.post("/api/v1/users/usr_nobody/revoke-sessions")
    assert missing.status_code == 404

    # A disable from the users API is recorded too, and the edge's report lands on it.
    await limen.call("POST", f"/users/{erin.id}/disable")
    await wait_for(
        lambda: any(r.event_type == "admin:user_disabled" for r in limen.signals(user_id=erin.id)),
        "the admin signal row",
    )
    at = revocations(limen)[-1]["at"]
    limen.ctx.bus.publish(
        SIGNAL_ENFORCED,
        signal_id="",
        user_id=erin.id,
        at=at,
        flows_cut=2,
        done_at=at + 0.01,
        node="edge-1",
    )
    await wait_for(
        lambda: any(r.flows_cut == 2 for r in limen.signals(user_id=erin.id)),
        "the report on the admin signal",
    )

    listed = await limen.call("GET", "/signals", user=erin.id)
    assert [s["event_type"] for s in listed] == [
        "admin:user_disabled",
        "admin:risk-level-change",
        "admin:risk-level-change",
        "admin:revoke-sessions",
    ]
    assert {s["source"] for s in listed} == {"admin"}
    assert len(await limen.call("GET", "/signals", action="set_risk")) == 2
    assert await limen.call("GET", "/signals", source="ssf:") == []
    one = await limen.call("GET", f"/signals/{listed[-1]['id']}")
    assert one["detail"]["reason"] == "lost laptop"


# --- CLI ----------------------------------------------------------------------------------------


async def test_cli_signal_commands(limen: Limen, transmitter: Transmitter, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from limen.cli import main as cli_main
    from limen.cli.admin import app as admin_app

    assert cli_main.app is not None  # importing main registers the signal commands

    limen.user("frank")
    token = create_admin_token(limen.ctx.store, "cli", "admin")
    runner = CliRunner(env={"LIMEN_DATA_DIR": str(tmp_path / "cli"), "LIMEN_API_URL": limen.base,
                            "LIMEN_ADMIN_TOKEN": token, "LIMEN_CA_FILE": None,
                            "LIMEN_SSF_AUTH_TOKEN": None})  # fmt: skip

    async def run(*args: str, stdin: str | None = None, code: int = 0) -> str:
        result = await asyncio.to_thread(runner.invoke, admin_app, list(args), stdin)
        assert result.exit_code == code, (result.output, result.exception)
        return str(result.output)

    assert "revoked the sessions of frank" in await run("user", "revoke-sessions", "frank")
    assert "risk of frank is high" in await run("user", "set-risk", "frank", "high")
    rows = json.loads(await run("signal", "list", "--user", "frank", "--json"))
    assert [r["event_type"] for r in rows] == ["admin:risk-level-change", "admin:revoke-sessions"]
    assert "revoke-sessions" in await run("signal", "list")
    await run("user", "set-risk", "frank", "extreme", code=1)

    out = await run("transmitter", "add", "idp", transmitter.base, "--auth-token-stdin",
                    "--receiver-url", limen.base, stdin=MGMT_TOKEN + "\n")  # fmt: skip
    assert "push token (shown once" in out and MGMT_TOKEN not in out
    assert "idp" in await run("transmitter", "list")
    assert "verified" in await run("transmitter", "verify", "idp", "--wait", "10")
    assert "deleted transmitter idp" in await run("transmitter", "delete", "idp")
    assert transmitter.stream is None
