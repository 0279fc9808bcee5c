"""Component tests of forwarding profiles: the profile endpoint on a real service (real TLS,
real SQLite), the admin settings, and the client daemon (without packet capture) picking up
changes and obeying its control socket."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from limen.client.daemon import ClientDaemon, DaemonNotRunning, control_call, control_path
from limen.client.forwarding import parse_profile
from limen.client.profile import StateFile
from limen.client.tunnel import EdgeSession
from limen.errors import LimenError
from limen.net.tasks import spawn
from tests.support import Tenant, running_tenant

ME = "/api/v1/me/forwarding-profile"
SETTINGS = "/api/v1/forwarding-profiles/private-access"


@pytest.fixture
async def tenant(tmp_path: Path) -> AsyncIterator[Tenant]:
    async with running_tenant(tmp_path) as t:
        yield t


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~100 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="lmc", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _me(tenant: Tenant, token: str, known: int | None = None) -> httpx.Response:
    params = {"known_version": str(known)} if known is not None else {}
    return await tenant.admin.get(ME, params=params, headers={"Authorization": f"Bearer {token}"})


async def _lab(tenant: Tenant) -> dict[str, Any]:
    """alice: assigned to "ssh" directly and to "web" through a nested group; "hr" is
    someone else's."""
    alice = await tenant.user("alice")
    bob = await tenant.user("bob")
    outer = await tenant.call("POST", "/api/v1/groups", {"name": "staff"})
    inner = await tenant.call("POST", "/api/v1/groups", {"name": "devs"})
    await tenant.call("POST", f"/api/v1/groups/{outer['id']}/members", {"member_id": inner["id"]})
    await tenant.call("POST", f"/api/v1/groups/{inner['id']}/members", {"member_id": alice["id"]})
    ssh = await tenant.app("ssh", [("ip", "198.18.3.10", "22")], [alice["id"]])
    web = await tenant.app("web", [("cidr", "198.18.3.0/24", "80,443")], [outer["id"]])
    await tenant.app("hr", [("ip", "198.18.9.9", "443")], [bob["id"]])
    return {"alice": alice, "ssh": ssh, "web": web}


async def test_profile_has_the_rules_of_assigned_apps_only(tenant: Tenant) -> None:
    lab = await _lab(tenant)
    alice = await tenant.login("alice")
    response = await _me(tenant, alice.state.access_token)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["username"] == "alice" and doc["user_id"] == lab["alice"]["id"]
    profile = parse_profile(doc)
    assert profile.enabled and profile.hardening == "block" and profile.allow_pause
    rules = {r.app_name: r for r in profile.rules}
    assert set(rules) == {"ssh", "web"}  # "hr" is bob's
    # Most specific first: the single address before the /24.
    assert rules["ssh"].priority < rules["web"].priority
    assert all(r.action.value == "tunnel" and r.hardening == "block" for r in profile.rules)
    assert rules["web"].ports == "80,443" and rules["web"].protocol == "tcp"
    assert profile.match("198.18.3.10", 22).rule == rules["ssh"]
    assert profile.match("198.18.3.77", 443).rule == rules["web"]
    assert profile.match("198.18.9.9", 443).rule is None
    assert profile.version == tenant.service.ctx.store.config_version()  # type: ignore[union-attr]
    assert response.headers["etag"] == f'"v{profile.version}"'

    # Unchanged: 304 with no body.
    same = await _me(tenant, alice.state.access_token, known=profile.version)
    assert same.status_code == 304 and same.content == b""
    # A stale version gets the whole profile.
    stale = await _me(tenant, alice.state.access_token, known=profile.version - 1)
    assert stale.status_code == 200
    await alice.close()


async def test_profile_needs_the_users_own_token(tenant: Tenant) -> None:
    await _lab(tenant)
    alice = await tenant.login("alice")
    missing = await tenant.admin.get(ME, headers={"Authorization": ""})
    assert missing.status_code == 401 and missing.json()["error"] == "invalid_token"
    # The admin API token is not a user's access token.
    admin = await tenant.admin.get(ME)
    assert admin.status_code == 401
    forged = await _me(tenant, alice.state.access_token[:-4] + "AAAA")
    assert forged.status_code == 401
    # Disabled user: refused although the token is still within its lifetime.
    user_id = (await _me(tenant, alice.state.access_token)).json()["user_id"]
    await tenant.call("POST", f"/api/v1/users/{user_id}/disable")
    disabled = await _me(tenant, alice.state.access_token)
    assert disabled.status_code == 401
    await alice.close()


