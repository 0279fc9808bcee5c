"""The edge's end of clients' control streams: who is listening, and the claims challenge
sent to them when a user's access is revoked.

A client opens one control stream on each multiplexed connection (``GET
/.well-known/limen/control`` with ``Upgrade: limen-control`` and its bearer token, see
docs/protocol.md). The token is verified once, at open; the stream is then filed under the
verified user id, so a client that refreshes its token later keeps its control stream. On a
revocation the edge cuts the user's flows and then sends a ``claims_challenge`` on each of
that user's control streams: the client learns at once that it must sign in again, instead
of at its next flow.

Framing is wire/control.py's; this module only keeps the registry and reacts to messages.
A client that sends garbage on its control stream loses that stream only: its connection
and its flows are untouched.
"""

from __future__ import annotations

import logging
import time

from limen.edge.admission import claims_challenge
from limen.errors import AuthError, RemoteProtocolError
from limen.identity.tokens import TokenVerifier
from limen.metrics import PROTOCOL_ERRORS
from limen.net.endpoints import Buffer, Endpoint
from limen.net.mux import MuxStream
from limen.wire import connect as wire
from limen.wire.control import ClaimsChallenge, ControlReader, encode_control

log = logging.getLogger(__name__)

#: What the challenge's ``reason`` says when the edge cut a user's flows.
REVOKED_REASON = "access was revoked; sign in again"


class ClientControlRegistry:
    """Live client control streams by user id."""

    def __init__(self) -> None:
        self.by_user: dict[str, set[MuxStream]] = {}

    def __len__(self) -> int:
        return sum(len(streams) for streams in self.by_user.values())

    def open(
        self,
        endpoint: Endpoint,
        request: wire.FlowRequest,
        trailing: bytes,
        verifier: TokenVerifier,
        source: tuple[str, int],
    ) -> None:
        """Answer a control-stream head: 101 and register it, or refuse it (401 for a
        missing or bad token, 405 off a multiplexed connection)."""
        if not isinstance(endpoint, MuxStream):
            # A plain one-flow TLS connection has nowhere to keep a control stream.
            endpoint.write(
                wire.encode_refusal(
                    405, "method_not_allowed", "a control stream needs a limen/1 connection"
                )
            )
            endpoint.close()
            return
        token = request.bearer_token
        if token is None:
            self._refuse(endpoint, "missing_token", "no bearer token", 'Bearer realm="limen"')
            return
        try:
            claims = verifier.verify(token, time.time())
        except AuthError as exc:
            header = f'Bearer realm="limen", error="invalid_token", error_description="{exc.code}"'
            self._refuse(endpoint, exc.code, exc.message, header)
            return
        user_id = claims.sub
        endpoint.write(wire.encode_response(101, upgrade=wire.CONTROL_UPGRADE))
        self.by_user.setdefault(user_id, set()).add(endpoint)
        receiver = _ControlStream(self, user_id, endpoint, source)
        endpoint.attach(receiver)
        if trailing and not endpoint.closed:
            receiver.on_data(trailing)
        log.debug("client control stream of %s from %s:%d", user_id, *source)

    def _refuse(self, endpoint: Endpoint, code: str, message: str, header: str) -> None:
        PROTOCOL_ERRORS.labels(code).inc()
        endpoint.write(wire.encode_refusal(401, code, message, [("WWW-Authenticate", header)]))
        endpoint.close()

    def forget(self, user_id: str, stream: MuxStream) -> None:
        streams = self.by_user.get(user_id)
        if streams is None:
            return
        streams.discard(stream)
        if not streams:
            del self.by_user[user_id]

    def challenge(self, user_id: str, revoked_at: float, reason: str = REVOKED_REASON) -> int:
        """Send the claims challenge (``insufficient_claims`` with ``nbf`` = ``revoked_at``,
        as admission would answer a new flow) on every control stream of the user; how many
        streams it went to."""
        streams = [s for s in self.by_user.get(user_id, ()) if not s.closed]
        if not streams:
            return 0
        frame = encode_control(ClaimsChallenge(claims_challenge(revoked_at), reason))
        for stream in streams:
            stream.write(frame)
        log.info("sent a claims challenge to %d control streams of %s", len(streams), user_id)
        return len(streams)

    def close_all(self) -> None:
        for streams in list(self.by_user.values()):
            for stream in list(streams):
                stream.abort()
        self.by_user.clear()


class _ControlStream:
    """Receiver on one client control stream. Clients send nothing the edge acts on yet
    (a ``hello`` is read and ignored); bad framing resets this stream only."""

    def __init__(
        self,
        registry: ClientControlRegistry,
        user_id: str,
        stream: MuxStream,
        source: tuple[str, int],
    ) -> None:
        self.registry = registry
        self.user_id = user_id
        self.stream = stream
        self.source = source
        self.reader = ControlReader()
        stream.mark_background()  # heartbeats must not make bulk streams give way

    def on_data(self, data: Buffer) -> None:
        try:
            _messages, rejected = self.reader.feed(data)
        except RemoteProtocolError as exc:
            PROTOCOL_ERRORS.labels(exc.code).inc()
            log.warning(
                "client %s:%d sent a bad control frame (%s): closing its control stream",
                *self.source,
                exc.code,
            )
            self.registry.forget(self.user_id, self.stream)
            self.stream.abort()
            return
        for kind, error in rejected:  # a known type with bad members: skipped
            PROTOCOL_ERRORS.labels(error.code).inc()
            log.info("client %s:%d: bad %s control message", *self.source, kind)

    def on_eof(self) -> None:
        self.registry.forget(self.user_id, self.stream)
        self.stream.close()

    def on_closed(self, error: BaseException | None) -> None:
        self.registry.forget(self.user_id, self.stream)

    def on_drained(self) -> None:
        pass
