"""The demo tenant ``limen up`` creates on first start: a user, a private app served by an
in-process "intranet" HTTP server, and a connector enrolled through the real API."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from limen.admin.auth import create_admin_token
from limen.connector.agent import ConnectorAgent, ConnectorIdentity, enroll
from limen.errors import ConfigError
from limen.files import write_private
from limen.net.tasks import spawn
from limen.runner import Service

log = logging.getLogger(__name__)

DEMO_USER = "demo"
DEMO_APP = "demo-intranet"
DEMO_PAGE = b"Hello from the private demo intranet, reached through Limen.\n"


@dataclass
class DemoTenant:
    username: str
    password: str
    intranet_host: str
    intranet_port: int
    connector: ConnectorAgent
    intranet: asyncio.Server


def admin_token(service: Service) -> str:
    """The bootstrap admin token of ``<data_dir>/admin-token`` (created on first start)."""
    assert service.ctx is not None
    path = service.settings.data_dir / "admin-token"
    if path.exists():
        return path.read_text().strip()
    token = create_admin_token(service.ctx.store, "bootstrap", "admin")
    write_private(path, token)
    return token


async def _intranet(host: str, port: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(DEMO_PAGE)).encode() + b"\r\n\r\n" + DEMO_PAGE
            )
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            ConnectionError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


async def setup_demo(service: Service, intranet_port: int = 8081) -> DemoTenant:
    settings = service.settings
    data_dir = settings.data_dir
    state_path = data_dir / "demo.json"
    token = admin_token(service)
    ca_pem = (data_dir / "ca.pem").read_text()
    verify = ssl.create_default_context(cadata=ca_pem)
    intranet = await _intranet("127.0.0.1", intranet_port)
    intranet_port = intranet.sockets[0].getsockname()[1]
    connector_dir = data_dir / "demo-connector"
    if state_path.exists():
        state = json.loads(state_path.read_text())
        password = state["password"]
        async with httpx.AsyncClient(
            base_url=service.api_url,
            verify=verify,
            timeout=30,
            headers={"Authorization": f"Bearer {token}"},
        ) as http:
            await _publish(http, state["app_id"], intranet_port)
    else:
        password = secrets.token_urlsafe(12)
        async with httpx.AsyncClient(
            base_url=service.api_url,
            verify=verify,
            timeout=30,
            headers={"Authorization": f"Bearer {token}"},
        ) as http:
            user = await _call(
                http,
                "POST",
                "/api/v1/users",
                {"username": DEMO_USER, "password": password, "display_name": "Demo User"},
            )
            groups = await _call(http, "GET", "/api/v1/connector-groups")
            items = groups["items"] if isinstance(groups, dict) else groups
            default = next((g for g in items if g.get("is_default")), None)
            if default is None:
                default = await _call(http, "POST", "/api/v1/connector-groups", {"name": "Default"})
            app = await _call(
                http,
                "POST",
                "/api/v1/apps",
                {"name": DEMO_APP, "connector_group_id": default["id"]},
            )
            await _publish(http, app["id"], intranet_port)
            await _call(
                http, "POST", f"/api/v1/apps/{app['id']}/assignments", {"principal_id": user["id"]}
            )
            enr = await _call(
                http,
                "POST",
                f"/api/v1/connector-groups/{default['id']}/enrollment-tokens",
                {"name": "demo-connector"},
            )
        await asyncio.to_thread(
            enroll,
            service.api_url,
            enr["token"],
            connector_dir,
            ca_pem=ca_pem,
            name="demo-connector",
            edge=service.edge_address,
        )
        write_private(state_path, json.dumps({"password": password, "app_id": app["id"]}))
    identity = ConnectorIdentity.load(connector_dir)
    identity.edge = service.edge_address
    agent = ConnectorAgent(identity)
    spawn(agent.run(), name="demo connector")
    async with asyncio.timeout(15):
        await agent.connected.wait()
    return DemoTenant(DEMO_USER, password, "127.0.0.1", intranet_port, agent, intranet)


async def _publish(http: httpx.AsyncClient, app_id: str, port: int) -> None:
    """(Re)point the demo app's segment at the intranet's port."""
    app = await _call(http, "GET", f"/api/v1/apps/{app_id}")
    for seg in app.get("segments", []):
        if seg.get("destination") == "127.0.0.1" and seg.get("ports") == str(port):
            return
        await _call(http, "DELETE", f"/api/v1/apps/{app_id}/segments/{seg['id']}")
    await _call(
        http,
        "POST",
        f"/api/v1/apps/{app_id}/segments",
        {"type": "ip", "destination": "127.0.0.1", "ports": str(port), "protocol": "tcp"},
    )


async def _call(
    http: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    response = await http.request(method, path, json=body)
    if response.status_code >= 400:
        raise ConfigError(f"demo setup: {method} {path}: {response.status_code} {response.text}")
    if response.status_code == 204 or not response.content:
        return {}
    return response.json()


def instructions(service: Service, demo: DemoTenant, data_dir: Path) -> str:
    ca = data_dir / "ca.pem"
    api = service.api_url
    edge = service.edge_address
    target = f"{demo.intranet_host}:{demo.intranet_port}"
    # `limen` lives in the virtualenv the quick start created, which is not on PATH.
    bindir = Path(sys.executable).parent
    path = f" PATH={bindir}:$PATH" if (bindir / "limen").exists() else ""
    return f"""
Limen is running (identity + admin API {api}, edge {edge}, data in {data_dir}).

Demo tenant: user '{demo.username}', password '{demo.password}'
  a private app '{DEMO_APP}' at {target}, published through the in-process demo connector.
Admin token: {data_dir / "admin-token"}     CA certificate: {ca}

Try, in another shell:
  export LIMEN_API_URL={api} LIMEN_CA_FILE={ca} LIMEN_DATA_DIR={data_dir}{path}
  echo '{demo.password}' | limen client login --api {api} --ca-file {ca} \\
       --username {demo.username} --password-stdin
  limen client forward {target} --listen 127.0.0.1:18081 &
  sleep 2   # until it prints "forwarding 127.0.0.1:18081 -> ..."
  curl http://127.0.0.1:18081/
  curl -p --proxy https://{edge} --proxy-cacert {ca} \\
       --proxy-header "Proxy-Authorization: Bearer $(limen client token)" http://{target}/
  limen admin traffic list
  limen admin user list
"""
