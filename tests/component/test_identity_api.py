from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import fastapi
import httpx
import pytest

from limen.config import load_settings
from limen.errors import AuthError, NotFound
from limen.identity.api import CLIENT_ID, DEVICE_CODE_GRANT, build_router
from limen.identity.passwords import hash_password
from limen.identity.service import IdentityService, normalize_user_code
from limen.identity.tokens import EDGE_AUDIENCE, KeySet, TokenVerifier
from limen.service import ServiceContext, open_context
from limen.store.db import token_hash
from limen.store.models import RefreshToken, SignInSession, User

PASSWORD = "s3cret-pass"


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    context = open_context(load_settings(data_dir=tmp_path, issuer="https://idp.test"))
    yield context
    context.store.dispose()


def add_user(ctx: ServiceContext, username: str, *, enabled: bool = True) -> User:
    now = time.time()
    user = User(
        id=f"usr_{username}",
        username=username,
        password_hash=hash_password(PASSWORD),
        enabled=enabled,
        created_at=now,
        updated_at=now,
    )
    with ctx.store.session() as s:
        s.add(user)
    return user


@pytest.fixture
def alice(ctx: ServiceContext) -> User:
    return add_user(ctx, "alice")


@pytest.fixture
async def client(ctx: ServiceContext) -> AsyncIterator[httpx.AsyncClient]:
    app = fastapi.FastAPI()
    app.include_router(build_router(ctx))
    transport = httpx.ASGITransport(app=app, client=("192.0.2.50", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://idp.test") as c:
        yield c


def verify(ctx: ServiceContext, token: str) -> Any:
    verifier = TokenVerifier(
        KeySet.load(ctx.store), issuer=ctx.settings.resolved_issuer, audience=EDGE_AUDIENCE
    )
    return verifier.verify(token, time.time())


async def token_request(client: httpx.AsyncClient, **form: str) -> httpx.Response:
    return await client.post("/oauth2/token", data={"client_id": CLIENT_ID, **form})


async def password_grant(client: httpx.AsyncClient, **extra: str) -> httpx.Response:
    return await token_request(
        client, grant_type="password", username="alice", password=PASSWORD, **extra
    )


# --- discovery and keys ---------------------------------------------------------------------


async def test_discovery_document(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/.well-known/openid-configuration")).json()
    assert doc["issuer"] == "https://idp.test"
    assert doc["token_endpoint"] == "https://idp.test/oauth2/token"
    assert doc["device_authorization_endpoint"] == "https://idp.test/oauth2/device_authorization"
    assert doc["jwks_uri"] == "https://idp.test/oauth2/jwks"
    assert doc["authorization_endpoint"] == "https://idp.test/oauth2/authorize"
    assert DEVICE_CODE_GRANT in doc["grant_types_supported"]
    assert doc["id_token_signing_alg_values_supported"] == ["ES256"]
    assert doc["token_endpoint_auth_methods_supported"] == ["none"]
    assert doc["claims_parameter_supported"] is True
    assert doc["acr_values_supported"] == ["urn:limen:acr:pwd", "urn:limen:acr:mfa"]
    response = await client.get("/oauth2/authorize")
    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_response_type"


async def test_jwks_endpoint_verifies_issued_token(
    client: httpx.AsyncClient, ctx: ServiceContext, alice: User
) -> None:
    access = (await password_grant(client)).json()["access_token"]
    document = (await client.get("/oauth2/jwks")).json()
    assert all("d" not in key for key in document["keys"])
    verifier = TokenVerifier(
        KeySet.from_jwks(document), issuer="https://idp.test", audience=EDGE_AUDIENCE
    )
    assert verifier.verify(access, time.time()).username == "alice"


# --- password grant -------------------------------------------------------------------------


async def test_password_grant(client: httpx.AsyncClient, ctx: ServiceContext, alice: User) -> None:
    response = await password_grant(client, device_id="dev_1a2b3c4d5e6f7a8b9c0d")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["refresh_token"]
    assert "openid" in body["scope"]
    claims = verify(ctx, body["access_token"])
    assert claims.sub == alice.id
    assert claims.amr == ("pwd",)
    assert claims.ipaddr == "192.0.2.50"
    assert claims.device_id == "dev_1a2b3c4d5e6f7a8b9c0d"
    assert claims.capabilities == ()
    assert ctx.settings.access_token_min_ttl <= body["expires_in"]
    assert body["expires_in"] <= ctx.settings.access_token_max_ttl


async def test_password_grant_with_cp1(
    client: httpx.AsyncClient, ctx: ServiceContext, alice: User
) -> None:
    body = (await password_grant(client, client_capabilities="cp1")).json()
    assert body["expires_in"] == ctx.settings.cae_token_ttl
    assert verify(ctx, body["access_token"]).capabilities == ("cp1",)


async def test_wrong_password_and_unknown_user_look_alike(
    client: httpx.AsyncClient, alice: User
) -> None:
    wrong = await token_request(client, grant_type="password", username="alice", password="nope")
    unknown = await token_request(client, grant_type="password", username="bob", password="nope")
    assert wrong.status_code == unknown.status_code == 400
    assert wrong.json() == unknown.json()
    assert wrong.json()["error"] == "invalid_grant"


async def test_disabled_user_refused(client: httpx.AsyncClient, ctx: ServiceContext) -> None:
    add_user(ctx, "carol", enabled=False)
    response = await token_request(
        client, grant_type="password", username="carol", password=PASSWORD
    )
    assert response.status_code == 400
    assert response.json()["error"] == "user_disabled"


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        ({"client_id": "other", "grant_type": "password"}, 401, "invalid_client"),
        ({"grant_type": "password"}, 401, "invalid_client"),
        ({"client_id": CLIENT_ID}, 400, "invalid_request"),
        (
            {"client_id": CLIENT_ID, "grant_type": "client_credentials"},
            400,
            "unsupported_grant_type",
        ),
        (
            {"client_id": CLIENT_ID, "grant_type": "password", "username": "alice"},
            400,
            "invalid_request",
        ),
        (
            {"client_id": CLIENT_ID, "grant_type": "refresh_token", "refresh_token": "x"},
            400,
            "invalid_grant",
        ),
        (
            {"client_id": CLIENT_ID, "grant_type": DEVICE_CODE_GRANT, "device_code": "x"},
            400,
            "invalid_grant",
        ),
    ],
)
async def test_token_endpoint_errors(
    client: httpx.AsyncClient, alice: User, form: dict[str, str], status: int, error: str
) -> None:
    response = await client.post("/oauth2/token", data=form)
    assert response.status_code == status
    assert response.json()["error"] == error
    assert response.json()["error_description"]


async def test_token_endpoint_refuses_json_and_repeated_parameters(
    client: httpx.AsyncClient, alice: User
) -> None:
    as_json = await client.post(
        "/oauth2/token", json={"client_id": CLIENT_ID, "grant_type": "password"}
    )
    assert as_json.status_code == 400
    assert as_json.json()["error"] == "invalid_request"
    repeated = await client.post(
        "/oauth2/token",
        content=f"client_id={CLIENT_ID}&grant_type=password&username=alice&username=bob&password=x",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert repeated.status_code == 400
    assert "repeated" in repeated.json()["error_description"]


# --- refresh tokens -------------------------------------------------------------------------


async def test_refresh_rotation_and_reuse_revokes_family(
    client: httpx.AsyncClient, ctx: ServiceContext, alice: User, caplog: pytest.LogCaptureFixture
) -> None:
    first = (await password_grant(client, client_capabilities="cp1")).json()
    second = await token_request(
        client, grant_type="refresh_token", refresh_token=first["refresh_token"]
    )
    assert second.status_code == 200
    body = second.json()
    assert body["refresh_token"] != first["refresh_token"]
    claims = verify(ctx, body["access_token"])
    assert claims.sid == verify(ctx, first["access_token"]).sid
    assert claims.capabilities == ("cp1",)  # kept from the session

    with caplog.at_level(logging.WARNING, logger="limen.identity.service"):
        reuse = await token_request(
            client, grant_type="refresh_token", refresh_token=first["refresh_token"]
        )
    assert reuse.status_code == 400
    assert reuse.json()["error"] == "invalid_grant"
    assert "reuse" in reuse.json()["error_description"]
    assert "reuse detected" in caplog.text
    assert first["refresh_token"] not in caplog.text
    # The legitimate holder's newer token died with the family, and the session is revoked.
    after = await token_request(
        client, grant_type="refresh_token", refresh_token=body["refresh_token"]
    )
    assert after.json()["error"] == "invalid_grant"
    with ctx.store.session() as s:
        session = s.get(SignInSession, claims.sid)
        assert session is not None and session.revoked_at is not None


def test_refresh_service_rules(ctx: ServiceContext, alice: User) -> None:
    service = IdentityService(ctx.store, ctx.settings)
    now = 1_000_000.0
    session = service.start_session(
        alice, client_id=CLIENT_ID, amr=["pwd"], ip_address="192.0.2.1", capabilities=[], now=now
    )
    token = service.issue_refresh_token(session, now)
    with ctx.store.session() as s:
        stored = s.get(RefreshToken, token_hash(token))
        assert stored is not None  # only the hash is stored
        assert stored.expires_at == now + ctx.settings.refresh_token_ttl
    user, same, token2 = service.rotate_refresh_token(token, now + 1)
    assert user.id == alice.id and same.id == session.id

    # Expired: refused, and not spent (no reuse alarm afterwards).
    ttl = ctx.settings.refresh_token_ttl
    err = _auth_error(service.rotate_refresh_token, token2, now + 1 + ttl)
    assert err.code == "invalid_grant" and "expired" in err.message
    # Disabled user: refused without spending the token.
    with ctx.store.session() as s:
        row = s.get(User, alice.id)
        assert row is not None
        row.enabled = False
    assert _auth_error(service.rotate_refresh_token, token2, now + 2).code == "invalid_grant"
    with ctx.store.session() as s:
        row = s.get(User, alice.id)
        assert row is not None
        row.enabled = True
    _, _, token3 = service.rotate_refresh_token(token2, now + 3)

    # Revocation: sessions authenticated before revoked_before are refused.
    assert service.revoke_user_sessions(alice.id, now + 4) == 1
    err = _auth_error(service.rotate_refresh_token, token3, now + 5)
    assert err.code == "invalid_grant"
    with ctx.store.session() as s:
        row = s.get(User, alice.id)
        assert row is not None and row.revoked_before == now + 4
    # A new sign-in after the revocation works.
    fresh = service.start_session(
        alice,
        client_id=CLIENT_ID,
        amr=["pwd"],
        ip_address="192.0.2.1",
        capabilities=[],
        now=now + 6,
    )
    service.rotate_refresh_token(service.issue_refresh_token(fresh, now + 6), now + 7)
    with pytest.raises(NotFound):
        service.revoke_user_sessions("usr_nobody", now)


def test_revoked_before_alone_blocks_old_session(ctx: ServiceContext, alice: User) -> None:
    service = IdentityService(ctx.store, ctx.settings)
    session = service.start_session(
        alice, client_id=CLIENT_ID, amr=["pwd"], ip_address="", capabilities=[], now=100.0
    )
    token = service.issue_refresh_token(session, 100.0)
    with ctx.store.session() as s:
        row = s.get(User, alice.id)
        assert row is not None
        row.revoked_before = 150.0  # e.g. set by a CAE signal, sessions untouched
    assert _auth_error(service.rotate_refresh_token, token, 200.0).code == "invalid_grant"


def _auth_error(fn: Any, *args: Any) -> AuthError:
    with pytest.raises(AuthError) as info:
        fn(*args)
    return info.value


# --- device authorization grant -------------------------------------------------------------


async def start_device(client: httpx.AsyncClient, **extra: str) -> dict[str, Any]:
    response = await client.post(
        "/oauth2/device_authorization", data={"client_id": CLIENT_ID, "scope": "openid", **extra}
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    return dict(response.json())


async def poll(client: httpx.AsyncClient, device_code: str) -> httpx.Response:
    return await token_request(client, grant_type=DEVICE_CODE_GRANT, device_code=device_code)


async def test_device_flow_end_to_end(
    client: httpx.AsyncClient, ctx: ServiceContext, alice: User
) -> None:
    grant = await start_device(
        client, client_capabilities="cp1", device_id="dev_00112233445566778899"
    )
    assert re.fullmatch(r"[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}", grant["user_code"])
    assert grant["verification_uri"] == "https://idp.test/device"
    assert grant["verification_uri_complete"].endswith(f"?user_code={grant['user_code']}")
    assert grant["expires_in"] == ctx.settings.device_code_ttl
    assert grant["interval"] == ctx.settings.device_code_interval

    pending = await poll(client, grant["device_code"])
    assert pending.status_code == 400
    assert pending.json()["error"] == "authorization_pending"

    page = await client.get("/device", params={"user_code": grant["user_code"].lower()})
    assert page.status_code == 200
    assert f'value="{grant["user_code"]}"' in page.text
    assert page.headers["x-frame-options"] == "DENY"

    approved = await client.post(
        "/device",
        data={"user_code": grant["user_code"], "username": "alice", "password": PASSWORD},
    )
    assert approved.status_code == 200
    assert "Signed in as alice" in approved.text

    # Polling again right away is too fast, but an approved code is handed out anyway.
    done = await poll(client, grant["device_code"])
    assert done.status_code == 200, done.text
    claims = verify(ctx, done.json()["access_token"])
    assert claims.sub == alice.id
    assert claims.capabilities == ("cp1",)
    assert claims.device_id == "dev_00112233445566778899"
    assert done.json()["expires_in"] == ctx.settings.cae_token_ttl

    # Consumed once.
    again = await poll(client, grant["device_code"])
    assert again.json()["error"] == "invalid_grant"


async def test_device_flow_slow_down(client: httpx.AsyncClient, alice: User) -> None:
    grant = await start_device(client)
    assert (await poll(client, grant["device_code"])).json()["error"] == "authorization_pending"
    too_fast = await poll(client, grant["device_code"])
    assert too_fast.status_code == 400
    assert too_fast.json()["error"] == "slow_down"
    assert "10" in too_fast.json()["error_description"]  # 5 + 5 (RFC 8628 §3.5)


async def test_device_flow_denied(client: httpx.AsyncClient, alice: User) -> None:
    grant = await start_device(client)
    denied = await client.post(
        "/device",
        data={
            "user_code": grant["user_code"],
            "username": "alice",
            "password": PASSWORD,
            "action": "deny",
        },
    )
    assert denied.status_code == 200
    assert "denied" in denied.text
    response = await poll(client, grant["device_code"])
    assert response.json()["error"] == "access_denied"


async def test_device_page_errors_are_clear_and_escaped(
    client: httpx.AsyncClient, alice: User
) -> None:
    grant = await start_device(client)
    bad_login = await client.post(
        "/device",
        data={"user_code": grant["user_code"], "username": "alice", "password": "wrong"},
    )
    assert bad_login.status_code == 401
    assert "invalid username or password" in bad_login.text
    bad_code = await client.post(
        "/device", data={"user_code": "BBBB-BBBB", "username": "alice", "password": PASSWORD}
    )
    assert bad_code.status_code == 400
    assert "unknown or expired code" in bad_code.text
    hostile = await client.get("/device", params={"user_code": '"><script>alert(1)</script>'})
    assert "<script>" not in hostile.text
    # The code is still pending: nothing above approved it.
    assert (await poll(client, grant["device_code"])).json()["error"] == "authorization_pending"


async def test_device_flow_disabled_user_cannot_approve(
    client: httpx.AsyncClient, ctx: ServiceContext
) -> None:
    add_user(ctx, "dave", enabled=False)
    grant = await start_device(client)
    response = await client.post(
        "/device", data={"user_code": grant["user_code"], "username": "dave", "password": PASSWORD}
    )
    assert response.status_code == 401
    assert "disabled" in response.text


def test_device_code_service_rules(ctx: ServiceContext, alice: User) -> None:
    service = IdentityService(ctx.store, ctx.settings)
    now = 5_000.0
    grant = service.start_device_authorization(CLIENT_ID, "openid", {"k": "v"}, now)
    code = grant["device_code"]
    # Another client cannot poll it.
    assert _auth_error(service.poll_device_code, code, "other", now).code == "invalid_grant"
    assert (
        _auth_error(service.poll_device_code, code, CLIENT_ID, now).code == "authorization_pending"
    )
    assert _auth_error(service.poll_device_code, code, CLIENT_ID, now + 1).code == "slow_down"
    # The interval is now 10 s; polling 10 s later is fine again.
    assert (
        _auth_error(service.poll_device_code, code, CLIENT_ID, now + 11).code
        == "authorization_pending"
    )
    service.approve_device_code(
        normalize_user_code(grant["user_code"].lower()), alice, ["pwd", "otp", "mfa"], now + 12
    )
    # Approving twice is refused.
    assert (
        _auth_error(service.approve_device_code, grant["user_code"], alice, ["pwd"], now + 13).code
        == "invalid_grant"
    )
    user, amr, request = service.poll_device_code(code, CLIENT_ID, now + 30)
    assert (user.id, amr, request) == (alice.id, ["pwd", "otp", "mfa"], {"k": "v"})

    expired = service.start_device_authorization(CLIENT_ID, "", {}, now)
    ttl = ctx.settings.device_code_ttl
    err = _auth_error(service.poll_device_code, expired["device_code"], CLIENT_ID, now + ttl)
    assert err.code == "expired_token"
    assert (
        _auth_error(
            service.approve_device_code, expired["user_code"], alice, ["pwd"], now + ttl
        ).code
        == "invalid_grant"
    )


def test_user_code_normalisation() -> None:
    assert normalize_user_code("bcdf ghjk") == "BCDF-GHJK"
    assert normalize_user_code("BCDF-GHJK") == "BCDF-GHJK"
    assert normalize_user_code("bc") == "BC"