async def test_admin_settings_change_the_version_and_the_rules(tenant: Tenant) -> None:
    await _lab(tenant)
    alice = await tenant.login("alice")
    before = parse_profile((await _me(tenant, alice.state.access_token)).json())
    settings = await tenant.call(
        "PUT",
        SETTINGS,
        {
            "hardening": "pass",
            "allow_pause": False,
            "bypass": [{"type": "ip", "destination": "198.18.3.99", "ports": "443"}],
        },
    )
    assert settings["hardening"] == "pass" and settings["allow_pause"] is False
    assert settings["bypass"][0]["destination"] == "198.18.3.99"
    changed = await _me(tenant, alice.state.access_token, known=before.version)
    assert changed.status_code == 200
    after = parse_profile(changed.json())
    assert after.version > before.version
    assert after.hardening == "pass" and not after.allow_pause
    assert after.rules[0].action.value == "bypass"  # bypass rules come first
    assert after.match("198.18.3.99", 443).rule == after.rules[0]
    assert after.match("198.18.3.98", 443).rule is not None
    assert all(r.hardening == "pass" for r in after.rules)

    off = await tenant.call("PUT", SETTINGS, {"enabled": False})
    assert off["enabled"] is False and off["hardening"] == "pass"  # others unchanged
    disabled = parse_profile((await _me(tenant, alice.state.access_token)).json())
    assert not disabled.enabled and disabled.rules == ()

    bad = await tenant.admin.put(
        SETTINGS, json={"bypass": [{"type": "cidr", "destination": "10.0.0.1/8"}]}
    )
    assert bad.status_code == 400 and "bypass[0]" in bad.json()["message"]
    unknown = await tenant.admin.put(SETTINGS, json={"hardening": "maybe"})
    assert unknown.status_code == 400
    # Support view of the same profile.
    view = await tenant.call("GET", "/api/v1/users/alice/forwarding-profile")
    assert view["enabled"] is False and view["username"] == "alice"
    await alice.close()


async def _start_daemon(session: EdgeSession, directory: Path) -> tuple[ClientDaemon, Any]:
    files = StateFile(directory)
    files.save(session.state)
    daemon = ClientDaemon(files, capture=False, poll_interval=0.2, health_interval=0.2)
    task = spawn(daemon.run(), name="test client daemon")
    async with asyncio.timeout(10):
        await daemon.wait_ready()
    return daemon, task


async def _control(directory: Path, command: str, **args: Any) -> dict[str, Any]:
    return await asyncio.to_thread(control_call, control_path(directory), command, 5.0, **args)


async def test_daemon_picks_up_a_new_segment_within_seconds(
    tenant: Tenant, short_dir: Path
) -> None:
    lab = await _lab(tenant)
    await tenant.connector()
    alice = await tenant.login("alice")
    daemon, task = await _start_daemon(alice, short_dir)
    try:
        status = await _control(short_dir, "status")
        assert status["user"] == "alice" and status["device_id"] == alice.state.device_id
        assert status["profile"]["source"] == "api" and status["profile"]["rules"] == 2
        assert status["health"]["edge"] == "up" and status["tunnels"]["connections"] >= 1
        assert status["mode"] == "no-capture" and not status["paused"]
        first = status["profile"]["version"]

        added = time.monotonic()
        await tenant.call(
            "POST",
            f"/api/v1/apps/{lab['ssh']['id']}/segments",
            {"type": "ip", "destination": "198.18.3.11", "ports": "3389"},
        )
        while daemon.profile.match("198.18.3.11", 3389).rule is None:
            assert time.monotonic() - added < 5.0, "the daemon did not pick up the segment"
            await asyncio.sleep(0.05)
        assert daemon.profile.version > first
        # The cached copy follows, for a start without the API.
        cached = parse_profile(json.loads((short_dir / "profile.json").read_text()))
        assert cached.version == daemon.profile.version
        assert (short_dir / "profile.json").stat().st_mode & 0o777 == 0o600
    finally:
        await _control(short_dir, "down")
        async with asyncio.timeout(10):
            await task
        await alice.close()
    assert not control_path(short_dir).exists()
    with pytest.raises(DaemonNotRunning):
        await _control(short_dir, "status")


async def test_pause_and_resume_through_the_control_socket(tenant: Tenant, short_dir: Path) -> None:
    await _lab(tenant)
    alice = await tenant.login("alice")
    daemon, task = await _start_daemon(alice, short_dir)
    try:
        assert control_path(short_dir).stat().st_mode & 0o777 == 0o600
        paused = await _control(short_dir, "pause", reason="on a call")
        assert paused["paused"] and "on a call" in paused["paused_reason"]
        assert paused["capture"]["state"] == "paused"
        assert (await _control(short_dir, "status"))["paused"]
        resumed = await _control(short_dir, "resume")
        assert not resumed["paused"] and resumed["paused_reason"] == ""
        assert resumed["capture"]["state"] == "active"

        # The administrator forbids pausing: a paused client resumes, and pause is refused.
        await _control(short_dir, "pause")
        await tenant.call("PUT", SETTINGS, {"allow_pause": False})
        for _ in range(100):  # bounded: the daemon polls every 0.2 s
            if not daemon.paused:
                break
            await asyncio.sleep(0.05)
        assert not daemon.paused
        with pytest.raises(LimenError) as refused:
            await _control(short_dir, "pause")
        assert refused.value.code == "pause_forbidden"
        with pytest.raises(LimenError) as unknown:
            await _control(short_dir, "reboot")
        assert unknown.value.code == "unknown_command"
        # A second daemon on the same client directory is refused.
        second = ClientDaemon(StateFile(short_dir), capture=False)
        with pytest.raises(LimenError) as twice:
            await second.run()
        assert twice.value.code == "already_running"
        traffic = await _control(short_dir, "traffic")
        assert traffic["flows"] == []
    finally:
        await _control(short_dir, "down")
        async with asyncio.timeout(10):
            await task
        await alice.close()
