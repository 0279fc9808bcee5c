"""The connector: enrolls once, then keeps outbound mutual-TLS connections to the edge and
dials private targets when the edge opens a flow stream. It never listens."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from limen import __version__
from limen.errors import AuthError, ConfigError, RemoteProtocolError
from limen.net.endpoints import Buffer, TransportEndpoint
from limen.net.mux import MuxConnection, MuxStream
from limen.net.relay import Relay
from limen.net.tasks import spawn
from limen.net.tls import ALPN_MUX, client_context
from limen.pki import key_pem, make_csr, new_key
from limen.wire import connect as wire
from limen.wire.control import Heartbeat, Hello, encode_control

log = logging.getLogger(__name__)

STATE_FILE = "connector.json"
KEY_FILE = "connector-key.pem"
CERT_FILE = "connector-cert.pem"
CA_FILE = "ca.pem"
#: Flow heads from the edge must arrive quickly; the edge sends them in one write.
HEAD_TIMEOUT = 10.0
HEARTBEAT_SECONDS = 1.0


@dataclass
class ConnectorIdentity:
    connector_id: str
    edge: str
    cert_pem: str
    key_pem: str
    ca_pem: str

    @classmethod
    def load(cls, data_dir: Path) -> ConnectorIdentity:
        try:
            state = json.loads((data_dir / STATE_FILE).read_text())
            return cls(
                connector_id=state["connector_id"],
                edge=state["edge"],
                cert_pem=(data_dir / CERT_FILE).read_text(),
                key_pem=(data_dir / KEY_FILE).read_text(),
                ca_pem=(data_dir / CA_FILE).read_text(),
            )
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(
                f"connector is not enrolled in {data_dir} ({exc}); run `limen connector enroll`"
            ) from exc


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def enroll(
    api_url: str,
    token: str,
    data_dir: Path,
    *,
    ca_pem: str | None = None,
    name: str = "",
    edge: str = "",
    client: httpx.Client | None = None,
) -> ConnectorIdentity:
    """Generate a key, send a CSR with the one-time token, store key, certificate and CA."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = new_key()
    csr = make_csr(key, name or socket.gethostname())
    body = {
        "token": token,
        "csr_pem": csr,
        "name": name or socket.gethostname(),
        "version": __version__,
    }
    if client is None:
        verify: Any = True
        if ca_pem:
            import ssl

            verify = ssl.create_default_context(cadata=ca_pem)
        client = httpx.Client(base_url=api_url.rstrip("/"), verify=verify, timeout=30)
    with client as http:
        response = http.post("/api/v1/connectors/enroll", json=body)
        if not edge and response.status_code in (200, 201):
            found = http.get("/.well-known/limen-client")
            if found.status_code == 200:
                edge = str(found.json().get("edge") or "")
    if response.status_code not in (200, 201):
        try:
            err = response.json()
        except ValueError:
            err = {}
        raise AuthError(
            f"enrollment refused: {err.get('message') or response.text[:200]}",
            code=str(err.get("error") or "enrollment_failed"),
        )
    data = response.json()
    edge_addr = edge or data.get("edge") or ""
    if not edge_addr:
        raise ConfigError("the service did not say where its edge is; pass --edge HOST:PORT")
    identity = ConnectorIdentity(
        connector_id=data["connector_id"],
        edge=edge_addr,
        cert_pem=data["cert_pem"],
        key_pem=key_pem(key),
        ca_pem=data["ca_pem"],
    )
    save_identity(identity, data_dir)
    return identity


