"""The connector: enrolls once, then keeps outbound mutual-TLS connections to the edge and
dials private targets when the edge opens a flow stream. It never listens."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from limen import __version__
from limen.connector.dns import resolver_from_env, serve_dns
from limen.connector.udp import serve_udp, udp_settings_from_env
from limen.errors import AuthError, ConfigError, RemoteProtocolError
from limen.files import write_private
from limen.net.endpoints import Buffer, TransportEndpoint
from limen.net.mux import MuxConnection, MuxStream
from limen.net.proxy import ProxyAddress, open_tls, proxy_from_env
from limen.net.relay import Relay
from limen.net.tasks import spawn
from limen.net.tls import ALPN_MUX, client_context
from limen.pki import key_pem, make_csr, new_key
from limen.wire import connect as wire
from limen.wire.control import (
    ControlReader,
    Drain,
    Heartbeat,
    Hello,
    RenewRefused,
    RenewRequest,
    RenewResponse,
    encode_control,
)

log = logging.getLogger(__name__)

STATE_FILE = "connector.json"
KEY_FILE = "connector-key.pem"
CERT_FILE = "connector-cert.pem"
CA_FILE = "ca.pem"
#: Flow heads from the edge must arrive quickly; the edge sends them in one write.
HEAD_TIMEOUT = 10.0
HEARTBEAT_SECONDS = 1.0
#: How long a flow's 200 may wait for the target's first bytes when the client spoke first.
#: Nothing waits on it but the client's early-data hold (docs/protocol.md §4).
ANSWER_WAIT = 0.002
#: Header on the edge's data-path probes (limen.edge.health.PROBE_HEADER), lower-cased as
#: FlowRequest keeps headers.
PROBE_HEADER = "limen-probe"
#: A probe's dial must finish before the edge gives up on it (1 s), so the edge hears the
#: real error instead of a timeout.
PROBE_DIAL_TIMEOUT = 0.8
#: Renew when this fraction of the certificate's lifetime has passed.
RENEW_AT_FRACTION = 2 / 3
#: pki backdates certificates by 5 minutes for clock skew; that is not lifetime to spend.
CERT_BACKDATE = 300.0
#: Default bound on how long a draining connector waits for its flows to end.
DRAIN_GRACE = 30.0


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
    write_private(data_dir / KEY_FILE, identity.key_pem)
    (data_dir / CERT_FILE).write_text(identity.cert_pem)
    (data_dir / CA_FILE).write_text(identity.ca_pem)
    state = {"connector_id": identity.connector_id, "edge": identity.edge}
    write_private(data_dir / STATE_FILE, json.dumps(state, indent=2))


def parse_hostport(text: str, default_port: int = 443) -> tuple[str, int]:
    text = text.removeprefix("https://").rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    return host, int(port)


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
        if request.headers.get(PROBE_HEADER):
            spawn(
                self.agent.serve_probe(self.stream, request),
                name=f"probe {request.host}:{request.port}",
            )
            return
        spawn(
            self.agent.serve_counted(self.stream, request),
            name=f"dial {request.host}:{request.port}",
        )

    def on_eof(self) -> None:
        if not self.done:
            self.done = True
            self.stream.close()

    def on_closed(self, error: BaseException | None) -> None:
        self.done = True

    def on_drained(self) -> None:
        pass


def cert_times(cert_pem: str) -> tuple[float, float]:
    """(not_before, not_after) of a PEM certificate, as Unix times."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def renewal_time(cert_pem: str) -> float:
    """When to renew: after RENEW_AT_FRACTION of the lifetime (not counting the backdate)."""
    not_before, not_after = cert_times(cert_pem)
    start = not_before + CERT_BACKDATE if not_after - not_before > CERT_BACKDATE else not_before
    return start + (not_after - start) * RENEW_AT_FRACTION


class _EdgeControl:
    """The connector's end of its control stream: what the edge sends back (renewals)."""

    def __init__(self, agent: ConnectorAgent, stream: MuxStream) -> None:
        self.agent = agent
        self.stream = stream
        self.reader = ControlReader()
        stream.mark_background()  # heartbeats must not make bulk streams give way

    def on_data(self, data: Buffer) -> None:
        try:
            messages, rejected = self.reader.feed(data)
        except RemoteProtocolError as exc:
            log.warning("the edge sent a bad control message (%s): reconnecting", exc.code)
            self.stream.conn.close()
            return
        for kind, error in rejected:
            log.warning("the edge sent a bad %s message: %s", kind, error)
        for message in messages:
            if isinstance(message, RenewResponse):
                self.agent.install_certificate(message.cert_pem)
            elif isinstance(message, RenewRefused):
                self.agent.renewal_refused(message.code, message.message)
            elif isinstance(message, Drain):
                log.info("the edge asks this connector to drain: %s", message.reason)

    def on_eof(self) -> None:
        self.stream.close()

    def on_closed(self, error: BaseException | None) -> None:
        pass

    def on_drained(self) -> None:
        pass


