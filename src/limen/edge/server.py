"""The edge: the policy enforcement point of the data plane.

One TLS port. After the handshake the connection is dispatched:

* ALPN ``limen/1`` with a connector certificate from our CA → a connector link (yamux; the
  connector's first stream is its control stream; the edge opens one stream per flow);
* ALPN ``limen/1`` without a certificate → a client (yamux; one stream per flow);
* ALPN ``http/1.1`` or none → one plain CONNECT flow on the connection (curl, any
  HTTPS-proxy-capable program).

Every flow: read the head, :func:`limen.edge.admission.admit`, pick a connector, open a
stream to it, relay, write one traffic-log record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from limen.bus.inprocess import CONFIG_CHANGED, SUBJECT_REVOKED, BusEvent
from limen.edge import dns as edge_dns
from limen.edge import udp as edge_udp
from limen.edge.admission import Decision, admit
from limen.edge.client_control import ClientControlRegistry
from limen.edge.connectors import ConnectorLink, ConnectorMonitor, ConnectorRegistry
from limen.edge.revocations import RevocationOverlay
from limen.edge.snapshot import Snapshot, load_snapshot
from limen.errors import AuthError, ConfigError, RemoteProtocolError
from limen.identity.tokens import EDGE_AUDIENCE, TokenVerifier
from limen.ids import new_id
from limen.logs.traffic import TrafficLogWriter
from limen.metrics import (
    BYTES_TOTAL,
    CLIENT_CONNECTIONS,
    FLOWS_ACTIVE,
    FLOWS_TOTAL,
    PROTOCOL_ERRORS,
)
from limen.net.endpoints import Buffer, Endpoint, TransportEndpoint
from limen.net.mux import EarlyData, MuxConnection, MuxStream, open_flow
from limen.net.relay import CloseReason, Relay
from limen.net.tasks import spawn
from limen.net.tls import ALPN_MUX, server_context
from limen.pki import IssuedCert, connector_id_from_cert
from limen.service import ServiceContext
from limen.signals import SIGNAL_ENFORCED
from limen.store.models import Connector
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
T = TypeVar("T")

#: A flow head must arrive within this time, or the stream/connection is dropped (slowloris).
HEAD_TIMEOUT = 10.0
#: Minimum seconds between two certificate renewals on one control stream.
RENEW_MIN_INTERVAL = 1.0


@dataclass
class LiveFlow:
    flow_id: str
    user_id: str
    session_id: str
    device_id: str
    relay: Relay | None = None
    record: dict[str, Any] = field(default_factory=dict)
    link: ConnectorLink | None = None


class _HeadReader:
    """Receives a flow head on an endpoint, then hands the endpoint to the edge."""

    def __init__(self, edge: Edge, endpoint: Endpoint, source: tuple[str, int], conn_id: str):
        self.edge = edge
        self.endpoint = endpoint
        self.source = source
        self.conn_id = conn_id
        self.reader = wire.FlowRequestReader()
        self.done = False
        self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._timeout)

    def on_data(self, data: Buffer) -> None:
        if self.done:
            return
        try:
            request = self.reader.feed(data)
        except RemoteProtocolError as exc:
            self._refuse_bad(exc)
            return
        if request is None:
            return
        self.done = True
        self.timer.cancel()
        self.endpoint.pause_reading()
        if isinstance(self.endpoint, MuxStream):
            self.endpoint.detach()
        spawn(
            self.edge.handle_flow(
                self.endpoint, request, self.reader.trailing, self.source, self.conn_id
            ),
            name=f"flow {self.source[0]}:{self.source[1]} {request.host}:{request.port}",
        )

    def _refuse_bad(self, exc: RemoteProtocolError) -> None:
        self.done = True
        self.timer.cancel()
        PROTOCOL_ERRORS.labels(exc.code).inc()
        log.info("refused a malformed flow head from %s:%d (%s): %s", *self.source, exc.code, exc)
        status = (
            431
            if exc.code == "head_too_large"
            else (405 if exc.code == "method_not_allowed" else 400)
        )
        self.endpoint.write(wire.encode_refusal(status, exc.code, str(exc)))
        self.endpoint.close()

    def _timeout(self) -> None:
        if not self.done:
            self.done = True
            log.info("no flow head from %s:%d within %.0fs", *self.source, HEAD_TIMEOUT)
            self.endpoint.abort()

    def on_eof(self) -> None:
        if not self.done:
            self.done = True
            self.timer.cancel()
            self.endpoint.close()

    def on_closed(self, error: BaseException | None) -> None:
        self.done = True
        self.timer.cancel()

    def on_drained(self) -> None:
        pass


class _Dispatch(asyncio.Protocol):
    """First protocol on every accepted TLS connection: picks the real one by ALPN and
    client certificate, then steps aside."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.edge.dispatch(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:  # pragma: no cover - replaced before data
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class Edge:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.snapshot = Snapshot()
        self.verifier = TokenVerifier(
            self.snapshot.keys, issuer=self.settings.resolved_issuer, audience=EDGE_AUDIENCE
        )
        self.connectors = ConnectorRegistry()
        self.monitor = ConnectorMonitor(
            self.connectors,
            ctx.store,
            stale_days=self.settings.connector_stale_days,
        )
        self.flows: dict[str, LiveFlow] = {}
        self.flows_by_user: dict[str, set[str]] = {}
        #: Revocations heard on the bus, refused at once (before the snapshot shows them).
        self.revocations = RevocationOverlay()
        self.traffic = TrafficLogWriter(
            ctx.store,
            batch=self.settings.traffic_log_batch,
            flush_seconds=self.settings.traffic_log_flush_seconds,
            max_queue=self.settings.traffic_log_queue,
        )
        self.server: asyncio.Server | None = None
        self.port = 0
        self._reload = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._unsubscribe: list[Any] = []
        self._loop = asyncio.get_running_loop()
        self._client_conns: set[MuxConnection] = set()
        #: Clients' control streams by user: where claims challenges go on a revocation.
        self.client_control = ClientControlRegistry()
        self._inflight: set[asyncio.Future[Any]] = set()

    # lifecycle -------------------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on ``sock`` (already bound) or on the configured address."""
        await self.reload()
        ssl_ctx = server_context(
            self.ctx.pki.server_cert_pem, self.ctx.pki.server_key_pem, self.ctx.pki.ca_pem
        )
        if sock is not None:
            self.server = await self._loop.create_server(
                lambda: _Dispatch(self), sock=sock, ssl=ssl_ctx, ssl_handshake_timeout=10.0
            )
        else:
            self.server = await self._loop.create_server(
                lambda: _Dispatch(self),
                self.settings.edge_host,
                self.settings.edge_port,
                ssl=ssl_ctx,
                ssl_handshake_timeout=10.0,
                backlog=1024,
            )
        self.port = self.server.sockets[0].getsockname()[1]
        self._unsubscribe.append(self.ctx.bus.subscribe(self._on_bus))
        self._tasks.append(spawn(self.traffic.run(), name="edge traffic log"))
        self._tasks.append(spawn(self._watch_config(), name="edge config watch"))
        self._tasks.append(spawn(self.monitor.run(), name="edge connector monitor"))
        log.info("edge listening on port %d", self.port)

    async def stop(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        if self.server is not None:
            self.server.close()
        for flow in list(self.flows.values()):
            if flow.relay is not None:
                flow.relay.abort(CloseReason.SHUTDOWN)
        for conn in list(self._client_conns):
            conn.close()
        for link in list(self.connectors.links.values()):
            for conn in list(link.connections):
                conn.close()
        self.traffic.stop()
        for task in self._tasks:
            if task.get_name() == "edge traffic log":
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(10):
                        await task
            else:
                task.cancel()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=10)
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self.server.wait_closed()

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run store work in a worker thread that :meth:`stop` waits for: a cancelled
        caller must not leave a thread using the store after it is disposed."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        return await asyncio.shield(future)

    async def reload(self) -> None:
        began = self._loop.time()
        snapshot = await self._in_thread(load_snapshot, self.ctx.store)
        self.revocations.apply(snapshot, began)
        previous, self.snapshot = self.snapshot, snapshot
        self._cut_revoked(previous, snapshot)
        self.verifier.replace_keys(snapshot.keys)
        self.connectors.regroup({c.id: c.group_id for c in snapshot.connectors.values()})
        self.monitor.set_snapshot(snapshot)
        for link in list(self.connectors.links.values()):
            info = snapshot.connectors.get(link.connector_id)
            link.draining = info is not None and info.state == "draining"
            if info is None or info.state == "revoked":
                log.warning("connector %s was revoked or removed: closing", link.connector_id)
                for conn in list(link.connections):
                    conn.close()

    def _cut_revoked(self, previous: Snapshot, current: Snapshot) -> None:
        """Cut live flows of users revoked since the previous snapshot. In one process the
        bus does it at once; an edge in another process (sharing the store) learns it here,
        within ``config_poll_seconds``."""
        for user_id in list(self.flows_by_user):
            before = previous.users.get(user_id)
            now = current.users.get(user_id)
            if (
                now is None
                or not now.enabled
                or (before is not None and now.revoked_before > before.revoked_before)
            ):
                self._revoke_user(user_id)

    def _on_bus(self, event: BusEvent) -> None:
        # Called from any thread: hop onto the loop.
        if event.topic == CONFIG_CHANGED:
            self._loop.call_soon_threadsafe(self._reload.set)
        elif event.topic == SUBJECT_REVOKED:
            user_id = str(event.payload.get("user_id", ""))
            self._loop.call_soon_threadsafe(self._enforce, user_id, dict(event.payload))

    async def _watch_config(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.settings.config_poll_seconds):
                    await self._reload.wait()
            except TimeoutError:
                try:
                    version = await self._in_thread(self.ctx.store.config_version)
                except Exception as exc:
                    log.error("config poll failed: %s", exc)
                    continue
                if version == self.snapshot.version:
                    continue
            self._reload.clear()
            try:
                await self.reload()
            except Exception:
                log.exception("configuration reload failed; keeping the previous snapshot")

    def _enforce(self, user_id: str, payload: dict[str, Any]) -> None:
        """Cut a user's live flows for a signal, then report how many and when (the signal
        audit's "flows cut" and "time to cut")."""
        if not payload.get("device_id"):
            # New flows with tokens from before the revocation are refused from now on,
            # not from the next snapshot reload (edge/revocations.py).
            at = payload.get("at")
            when = float(at) if isinstance(at, int | float) and at > 0 else time.time()
            self.revocations.record(self.snapshot, user_id, when, self._loop.time())
        cut = self._revoke_user(user_id, device_id=str(payload.get("device_id") or ""))
        self.ctx.bus.publish(
            SIGNAL_ENFORCED,
            signal_id=str(payload.get("signal_id") or ""),
            user_id=user_id,
            at=payload.get("at", 0.0),
            flows_cut=cut,
            done_at=time.time(),
            node=self.ctx.node_name,
        )

    def _revoke_user(self, user_id: str, device_id: str = "") -> int:
        """Cut the live flows of a user (continuous access evaluation) — only those from
        ``device_id`` when the signal is about one device (non-compliant, disabled): the
        user's other devices keep working. Returns how many were cut."""
        flow_ids = list(self.flows_by_user.get(user_id, ()))
        cut = 0
        for flow_id in flow_ids:
            flow = self.flows.get(flow_id)
            if flow is None or flow.relay is None:
                continue
            if device_id and flow.device_id != device_id:
                continue
            flow.relay.abort(CloseReason.REVOKED)
            cut += 1
        if cut:
            log.info(
                "revoked %d live flows of %s%s",
                cut,
                user_id,
                f" on device {device_id}" if device_id else "",
            )
        self._reload.set()
        if device_id:
            # The device's next flow meets the new device state in policy; the user's
            # sign-in itself stands, so no claims challenge to all of the user's clients.
            return cut
        # Then tell the user's clients at once, with the challenge a new flow would get.
        user = self.snapshot.users.get(user_id)
        self.client_control.challenge(
            user_id, (user.revoked_before if user is not None else 0.0) or time.time()
        )
        return cut

    def renew_connector(self, connector_id: str, csr_pem: str) -> IssuedCert:
        """Sign a renewal CSR for a connector and record the new serial and expiry (runs in
        a worker thread). ConfigError if the CSR is bad or the connector was revoked."""
        issued = self.ctx.pki.issue_connector_cert(
            csr_pem, connector_id, self.settings.connector_cert_ttl
        )
        with self.ctx.store.session() as s:
            row = s.get(Connector, connector_id)
            if row is None or row.state == "revoked":
                raise ConfigError("this connector was revoked", code="connector_revoked")
            previous = row.cert_serial
            row.cert_serial = issued.serial
            row.cert_not_after = issued.not_after
        self.ctx.audit(
            f"connector:{connector_id}",
            "connector.renew",
            connector_id,
            {"cert_serial": issued.serial, "previous_serial": previous},
        )
        return issued

    # connections -----------------------------------------------------------------------------

    def dispatch(self, transport: asyncio.Transport) -> None:
        ssl_obj: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        peer = transport.get_extra_info("peername") or ("", 0)
        source = (str(peer[0]), int(peer[1]))
        alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
        cert = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        conn_id = new_id("connection")
        if alpn == ALPN_MUX and cert:
            self._accept_connector(transport, cert, source, conn_id)
        elif alpn == ALPN_MUX:
            self._accept_client(transport, source, conn_id)
        else:
            endpoint = TransportEndpoint()
            transport.set_protocol(endpoint)
            endpoint.connection_made(transport)
            endpoint.attach(_HeadReader(self, endpoint, source, conn_id))

    def _accept_client(
        self, transport: asyncio.Transport, source: tuple[str, int], conn_id: str
    ) -> None:
        def on_stream(stream: MuxStream) -> None:
            stream.attach(_HeadReader(self, stream, source, conn_id))

        conn = MuxConnection(is_client=False, on_stream=on_stream, name=f"client {source[0]}")
        transport.set_protocol(conn)
        conn.connection_made(transport)
        self._client_conns.add(conn)
        CLIENT_CONNECTIONS.inc()

        def closed(c: MuxConnection) -> None:
            self._client_conns.discard(c)
            CLIENT_CONNECTIONS.dec()

        conn.on_close = closed
        conn.start_keepalive(interval=15.0, timeout=45.0)

    def _accept_connector(
        self, transport: asyncio.Transport, cert: bytes, source: tuple[str, int], conn_id: str
    ) -> None:
        try:
            connector_id, _serial = connector_id_from_cert(cert)
        except (AuthError, ValueError) as exc:
            log.warning("refused a connection from %s: %s", source[0], exc)
            transport.abort()
            return
        info = self.snapshot.connectors.get(connector_id)
        if info is None or info.state == "revoked":
            log.warning("refused connector %s from %s: unknown or revoked", connector_id, source[0])
            transport.abort()
            return
        conn = MuxConnection(is_client=False, name=f"connector {connector_id}")
        transport.set_protocol(conn)
        conn.connection_made(transport)
        link = self.connectors.add(
            connector_id, info.group_id, conn, self._loop.time(), name=info.name, address=source[0]
        )
        link.draining = info.state == "draining"

        def on_control(stream: MuxStream) -> None:
            # The connector's first stream is its control stream; it opens no others.
            if getattr(conn, "_control_seen", False):
                stream.abort()
                return
            conn._control_seen = True  # type: ignore[attr-defined]
            stream.attach(_ControlReceiver(self, link, stream))

        conn.on_stream = on_control

        def closed(c: MuxConnection) -> None:
            self.connectors.remove(connector_id, c)
            log.info("connector %s connection from %s closed", connector_id, source[0])

        conn.on_close = closed
        conn.start_keepalive()
        log.info("connector %s connected from %s", connector_id, source[0])

    # flows ------------------------------------------------------------------------------------

    async def handle_flow(
        self,
        endpoint: Endpoint,
        request: wire.FlowRequest,
        trailing: bytes,
        source: tuple[str, int],
        conn_id: str,
    ) -> None:
        if request.protocol == "control":  # a client's control stream (edge/client_control.py)
            self.client_control.open(endpoint, request, trailing, self.verifier, source)
            return
        if request.protocol in ("dns", "dns-suffixes"):  # private DNS (edge/dns.py)
            await edge_dns.handle_dns(self, endpoint, request, trailing, source, conn_id)
            return
        started = time.time()
        flow_id = request.headers.get(wire.HEADER_FLOW_ID, "")
        if not flow_id.startswith("flw_") or len(flow_id) > 40 or flow_id in self.flows:
            flow_id = new_id("flow")
        decision = admit(
            request,
            snapshot=self.snapshot,
            verifier=self.verifier,
            now=started,
            source_ip=source[0],
            strict_ip=self.settings.cae_strict_ip,
        )
        record = self._record(flow_id, conn_id, started, request, source, decision)
        if not decision.allowed:
            self._refuse(
                endpoint, decision.status, decision.code, decision.reason, record, decision
            )
            return
        assert decision.app is not None and decision.claims is not None
        if request.protocol == "udp" and edge_udp.too_many_udp_flows(endpoint):
            self._refuse(
                endpoint, 429, "too_many_udp_flows", "too many UDP flows", record, decision
            )
            return
        head = wire.encode_request(
            request.protocol,
            request.host,
            request.port,
            [
                (wire.HEADER_FLOW_ID, flow_id),
                (wire.HEADER_USER, decision.claims.sub),
                (wire.HEADER_SOURCE, f"{source[0]}:{source[1]}"),
            ],
        )
        early: EarlyData | None = None
        if request.protocol == "tcp":
            # What the client sends while the connector dials goes on at once (early data):
            # the connector holds it until the target answers.
            early = EarlyData(endpoint, trailing)
            trailing = b""
        opened = await self._open_via_connector(endpoint, request, head, record, decision, early)
        if opened is None:
            return
        link, target = opened
        try:
            answer = wire.encode_response(200 if request.protocol == "tcp" else 101)
            if request.protocol == "tcp" and isinstance(endpoint, MuxStream):
                # Whatever the connector's answer brought (the target's first bytes) is
                # relayed in this same turn of the loop: ours leaves with it, one record.
                endpoint.write_deferred(answer, 0.0)
            else:
                endpoint.write(answer)
            if request.protocol == "udp":  # counts datagrams, polices capsules (edge/udp.py)
                endpoint = edge_udp.DatagramCounter(endpoint, record, trailing)
            sent_early = len(early.data) if early is not None else 0
            await self._relay(endpoint, target, trailing, record, decision, link, sent_early)
        finally:
            link.active_flows -= 1

    async def _open_via_connector(
        self,
        endpoint: Endpoint,
        request: wire.FlowRequest,
        head: bytes,
        record: dict[str, Any],
        decision: Decision,
        early: EarlyData | None = None,
    ) -> tuple[ConnectorLink, MuxStream] | None:
        """Pick a connector of the app's group and open the flow on it. On success the
        picked link's ``active_flows`` is already counted (the caller uncounts it); on
        failure the client has been answered and None is returned.

        If the chosen connector's link dies while the flow opens, the flow is tried once
        more on another connector: nothing has been relayed yet (the client's bytes wait
        in ``early``, sent again, or in its paused stream), so the retry is invisible to
        it."""
        assert decision.app is not None
        group_id = decision.app.connector_group_id
        tried: frozenset[str] = frozenset()
        while True:
            picked = self.connectors.pick(group_id, self._loop.time(), tried)
            if picked is None:
                group = self.snapshot.connector_groups.get(group_id, "?")
                detail = "is connected" if not tried else "is left after a connector was lost"
                self._refuse(
                    endpoint,
                    502,
                    "no_connector",
                    f"no healthy connector of group {group} {detail}",
                    record,
                    decision,
                )
                return None
            link, conn = picked
            record["connector_id"] = link.connector_id
            link.active_flows += 1
            try:
                target, response = await open_flow(
                    conn, head, request.protocol, self.settings.connector_dial_timeout, early
                )
            except TimeoutError:
                link.active_flows -= 1
                link.recent_failures += 1
                self.monitor.on_flow_result(link, False, "connector_timeout")
                self._refuse(
                    endpoint,
                    504,
                    "connector_timeout",
                    f"connector {link.connector_id} did not answer in time",
                    record,
                    decision,
                )
                return None
            except (ConnectionError, RemoteProtocolError) as exc:
                link.active_flows -= 1
                link.recent_failures += 1
                if not conn.is_open and not tried:
                    log.info(
                        "flow %s: connector %s was lost while the flow opened; retrying",
                        record["flow_id"],
                        link.connector_id,
                    )
                    tried = tried | {link.connector_id}
                    continue
                self._refuse(
                    endpoint,
                    502,
                    "connector_unreachable",
                    f"connector {link.connector_id} failed: {exc}",
                    record,
                    decision,
                )
                return None
            if not response.ok:
                link.active_flows -= 1
                code, message = response.error()
                if code in ("target_unreachable", "target_timeout", "target_unresolvable"):
                    # Possibly this connector's route or resolver: a health signal, which
                    # the relative judgement weighs against its peers.
                    link.recent_failures += 1
                    self.monitor.on_flow_result(link, False, code)
                self._refuse(endpoint, response.status, code, message, record, decision)
                return None
            link.recent_failures = 0
            self.monitor.on_flow_result(link, True)
            choice = f"connector {link.connector_id} ({link.active_flows - 1} active flows)"
            if tried:
                choice += f", retried after {', '.join(sorted(tried))} was lost"
            record["reason"] = f"{record['reason']}; {choice}" if record["reason"] else choice
            return link, target

    async def _relay(
        self,
        endpoint: Endpoint,
        target: MuxStream,
        trailing: bytes,
        record: dict[str, Any],
        decision: Decision,
        link: ConnectorLink,
        sent_early: int = 0,
    ) -> None:
        claims = decision.claims
        assert claims is not None
        flow = LiveFlow(
            record["flow_id"],
            claims.sub,
            claims.sid,
            claims.device_id or "",
            record=record,
            link=link,
        )
        relay = Relay(endpoint, target)
        flow.relay = relay
        self.flows[flow.flow_id] = flow
        self.flows_by_user.setdefault(flow.user_id, set()).add(flow.flow_id)
        FLOWS_ACTIVE.inc()
        FLOWS_TOTAL.labels("allow", "").inc()
        try:
            relay.start(initial_to_b=trailing, sent_to_b=sent_early)
            reason = await relay.done
            if (
                reason in (CloseReason.TARGET_CLOSED, CloseReason.ERROR)
                and relay.error is not None
                and target.conn.closed.done()
            ):
                # The connector's whole link went away under the flow (process killed,
                # network cut, keepalive timeout), not just the target connection.
                reason = CloseReason.CONNECTOR_LOST
        finally:
            FLOWS_ACTIVE.dec()
            self.flows.pop(flow.flow_id, None)
            ids = self.flows_by_user.get(flow.user_id)
            if ids is not None:
                ids.discard(flow.flow_id)
                if not ids:
                    del self.flows_by_user[flow.user_id]
        up, down = relay.bytes_a_to_b, relay.bytes_b_to_a
        link.bytes_up += up
        link.bytes_down += down
        BYTES_TOTAL.labels("up").inc(up)
        BYTES_TOTAL.labels("down").inc(down)
        record.update(ended_at=time.time(), bytes_up=up, bytes_down=down, close_reason=str(reason))
        if reason is CloseReason.CONNECTOR_LOST:
            record["reason"] = f"connector {link.connector_id} was lost: {relay.error!r}"[:500]
        elif relay.error is not None and reason is CloseReason.ERROR:
            record["reason"] = f"relay failed: {relay.error!r}"[:500]
            log.warning("flow %s ended by an error: %r", flow.flow_id, relay.error)
        self.traffic.submit(record)

    def _refuse(
        self,
        endpoint: Endpoint,
        status: int,
        code: str,
        reason: str,
        record: dict[str, Any],
        decision: Decision,
    ) -> None:
        headers: list[tuple[str, str]] = []
        if decision.www_authenticate and status == 401:
            headers.append(("WWW-Authenticate", decision.www_authenticate))
        action = decision.action if decision.action != "allow" else "error"
        FLOWS_TOTAL.labels(action, code).inc()
        log.info("flow %s refused (%d %s): %s", record["flow_id"], status, code, reason)
        endpoint.write(wire.encode_refusal(status, code, reason, headers))
        endpoint.close()
        record.update(
            action=action, code=code, reason=reason, ended_at=time.time(), close_reason="refused"
        )
        self.traffic.submit(record)

    def _record(
        self,
        flow_id: str,
        conn_id: str,
        started: float,
        request: wire.FlowRequest,
        source: tuple[str, int],
        decision: Decision,
    ) -> dict[str, Any]:
        claims = decision.claims
        host = request.host
        is_ip = host.replace(".", "").isdigit() or ":" in host
        return {
            "flow_id": flow_id,
            "connection_id": conn_id,
            "session_id": claims.sid if claims else "",
            "started_at": started,
            "user_id": claims.sub if claims else "",
            "username": claims.username if claims else "",
            "device_id": (claims.device_id or "") if claims else "",
            "client_version": request.headers.get(wire.HEADER_CLIENT_VERSION, "")[:64],
            "process_name": request.headers.get(wire.HEADER_PROCESS, "")[:255],
            "source_ip": source[0],
            "source_port": source[1],
            "dest_host": "" if is_ip else host,
            "dest_ip": host if is_ip else "",
            "dest_port": request.port,
            "transport": request.protocol,
            "app_id": decision.app.id if decision.app else "",
            "segment_id": decision.segment.id if decision.segment else "",
            "connector_group_id": decision.app.connector_group_id if decision.app else "",
            "action": decision.action,
            "code": decision.code,
            "reason": decision.reason,
            "policy_ids": list(decision.policy_ids),
            "edge_node": self.ctx.node_name,
        }