def save_identity(identity: ConnectorIdentity, data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(data_dir / KEY_FILE, identity.key_pem)
    (data_dir / CERT_FILE).write_text(identity.cert_pem)
    (data_dir / CA_FILE).write_text(identity.ca_pem)
    state = {"connector_id": identity.connector_id, "edge": identity.edge}
    _write_private(data_dir / STATE_FILE, json.dumps(state, indent=2))


def parse_hostport(text: str, default_port: int = 443) -> tuple[str, int]:
    text = text.removeprefix("https://").rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    return host, int(port)


def _same(conn: MuxConnection) -> MuxConnection:
    return conn


class _FlowHead:
    """Reads the flow head the edge sends on a new stream."""

    def __init__(self, agent: ConnectorAgent, stream: MuxStream) -> None:
        self.agent = agent
        self.stream = stream
        self.reader = wire.FlowRequestReader()
        self.done = False

    def on_data(self, data: Buffer) -> None:
        if self.done:
            return
        try:
            request = self.reader.feed(data)
        except RemoteProtocolError as exc:
            self.done = True
            self.stream.write(wire.encode_refusal(400, exc.code, str(exc)))
            self.stream.close()
            return
        if request is None:
            return
        self.done = True
        self.stream.detach(self.reader.trailing)
        spawn(
            self.agent.serve_flow(self.stream, request), name=f"dial {request.host}:{request.port}"
        )

    def on_eof(self) -> None:
        if not self.done:
            self.done = True
            self.stream.close()

    def on_closed(self, error: BaseException | None) -> None:
        self.done = True

    def on_drained(self) -> None:
        pass


class ConnectorAgent:
    def __init__(
        self,
        identity: ConnectorIdentity,
        *,
        connections: int = 2,
        dial_timeout: float = 10.0,
        edge_override: str | None = None,
    ) -> None:
        self.identity = identity
        self.connections = connections
        self.dial_timeout = dial_timeout
        self.edge = parse_hostport(edge_override or identity.edge)
        self._ssl = client_context(
            identity.ca_pem,
            cert_pem=identity.cert_pem,
            key_pem=identity.key_pem,
            alpn=[ALPN_MUX],
        )
        self.active_flows = 0
        self.dials_failed = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.live: set[MuxConnection] = set()
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Keep ``connections`` links up until cancelled."""
        self._tasks = [
            spawn(self._keep_link(i), name=f"connector link {i}") for i in range(self.connections)
        ]
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for conn in list(self.live):
            conn.close()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _keep_link(self, index: int) -> None:
        backoff = 0.2
        loop = asyncio.get_running_loop()
        while not self._stopping:
            conn = MuxConnection(
                is_client=True,
                on_stream=self._on_stream,
                name=f"edge link {index} ({self.identity.connector_id})",
            )
            try:
                host, port = self.edge
                await loop.create_connection(
                    functools.partial(_same, conn),
                    host,
                    port,
                    ssl=self._ssl,
                    server_hostname=host,
                    ssl_handshake_timeout=10.0,
                )
            except (OSError, TimeoutError) as exc:
                log.warning(
                    "cannot reach the edge at %s:%d: %s (retry in %.1fs)", *self.edge, exc, backoff
                )
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.2
            self.live.add(conn)
            self.connected.set()
            log.info("link %d to the edge %s:%d is up", index, *self.edge)
            conn.start_keepalive()
            heartbeat = spawn(self._control(conn), name=f"connector control {index}")
            try:
                await conn.closed
            finally:
                heartbeat.cancel()
                self.live.discard(conn)
                if not self.live:
                    self.connected.clear()
            log.warning("link %d to the edge closed; reconnecting", index)

    async def _control(self, conn: MuxConnection) -> None:
        stream = conn.open_stream()
        stream.write(encode_control(Hello("connector", self.identity.connector_id, __version__)))
        while not conn.closed.done():
            stream.write(
                encode_control(
                    Heartbeat(
                        self.active_flows,
                        self.bytes_up,
                        self.bytes_down,
                        self.dials_failed,
                        time.time(),
                    )
                )
            )
            await asyncio.sleep(HEARTBEAT_SECONDS)  # a period, not synchronisation

    def _on_stream(self, stream: MuxStream) -> None:
        stream.attach(_FlowHead(self, stream))

    async def serve_flow(self, stream: MuxStream, request: wire.FlowRequest) -> None:
        if request.protocol != "tcp":
            stream.write(
                wire.encode_refusal(
                    400, "unsupported_protocol", f"{request.protocol} flows are not supported yet"
                )
            )
            stream.close()
            return
        loop = asyncio.get_running_loop()
        target = TransportEndpoint()
        try:
            async with asyncio.timeout(self.dial_timeout):
                await loop.create_connection(lambda: target, request.host, request.port)
        except TimeoutError:
            self.dials_failed += 1
            self._refuse(
                stream,
                504,
                "target_timeout",
                f"{request.host}:{request.port} did not answer within {self.dial_timeout:.0f}s",
            )
            return
        except socket.gaierror as exc:
            self.dials_failed += 1
            self._refuse(
                stream, 502, "target_unresolvable", f"cannot resolve {request.host}: {exc.strerror}"
            )
            return
        except OSError as exc:
            self.dials_failed += 1
            code = (
                "target_refused"
                if isinstance(exc, ConnectionRefusedError)
                else ("target_unreachable")
            )
            self._refuse(stream, 502, code, f"{request.host}:{request.port}: {exc.strerror}")
            return
        stream.write(wire.encode_response(200))
        relay = Relay(stream, target)
        self.active_flows += 1
        try:
            relay.start()
            await relay.done
        finally:
            self.active_flows -= 1
            self.bytes_up += relay.bytes_a_to_b
            self.bytes_down += relay.bytes_b_to_a

    def _refuse(self, stream: MuxStream, status: int, code: str, message: str) -> None:
        log.info("dial refused (%s): %s", code, message)
        stream.write(wire.encode_refusal(status, code, message))
        stream.close()