class ConnectorAgent:
    """Keeps ``connections`` links to the edge, serves flows, renews its certificate over
    the control stream (when ``renew``), and drains on request."""

    def __init__(
        self,
        identity: ConnectorIdentity,
        *,
        connections: int = 2,
        dial_timeout: float = 10.0,
        edge_override: str | None = None,
        data_dir: Path | None = None,
        proxy: str | None = None,
        renew: bool = True,
        dial_source: str | None = None,
    ) -> None:
        self.identity = identity
        self.connections = connections
        self.dial_timeout = dial_timeout
        self.edge = parse_hostport(edge_override or identity.edge)
        #: Where renewed certificates are stored (None: kept in memory only).
        self.data_dir = data_dir
        #: Explicit proxy URL; otherwise HTTPS_PROXY / NO_PROXY decide.
        self.proxy: ProxyAddress | None = (
            ProxyAddress.parse(proxy) if proxy else proxy_from_env(self.edge[0])
        )
        self.renew = renew
        #: Local address dials to targets leave from (a multi-homed branch host); None: any.
        self.dial_source = dial_source
        self._ssl = self._context()
        self.renew_at = renewal_time(identity.cert_pem)
        self._renew_key: ec.EllipticCurvePrivateKey | None = None
        self._renew_sent_at = 0.0
        #: Flows being dialed or relayed (what a drain waits for).
        self.flows_in_progress = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        self._controls: list[MuxStream] = []
        self.active_flows = 0
        self.dials_failed = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.live: set[MuxConnection] = set()
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self.connected = asyncio.Event()
        #: UDP flow limits and the private DNS resolver (from the environment; issue 3).
        self.udp_settings = udp_settings_from_env()
        self.dns = resolver_from_env()

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

    def _context(self) -> ssl.SSLContext:
        return client_context(
            self.identity.ca_pem,
            cert_pem=self.identity.cert_pem,
            key_pem=self.identity.key_pem,
            alpn=[ALPN_MUX],
        )

    async def drain(self, grace: float = DRAIN_GRACE) -> None:
        """Tell the edge to send no new flows, wait for the current ones to end (at most
        ``grace`` seconds), then stop."""
        self.draining = True
        for stream in list(self._controls):
            if not stream.closed:
                stream.write(encode_control(Drain("connector shutting down")))
        log.info("draining: %d flows in progress (grace %.0fs)", self.flows_in_progress, grace)
        if self.flows_in_progress:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._idle.wait()
        if self.flows_in_progress:
            log.warning("drain grace over: cutting %d flows", self.flows_in_progress)
        await self.stop()

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
        while not self._stopping and not self.draining:
            conn = MuxConnection(
                is_client=True,
                on_stream=self._on_stream,
                name=f"edge link {index} ({self.identity.connector_id})",
            )
            try:
                host, port = self.edge
                await open_tls(conn, host, port, ssl_context=self._ssl, proxy=self.proxy)
            except (OSError, TimeoutError) as exc:
                log.warning(
                    "cannot reach the edge at %s:%d%s: %s (retry in %.1fs)",
                    *self.edge,
                    f" via proxy {self.proxy.host}:{self.proxy.port}" if self.proxy else "",
                    exc,
                    backoff,
                )
                if cert_times(self.identity.cert_pem)[1] < time.time():
                    log.error("this connector's certificate has expired: enroll it again")
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
        stream.attach(_EdgeControl(self, stream))
        self._controls.append(stream)
        try:
            await self._control_loop(conn, stream)
        finally:
            self._controls.remove(stream)

    async def _control_loop(self, conn: MuxConnection, stream: MuxStream) -> None:
        stream.write(encode_control(Hello("connector", self.identity.connector_id, __version__)))
        if self.draining:
            stream.write(encode_control(Drain("connector shutting down")))
        while not conn.closed.done():
            self._maybe_renew(stream)
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

    # certificate renewal -------------------------------------------------------------------

    def _maybe_renew(self, stream: MuxStream) -> None:
        now = time.time()
        if not self.renew or now < self.renew_at:
            return
        # One request in flight; ask again if no answer came within 30 s (link lost).
        if self._renew_key is not None and now - self._renew_sent_at < 30.0:
            return
        self._renew_key = new_key()
        self._renew_sent_at = now
        csr = make_csr(self._renew_key, self.identity.connector_id)
        stream.write(encode_control(RenewRequest(csr)))
        log.info("renewing this connector's certificate")

    def install_certificate(self, cert_pem: str) -> None:
        """A renewed certificate arrived: check it matches our pending key, keep it, store it,
        and use it for every new link (live links keep their TLS session)."""
        key = self._renew_key
        if key is None:
            log.warning("ignored a certificate the connector did not ask for")
            return
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
        except ValueError:
            log.warning("the edge sent an unreadable certificate; renewing again later")
            self._renew_key = None
            return
        if cert.public_key() != key.public_key():
            log.warning("the renewed certificate does not match the requested key; ignored")
            self._renew_key = None
            return
        self._renew_key = None
        self.identity = dataclasses.replace(self.identity, cert_pem=cert_pem, key_pem=key_pem(key))
        self._ssl = self._context()
        self.renew_at = renewal_time(cert_pem)
        if self.data_dir is not None:
            save_identity(self.identity, self.data_dir)
        log.info(
            "certificate renewed (serial %x, valid until %s)",
            cert.serial_number,
            cert.not_valid_after_utc.isoformat(),
        )

    def renewal_refused(self, code: str, message: str) -> None:
        self._renew_key = None
        # Try again after a tenth of what is left (at least 1 s, at most an hour).
        left = cert_times(self.identity.cert_pem)[1] - time.time()
        self.renew_at = time.time() + min(max(left / 10, 1.0), 3600.0)
        log.warning("certificate renewal refused (%s): %s", code, message)

    # flows ---------------------------------------------------------------------------------

    def _local_addr(self) -> tuple[str, int] | None:
        return (self.dial_source, 0) if self.dial_source else None

    async def serve_counted(self, stream: MuxStream, request: wire.FlowRequest) -> None:
        """Serve one flow, counted from its dial to its end (what a drain waits for)."""
        self.flows_in_progress += 1
        self._idle.clear()
        try:
            await self.serve_flow(stream, request)
        finally:
            self.flows_in_progress -= 1
            if not self.flows_in_progress:
                self._idle.set()

    async def serve_probe(self, stream: MuxStream, request: wire.FlowRequest) -> None:
        """The edge's data-path check: dial the target, hang up, report the outcome."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(min(self.dial_timeout, PROBE_DIAL_TIMEOUT)):
                transport, _ = await loop.create_connection(
                    asyncio.Protocol, request.host, request.port, local_addr=self._local_addr()
                )
        except TimeoutError:
            self._refuse(stream, 504, "target_timeout", "probe dial timed out", quiet=True)
            return
        except socket.gaierror as exc:
            self._refuse(stream, 502, "target_unresolvable", str(exc.strerror), quiet=True)
            return
        except OSError as exc:
            refused = isinstance(exc, ConnectionRefusedError)
            code = "target_refused" if refused else "target_unreachable"
            self._refuse(stream, 502, code, str(exc.strerror), quiet=True)
            return
        transport.abort()  # no bytes to the target: a probe must not look like a client
        stream.write(wire.encode_response(200))
        stream.close()

    async def serve_flow(self, stream: MuxStream, request: wire.FlowRequest) -> None:
        if request.protocol == "udp":
            await serve_udp(self, stream, request, self.udp_settings)
            return
        if request.protocol == "dns":
            await serve_dns(self, stream, request, self.dns)
            return
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
                await loop.create_connection(
                    lambda: target, request.host, request.port, local_addr=self._local_addr()
                )
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
        answer = wire.encode_response(200)
        if stream.held_bytes:
            # The client spoke first (early data came with the head): the target's reply
            # usually follows within a moment, and the answer waits for it (at most
            # ANSWER_WAIT) so both travel in one record (docs/protocol.md §4).
            stream.write_deferred(answer, ANSWER_WAIT)
        else:
            stream.write(answer)
        relay = Relay(stream, target)
        self.active_flows += 1
        try:
            relay.start()
            await relay.done
        finally:
            self.active_flows -= 1
            self.bytes_up += relay.bytes_a_to_b
            self.bytes_down += relay.bytes_b_to_a

    def _refuse(
        self, stream: MuxStream, status: int, code: str, message: str, *, quiet: bool = False
    ) -> None:
        if quiet:  # probes run twice a second: their failures are the edge's to log
            log.debug("probe dial failed (%s): %s", code, message)
        else:
            log.info("dial refused (%s): %s", code, message)
        stream.write(wire.encode_refusal(status, code, message))
        stream.close()