class _ControlReceiver:
    """The edge's end of a connector's control stream: hello, heartbeats, drain and
    certificate renewal. Bad framing closes the connector's link (its flows end as
    ``connector_lost``; its other links and every other connector are unaffected)."""

    def __init__(self, edge: Edge, link: ConnectorLink, stream: MuxStream) -> None:
        self.edge = edge
        self.link = link
        self.stream = stream
        self.reader = ControlReader()
        stream.mark_background()  # heartbeats must not make bulk streams give way
        self.renewing = False
        self.last_renewal = -1e9

    def on_data(self, data: Buffer) -> None:
        try:
            messages, rejected = self.reader.feed(data)
        except RemoteProtocolError as exc:
            PROTOCOL_ERRORS.labels(exc.code).inc()
            log.warning(
                "connector %s sent a bad control message (%s): closing",
                self.link.connector_id,
                exc.code,
            )
            self.stream.conn.close()
            return
        if messages or rejected:
            self.edge.monitor.on_control(self.link)
        for kind, error in rejected:
            PROTOCOL_ERRORS.labels(error.code).inc()
            log.warning("connector %s: bad %s message: %s", self.link.connector_id, kind, error)
        for message in messages:
            if isinstance(message, Hello):
                self.link.version = message.version[:64]
            elif isinstance(message, Heartbeat):
                self.link.last_heartbeat = time.time()
                self.link.reported_active_flows = message.active_flows
                self.link.reported_dials_failed = message.dials_failed
            elif isinstance(message, Drain):
                if not self.link.self_draining:
                    log.info(
                        "connector %s is draining (%s): no new flows",
                        self.link.connector_id,
                        message.reason or "no reason given",
                    )
                self.link.self_draining = True
            elif isinstance(message, RenewRequest):
                self._renew(message)

    def _renew(self, message: RenewRequest) -> None:
        # One renewal at a time and at most one per RENEW_MIN_INTERVAL per stream: each is
        # a signature and a database write, and a connector only needs one per lifetime.
        now = self.edge._loop.time()
        if self.renewing or now - self.last_renewal < RENEW_MIN_INTERVAL:
            self._send(RenewRefused("renewal_too_soon", "a renewal was just issued"))
            return
        self.renewing = True
        self.last_renewal = now
        spawn(self._do_renew(message.csr_pem), name=f"renew {self.link.connector_id}")

    async def _do_renew(self, csr_pem: str) -> None:
        connector_id = self.link.connector_id
        try:
            info = self.edge.snapshot.connectors.get(connector_id)
            if info is None or info.state == "revoked":
                self._send(RenewRefused("connector_revoked", "this connector was revoked"))
                return
            try:
                issued = await asyncio.to_thread(self.edge.renew_connector, connector_id, csr_pem)
            except ConfigError as exc:
                log.warning("connector %s: renewal refused: %s", connector_id, exc)
                self._send(RenewRefused(exc.code, exc.message))
                return
            self._send(RenewResponse(issued.cert_pem, issued.not_after))
            log.info(
                "connector %s renewed its certificate (serial %s)", connector_id, issued.serial
            )
        finally:
            self.renewing = False

    def _send(self, message: RenewResponse | RenewRefused) -> None:
        if not self.stream.closed:
            self.stream.write(encode_control(message))

    def on_eof(self) -> None:
        self.stream.close()

    def on_closed(self, error: BaseException | None) -> None:
        pass

    def on_drained(self) -> None:
        pass
