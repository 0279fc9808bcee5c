"""Running the service's parts in one process: API (uvicorn), edge, and for ``limen up`` a
demo tenant with an in-process connector and a demo private app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from limen.admin.app import create_app
from limen.config import Settings
from limen.edge.server import Edge
from limen.files import write_private
from limen.service import ServiceContext, open_context
from limen.signals.receiver import SignalReceiver

log = logging.getLogger(__name__)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@dataclass
class Service:
    """The API and/or the edge in this process. Ports of 0 pick free ports; the settings
    are updated with the real ones before anything is built (the issuer URL depends on
    them)."""

    settings: Settings
    run_api: bool = True
    run_edge: bool = True
    ctx: ServiceContext | None = None
    edge: Edge | None = None
    _uvicorn: uvicorn.Server | None = None
    _api_task: asyncio.Task[Any] | None = None
    _extra: list[Any] = field(default_factory=list)
    _signals: SignalReceiver | None = None

    async def start(self) -> None:
        api_sock = _bind(self.settings.api_host, self.settings.api_port) if self.run_api else None
        if api_sock is not None:
            self.settings.api_port = api_sock.getsockname()[1]
        edge_sock = None
        if self.run_edge:
            edge_sock = _bind(self.settings.edge_host, self.settings.edge_port)
            self.settings.edge_port = edge_sock.getsockname()[1]
        self.ctx = await asyncio.to_thread(open_context, self.settings)
        data_dir = self.settings.data_dir
        (data_dir / "ca.pem").write_text(self.ctx.pki.ca_pem)
        if self.run_edge and edge_sock is not None:
            self.edge = Edge(self.ctx)
            await self.edge.start(edge_sock)
        if self.settings.metrics_port and not self.run_api:
            from prometheus_client import start_http_server

            from limen.metrics import REGISTRY

            start_http_server(
                self.settings.metrics_port, self.settings.metrics_host, registry=REGISTRY
            )
        if api_sock is not None:
            cert = data_dir / "server-cert.pem"
            key = data_dir / "server-key.pem"
            cert.write_text(self.ctx.pki.server_cert_pem)
            write_private(key, self.ctx.pki.server_key_pem)
            config = uvicorn.Config(
                create_app(self.ctx),
                ssl_certfile=str(cert),
                ssl_keyfile=str(key),
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=2,
            )
            self._uvicorn = uvicorn.Server(config)
            from limen.net.tasks import spawn

            self._api_task = spawn(self._uvicorn.serve(sockets=[api_sock]), name="api server")
            for _ in range(500):  # bounded: uvicorn sets `started` once it serves
                if self._uvicorn.started or self._api_task.done():
                    break
                await asyncio.sleep(0.01)
            if self._api_task.done():
                self._api_task.result()
            # Shared Signals poll delivery (RFC 8936) runs beside the API that manages it.
            self._signals = SignalReceiver(self.ctx)
            await self._signals.start()
        await self._start_bus()

    async def _start_bus(self) -> None:
        # Last, once every subscriber (edge, signal recorder, SSF receiver) is registered: the
        # distributed bus replays what this node missed while it was down.
        from limen.bus.postgres import PostgresBus

        assert self.ctx is not None
        if isinstance(self.ctx.bus, PostgresBus):
            role = "edge" if self.run_edge else "api"
            await asyncio.to_thread(self.ctx.bus.start, f"{self.ctx.node_name}/{role}")

    async def stop(self) -> None:
        if self._signals is not None:
            await self._signals.stop()
        if self.edge is not None:
            await self.edge.stop()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            if self._api_task is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    async with asyncio.timeout(5):
                        await self._api_task
        if self.ctx is not None:
            close_bus = getattr(self.ctx.bus, "close", None)
            if close_bus is not None:
                # Writes what the parts published while stopping; saves the replay position.
                await asyncio.to_thread(close_bus)
            self.ctx.store.dispose()

    @property
    def api_url(self) -> str:
        return f"https://{self.settings.public_host}:{self.settings.api_port}"

    @property
    def edge_address(self) -> str:
        return f"{self.settings.public_host}:{self.settings.edge_port}"
