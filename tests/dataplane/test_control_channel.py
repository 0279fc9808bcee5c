"""The client control channel (loopback, real TLS, real SQLite): every edge connection of a
client carries a control stream; when the admin revokes the user, the edge cuts the flows
and sends a claims challenge on it at once, the client records why access is paused and
starts signing in again. A control-stream head with a bad token is refused 401; garbage on
a control stream ends that stream only."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from limen.client import auth
from limen.client.profile import ClientState, StateFile
from limen.client.tunnel import (
    EdgeSession,
    FlowRefused,
    challenge_nbf,
    pause_file,
    read_pause_files,
)
from limen.client.tunnel import _ControlReceiver as ClientControl
from limen.edge.server import Edge
from limen.edge.server import _ControlReceiver as EdgeConnectorControl
from limen.net.mux import MuxStream, open_flow
from limen.wire import connect as wire
from limen.wire.control import ClaimsChallenge, encode_control
from tests.support import EchoServer, Tenant, echo_roundtrip, running_tenant

#: Generous bound for the challenge to arrive (the target is the cut's: under 1 s).
BOUND = 5.0


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = await EchoServer().start()
    yield server
    await server.stop()


@pytest.fixture
async def tenant(tmp_path: Path) -> AsyncIterator[Tenant]:
    async with running_tenant(tmp_path) as t:
        yield t


def _edge(tenant: Tenant) -> Edge:
    edge = tenant.service.edge
    assert edge is not None
    return edge


async def _published(tenant: Tenant, echo: EchoServer) -> dict[str, Any]:
    alice = await tenant.user("alice")
    await tenant.app("echo", [("ip", "127.0.0.1", str(echo.port))], [alice["id"]])
    await tenant.connector()
    return alice


async def _until(what: str, probe: Any, bound: float = BOUND) -> None:
    deadline = time.monotonic() + bound
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {bound}s waiting for {what}")
        await asyncio.sleep(0.005)


class _Watch:
    """Receiver noting data and the stream's end."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_data(self, data: Any) -> None:
        self.data += data

    def on_eof(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def on_closed(self, error: BaseException | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def on_drained(self) -> None:
        pass


def _control_head(session: EdgeSession, token: str) -> bytes:
    return wire.encode_request(
        "control", session.edge_host, session.edge_port, [("Authorization", f"Bearer {token}")]
    )


async def test_disable_sends_a_claims_challenge_on_the_control_stream(
    tenant: Tenant, echo: EchoServer
) -> None:
    alice = await _published(tenant, echo)
    session = await tenant.login("alice")
    asked: list[FlowRefused] = []

    def reauthenticate(refusal: FlowRefused) -> bool:
        asked.append(refusal)
        return False  # a non-interactive client: it reports, access stays paused

    session.reauthenticate = reauthenticate
    stream, _ = await session.open("tcp", "127.0.0.1", echo.port)
    live = _Watch()
    stream.attach(live)
    stream.write(b"hello")
    edge = _edge(tenant)
    await _until("the control stream", lambda: alice["id"] in edge.client_control.by_user)

    sent = time.perf_counter()
    revoked_at = time.time()
    await tenant.call("POST", f"/api/v1/users/{alice['id']}/disable")
    await _until("the claims challenge", lambda: session.challenges)
    arrived = time.perf_counter()
    print(
        f"\nclaims challenge on the control stream {(arrived - sent) * 1000:.1f} ms after the call"
    )
    async with asyncio.timeout(BOUND):
        await live.ended  # the live flow was cut too

    challenge = session.challenges[0]
    assert isinstance(challenge, ClaimsChallenge)
    header = challenge.www_authenticate
    assert header.startswith('Bearer realm="limen", error="insufficient_claims"')
    encoded = header.split('claims="', 1)[1].split('"', 1)[0]
    claims = json.loads(base64.b64decode(encoded))
    assert claims["access_token"]["nbf"]["essential"] is True
    nbf = int(claims["access_token"]["nbf"]["value"])
    assert abs(nbf - revoked_at) <= 2 and challenge_nbf(header) == nbf
    assert challenge.reason
    assert session.paused_reason.startswith("session_revoked")
    # The client tried to sign in again at once, without waiting for a flow.
    await _until("the reauthentication", lambda: asked)
    assert asked[0].status == 401 and asked[0].www_authenticate == header
    assert session.paused_reason  # the non-interactive answer left access paused
    await session.close()
    await _until("the control streams to be forgotten", lambda: not edge.client_control.by_user)


def _controls_in(conns: Any, receiver_type: type) -> list[MuxStream]:
    return [s for c in conns for s in c.streams.values() if isinstance(s.receiver, receiver_type)]


async def test_control_streams_never_make_bulk_streams_give_way(
    tenant: Tenant, echo: EchoServer
) -> None:
    """Heartbeats and other control messages are not someone typing: every control stream,
    at both ends of client and connector links, is background for the receive budget
    (docs/protocol.md, flow control), while a flow's stream is not."""
    alice = await _published(tenant, echo)
    session = await tenant.login("alice")
    flow, _ = await session.open("tcp", "127.0.0.1", echo.port)
    edge = _edge(tenant)
    await _until("the control stream", lambda: alice["id"] in edge.client_control.by_user)
    links = [c for link in edge.connectors.links.values() for c in link.connections]
    controls = {
        "edge, client side": list(edge.client_control.by_user[alice["id"]]),
        "edge, connector side": _controls_in(links, EdgeConnectorControl),
        "client": _controls_in(session.conns, ClientControl),
        "connector": list(tenant.agents[0]._controls),
    }
    for where, streams in controls.items():
        assert streams, f"no control stream found at the {where}"
        for stream in streams:
            assert stream.conn.session.is_background(stream.stream_id), where
    assert not flow.conn.session.is_background(flow.stream_id)
    await session.close()


async def test_control_stream_with_a_bad_token_is_refused(tenant: Tenant, echo: EchoServer) -> None:
    alice = await _published(tenant, echo)
    session = await tenant.login("alice")
    conn = await session._connection()
    _stream, response = await open_flow(conn, _control_head(session, "not.a.token"), "control")
    assert response.status == 401
    code, _message = response.error()
    assert code == "invalid_token"
    assert 'error="invalid_token"' in response.headers.get("www-authenticate", "")
    no_token = wire.encode_request("control", session.edge_host, session.edge_port)
    _stream, response = await open_flow(conn, no_token, "control")
    assert response.status == 401 and response.error()[0] == "missing_token"
    # Only the client's own stream (opened with its valid token) is registered.
    edge = _edge(tenant)
    await _until(
        "the client's own control stream", lambda: alice["id"] in edge.client_control.by_user
    )
    assert len(edge.client_control) == 1
    await session.close()


async def test_garbage_on_a_control_stream_closes_that_stream_only(
    tenant: Tenant, echo: EchoServer
) -> None:
    alice = await _published(tenant, echo)
    session = await tenant.login("alice")
    conn = await session._connection()
    edge = _edge(tenant)
    await _until("the client's own control stream", lambda: len(edge.client_control) == 1)
    stream, response = await open_flow(
        conn, _control_head(session, session.state.access_token), "control"
    )
    assert response.status == 101
    assert len(edge.client_control) == 2
    watch = _Watch()
    stream.attach(watch)
    # A well-formed frame is fine; a length prefix over the 64 KiB cap is not.
    stream.write(
        encode_control({"type": "hello", "role": "client", "node_id": "x", "version": "1"})
    )
    stream.write(b"\xff\xff\xff\xffgarbage")
    async with asyncio.timeout(BOUND):
        await watch.ended
    await _until("the bad stream to be forgotten", lambda: len(edge.client_control) == 1)
    assert conn.is_open
    # The connection, its flows and its own control stream carry on.
    assert await echo_roundtrip(session, echo.port) == b"ping"
    await tenant.call("POST", f"/api/v1/users/{alice['id']}/revoke-sessions")
    await _until("the claims challenge", lambda: session.challenges)
    await session.close()


async def test_a_sign_in_by_another_process_ends_the_pause(
    tenant: Tenant, echo: EchoServer, tmp_path: Path
) -> None:
    alice = await _published(tenant, echo)
    session = await tenant.login("alice")
    files = StateFile(tmp_path / "client")
    files.save(session.state)
    session.state_file = files
    session.pause_path = pause_file(files.directory)
    assert await echo_roundtrip(session, echo.port) == b"ping"
    edge = _edge(tenant)
    await _until("the control stream", lambda: alice["id"] in edge.client_control.by_user)
    await tenant.call("POST", f"/api/v1/users/{alice['id']}/revoke-sessions")
    await _until("the pause", lambda: session.paused_reason)
    assert read_pause_files(files.directory)[0]["paused_reason"] == session.paused_reason
    # `limen client login` in another process, a second after the revocation (nbf is in
    # whole seconds): the running session picks it up without any flow trying.
    await asyncio.sleep(1.1)
    other = files.load()
    await asyncio.to_thread(_sign_in, other)
    files.save(other)
    await _until("the pause to end", lambda: not session.paused_reason)
    assert read_pause_files(files.directory) == []
    assert session.state.access_token == other.access_token
    assert await echo_roundtrip(session, echo.port) == b"ping"
    await session.close()


def _sign_in(state: ClientState) -> None:
    with auth.http_client(state) as http:
        auth.password_login(state, http, "alice", "correct horse battery")
