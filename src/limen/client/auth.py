"""Signing in (device code, RFC 8628; password grant for scripts) and keeping tokens fresh."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from typing import Any

import httpx

from limen import __version__
from limen.client.profile import ClientState, device_facts
from limen.errors import AuthError, ConfigError

CLIENT_ID = "limen-client"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def http_client(state: ClientState, timeout: float = 30.0) -> httpx.Client:
    verify: Any = ssl.create_default_context(cadata=state.ca_pem) if state.ca_pem else True
    return httpx.Client(base_url=state.api_url, verify=verify, timeout=timeout)


def discover(state: ClientState, http: httpx.Client) -> dict[str, Any]:
    try:
        response = http.get("/.well-known/openid-configuration")
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot reach the identity service at {state.api_url}: {exc}") from exc
    if response.status_code != 200:
        raise ConfigError(f"{state.api_url} is not a Limen identity service")
    data: dict[str, Any] = response.json()
    return data


def _token_request(http: httpx.Client, form: dict[str, str]) -> dict[str, Any]:
    try:
        response = http.post("/oauth2/token", data=form)
    except httpx.HTTPError as exc:
        raise AuthError(f"token request failed: {exc}", code="temporarily_unavailable") from exc
    try:
        data: dict[str, Any] = response.json()
    except ValueError:
        data = {}
    if response.status_code != 200:
        raise AuthError(
            str(data.get("error_description") or data.get("error") or response.text[:200]),
            code=str(data.get("error") or "invalid_grant"),
        )
    return data


def _store_tokens(state: ClientState, data: dict[str, Any]) -> None:
    state.access_token = str(data["access_token"])
    state.refresh_token = str(data.get("refresh_token") or state.refresh_token)
    state.expires_at = time.time() + float(data.get("expires_in", 3600))


def _common(state: ClientState) -> dict[str, str]:
    form = {"client_id": CLIENT_ID, "scope": "openid limen"}
    if state.capabilities:
        form["client_capabilities"] = ",".join(state.capabilities)
    if state.device_id:
        # The device registers itself with what it is (RFC-less but Entra-like): policies on
        # device platform need the OS, the admin console shows the rest.
        facts = device_facts()
        form["device_id"] = state.device_id
        form["device_hostname"] = facts["hostname"][:255]
        form["device_os"] = facts["os"][:64]
        form["device_os_version"] = facts["os_version"][:64]
        form["client_version"] = f"limen/{__version__}"
    return form


ACR_MFA = "urn:limen:acr:mfa"


def password_login(
    state: ClientState,
    http: httpx.Client,
    username: str,
    password: str,
    *,
    otp: str = "",
    acr_values: str = "",
) -> None:
    """Password grant, with a one-time code when given; ``acr_values`` asks for a step-up
    (RFC 9470) so a missing second factor is an error rather than a weaker token."""
    form = {**_common(state), "grant_type": "password", "username": username, "password": password}
    if otp:
        form["otp"] = otp
    if acr_values:
        form["acr_values"] = acr_values
    data = _token_request(http, form)
    state.username = username
    _store_tokens(state, data)


def device_login(
    state: ClientState,
    http: httpx.Client,
    show: Callable[[dict[str, Any]], None],
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """RFC 8628: show the user where to go, then poll at the interval the server asks."""
    try:
        response = http.post("/oauth2/device_authorization", data=_common(state))
    except httpx.HTTPError as exc:
        raise AuthError(
            f"device authorization failed: {exc}", code="temporarily_unavailable"
        ) from exc
    if response.status_code != 200:
        raise AuthError(
            f"device authorization refused: {response.text[:200]}",
            code="device_authorization_failed",
        )
    start = response.json()
    show(start)
    interval = float(start.get("interval", 5))
    deadline = time.time() + float(start.get("expires_in", 600))
    while time.time() < deadline:
        sleep(interval)  # the interval the server asked for (RFC 8628 §3.5)
        try:
            data = _token_request(
                http,
                {**_common(state), "grant_type": DEVICE_GRANT, "device_code": start["device_code"]},
            )
        except AuthError as exc:
            if exc.code == "authorization_pending":
                continue
            if exc.code == "slow_down":
                interval += 5
                continue
            raise
        _store_tokens(state, data)
        return
    raise AuthError("the sign-in code expired before it was used", code="expired_token")


def refresh(state: ClientState, http: httpx.Client) -> None:
    if not state.refresh_token:
        raise AuthError("no refresh token: sign in again", code="not_signed_in")
    data = _token_request(
        http,
        {**_common(state), "grant_type": "refresh_token", "refresh_token": state.refresh_token},
    )
    _store_tokens(state, data)
