"""The client's data plane: a few long-lived TLS connections to the edge, one yamux stream
per flow, and the local capture modes that feed them (port forward, SOCKS5)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from limen import __version__
from limen.client import auth
from limen.client.profile import ClientState, StateFile
from limen.client.udp import udp_associate
from limen.errors import LimenError, RemoteProtocolError
from limen.ids import new_id
from limen.net.endpoints import Buffer, TransportEndpoint
from limen.net.mux import EarlyData, MuxConnection, MuxStream, open_flow
from limen.net.relay import Relay
from limen.net.tasks import spawn
from limen.net.tls import ALPN_MUX, client_context
from limen.wire import connect as wire
from limen.wire.control import ClaimsChallenge, ControlReader
from limen.wire.socks5 import (
    ConnectRequested,
    ReplyCode,
    Socks5Server,
    UdpAssociateRequested,
)

log = logging.getLogger(__name__)


class FlowRefused(LimenError):
    """The edge (or the connector behind it) refused a flow."""

    def __init__(self, status: int, code: str, message: str, www_authenticate: str = "") -> None:
        super().__init__(message, code=code)
        self.status = status
        self.www_authenticate = www_authenticate


#: Asked to sign the user in again after a challenge; returns True when it did (the flow is
#: then retried once with the new token). Runs in a worker thread: it may prompt.
Reauthenticate = Callable[["FlowRefused"], bool]

#: The edge's refusal code under strict enforcement when the flow's source address is not
#: the token's ``ipaddr`` (limen.edge.admission.ADDRESS_MISMATCH): a refresh answers it.
ADDRESS_MISMATCH = "address_mismatch"

CHALLENGE_CODES = frozenset(
    {
        "insufficient_user_authentication",
        "session_revoked",
        "user_disabled",
        "unknown_user",
        ADDRESS_MISMATCH,
    }
)

#: How often a client paused by a control-stream challenge looks for a new sign-in made by
#: another process (it reads the small client state file; nothing goes on the network).
PAUSE_RECHECK = 0.2

#: Written by ``forward`` and ``socks`` processes while access is paused, one per process,
#: in the client directory; ``limen client status`` lists them.
PAUSE_FILE_GLOB = "paused-*.json"


def pause_file(directory: Path, pid: int | None = None) -> Path:
    """The pause status file of process ``pid`` (this one by default)."""
    return directory / f"paused-{os.getpid() if pid is None else pid}.json"


def read_pause_files(directory: Path) -> list[dict[str, Any]]:
    """Pause reasons of running client processes; files of processes that are gone are
    removed."""
    found: list[dict[str, Any]] = []
    for path in sorted(directory.glob(PAUSE_FILE_GLOB)):
        try:
            data = json.loads(path.read_text())
            pid = int(data.get("pid", 0))
        except (OSError, ValueError, AttributeError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        except PermissionError:
            pass  # another user's process: alive
        found.append(data)
    return found


class EdgeSession:
    """Keeps up to ``connections`` multiplexed TLS connections to the edge and opens flows
    on the least busy one. Tokens are refreshed ahead of expiry (in a worker thread: the
    token endpoint is plain HTTPS)."""

    def __init__(
        self,
        state: ClientState,
        *,
        state_file: StateFile | None = None,
        connections: int = 2,
        process_name: str = "",
        reauthenticate: Reauthenticate | None = None,
        local_address: str = "",
    ) -> None:
        self.state = state
        #: Bind edge connections to this local address ("" lets the kernel choose).
        self.local_address = local_address
        #: The local address of the last edge connection: a change means the network
        #: changed, and the next flow refreshes its token first (it carries ``ipaddr``).
        self.seen_local_ip = ""
        self._address_changed = False
        #: Where this process reports a pause for ``limen client status`` (None: nowhere).
        self.pause_path: Path | None = None
        #: Shown in the pause file: what this process is (``forward 10.0.0.5:22``).
        self.purpose = ""
        self.reauthenticate = reauthenticate
        #: Put the initiating process's name on each flow (costs a /proc walk per flow).
        self.attribute_processes = False
        #: Why access is paused (the last challenge), for ``status``; "" when flowing.
        self.paused_reason = ""
        self.state_file = state_file
        self.max_connections = connections
        self.conns: list[MuxConnection] = []
        self._connecting: asyncio.Lock | None = None
        host, _, port = state.edge.removeprefix("https://").rstrip("/").rpartition(":")
        self.edge_host = host.strip("[]") or "localhost"
        self.edge_port = int(port or 443)
        self._ssl = client_context(state.ca_pem or None, alpn=[ALPN_MUX])
        self._refresh_lock = threading.Lock()
        self.process_name = process_name
        #: Claims challenges received on the control streams (the last few), for tests and
        #: diagnostics; a reauthentication they started runs at most one at a time.
        self.challenges: list[ClaimsChallenge] = []
        self._reauthenticating = False
        self._pause_watch: asyncio.Task[None] | None = None

    async def _connection(self) -> MuxConnection:
        self.conns = [c for c in self.conns if c.is_open]
        if len(self.conns) >= self.max_connections:
            return min(self.conns, key=lambda c: len(c.streams))
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            self.conns = [c for c in self.conns if c.is_open]
            if self.conns and len(self.conns) >= self.max_connections:
                return min(self.conns, key=lambda c: len(c.streams))
            loop = asyncio.get_running_loop()
            conn = MuxConnection(is_client=True, name="edge")
            try:
                transport, _ = await loop.create_connection(
                    lambda: conn,
                    self.edge_host,
                    self.edge_port,
                    ssl=self._ssl,
                    server_hostname=self.edge_host,
                    ssl_handshake_timeout=10.0,
                    local_addr=(self.local_address, 0) if self.local_address else None,
                )
            except OSError as exc:
                if self.conns:
                    return min(self.conns, key=lambda c: len(c.streams))
                raise FlowRefused(
                    503,
                    "edge_unreachable",
                    f"cannot reach the edge at {self.edge_host}:{self.edge_port}: {exc}",
                ) from exc
            conn.start_keepalive(interval=15.0, timeout=45.0)
            self.conns.append(conn)
            self._note_local_address(transport.get_extra_info("sockname"))
            spawn(self._open_control(conn), name="edge control stream")
            return conn

    def _note_local_address(self, sockname: Any) -> None:
        if not isinstance(sockname, tuple) or not sockname:
            return
        local_ip = str(sockname[0])
        if self.seen_local_ip and local_ip != self.seen_local_ip:
            log.info("the local address changed (%s -> %s)", self.seen_local_ip, local_ip)
            self._address_changed = True
        self.seen_local_ip = local_ip

    async def warm_up(self) -> None:
        """Open every connection now, so the first flows pay no handshake."""
        while len([c for c in self.conns if c.is_open]) < self.max_connections:
            before = len(self.conns)
            await self._connection()
            if len(self.conns) == before:
                break

    async def access_token(self, force_refresh: bool = False) -> str:
        if self._address_changed:
            # Network change: a new token carries the new address (strict enforcement) and
            # the sign-in policy, location conditions included, is evaluated again.
            self._address_changed = False
            try:
                await asyncio.to_thread(self._refresh_blocking, self.state.access_token)
            except LimenError as exc:
                log.warning("refresh after a network change failed: %s (%s)", exc, exc.code)
            return self.state.access_token
        if not force_refresh and self.state.token_fresh():
            return self.state.access_token
        stale = self.state.access_token if force_refresh else None
        await asyncio.to_thread(self._refresh_blocking, stale)
        return self.state.access_token

    def _refresh_blocking(self, stale: str | None = None) -> None:
        """Refresh the access token: when it is no longer fresh, or (``stale``) when it is
        still that token — a concurrent flow may have refreshed it already."""
        with self._refresh_lock:
            if stale is None and self.state.token_fresh():
                return
            if stale is not None and self.state.access_token != stale:
                return
            with auth.http_client(self.state) as http:
                auth.refresh(self.state, http)
            if self.state_file is not None:
                self.state_file.save(self.state)

    def _adopt_newer_sign_in(self, used: str) -> bool:
        """Take the tokens of a sign-in made meanwhile by another process (``limen client
        login`` in a terminal while this one runs unattended); True when there was one."""
        if self.state_file is None:
            return False
        with self._refresh_lock:
            try:
                on_disk = self.state_file.load()
            except LimenError:
                return False
            if not on_disk.access_token or on_disk.access_token in (used, self.state.access_token):
                return self.state.access_token != used
            # In place: the reauthenticate callback holds this very object.
            for name in ClientState.__dataclass_fields__:
                setattr(self.state, name, getattr(on_disk, name))
            log.info("using the sign-in made by another process")
            return True

    def set_paused(self, reason: str) -> None:
        """Record why access is paused ("" when it flows again) for ``status``."""
        if reason == self.paused_reason:
            return
        self.paused_reason = reason
        if self.pause_path is None:
            return
        try:
            if reason:
                self.pause_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = self.pause_path.with_suffix(".tmp")
                body = {
                    "pid": os.getpid(),
                    "purpose": self.purpose,
                    "paused_reason": reason,
                    "since": time.time(),
                }
                tmp.write_text(json.dumps(body))
                os.replace(tmp, self.pause_path)
            else:
                self.pause_path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.pause_path, exc)

    async def open(
        self,
        protocol: str,
        host: str,
        port: int,
        *,
        process: str = "",
        early: EarlyData | None = None,
    ) -> tuple[MuxStream, wire.FlowResponse]:
        """Open one flow; raises :class:`FlowRefused` with the edge's code and reason.
        ``early`` sends what the local side sends meanwhile with the flow head (sent again
        on every retry).

        A claims challenge (revocation, step-up, strict enforcement) pauses access: the
        reason is kept in ``paused_reason`` until a flow is admitted again. It is answered
        once per flow: a token moved to another address is refreshed (it then carries the
        new address); otherwise a sign-in made by another process is adopted, or
        ``reauthenticate`` asks the user."""
        retried = False
        while True:
            # The connection first: a new one may reveal a network change, which the token
            # taken next must already reflect (strict enforcement).
            conn = await self._connection()
            token = await self.access_token()
            headers = [
                ("Proxy-Authorization", f"Bearer {token}"),
                (wire.HEADER_FLOW_ID, new_id("flow")),
                (wire.HEADER_CLIENT_VERSION, f"limen/{__version__}"),
            ]
            if self.state.device_id:
                headers.append((wire.HEADER_DEVICE_ID, self.state.device_id))
            if process or self.process_name:
                headers.append((wire.HEADER_PROCESS, (process or self.process_name)[:200]))
            head = wire.encode_request(protocol, host, port, headers)
            try:
                stream, response = await open_flow(conn, head, protocol, early=early)
            except (ConnectionError, RemoteProtocolError, TimeoutError) as exc:
                if retried:
                    raise FlowRefused(
                        503, "edge_unreachable", f"edge connection failed: {exc}"
                    ) from exc
                retried = True
                conn.close()
                continue
            if response.ok:
                self.set_paused("")
                return stream, response
            code, message = response.error()
            refusal = FlowRefused(
                response.status, code, message, response.headers.get("www-authenticate", "")
            )
            if response.status == 401 and code == "token_expired" and not retried:
                retried = True
                await self.access_token(force_refresh=True)
                continue
            if response.status == 401 and code in CHALLENGE_CODES:
                self.set_paused(f"{code}: {message}")
                if retried:
                    raise refusal
                retried = True
                if code == ADDRESS_MISMATCH:
                    try:
                        await self.access_token(force_refresh=True)
                        continue
                    except LimenError as exc:
                        log.info("refresh after an address challenge failed: %s", exc.code)
                elif await asyncio.to_thread(self._adopt_newer_sign_in, token):
                    continue
                if self.reauthenticate is not None and await asyncio.to_thread(
                    self._reauthenticate, refusal, token
                ):
                    continue
            raise refusal

    def _reauthenticate(self, refusal: FlowRefused, used: str = "") -> bool:
        assert self.reauthenticate is not None
        with self._refresh_lock:
            if used and self.state.access_token != used:
                return True  # signed in again meanwhile (a control-stream challenge): ask once
            done = self.reauthenticate(refusal)
            if done and self.state_file is not None:
                self.state_file.save(self.state)
            return done

    async def close(self) -> None:
        if self._pause_watch is not None:
            self._pause_watch.cancel()
            self._pause_watch = None
        for conn in self.conns:
            conn.close()
        self.conns = []

    # the control stream ------------------------------------------------------------------

    async def _open_control(self, conn: MuxConnection) -> None:
        """Open this connection's control stream, where the edge sends claims challenges
        the moment it revokes access (instead of the next flow learning it)."""
        try:
            token = await self.access_token()
            head = wire.encode_request(
                "control", self.edge_host, self.edge_port, [("Authorization", f"Bearer {token}")]
            )
            stream, response = await open_flow(conn, head, "control")
        except (LimenError, ConnectionError, TimeoutError) as exc:
            log.info("no control stream on this edge connection: %s", exc)
            return
        if not response.ok:
            code, message = response.error()
            log.warning("the edge refused the control stream: %s (%s)", message, code)
            return
        stream.attach(_ControlReceiver(self, stream))

    def on_claims_challenge(self, challenge: ClaimsChallenge) -> None:
        """The edge revoked access: record why (``status`` shows it) and sign in again now
        (a prompt when interactive; a report otherwise), in a worker thread."""
        repeated = bool(self.challenges) and self.challenges[-1] == challenge
        self.challenges = [*self.challenges[-9:], challenge]
        if self._answered(challenge):
            return  # our token is already newer than the revocation (a repeated challenge)
        if repeated and self.paused_reason:
            return  # one edge connection per challenge is enough to ask the user once
        reason = challenge.reason or "access was revoked"
        self.set_paused(f"session_revoked: {reason}")
        log.warning("the edge revoked access: %s", reason)
        if self._reauthenticating:
            return
        self._reauthenticating = True
        spawn(self._answer_challenge(challenge), name="answer claims challenge")

    async def _answer_challenge(self, challenge: ClaimsChallenge) -> None:
        refusal = FlowRefused(
            401, "session_revoked", challenge.reason or "access was revoked",
            challenge.www_authenticate,
        )  # fmt: skip
        try:
            # A sign-in made by another process answers it only if it followed the revocation.
            await asyncio.to_thread(self._adopt_newer_sign_in, self.state.access_token)
            if self._answered(challenge) or (
                self.reauthenticate is not None
                and await asyncio.to_thread(self._reauthenticate, refusal, self.state.access_token)
            ):
                self.set_paused("")
        except LimenError as exc:
            log.warning("signing in again failed: %s (%s)", exc.message, exc.code)
        finally:
            self._reauthenticating = False
        if self.paused_reason and self.state_file is not None and self._pause_watch is None:
            self._pause_watch = spawn(self._watch_sign_in(), name="watch for a new sign-in")

    def _answered(self, challenge: ClaimsChallenge) -> bool:
        """Whether our token was issued after the revocation the challenge names."""
        nbf = challenge_nbf(challenge.www_authenticate)
        # nbf is in whole seconds: only a token from a later second is surely newer.
        return nbf is not None and int(token_issued_at(self.state.access_token)) > nbf

    async def _watch_sign_in(self) -> None:
        """While paused by a control-stream challenge, pick up a sign-in made by another
        process (``limen client login``), so access resumes — and ``status`` says so —
        without waiting for a flow to try."""
        try:
            while self.paused_reason and self.challenges:
                await asyncio.sleep(PAUSE_RECHECK)
                await asyncio.to_thread(self._adopt_newer_sign_in, self.state.access_token)
                if self._answered(self.challenges[-1]):
                    log.info("signed in again; access resumes")
                    self.set_paused("")
        finally:
            self._pause_watch = None


def challenge_nbf(www_authenticate: str) -> int | None:
    """The ``nbf`` an ``insufficient_claims`` challenge asks for (Unix seconds), or None."""
    _, found, rest = www_authenticate.partition('claims="')
    if not found:
        return None
    try:
        claims = json.loads(base64.b64decode(rest.partition('"')[0], validate=True))
        return int(claims["access_token"]["nbf"]["value"])
    except (ValueError, TypeError, KeyError):
        return None


def token_issued_at(token: str) -> float:
    """The ``iat`` of our own access token (read, not verified: only to compare it with a
    challenge's ``nbf``); 0 when unreadable."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims.get("iat", 0))
    except (IndexError, ValueError, TypeError, AttributeError):
        return 0.0


class _ControlReceiver:
    """The client's end of a control stream: claims challenges. Bad framing from the edge
    closes this stream only."""

    def __init__(self, session: EdgeSession, stream: MuxStream) -> None:
        self.session = session
        self.stream = stream
        self.reader = ControlReader()
        stream.mark_background()  # heartbeats must not make bulk streams give way

    def on_data(self, data: Buffer) -> None:
        try:
            messages, rejected = self.reader.feed(data)
        except RemoteProtocolError as exc:
            log.warning("bad control frame from the edge (%s): closing the stream", exc.code)
            self.stream.abort()
            return
        for kind, error in rejected:
            log.info("bad %s control message from the edge: %s", kind, error)
        for message in messages:
            if isinstance(message, ClaimsChallenge):
                self.session.on_claims_challenge(message)

    def on_eof(self) -> None:
        self.stream.close()

    def on_closed(self, error: BaseException | None) -> None:
        pass

    def on_drained(self) -> None:
        pass


def load_session(state_file: StateFile, **kw: Any) -> EdgeSession:
    state = state_file.require()
    return EdgeSession(state, state_file=state_file, **kw)


ReportRefusal = Callable[[str, FlowRefused], None]


def _log_refusal(target: str, exc: FlowRefused) -> None:
    log.warning("flow to %s refused: %s (%s)", target, exc.message, exc.code)


async def serve_forward(
    session: EdgeSession,
    target_host: str,
    target_port: int,
    listen_host: str,
    listen_port: int,
    *,
    on_refused: ReportRefusal = _log_refusal,
) -> asyncio.Server:
    """``limen client forward``: every local connection becomes one flow to the target."""
    loop = asyncio.get_running_loop()

    def factory() -> TransportEndpoint:
        local = TransportEndpoint()
        spawn(
            _forward_one(session, local, target_host, target_port, on_refused),
            name=f"forward to {target_host}:{target_port}",
        )
        return local

    return await loop.create_server(factory, listen_host, listen_port, backlog=1024)


async def _forward_one(
    session: EdgeSession,
    local: TransportEndpoint,
    host: str,
    port: int,
    on_refused: ReportRefusal,
) -> None:
    try:
        await local.connected
    except (ConnectionError, OSError):
        return
    early = EarlyData(local)
    try:
        stream, _response = await session.open(
            "tcp", host, port, process=_peer_process(session, local), early=early
        )
    except FlowRefused as exc:
        on_refused(f"{host}:{port}", exc)
        local.abort()
        return
    relay = Relay(local, stream)
    relay.start(sent_to_b=len(early.data))
    await relay.done


def _peer_process(session: EdgeSession, local: TransportEndpoint) -> str:
    """Name of the local process that opened the connection (best effort, Linux), when the
    session attributes processes: finding it walks /proc (milliseconds), so a per-app
    forward or a SOCKS proxy skips it unless asked (``--process-names``)."""
    if not session.attribute_processes or local.transport is None:
        return ""
    sock = local.transport.get_extra_info("socket")
    peer = local.transport.get_extra_info("peername")
    if sock is None or not isinstance(peer, tuple):
        return ""
    try:
        from limen.client.procinfo import process_for_peer

        return process_for_peer(peer[0], peer[1]) or ""
    except (ImportError, OSError):
        return ""


class _SocksHandshake:
    """Receiver that runs the SOCKS5 handshake, then hands the socket to a flow."""

    def __init__(
        self, session: EdgeSession, local: TransportEndpoint, on_refused: ReportRefusal
    ) -> None:
        self.session = session
        self.local = local
        self.codec = Socks5Server()
        self.on_refused = on_refused
        self.started = False

    def on_data(self, data: Buffer) -> None:
        if self.started:
            return
        try:
            events = self.codec.receive_data(bytes(data))
        except RemoteProtocolError as exc:
            out = self.codec.data_to_send()
            if out:
                self.local.write(out)
            log.info("socks: bad handshake (%s): %s", exc.code, exc)
            self.local.close()
            return
        out = self.codec.data_to_send()
        if out:
            self.local.write(out)
        for event in events:
            if isinstance(event, ConnectRequested):
                self.started = True
                self.local.pause_reading()
                spawn(
                    self._connect(event.host, event.port),
                    name=f"socks to {event.host}:{event.port}",
                )
                return
            if isinstance(event, UdpAssociateRequested):  # the UDP relay (client/udp.py)
                self.started = True
                spawn(
                    udp_associate(self.session, self.local, self.codec, event, self.on_refused),
                    name=f"socks udp associate {event.host}:{event.port}",
                )
                return
            self.codec.reject(ReplyCode.COMMAND_NOT_SUPPORTED)
            self.local.write(self.codec.data_to_send())
            self.local.close()
            return

    async def _connect(self, host: str, port: int) -> None:
        try:
            stream, _response = await self.session.open(
                "tcp", host, port, process=_peer_process(self.session, self.local)
            )
        except FlowRefused as exc:
            self.on_refused(f"{host}:{port}", exc)
            reply = (
                ReplyCode.NOT_ALLOWED
                if exc.status in (401, 403)
                else (
                    ReplyCode.HOST_UNREACHABLE
                    if exc.status in (502, 504)
                    else ReplyCode.GENERAL_FAILURE
                )
            )
            self.codec.reject(reply)
            self.local.write(self.codec.data_to_send())
            self.local.close()
            return
        self.codec.accept("0.0.0.0", 0)
        self.local.write(self.codec.data_to_send())
        early = self.codec.trailing_data()
        relay = Relay(self.local, stream)
        relay.start(initial_to_b=early)
        await relay.done

    def on_eof(self) -> None:
        if not self.started:
            self.local.close()

    def on_closed(self, error: BaseException | None) -> None:
        pass

    def on_drained(self) -> None:
        pass


async def serve_socks(
    session: EdgeSession,
    listen_host: str,
    listen_port: int,
    *,
    on_refused: ReportRefusal = _log_refusal,
) -> asyncio.Server:
    """``limen client socks``: a SOCKS5 proxy whose CONNECTs become flows."""
    loop = asyncio.get_running_loop()

    def factory() -> TransportEndpoint:
        local = TransportEndpoint()
        local.attach(_SocksHandshake(session, local, on_refused))
        return local

    return await loop.create_server(factory, listen_host, listen_port, backlog=1024)
