"""yamux: a sans-IO stream multiplexer (HashiCorp's yamux ``spec.md``).

Rules this core keeps:

* A frame is a 12-byte header ``version(1) type(1) flags(2) stream_id(4) length(4)``, big
  endian, followed by ``length`` payload bytes for Data frames only. Version is always 0.
* Types: Data 0, WindowUpdate 1, Ping 2, GoAway 3. Flags: SYN 1, ACK 2, FIN 4, RST 8.
* The side that dialled the connection (``is_client``) opens odd stream ids, the other even.
  A stream is opened by a frame carrying SYN and acknowledged by a frame carrying ACK; data
  may follow SYN at once.
* Every stream starts with a 256 KiB receive window in each direction. A sender never sends
  more Data than the window the receiver has granted; the receiver grants more with
  WindowUpdate (length = delta). Data beyond the window is a protocol error.
* Extension (compatible with the spec): the receive window grows by auto-tuning. When a
  stream consumes its window quickly (two window updates within ``AUTOTUNE_INTERVAL``
  seconds), the window doubles, up to ``max_window``, so one bulk stream can fill a long, fat
  link while an interactive stream keeps a small window. ``now`` is passed in; this core never
  reads the clock.
* Extension: a receive budget per connection. Streams that have needed a bigger window
  within the last ``BULK_HORIZON`` seconds ("bulk" streams) share ``receive_budget`` equally:
  each grows only up to its share (never below the initial window), and a stream above its
  share is brought down by returning less window than it consumed (never a negative
  update). One bulk stream alone still reaches ``max_window``; four share the budget instead
  of queueing four full windows in the shared socket buffers, ahead of everyone else's
  frames. While any other stream has received data within ``BULK_HORIZON`` (someone is
  typing), the bulk streams share an eighth of the budget, so that stream's frames wait
  behind less (a new stream counts as such until it shows itself bulk). The shell sets the
  budget from the connection's measured round trip.
* Ping: SYN = request, ACK = response, the length field carries an opaque value. GoAway:
  the length field is the reason (0 normal, 1 protocol error, 2 internal error).

Data frames are delivered as they arrive, before a whole frame is buffered, so a large frame
costs no extra latency or memory. When a whole frame sits in one ``receive_data`` chunk its
payload is delivered as a zero-copy ``memoryview`` of that chunk.

Peer misbehaviour raises :class:`~limen.errors.RemoteProtocolError`; the caller answers it by
sending GoAway (``protocol_error_goaway``) and closing the connection. Misuse by our own code
raises :class:`~limen.errors.LocalProtocolError`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from limen.errors import LocalProtocolError, RemoteProtocolError

VERSION = 0
HEADER = struct.Struct(">BBHII")
HEADER_SIZE = HEADER.size

TYPE_DATA = 0
TYPE_WINDOW_UPDATE = 1
TYPE_PING = 2
TYPE_GO_AWAY = 3

FLAG_SYN = 0x1
FLAG_ACK = 0x2
FLAG_FIN = 0x4
FLAG_RST = 0x8

GOAWAY_NORMAL = 0
GOAWAY_PROTOCOL_ERROR = 1
GOAWAY_INTERNAL_ERROR = 2

#: The spec's initial per-stream window.
INITIAL_WINDOW = 256 * 1024
#: Auto-tuning stops here. 4 MiB lets one stream fill ~670 Mbit/s at 50 ms RTT (1.7 Gbit/s
#: at 20 ms) and bounds what it can queue ahead of other streams in shared socket buffers:
#: measured with four bulk flows (docs/performance.md), 16 MiB let an interactive round trip
#: reach ~100 ms at p50 and ~270 ms at p99, 4 MiB ~70 and ~150 ms, for ~2% of single-flow
#: throughput (OpenSSH's channel window is 2 MiB).
DEFAULT_MAX_WINDOW = 4 * 1024 * 1024
#: Largest Data frame we send. Big frames mean few headers and few Python calls per byte;
#: 256 KiB still lets an interactive frame through within ~0.1 ms at loopback speeds.
DEFAULT_MAX_FRAME = 256 * 1024
#: Two window updates closer than this mean the window, not the network, limits the stream.
AUTOTUNE_INTERVAL = 0.05
#: What all bulk streams of a connection may have granted between them by default (see
#: :attr:`YamuxSession.receive_budget`). Every byte granted can sit in a first-in first-out
#: socket buffer ahead of an interactive stream's frame: measured with four bulk flows on
#: loopback (docs/performance.md), four 4 MiB windows made a 1-byte round trip wait
#: ~110 ms at p50, four 1 MiB windows ~43 ms, four 256 KiB ones ~14 ms.
DEFAULT_RECEIVE_BUDGET = 4 * 1024 * 1024
#: A stream counts as bulk for this long after it last needed a bigger window; another
#: stream counts as interactive for this long after it last received data.
BULK_HORIZON = 0.5
#: While an interactive stream is active on the connection, the bulk streams share only
#: this fraction of the budget (1/8): what they have in flight is what its frames wait
#: behind. Measured with four bulk flows beside a typing-paced one (docs/performance.md):
#: 1/4 gave a round trip of ~32 ms at p50, 1/8 ~20 ms, for the same bulk rate.
INTERACTIVE_BUDGET_DIVISOR = 8
# The map of recently active streams is pruned of stale entries when it outgrows this, and
# then when it outgrows twice its live size (amortised constant time per update).
_RECENT_PRUNE_AT = 64
#: A peer may hold at most this many streams open on one connection; beyond it, new streams
#: are refused with RST (not a connection error) so one client cannot exhaust an edge.
DEFAULT_MAX_STREAMS = 16_384
_MAX_WINDOW_VALUE = 2**32 - 1


class StreamState(enum.Enum):
    OPEN = "open"
    LOCAL_CLOSED = "local_closed"  # we sent FIN
    REMOTE_CLOSED = "remote_closed"  # peer sent FIN
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Payload for a stream. Call :meth:`YamuxSession.acknowledge` once it is consumed."""

    stream_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent FIN: it will send no more data on this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer reset the stream (or refused to open it)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class SendWindowOpened:
    """The peer granted more window: blocked data may be sent."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    opaque: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    opaque: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    code: int


Event = (
    StreamOpened
    | DataReceived
    | StreamEnded
    | StreamReset
    | SendWindowOpened
    | PingReceived
    | PongReceived
    | GoAwayReceived
)


class _Stream:
    __slots__ = (
        "acked",
        "background",
        "last_update_at",
        "recv_available",
        "recv_window",
        "send_window",
        "state",
        "unacked",
    )

    def __init__(self, window: int) -> None:
        self.state = StreamState.OPEN
        self.send_window = INITIAL_WINDOW
        #: The window we currently grant; grows by auto-tuning.
        self.recv_window = window
        #: How many more bytes the peer may send before our next update.
        self.recv_available = window
        #: Bytes delivered and consumed but not yet returned to the peer as window.
        self.unacked = 0
        #: Whether the peer has seen our ACK/SYN (we piggyback it on the first frame).
        self.acked = False
        self.last_update_at = -1.0
        #: Never counts as interactive (control traffic such as heartbeats).
        self.background = False


class YamuxSession:
    """One side of a yamux connection: feed it bytes, get events; call methods, drain
    :meth:`data_to_send`."""

    def __init__(
        self,
        *,
        is_client: bool,
        max_window: int = DEFAULT_MAX_WINDOW,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_streams: int = DEFAULT_MAX_STREAMS,
        initial_window: int = INITIAL_WINDOW,
        receive_budget: int = DEFAULT_RECEIVE_BUDGET,
    ) -> None:
        if not INITIAL_WINDOW <= initial_window <= max_window <= _MAX_WINDOW_VALUE:
            raise LocalProtocolError("windows must satisfy 256 KiB <= initial <= max < 4 GiB")
        self.is_client = is_client
        self.max_window = max_window
        self.max_frame = max_frame
        self.max_streams = max_streams
        self.initial_window = initial_window
        #: What the bulk streams may have granted between them; each gets an equal share.
        #: The shell may change it at any time (e.g. from the measured round trip).
        self.receive_budget = receive_budget
        # Bulk streams: stream id -> when it last needed a bigger window.
        self._bulk: dict[int, float] = {}
        # Streams that are not bulk -> when they last received data. A stream that turns
        # out to be bulk (a new one ramping up) stops counting as soon as it is known as such.
        self._recent: dict[int, float] = {}
        self._recent_limit = _RECENT_PRUNE_AT
        self._next_id = 1 if is_client else 2
        self._streams: dict[int, _Stream] = {}
        self._out: list[bytes | memoryview] = []
        self._in = bytearray()
        # Payload still to come for the Data frame being received.
        self._data_sid = 0
        self._data_left = 0
        self._data_flags = 0
        self._data_known = False
        self.go_away_sent = False
        self.go_away_received = False

    # --- inspection ---------------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def send_window(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.send_window if stream is not None else 0

    def receive_window(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.recv_window if stream is not None else 0

    def is_background(self, stream_id: int) -> bool:
        stream = self._streams.get(stream_id)
        return stream is not None and stream.background

    def stream_state(self, stream_id: int) -> StreamState:
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else StreamState.CLOSED

    def has_output(self) -> bool:
        return bool(self._out)

    # --- output -------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued for the peer, in order; empties the queue."""
        if not self._out:
            return b""
        out = self._out
        self._out = []
        if len(out) == 1:
            return bytes(out[0])
        return b"".join(out)

    def _frame(self, ftype: int, flags: int, stream_id: int, length: int) -> None:
        self._out.append(HEADER.pack(VERSION, ftype, flags, stream_id, length))

    # --- commands -----------------------------------------------------------------------

    def open_stream(self) -> int:
        """Open a new stream; returns its id. SYN goes out at once with our window."""
        if self.go_away_sent or self.go_away_received:
            raise LocalProtocolError("connection is going away")
        stream_id = self._next_id
        self._next_id += 2
        if self._next_id > 0xFFFFFFFF:
            raise LocalProtocolError("stream ids exhausted")
        stream = _Stream(self.initial_window)
        stream.acked = True
        self._streams[stream_id] = stream
        self._frame(TYPE_WINDOW_UPDATE, FLAG_SYN, stream_id, self.initial_window - INITIAL_WINDOW)
        return stream_id

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as the send window allows; returns how many bytes were
        taken. The caller keeps the rest until :class:`SendWindowOpened`."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state in (StreamState.LOCAL_CLOSED, StreamState.CLOSED):
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        total = len(data)
        if total == 0:
            return 0
        allowed = min(total, stream.send_window)
        if allowed <= 0:
            return 0
        flags = self._take_ack_flag(stream)
        view = memoryview(data)
        sent = 0
        while sent < allowed:
            chunk = min(allowed - sent, self.max_frame)
            self._out.append(HEADER.pack(VERSION, TYPE_DATA, flags, stream_id, chunk))
            self._out.append(view[sent : sent + chunk])
            flags = 0
            sent += chunk
        stream.send_window -= allowed
        return allowed

    def _take_ack_flag(self, stream: _Stream) -> int:
        if stream.acked:
            return 0
        stream.acked = True
        return FLAG_ACK

    def acknowledge(self, stream_id: int, nbytes: int, now: float = 0.0) -> None:
        """The application consumed ``nbytes`` of this stream's data: return window to the
        peer once half the window is consumed (fewer, larger updates)."""
        stream = self._streams.get(stream_id)
        if stream is None or nbytes <= 0:
            return
        stream.unacked += nbytes
        if not stream.background and stream_id not in self._bulk:
            recent = self._recent
            recent[stream_id] = now
            if len(recent) > self._recent_limit:
                self._prune_recent(now)
        if stream.unacked < stream.recv_window // 2:
            return
        delta = stream.unacked
        window = stream.recv_window
        window_limited = (
            now > 0
            and stream.last_update_at >= 0
            and now - stream.last_update_at < AUTOTUNE_INTERVAL
        )
        if window_limited:
            self._bulk[stream_id] = now
        if stream_id in self._bulk:
            share = self._bulk_share(now)
            if window_limited and window < share:
                window = min(window * 2, share)
            elif window > share:
                # Shrink by at most what was consumed, so the update is never negative.
                window = max(share, window - stream.unacked)
            delta += window - stream.recv_window
            stream.recv_window = window
        stream.last_update_at = now
        stream.unacked = 0
        stream.recv_available += delta
        if stream.state is StreamState.REMOTE_CLOSED or (delta == 0 and stream.acked):
            return  # nothing to grant, or the peer sends nothing more
        self._frame(TYPE_WINDOW_UPDATE, self._take_ack_flag(stream), stream_id, delta)

    def _is_stale(self, stream_id: int, seen: float, now: float) -> bool:
        return (
            now - seen > BULK_HORIZON or stream_id in self._bulk or stream_id not in self._streams
        )

    def _interactive(self, now: float) -> bool:
        """Whether a stream that is not bulk received data within the horizon. Scans from
        the oldest entry and stops at the first live one, dropping stale ones on the way."""
        recent = self._recent
        stale: list[int] = []
        found = False
        for stream_id, seen in recent.items():
            if not self._is_stale(stream_id, seen, now):
                found = True
                break
            stale.append(stream_id)
        for stream_id in stale:
            del recent[stream_id]
        return found

    def _prune_recent(self, now: float) -> None:
        # Amortised: the next full prune waits until the map has doubled again.
        self._recent = {
            sid: seen for sid, seen in self._recent.items() if not self._is_stale(sid, seen, now)
        }
        self._recent_limit = max(_RECENT_PRUNE_AT, 2 * len(self._recent))

    def _bulk_share(self, now: float) -> int:
        """Each bulk stream's share of the receive budget (of an eighth of it while an
        interactive stream is active); forgets streams that are closed or have not needed a
        bigger window for ``BULK_HORIZON`` seconds."""
        streams = self._streams
        stale = [
            sid
            for sid, seen in self._bulk.items()
            if now - seen > BULK_HORIZON or sid not in streams
        ]
        for sid in stale:
            del self._bulk[sid]
        budget = self.receive_budget
        if self._interactive(now):
            budget //= INTERACTIVE_BUDGET_DIVISOR
        share = budget // max(1, len(self._bulk))
        return max(self.initial_window, min(self.max_window, share))

    def set_background(self, stream_id: int) -> None:
        """Data on this stream never makes the bulk streams give way (see the receive
        budget): for periodic control traffic, which no one waits on interactively."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.background = True

    def close_stream(self, stream_id: int) -> None:
        """Half-close: send FIN. The stream is forgotten once both sides have closed."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if stream.state in (StreamState.LOCAL_CLOSED, StreamState.CLOSED):
            return
        self._frame(TYPE_WINDOW_UPDATE, self._take_ack_flag(stream) | FLAG_FIN, stream_id, 0)
        if stream.state is StreamState.REMOTE_CLOSED:
            stream.state = StreamState.CLOSED
            del self._streams[stream_id]
        else:
            stream.state = StreamState.LOCAL_CLOSED

    def reset_stream(self, stream_id: int) -> None:
        """Abort a stream at once (RST); its data in flight is dropped."""
        if self._streams.pop(stream_id, None) is None:
            return
        if self._data_sid == stream_id:
            # Reset between two reads of one Data frame: skip the rest of its payload too.
            self._data_known = False
        self._frame(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)

    def ping(self, opaque: int) -> None:
        self._frame(TYPE_PING, FLAG_SYN, 0, opaque & 0xFFFFFFFF)

    def go_away(self, code: int = GOAWAY_NORMAL) -> None:
        if self.go_away_sent:
            return
        self.go_away_sent = True
        self._frame(TYPE_GO_AWAY, 0, 0, code)

    def protocol_error_goaway(self) -> None:
        """Queue GoAway(protocol error); the caller then flushes and closes."""
        self.go_away(GOAWAY_PROTOCOL_ERROR)

    # --- input --------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer; returns the events they complete."""
        events: list[Event] = []
        if not data:
            return events
        if self._in:
            self._in += data
            buf: bytes | bytearray = self._in
            zero_copy = False
        else:
            buf = data if isinstance(data, bytes) else bytes(data)
            zero_copy = True
        view = memoryview(buf)
        pos = 0
        end = len(buf)
        try:
            while pos < end:
                if self._data_left:
                    take = min(self._data_left, end - pos)
                    self._deliver(view[pos : pos + take], zero_copy, events)
                    pos += take
                    self._data_left -= take
                    if self._data_left == 0:
                        self._finish_data_frame(events)
                    continue
                if end - pos < HEADER_SIZE:
                    break
                version, ftype, flags, stream_id, length = HEADER.unpack_from(buf, pos)
                pos += HEADER_SIZE
                if version != VERSION:
                    raise RemoteProtocolError(
                        f"unsupported yamux version {version}", code="mux_bad_version"
                    )
                if ftype == TYPE_DATA:
                    self._start_data_frame(flags, stream_id, length, events)
                    if length == 0:
                        self._finish_data_frame(events)
                elif ftype == TYPE_WINDOW_UPDATE:
                    self._on_window_update(flags, stream_id, length, events)
                elif ftype == TYPE_PING:
                    self._on_ping(flags, length, events)
                elif ftype == TYPE_GO_AWAY:
                    self.go_away_received = True
                    events.append(GoAwayReceived(length))
                else:
                    raise RemoteProtocolError(
                        f"unknown yamux frame type {ftype}", code="mux_bad_type"
                    )
        finally:
            view.release()
        if pos < end:
            rest = buf[pos:]
            if self._in:
                del self._in[:pos]
            else:
                self._in = bytearray(rest)
        elif self._in:
            self._in = bytearray()
        return events

    def _deliver(self, payload: memoryview, zero_copy: bool, events: list[Event]) -> None:
        if not self._data_known or not payload:
            return
        data: bytes | memoryview = payload if zero_copy else payload.tobytes()
        events.append(DataReceived(self._data_sid, data))

    def _start_data_frame(
        self, flags: int, stream_id: int, length: int, events: list[Event]
    ) -> None:
        stream = self._on_flags_open(flags, stream_id, events)
        self._data_sid = stream_id
        self._data_flags = flags
        self._data_left = length
        self._data_known = stream is not None
        if stream is None:
            return
        if stream.state in (StreamState.REMOTE_CLOSED, StreamState.CLOSED) and length:
            raise RemoteProtocolError(
                f"data on stream {stream_id} after FIN", code="mux_data_after_fin"
            )
        if length > stream.recv_available:
            raise RemoteProtocolError(
                f"stream {stream_id} exceeded its receive window "
                f"({length} > {stream.recv_available})",
                code="mux_window_exceeded",
            )
        stream.recv_available -= length

    def _finish_data_frame(self, events: list[Event]) -> None:
        flags = self._data_flags
        stream_id = self._data_sid
        self._data_flags = 0
        if self._data_known:
            self._on_flags_close(flags, stream_id, events)
        self._data_known = False

    def _on_window_update(
        self, flags: int, stream_id: int, delta: int, events: list[Event]
    ) -> None:
        stream = self._on_flags_open(flags, stream_id, events)
        if stream is None:
            return
        if delta:
            was_blocked = stream.send_window <= 0
            stream.send_window += delta
            if stream.send_window > _MAX_WINDOW_VALUE:
                raise RemoteProtocolError(
                    f"stream {stream_id} window overflow", code="mux_window_overflow"
                )
            if was_blocked:
                events.append(SendWindowOpened(stream_id))
        self._on_flags_close(flags, stream_id, events)

    def _on_flags_open(self, flags: int, stream_id: int, events: list[Event]) -> _Stream | None:
        """Handle SYN/ACK/RST; return the stream the frame applies to, or None to ignore it
        (frames for streams we already forgot, e.g. after our RST, are dropped silently as
        the spec allows)."""
        if stream_id == 0:
            raise RemoteProtocolError("stream frame on stream 0", code="mux_bad_stream")
        if flags & FLAG_SYN:
            if (stream_id % 2 == 1) == self.is_client:
                raise RemoteProtocolError(
                    f"peer opened stream {stream_id} of the wrong parity", code="mux_bad_stream"
                )
            if stream_id in self._streams:
                raise RemoteProtocolError(
                    f"peer reopened live stream {stream_id}", code="mux_duplicate_stream"
                )
            if len(self._streams) >= self.max_streams or self.go_away_sent:
                self._frame(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)
                return None
            stream = _Stream(self.initial_window)
            self._streams[stream_id] = stream
            if self.initial_window > INITIAL_WINDOW:
                stream.acked = True
                self._frame(
                    TYPE_WINDOW_UPDATE,
                    FLAG_ACK,
                    stream_id,
                    self.initial_window - INITIAL_WINDOW,
                )
            events.append(StreamOpened(stream_id))
            return stream
        existing = self._streams.get(stream_id)
        if existing is None:
            return None
        if flags & FLAG_RST:
            del self._streams[stream_id]
            events.append(StreamReset(stream_id))
            return None
        return existing

    def _on_flags_close(self, flags: int, stream_id: int, events: list[Event]) -> None:
        if not flags & FLAG_FIN:
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if stream.state is StreamState.OPEN:
            stream.state = StreamState.REMOTE_CLOSED
        elif stream.state is StreamState.LOCAL_CLOSED:
            stream.state = StreamState.CLOSED
            del self._streams[stream_id]
        else:
            return  # a repeated FIN is harmless
        events.append(StreamEnded(stream_id))

    def _on_ping(self, flags: int, opaque: int, events: list[Event]) -> None:
        if flags & FLAG_SYN:
            self._frame(TYPE_PING, FLAG_ACK, 0, opaque)
            events.append(PingReceived(opaque))
        elif flags & FLAG_ACK:
            events.append(PongReceived(opaque))
