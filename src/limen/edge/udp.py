"""UDP flows at the edge.

A UDP flow is admitted exactly like a TCP flow (``Edge.handle_flow``: token, segment with
protocol ``udp``, assignment, connector), then relayed as bytes by the ordinary
:class:`~limen.net.relay.Relay`: the edge does not re-frame datagrams. It does *parse* the
capsules on the way (both directions), because:

* the traffic log counts datagrams each way (``datagrams_up`` / ``datagrams_down``), which
  only a parser can do;
* a DATAGRAM over the size limit (65,527 bytes of payload) or a malformed capsule ends the
  flow at the edge, before it costs the connector anything, with a clear code
  (``capsule_too_large``, ``capsule_malformed``, ``capsule_truncated``) in the traffic log.

Parsing happens in :class:`DatagramCounter`, which wraps the client's endpoint: what the relay
reads from it is the upstream, what the relay writes to it is the downstream.

Flood bound: at most :data:`MAX_UDP_FLOWS_PER_CONNECTION` UDP flows may be open on one client
connection; more are refused with ``429 too_many_udp_flows`` (TCP flows are not affected).
"""

from __future__ import annotations

import logging
from typing import Any

from limen.errors import RemoteProtocolError
from limen.net.endpoints import Buffer, Endpoint, Receiver
from limen.net.mux import MuxStream
from limen.net.udp import MAX_UDP_PAYLOAD
from limen.wire.capsule import DATAGRAM, CapsuleDecoder, decode_datagram

log = logging.getLogger(__name__)

#: A client needs one UDP flow per local 5-tuple; a thousand per connection (a client keeps
#: two) is far beyond a desktop's needs and bounds what one client can make the edge and the
#: connector hold (a socket and a stream each).
MAX_UDP_FLOWS_PER_CONNECTION = 1024
#: MuxStream.tag of a UDP flow's client stream.
UDP_TAG = "udp"


def too_many_udp_flows(endpoint: Endpoint, limit: int | None = None) -> bool:
    """Tag ``endpoint`` as a UDP flow; True (and untagged) when its connection already holds
    ``limit`` (default :data:`MAX_UDP_FLOWS_PER_CONNECTION`) open UDP flows. Plain one-flow
    connections are never over the limit."""
    if not isinstance(endpoint, MuxStream):
        return False
    if limit is None:
        limit = MAX_UDP_FLOWS_PER_CONNECTION
    open_udp = sum(1 for s in endpoint.conn.streams.values() if s.tag == UDP_TAG)
    if open_udp >= limit:
        return True
    endpoint.tag = UDP_TAG
    return False


class _Direction:
    """Counts one direction's datagrams; raises RemoteProtocolError on a bad capsule."""

    __slots__ = ("bytes", "datagrams", "decoder", "key", "record")

    def __init__(self, record: dict[str, Any], key: str) -> None:
        self.decoder = CapsuleDecoder()
        self.record = record
        self.key = key
        self.datagrams = 0
        self.bytes = 0
        record[key] = 0

    def feed(self, data: Buffer) -> None:
        for capsule in self.decoder.feed(bytes(data)):
            if capsule.type != DATAGRAM:
                continue
            _context, payload = decode_datagram(capsule)
            if len(payload) > MAX_UDP_PAYLOAD:
                raise RemoteProtocolError(
                    f"datagram of {len(payload)} bytes over {MAX_UDP_PAYLOAD}",
                    code="capsule_too_large",
                )
            self.datagrams += 1
            self.bytes += len(payload)
        self.record[self.key] = self.datagrams


class _CountingReceiver:
    """Sits between the client endpoint and the relay's receiver (upstream)."""

    __slots__ = ("counter", "inner")

    def __init__(self, counter: DatagramCounter, inner: Receiver) -> None:
        self.counter = counter
        self.inner = inner

    def on_data(self, data: Buffer) -> None:
        if self.counter.failed:
            return
        try:
            self.counter.up.feed(data)
        except RemoteProtocolError as exc:
            self.counter.fail(exc, "client")
            return
        self.inner.on_data(data)

    def on_eof(self) -> None:
        if self.counter.failed:
            return
        try:
            self.counter.up.decoder.feed_eof()
        except RemoteProtocolError as exc:
            self.counter.fail(exc, "client")
            return
        self.inner.on_eof()

    def on_closed(self, error: BaseException | None) -> None:
        self.inner.on_closed(error)

    def on_drained(self) -> None:
        self.inner.on_drained()


class DatagramCounter:
    """Wraps the client's endpoint of a UDP flow: counts datagrams each way into ``record``
    and ends the flow (through the relay, as an error) on a bad capsule either way."""

    def __init__(self, inner: Endpoint, record: dict[str, Any], initial_up: bytes = b"") -> None:
        self.inner = inner
        self.record = record
        self.up = _Direction(record, "datagrams_up")
        self.down = _Direction(record, "datagrams_down")
        self.failed = False
        self._receiver: Receiver | None = None
        self._pending_error: RemoteProtocolError | None = None
        if initial_up:
            try:
                self.up.feed(initial_up)
            except RemoteProtocolError as exc:
                self._pending_error = exc

    def fail(self, exc: RemoteProtocolError, side: str) -> None:
        """End the flow: the relay's receiver hears of an error, so it aborts both sides."""
        if self.failed:
            return
        self.failed = True
        log.info("udp flow %s: %s sent a bad capsule (%s)", self.record.get("flow_id"), side, exc)
        self.record["code"] = exc.code
        if self._receiver is not None:
            self._receiver.on_closed(exc)

    # Endpoint --------------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        return self.inner.full

    def attach(self, receiver: Receiver) -> None:
        self._receiver = receiver
        if self._pending_error is not None:
            self.fail(self._pending_error, "client")
            return
        self.inner.attach(_CountingReceiver(self, receiver))

    def write(self, data: Buffer) -> None:
        if self.failed:
            return
        try:
            self.down.feed(data)
        except RemoteProtocolError as exc:
            self.fail(exc, "connector")
            return
        self.inner.write(data)

    def write_eof(self) -> None:
        self.inner.write_eof()

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()

    def pause_reading(self) -> None:
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()
