"""Second factors and devices through HTTP: self-service TOTP enrolment, password+otp sign-in,
step-up (RFC 9470), max_age, device registration, and the admin MFA and device endpoints, on a
real SQLite store with bus events observed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import fastapi
import httpx
import pytest
from sqlalchemy import select

from limen.admin.api import install_error_handlers
from limen.admin.api_mfa import add_mfa_routes
from limen.admin.auth import create_admin_token
from limen.bus.inprocess import CONFIG_CHANGED, SUBJECT_REVOKED, BusEvent
from limen.config import load_settings
from limen.errors import PolicyDenied
from limen.identity.api import CLIENT_ID, DEVICE_CODE_GRANT, build_router
from limen.identity.mfa import MfaService, time_step, totp_code
from limen.identity.passwords import hash_password
from limen.identity.service import SignInAttempt
from limen.identity.tokens import ACR_MFA, ACR_PASSWORD, EDGE_AUDIENCE, KeySet, TokenVerifier
from limen.service import ServiceContext, open_context
from limen.store.identity_models import RecoveryCode
from limen.store.models import AuditRecord, Device, User

PASSWORD = "s3cret-pass"
DEVICE = "dev_0123456789abcdef0123"
OTHER_DEVICE = "dev_fedcba9876543210fedc"


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    context = open_context(load_settings(data_dir=tmp_path, issuer="https://idp.test"))
    context.store.create_all_for_tests()  # the MFA tables, until the migration has them
    yield context
    context.store.dispose()


@pytest.fixture
def events(ctx: ServiceContext) -> list[BusEvent]:
    seen: list[BusEvent] = []
    ctx.bus.subscribe(seen.append)
    return seen


def add_user(ctx: ServiceContext, username: str) -> User:
    now = time.time()
    user = User(
        id=f"usr_{username}",
        username=username,
        password_hash=hash_password(PASSWORD),
        created_at=now,
        updated_at=now,
    )
    with ctx.store.session() as s:
        s.add(user)
    return user


@pytest.fixture
def alice(ctx: ServiceContext) -> User:
    return add_user(ctx, "alice")


def enrol(ctx: ServiceContext, user: User) -> tuple[str, list[str]]:
    """TOTP registered two minutes ago (its step is spent, current codes are free)."""
    service = MfaService(ctx.store)
    then = time.time() - 120
    secret, _ = service.begin_totp_enrollment(user, then)
    return secret, service.confirm_totp(user, totp_code(secret, time_step(then)), then)


def current_code(secret: str, ahead: int = 0) -> str:
    return totp_code(secret, time_step(time.time()) + ahead)


@pytest.fixture
async def client(ctx: ServiceContext) -> AsyncIterator[httpx.AsyncClient]:
    app = fastapi.FastAPI()
    app.include_router(build_router(ctx))
    transport = httpx.ASGITransport(app=app, client=("192.0.2.50", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://idp.test") as c:
        yield c


@pytest.fixture
async def admin(ctx: ServiceContext) -> AsyncIterator[httpx.AsyncClient]:
    app = fastapi.FastAPI()
    install_error_handlers(app)
    router = fastapi.APIRouter(prefix="/api/v1")
    add_mfa_routes(router, ctx)
    app.include_router(router)
    token = create_admin_token(ctx.store, "tester", "admin")
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40001))
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://admin.test",
        headers={"Authorization": f"Bearer {token}"},
    ) as c:
        yield c


def verify(ctx: ServiceContext, token: str) -> Any:
    verifier = TokenVerifier(
        KeySet.load(ctx.store), issuer=ctx.settings.resolved_issuer, audience=EDGE_AUDIENCE
    )
    return verifier.verify(token, time.time())


async def token_request(client: httpx.AsyncClient, **form: str) -> httpx.Response:
    return await client.post("/oauth2/token", data={"client_id": CLIENT_ID, **form})


async def password_grant(
    client: httpx.AsyncClient, username: str = "alice", **extra: str
) -> httpx.Response:
    return await token_request(
        client, grant_type="password", username=username, password=PASSWORD, **extra
    )


async def refresh(client: httpx.AsyncClient, token: str, **extra: str) -> httpx.Response:
    return await token_request(client, grant_type="refresh_token", refresh_token=token, **extra)


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    return response.status_code, body["error"], body.get("error_description", "")


def audit_actions(ctx: ServiceContext) -> list[str]:
    with ctx.store.session() as s:
        return list(s.scalars(select(AuditRecord.action).order_by(AuditRecord.at)))


# --- self-service enrolment -------------------------------------------------------------------


async def test_self_service_enrolment_revokes_and_enables_mfa_sign_in(
    client: httpx.AsyncClient, ctx: ServiceContext, alice: User, events: list[BusEvent]
) -> None:
    first = (await password_grant(client)).json()
    bearer = {"Authorization": f"Bearer {first['access_token']}"}

    begun = await client.post("/oauth2/mfa/totp", headers=bearer)
    assert begun.status_code == 200, begun.text
    assert begun.headers["cache-control"] == "no-store"
    secret = begun.json()["secret"]
    assert begun.json()["otpauth_uri"].startswith("otpauth://totp/Limen:alice?")
    assert f"secret={secret}" in begun.json()["otpauth_uri"]

    right = current_code(secret)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    refused = await client.post("/oauth2/mfa/totp/confirm", headers=bearer, json={"code": wrong})
    assert error_of(refused)[:2] == (400, "invalid_otp")
    malformed = await client.post("/oauth2/mfa/totp/confirm", headers=bearer, content=b"[")
    assert error_of(malformed)[:2] == (400, "invalid_request")

    confirmed = await client.post("/oauth2/mfa/totp/confirm", headers=bearer, json={"code": right})
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.headers["cache-control"] == "no-store"
    codes = confirmed.json()["recovery_codes"]
    assert len(codes) == 10 and len(set(codes)) == 10

    revoked = [e for e in events if e.topic == SUBJECT_REVOKED]
    assert [(e.payload["user_id"], e.payload["reason"]) for e in revoked] == [
        (alice.id, "mfa_registered")
    ]
    assert {"user.mfa_begin", "user.mfa_register"} <= set(audit_actions(ctx))
    with ctx.store.session() as s:
        user = s.get(User, alice.id)
        assert user is not None and user.totp_confirmed
        assert user.revoked_before >= revoked[0].payload["at"]

    # Everything from before the registration is void: the refresh token and the bearer.
    assert error_of(await refresh(client, first["refresh_token"]))[:2] == (400, "invalid_grant")
    again = await client.post("/oauth2/mfa/totp", headers=bearer)
    assert again.status_code == 401
    assert again.headers["www-authenticate"] == 'Bearer error="invalid_token"'

    # The user signs in again with the new factor. The confirmation spent the current step,
    # so the same code is a replay; the next step's code is inside the window.
    replay = await password_grant(client, otp=right)
    assert error_of(replay)[:2] == (400, "invalid_grant")
    signed_in = await password_grant(client, otp=current_code(secret, ahead=1))
    assert signed_in.status_code == 200, signed_in.text
    claims = verify(ctx, signed_in.json()["access_token"])
    assert claims.amr == ("pwd", "otp", "mfa")
    assert claims.acr == ACR_MFA

    # Once registered, enrolment cannot restart with a mere token (admin reset needed).
    fresh = {"Authorization": f"Bearer {signed_in.json()['access_token']}"}
    conflict = await client.post("/oauth2/mfa/totp", headers=fresh)
    assert error_of(conflict)[:2] == (409, "mfa_already_registered")


async def test_self_service_needs_a_valid_bearer(client: httpx.AsyncClient, alice: User) -> None:
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer not.a.jwt"}):
        response = await client.post("/oauth2/mfa/totp", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_token"
        confirm = await client.post("/oauth2/mfa/totp/confirm", headers=headers, json={"code": "1"})
        assert confirm.status_code == 401


# --- sign-in with a second factor -------------------------------------------------------------


async def test_password_and_otp_sign_in(
    client: httpx.AsyncClient, ctx: ServiceContext, alice: User
) -> None:
    secret, _ = enrol(ctx, alice)
    with_otp = await password_grant(client, otp=current_code(secret))
    assert with_otp.status_code == 200, with_otp.text
    claims = verify(ctx, with_otp.json()["access_token"])
    assert (claims.amr, claims.acr) == (("pwd", "otp", "mfa"), ACR_MFA)
    assert "mfa_registration_required" not in with_otp.json()

    # The refresh grant keeps the session's methods.
    refreshed = await refresh(client, with_otp.json()["refresh_token"])
    assert refreshed.status_code == 200
    assert verify(ctx, refreshed.json()["access_token"]).amr == ("pwd", "otp", "mfa")
    # Asking for MFA on refresh is fine for an MFA session.
    stepped = await refresh(client, refreshed.json()["refresh_token"], acr_values=ACR_MFA)
    assert stepped.status_code == 200

    # No otp: a password-only token; policies at the edge decide whether that is enough.
    without = await password_grant(client)
    assert without.status_code == 200
    claims = verify(ctx, without.json()["access_token"])
    assert (claims.amr, claims.acr) == (("pwd",), ACR_PASSWORD)


async def test_wrong_otp_is_an_error_not_a_downgrade(
    client: httpx.AsyncClient, ctx: ServiceContext, alice: User
) -> None:
    secret, _ = enrol(ctx, alice)
    right = current_code(secret)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    status, error, description = error_of(await password_grant(client, otp=wrong))
    assert (status, error) == (400, "invalid_grant")
    assert "one-time code" in description
    # A wrong password with a right code reveals nothing about the code.
    bad_password = await token_request(
        client, grant_type="password", username="alice", password="nope", otp=right
    )
    assert error_of(bad_password)[2] == "invalid username or password"
    # ...and did not spend it.
    assert (await password_grant(client, otp=right)).status_code == 200


async def test_step_up_requires_the_second_factor(
    client: httpx.AsyncClient, ctx: ServiceContext, alice: User
) -> None:
    secret, _ = enrol(ctx, alice)
    status, error, description = error_of(await password_grant(client, acr_values=ACR_MFA))
    assert (status, error, description) == (400, "invalid_grant", "a second factor is required")
    right = current_code(secret)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    status, error, description = error_of(
        await password_grant(client, acr_values=ACR_MFA, otp=wrong)
    )
    assert (status, error) == (400, "invalid_grant")
    assert description.startswith("a second factor is required")
    both = await password_grant(client, acr_values=f"{ACR_PASSWORD} {ACR_MFA}", otp=right)
    assert both.status_code == 200
    assert verify(ctx, both.json()["access_token"]).acr == ACR_MFA

    # A password-only session cannot be refreshed into an MFA one.
    pwd_only = (await password_grant(client)).json()
    refused = await refresh(client, pwd_only["refresh_token"], acr_values=ACR_MFA)
    assert error_of(refused) == (400, "invalid_grant", "a second factor is required")
    # The refusal did not spend the refresh token.
    assert (await refresh(client, pwd_only["refresh_token"])).status_code == 200


async def test_step_up_for_user_without_totp(client: httpx.AsyncClient, alice: User) -> None:
    status, error, _ = error_of(await password_grant(client, acr_values=ACR_MFA))
    assert (status, error) == (400, "invalid_grant")
    status, error, description = error_of(await password_grant(client, otp="123456"))
    assert (status, error) == (400, "invalid_grant")
    assert "no second factor is registered" in description


async def test_recovery_code_sign_in_is_single_use(
    client: httpx.AsyncClient, ctx: ServiceContext, alice: User
) -> None:
    _, codes = enrol(ctx, alice)
    used = await password_grant(client, otp=codes[0], acr_values=ACR_MFA)
    assert used.status_code == 200, used.text
    assert verify(ctx, used.json()["access_token"]).amr == ("pwd", "otp", "mfa")
    assert error_of(await password_grant(client, otp=codes[0]))[:2] == (400, "invalid_grant")
    with ctx.store.session() as s:
        spent = s.scalars(select(RecoveryCode).where(RecoveryCode.used_at.is_not(None))).all()
    assert len(spent) == 1


async def test_mfa_registration_required_flag(
    client: httpx.AsyncClient, ctx: ServiceContext, alice: User
) -> None:
    with ctx.store.session() as s:
        row = s.get(User, alice.id)
        assert row is not None
        row.mfa_required = True
    first = await password_grant(client)
    assert first.status_code == 200
    assert first.json()["mfa_registration_required"] is True
    again = await refresh(client, first.json()["refresh_token"])
    assert again.json()["mfa_registration_required"] is True
    enrol(ctx, alice)
    after = await password_grant(client)
    assert "mfa_registration_required" not in after.json()


async def test_max_age_on_refresh(
    client: httpx.AsyncClient, ctx: ServiceContext, alice: User
) -> None:
    tokens = (await password_grant(client)).json()
    stale = await refresh(client, tokens["refresh_token"], max_age="0")
    assert error_of(stale) == (400, "invalid_grant", "re-authentication required")
    bad = await refresh(client, tokens["refresh_token"], max_age="-5")
    assert error_of(bad)[:2] == (400, "invalid_request")
    # Neither spent the token; a generous max_age passes.
    fresh = await refresh(client, tokens["refresh_token"], max_age="3600")
    assert fresh.status_code == 200, fresh.text


# --- the /device page ---------------------------------------------------------------------------


async def start_device(client: httpx.AsyncClient, **extra: str) -> dict[str, Any]:
    response = await client.post(
        "/oauth2/device_authorization", data={"client_id": CLIENT_ID, **extra}
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_device_page_second_factor(
    client: httpx.AsyncClient, ctx: ServiceContext, alice: User
) -> None:
    secret, _ = enrol(ctx, alice)
    page = await client.get("/device")
    assert "name=otp" in page.text

    grant = await start_device(
        client, acr_values=ACR_MFA, device_id=DEVICE, device_os="linux", device_hostname="tv"
    )
    login = {"user_code": grant["user_code"], "username": "alice", "password": PASSWORD}
    missing = await client.post("/device", data=login)
    assert missing.status_code == 401
    assert "a second factor is required" in missing.text
    code = current_code(secret)
    wrong = await client.post("/device", data={**login, "otp": f"{(int(code) + 1) % 10**6:06d}"})
    assert wrong.status_code == 401
    approved = await client.post("/device", data={**login, "otp": code})
    assert approved.status_code == 200, approved.text

    done = await token_request(
        client, grant_type=DEVICE_CODE_GRANT, device_code=grant["device_code"]
    )
    assert done.status_code == 200, done.text
    claims = verify(ctx, done.json()["access_token"])
    assert claims.amr == ("pwd", "otp", "mfa")
    assert claims.device_id == DEVICE
    with ctx.store.session() as s:
        device = s.get(Device, DEVICE)
        assert device is not None
        assert (device.user_id, device.os, device.hostname) == (alice.id, "linux", "tv")

    # Without acr_values, the code stays optional: password alone approves with amr pwd.
    plain = await start_device(client)
    ok = await client.post(
        "/device", data={"user_code": plain["user_code"], "username": "alice", "password": PASSWORD}
    )
    assert ok.status_code == 200
    done = await token_request(
        client, grant_type=DEVICE_CODE_GRANT, device_code=plain["device_code"]
    )
    assert verify(ctx, done.json()["access_token"]).amr == ("pwd",)


# --- devices at sign-in -----------------------------------------------------------------------


async def test_device_registration_and_ownership(
    client: httpx.AsyncClient, ctx: ServiceContext, alice: User
) -> None:
    add_user(ctx, "bob")
    facts = {
        "device_id": DEVICE,
        "device_hostname": "alice-laptop",
        "device_os": "linux",
        "device_os_version": "6.1",
        "client_version": "0.1.0",
    }
    first = await password_grant(client, **facts)
    assert first.status_code == 200, first.text
    assert verify(ctx, first.json()["access_token"]).device_id == DEVICE
    with ctx.store.session() as s:
        device = s.get(Device, DEVICE)
        assert device is not None
        assert (device.user_id, device.hostname, device.os, device.os_version) == (
            alice.id,
            "alice-laptop",
            "linux",
            "6.1",
        )
        assert (device.client_version, device.enabled, device.compliant) == ("0.1.0", True, False)
        first_seen = device.last_seen_at

    # Facts are updated on the next sign-in; untold facts are kept.
    updated = await password_grant(client, device_id=DEVICE, device_os_version="6.6")
    assert updated.status_code == 200
    with ctx.store.session() as s:
        device = s.get(Device, DEVICE)
        assert device is not None
        assert (device.os_version, device.hostname) == ("6.6", "alice-laptop")
        assert device.last_seen_at >= first_seen

    # Another user cannot claim alice's device.
    stolen = await password_grant(client, username="bob", device_id=DEVICE)
    assert error_of(stolen)[:2] == (400, "invalid_request")

    for bad in ("dev_laptop", "usr_0123456789abcdef", "dev_0123", "DEV_0123456789ABCDEF"):
        assert error_of(await password_grant(client, device_id=bad))[:2] == (
            400,
            "invalid_request",
        ), bad
    long_host = await password_grant(client, device_id=DEVICE, device_hostname="h" * 300)
    assert error_of(long_host)[:2] == (400, "invalid_request")

    # A session stays bound to its device.
    tokens = updated.json()
    moved = await refresh(client, tokens["refresh_token"], device_id=OTHER_DEVICE)
    assert error_of(moved)[:2] == (400, "invalid_request")
    same = await refresh(client, tokens["refresh_token"], device_id=DEVICE)
    assert same.status_code == 200
    assert verify(ctx, same.json()["access_token"]).device_id == DEVICE


# --- admin: MFA -------------------------------------------------------------------------------


async def test_admin_reset_mfa(
    client: httpx.AsyncClient,
    admin: httpx.AsyncClient,
    ctx: ServiceContext,
    alice: User,
    events: list[BusEvent],
) -> None:
    secret, _ = enrol(ctx, alice)
    tokens = (await password_grant(client, otp=current_code(secret))).json()
    status = (await admin.get(f"/api/v1/users/{alice.id}/mfa")).json()
    assert status["mfa_registered"] is True and status["recovery_codes_left"] == 10

    reset = await admin.post(f"/api/v1/users/{alice.id}/mfa/reset")
    assert reset.status_code == 200, reset.text
    assert reset.json()["mfa_registered"] is False
    with ctx.store.session() as s:
        user = s.get(User, alice.id)
        assert user is not None and user.totp_secret is None and not user.totp_confirmed
        assert s.scalars(select(RecoveryCode)).first() is None
    revoked = [e.payload for e in events if e.topic == SUBJECT_REVOKED]
    assert [(p["user_id"], p["reason"]) for p in revoked] == [(alice.id, "mfa_reset")]
    assert "user.mfa_reset" in audit_actions(ctx)
    # Sessions are revoked as on a password change.
    assert error_of(await refresh(client, tokens["refresh_token"]))[:2] == (400, "invalid_grant")
    # The old code no longer counts; the user can enrol afresh.
    assert error_of(await password_grant(client, otp=current_code(secret, 1)))[:2] == (
        400,
        "invalid_grant",
    )
    assert (await admin.post("/api/v1/users/usr_nobody/mfa/reset")).status_code == 404


async def test_admin_require_mfa(
    client: httpx.AsyncClient, admin: httpx.AsyncClient, ctx: ServiceContext, alice: User
) -> None:
    response = await admin.post(f"/api/v1/users/{alice.id}/mfa/require", json={"required": True})
    assert response.status_code == 200, response.text
    assert response.json()["mfa_required"] is True
    assert (await password_grant(client)).json()["mfa_registration_required"] is True
    with ctx.store.session() as s:
        record = s.scalars(
            select(AuditRecord).where(AuditRecord.action == "user.mfa_require")
        ).one()
        assert record.details == {"required": True} and record.target == alice.id
    off = await admin.post(f"/api/v1/users/{alice.id}/mfa/require", json={"required": False})
    assert off.json()["mfa_required"] is False
    assert "mfa_registration_required" not in (await password_grant(client)).json()

    for body in ({"required": "yes"}, {"required": True, "extra": 1}, {}):
        bad = await admin.post(f"/api/v1/users/{alice.id}/mfa/require", json=body)
        assert bad.status_code == 400, body
        assert bad.json()["error"] == "invalid_request"


async def test_admin_roles(ctx: ServiceContext, admin: httpx.AsyncClient, alice: User) -> None:
    reader = create_admin_token(ctx.store, "viewer", "reader")
    headers = {"Authorization": f"Bearer {reader}"}
    assert (await admin.get("/api/v1/devices", headers=headers)).status_code == 200
    denied = await admin.post(f"/api/v1/users/{alice.id}/mfa/reset", headers=headers)
    assert (denied.status_code, denied.json()["error"]) == (403, "insufficient_role")
    anonymous = await admin.get("/api/v1/devices", headers={"Authorization": ""})
    assert anonymous.status_code == 401


# --- admin: devices ---------------------------------------------------------------------------


async def test_admin_devices(
    client: httpx.AsyncClient,
    admin: httpx.AsyncClient,
    ctx: ServiceContext,
    alice: User,
    events: list[BusEvent],
) -> None:
    add_user(ctx, "bob")
    tokens = (await password_grant(client, device_id=DEVICE, device_os="linux")).json()
    assert (await password_grant(client, "bob", device_id=OTHER_DEVICE)).status_code == 200

    everything = (await admin.get("/api/v1/devices")).json()
    assert {d["id"] for d in everything} == {DEVICE, OTHER_DEVICE}
    mine = (await admin.get("/api/v1/devices", params={"user": alice.id})).json()
    by_name = (await admin.get("/api/v1/devices", params={"user": "alice"})).json()
    assert [d["id"] for d in mine] == [d["id"] for d in by_name] == [DEVICE]
    assert mine[0]["os"] == "linux" and mine[0]["compliant"] is False
    unknown = await admin.get("/api/v1/devices", params={"user": "nobody"})
    assert unknown.status_code == 400
    shown = (await admin.get(f"/api/v1/devices/{DEVICE}")).json()
    assert shown["user_id"] == alice.id
    assert (await admin.get("/api/v1/devices/dev_00")).status_code == 404

    version = ctx.store.config_version()
    compliant = await admin.post(f"/api/v1/devices/{DEVICE}/compliance", json={"compliant": True})
    assert compliant.json()["compliant"] is True
    assert ctx.store.config_version() == version + 1
    assert not [e for e in events if e.topic == SUBJECT_REVOKED]  # granting cuts nothing

    events.clear()
    off = await admin.post(f"/api/v1/devices/{DEVICE}/compliance", json={"compliant": False})
    assert off.json()["compliant"] is False
    assert ctx.store.config_version() == version + 2
    revoked = [e.payload for e in events if e.topic == SUBJECT_REVOKED]
    assert len(revoked) == 1
    assert (revoked[0]["user_id"], revoked[0]["device_id"], revoked[0]["reason"]) == (
        alice.id,
        DEVICE,
        "device_noncompliant",
    )
    assert any(e.topic == CONFIG_CHANGED for e in events)

    events.clear()
    disabled = await admin.post(f"/api/v1/devices/{DEVICE}/disable")
    assert disabled.json()["enabled"] is False
    revoked = [e.payload for e in events if e.topic == SUBJECT_REVOKED]
    assert [(p["user_id"], p["device_id"], p["reason"]) for p in revoked] == [
        (alice.id, DEVICE, "device_disabled")
    ]
    # A disabled device can neither sign in nor refresh; bob's device is untouched.
    assert error_of(await password_grant(client, device_id=DEVICE)) == (
        400,
        "invalid_grant",
        "device disabled",
    )
    assert error_of(await refresh(client, tokens["refresh_token"])) == (
        400,
        "invalid_grant",
        "device disabled",
    )
    assert (await password_grant(client, "bob", device_id=OTHER_DEVICE)).status_code == 200

    enabled = await admin.post(f"/api/v1/devices/{DEVICE}/enable")
    assert enabled.json()["enabled"] is True
    # The refusal did not spend the refresh token: the session continues once re-enabled.
    assert (await refresh(client, tokens["refresh_token"])).status_code == 200

    actions = audit_actions(ctx)
    for action in ("device.compliance", "device.disable", "device.enable"):
        assert action in actions
    bad = await admin.post(f"/api/v1/devices/{DEVICE}/compliance", json={"compliant": 1})
    assert bad.status_code == 400


# --- sign-in policy hook ----------------------------------------------------------------------


async def test_sign_in_policy_can_block(ctx: ServiceContext, alice: User) -> None:
    seen: list[SignInAttempt] = []
    blocking = [False]

    def check(attempt: SignInAttempt) -> None:
        seen.append(attempt)
        if blocking[0]:
            raise PolicyDenied(
                "blocked by policy pol_outside: source address outside trusted locations",
                code="sign_in_blocked",
            )

    app = fastapi.FastAPI()
    app.include_router(build_router(ctx, sign_in_check=check))
    transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://idp.test") as client:
        tokens = (await password_grant(client, device_id=DEVICE)).json()
        assert (seen[0].grant_type, tuple(seen[0].amr)) == ("password", ("pwd",))
        assert (seen[0].ip_address, seen[0].device_id, seen[0].user.id) == (
            "198.51.100.7",
            DEVICE,
            alice.id,
        )
        tokens = (await refresh(client, tokens["refresh_token"])).json()
        assert seen[1].grant_type == "refresh_token" and seen[1].device_id == DEVICE

        blocking[0] = True
        status, error, description = error_of(await password_grant(client))
        assert (status, error) == (400, "sign_in_blocked")
        assert "pol_outside" in description
        assert error_of(await refresh(client, tokens["refresh_token"]))[1] == "sign_in_blocked"
        # A blocked refresh does not spend the token: once the policy allows, it works.
        blocking[0] = False
        assert (await refresh(client, tokens["refresh_token"])).status_code == 200
