"""Shared test support: a real Limen service on loopback (real TLS, real SQLite), a tenant
built through the real admin API, an enrolled in-process connector, and small targets."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from limen.admin.auth import create_admin_token
from limen.client import auth
from limen.client.profile import ClientState, new_device_id
from limen.client.tunnel import EdgeSession
from limen.config import load_settings
from limen.connector.agent import ConnectorAgent, ConnectorIdentity, enroll
from limen.net.tasks import spawn
from limen.runner import Service


@dataclass
class Tenant:
    service: Service
    admin: httpx.AsyncClient
    tmp: Path
    agents: list[ConnectorAgent] = field(default_factory=list)
    agent_tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @property
    def ca_pem(self) -> str:
        return (self.service.settings.data_dir / "ca.pem").read_text()

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = await self.admin.request(method, path, json=body)
        assert response.status_code < 400, f"{method} {path}: {response.text}"
        return response.json() if response.content else {}

    async def user(self, name: str, password: str = "correct horse battery") -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST", "/api/v1/users", {"username": name, "password": password}
        )
        return result

    async def default_group(self) -> str:
        groups = await self.call("GET", "/api/v1/connector-groups")
        return str(next(g["id"] for g in groups if g.get("is_default")))

    async def app(
        self,
        name: str,
        segments: list[tuple[str, str, str]],
        assign: list[str],
        group: str | None = None,
    ) -> dict[str, Any]:
        group = group or await self.default_group()
        app: dict[str, Any] = await self.call(
            "POST", "/api/v1/apps", {"name": name, "connector_group_id": group}
        )
        for dest_type, dest, ports in segments:
            await self.call(
                "POST",
                f"/api/v1/apps/{app['id']}/segments",
                {"type": dest_type, "destination": dest, "ports": ports},
            )
        for principal in assign:
            await self.call(
                "POST", f"/api/v1/apps/{app['id']}/assignments", {"principal_id": principal}
            )
        return app

    async def connector(self, name: str = "c1", group: str | None = None) -> ConnectorAgent:
        group = group or await self.default_group()
        enr = await self.call(
            "POST", f"/api/v1/connector-groups/{group}/enrollment-tokens", {"name": name}
        )
        directory = self.tmp / f"connector-{name}"
        await asyncio.to_thread(
            enroll,
            self.service.api_url,
            enr["token"],
            directory,
            ca_pem=self.ca_pem,
            name=name,
            edge=self.service.edge_address,
        )
        agent = ConnectorAgent(ConnectorIdentity.load(directory))
        self.agents.append(agent)
        self.agent_tasks.append(spawn(agent.run(), name=f"test connector {name}"))
        async with asyncio.timeout(10):
            await agent.connected.wait()
        return agent

    async def login(
        self,
        username: str,
        password: str = "correct horse battery",
        capabilities: list[str] | None = None,
    ) -> EdgeSession:
        state = ClientState(
            api_url=self.service.api_url,
            edge=self.service.edge_address,
            ca_pem=self.ca_pem,
            device_id=new_device_id(),
            capabilities=capabilities if capabilities is not None else ["cp1"],
        )

        def do_login() -> None:
            with auth.http_client(state) as http:
                auth.password_login(state, http, username, password)

        await asyncio.to_thread(do_login)
        return EdgeSession(state)

    async def wait_config(self) -> None:
        """Bounded wait until the edge runs on the newest configuration."""
        assert self.service.ctx is not None
        version = self.service.ctx.store.config_version()
        await self.wait_edge_sees(lambda e: e.snapshot.version >= version)

    async def wait_edge_sees(self, predicate: Any) -> None:
        """Bounded wait until the edge's snapshot satisfies ``predicate``."""
        edge = self.service.edge
        assert edge is not None
        for _ in range(300):
            if predicate(edge):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the edge did not pick up the change")


@contextlib.asynccontextmanager
async def running_tenant(tmp: Path, **overrides: Any) -> AsyncIterator[Tenant]:
    settings = load_settings(
        data_dir=tmp / "service",
        api_host="127.0.0.1",
        api_port=0,
        edge_host="127.0.0.1",
        edge_port=0,
        public_host="localhost",
        config_poll_seconds=0.2,
        traffic_log_flush_seconds=0.05,
        **overrides,
    )
    service = Service(settings)
    await service.start()
    assert service.ctx is not None
    token = create_admin_token(service.ctx.store, "test", "admin")
    verify = ssl.create_default_context(cadata=service.ctx.pki.ca_pem)
    admin = httpx.AsyncClient(
        base_url=service.api_url,
        verify=verify,
        timeout=30,
        headers={"Authorization": f"Bearer {token}"},
    )
    tenant = Tenant(service, admin, tmp)
    try:
        yield tenant
    finally:
        for agent in tenant.agents:
            await agent.stop()
        await admin.aclose()
        await service.stop()


class EchoServer:
    """A TCP echo server on loopback; counts connections."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> EchoServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.writers.add(writer)
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                self.writers.discard(writer)
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.writers):
                writer.close()


async def echo_roundtrip(session: EdgeSession, port: int, payload: bytes = b"ping") -> bytes:
    """Open a flow to the echo server at 127.0.0.1:port, send, read the echo, close."""
    stream, _ = await session.open("tcp", "127.0.0.1", port)
    got = bytearray()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    class Collect:
        def on_data(self, data: Any) -> None:
            got.extend(data)
            if len(got) >= len(payload) and not done.done():
                done.set_result(None)

        def on_eof(self) -> None:
            if not done.done():
                done.set_result(None)

        def on_closed(self, error: BaseException | None) -> None:
            if not done.done():
                done.set_result(None)

        def on_drained(self) -> None:
            pass

    stream.attach(Collect())
    stream.write(payload)
    async with asyncio.timeout(10):
        await done
    stream.close()
    return bytes(got)
