"""yamux sans-IO core: pair tests (two sessions linked in memory), peer misbehaviour, windows
and auto-tuning, incremental parsing, fuzzing."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limen.errors import LocalProtocolError, RemoteProtocolError
from limen.wire.yamux import (
    AUTOTUNE_INTERVAL,
    BULK_HORIZON,
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    GOAWAY_NORMAL,
    GOAWAY_PROTOCOL_ERROR,
    HEADER,
    HEADER_SIZE,
    INITIAL_WINDOW,
    INTERACTIVE_BUDGET_DIVISOR,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    DataReceived,
    Event,
    GoAwayReceived,
    PingReceived,
    PongReceived,
    SendWindowOpened,
    StreamEnded,
    StreamOpened,
    StreamReset,
    StreamState,
    YamuxSession,
)

KIB = 1024


# --- helpers ------------------------------------------------------------------------------


def frame(ftype: int, flags: int, stream_id: int, length: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(0, ftype, flags, stream_id, length) + payload


def data_frame(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return frame(TYPE_DATA, flags, stream_id, len(payload), payload)


def headers(raw: bytes) -> list[tuple[int, int, int, int, int]]:
    """Frame headers in a byte string produced by a session (payloads skipped)."""
    out = []
    pos = 0
    while pos < len(raw):
        version, ftype, flags, sid, length = HEADER.unpack_from(raw, pos)
        out.append((version, ftype, flags, sid, length))
        pos += HEADER_SIZE + (length if ftype == TYPE_DATA else 0)
    assert pos == len(raw)
    return out


def roundtrip(
    a: YamuxSession, b: YamuxSession, chunk: int | None = None
) -> tuple[list[Event], list[Event]]:
    """Shuttle bytes both ways until neither side has anything to send (aioquic style).
    Returns (events seen by a, events seen by b). ``chunk`` splits every transfer."""
    seen_a: list[Event] = []
    seen_b: list[Event] = []
    for _ in range(10_000):
        out_a = a.data_to_send()
        out_b = b.data_to_send()
        if not out_a and not out_b:
            return seen_a, seen_b
        seen_b += feed(b, out_a, chunk)
        seen_a += feed(a, out_b, chunk)
    raise AssertionError("sessions never went quiet")


def feed(session: YamuxSession, data: bytes, chunk: int | None = None) -> list[Event]:
    if not data:
        return []
    if chunk is None:
        return session.receive_data(data)
    events: list[Event] = []
    for pos in range(0, len(data), chunk):
        events += session.receive_data(data[pos : pos + chunk])
    return events


def payload(events: Sequence[Event], stream_id: int) -> bytes:
    return b"".join(
        bytes(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


def non_data(events: Sequence[Event]) -> list[Event]:
    return [e for e in events if not isinstance(e, DataReceived)]


def pair(**kwargs: int) -> tuple[YamuxSession, YamuxSession]:
    return YamuxSession(is_client=True, **kwargs), YamuxSession(is_client=False, **kwargs)


def expect_remote_error(session: YamuxSession, data: bytes, code: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        session.receive_data(data)
    assert info.value.code == code


# --- streams ------------------------------------------------------------------------------


def test_open_data_both_ways_fin_each_side_forgets_stream() -> None:
    client, server = pair()
    sid = client.open_stream()
    assert sid == 1
    assert client.send_data(sid, b"hello") == 5
    c_events, s_events = roundtrip(client, server)
    assert c_events == []
    assert non_data(s_events) == [StreamOpened(sid)]
    assert payload(s_events, sid) == b"hello"

    # The acceptor's first frame carries ACK (piggybacked), later ones do not.
    assert server.send_data(sid, b"world") == 5
    first = server.data_to_send()
    assert headers(first)[0][:4] == (0, TYPE_DATA, FLAG_ACK, sid)
    assert payload(client.receive_data(first), sid) == b"world"
    server.send_data(sid, b"!")
    assert headers(server.data_to_send())[0][2] == 0

    client.close_stream(sid)
    assert client.stream_state(sid) is StreamState.LOCAL_CLOSED
    _, s_events = roundtrip(client, server)
    assert s_events == [StreamEnded(sid)]
    assert server.stream_state(sid) is StreamState.REMOTE_CLOSED
    with pytest.raises(LocalProtocolError):
        client.send_data(sid, b"late")

    # Half-close: the server may still send after the client's FIN.
    server.send_data(sid, b"bye")
    server.close_stream(sid)
    c_events, _ = roundtrip(client, server)
    assert payload(c_events, sid) == b"bye"
    assert non_data(c_events) == [StreamEnded(sid)]
    for side in (client, server):
        assert side.stream_count == 0
        assert side.stream_state(sid) is StreamState.CLOSED
        assert side.send_window(sid) == 0
        assert side.receive_window(sid) == 0


def test_stream_ids_have_the_openers_parity() -> None:
    client, server = pair()
    assert [client.open_stream() for _ in range(3)] == [1, 3, 5]
    assert [server.open_stream() for _ in range(3)] == [2, 4, 6]
    c_events, s_events = roundtrip(client, server)
    assert c_events == [StreamOpened(2), StreamOpened(4), StreamOpened(6)]
    assert s_events == [StreamOpened(1), StreamOpened(3), StreamOpened(5)]
    assert client.stream_count == server.stream_count == 6


def test_data_may_follow_syn_in_the_same_read() -> None:
    client, server = pair()
    sid = client.open_stream()
    client.send_data(sid, b"x" * 100)
    client.close_stream(sid)
    events = server.receive_data(client.data_to_send())
    assert non_data(events) == [StreamOpened(sid), StreamEnded(sid)]
    assert payload(events, sid) == b"x" * 100


def test_fin_on_a_data_frame_and_repeated_fin_is_harmless() -> None:
    client, server = pair()
    sid = client.open_stream()
    roundtrip(client, server)
    events = server.receive_data(data_frame(sid, b"end", FLAG_FIN))
    assert payload(events, sid) == b"end"
    assert non_data(events) == [StreamEnded(sid)]
    assert server.receive_data(frame(TYPE_WINDOW_UPDATE, FLAG_FIN, sid, 0)) == []
    assert server.stream_state(sid) is StreamState.REMOTE_CLOSED


def test_reset_forgets_the_stream_on_both_sides() -> None:
    client, server = pair()
    sid = client.open_stream()
    client.send_data(sid, b"abc")
    roundtrip(client, server)
    server.reset_stream(sid)
    assert server.stream_count == 0
    assert headers(server.data_to_send()) == [(0, TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)]
    server.reset_stream(sid)  # already gone: nothing more to send
    assert not server.has_output()

    client2, server2 = pair()
    sid = client2.open_stream()
    roundtrip(client2, server2)
    server2.reset_stream(sid)
    c_events, _ = roundtrip(client2, server2)
    assert c_events == [StreamReset(sid)]
    assert client2.stream_count == 0
    with pytest.raises(LocalProtocolError):
        client2.send_data(sid, b"more")


def test_frames_for_forgotten_streams_are_ignored() -> None:
    client, server = pair()
    sid = client.open_stream()
    roundtrip(client, server)
    client.reset_stream(sid)
    roundtrip(client, server)
    assert client.stream_count == server.stream_count == 0
    # Frames the peer had in flight when it saw our RST: dropped silently, and the payload of
    # the dropped Data frame is skipped so the next frame parses.
    late = (
        data_frame(sid, b"in flight" * 100)
        + frame(TYPE_WINDOW_UPDATE, 0, sid, 4096)
        + frame(TYPE_WINDOW_UPDATE, FLAG_FIN, sid, 0)
        + frame(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)
        + frame(TYPE_PING, FLAG_SYN, 0, 77)
    )
    assert client.receive_data(late) == [PingReceived(77)]
    assert feed(server, late, chunk=7) == [PingReceived(77)]


def test_open_close_on_unknown_streams_is_a_no_op() -> None:
    client, _ = pair()
    client.close_stream(99)
    client.reset_stream(99)
    client.acknowledge(99, 1000)
    assert not client.has_output()
    assert client.send_data(client.open_stream(), b"") == 0
    with pytest.raises(LocalProtocolError):
        client.send_data(99, b"x")


# --- windows ------------------------------------------------------------------------------


def test_sender_stops_at_the_initial_window_until_acknowledged() -> None:
    client, server = pair()
    sid = client.open_stream()
    assert client.send_window(sid) == INITIAL_WINDOW
    blob = random.Random(1).randbytes(300 * KIB)
    assert client.send_data(sid, blob) == INITIAL_WINDOW
    assert client.send_window(sid) == 0
    assert client.send_data(sid, blob[INITIAL_WINDOW:]) == 0
    _, s_events = roundtrip(client, server)
    assert payload(s_events, sid) == blob[:INITIAL_WINDOW]

    # Half the window must be consumed before any window goes back.
    server.acknowledge(sid, INITIAL_WINDOW // 2 - 1)
    assert not server.has_output()
    server.acknowledge(sid, 1)
    update = server.data_to_send()
    assert headers(update) == [(0, TYPE_WINDOW_UPDATE, FLAG_ACK, sid, INITIAL_WINDOW // 2)]
    assert client.receive_data(update) == [SendWindowOpened(sid)]
    assert client.send_window(sid) == INITIAL_WINDOW // 2
    assert client.send_data(sid, blob[INITIAL_WINDOW:]) == len(blob) - INITIAL_WINDOW
    _, s_events = roundtrip(client, server)
    assert payload(s_events, sid) == blob[INITIAL_WINDOW:]


def test_window_update_on_an_unblocked_stream_emits_no_event() -> None:
    client, server = pair()
    sid = client.open_stream()
    client.send_data(sid, b"x" * (INITIAL_WINDOW // 2))
    roundtrip(client, server)
    server.acknowledge(sid, INITIAL_WINDOW // 2)
    c_events, _ = roundtrip(client, server)
    assert c_events == []  # the sender was not blocked
    assert client.send_window(sid) == INITIAL_WINDOW


def test_large_sends_are_split_into_max_frame_frames() -> None:
    client, server = pair(max_frame=1000)
    sid = client.open_stream()
    client.send_data(sid, b"y" * 2500)
    out = client.data_to_send()
    assert [h[4] for h in headers(out) if h[1] == TYPE_DATA] == [1000, 1000, 500]
    assert payload(server.receive_data(out), sid) == b"y" * 2500


def _pump(client: YamuxSession, server: YamuxSession, sid: int, now: float) -> tuple[int, int]:
    """Client fills its send window, server consumes everything at ``now``.
    Returns (bytes moved, server receive window afterwards)."""
    n = client.send_window(sid)
    assert client.send_data(sid, bytes(n)) == n
    _, s_events = roundtrip(client, server)
    assert len(payload(s_events, sid)) == n
    server.acknowledge(sid, n, now=now)
    roundtrip(client, server)
    return n, server.receive_window(sid)


def test_autotuning_doubles_on_fast_acknowledgements_up_to_max_window() -> None:
    max_window = 4 * INITIAL_WINDOW
    client, server = pair(max_window=max_window)
    sid = client.open_stream()
    roundtrip(client, server)
    step = AUTOTUNE_INTERVAL / 10
    windows = [_pump(client, server, sid, now=100.0 + i * step)[1] for i in range(8)]
    # First update has nothing to compare with; then 2x per fast update, capped.
    assert windows[0] == INITIAL_WINDOW
    assert windows[1:4] == [2 * INITIAL_WINDOW, 4 * INITIAL_WINDOW, 4 * INITIAL_WINDOW]
    assert set(windows[4:]) == {max_window}
    # The sender was granted exactly the grown window.
    assert client.send_window(sid) == max_window


def test_autotuning_does_not_grow_on_slow_acknowledgements() -> None:
    client, server = pair()
    sid = client.open_stream()
    roundtrip(client, server)
    for i in range(5):
        _, window = _pump(client, server, sid, now=100.0 + i * (AUTOTUNE_INTERVAL * 2))
        assert window == INITIAL_WINDOW
    assert client.send_window(sid) == INITIAL_WINDOW


# Rounds of bulk transfer: every stream moves a full window per round, rounds less than
# AUTOTUNE_INTERVAL apart (so each stream is window-limited, i.e. bulk). Enough rounds to
# run past BULK_HORIZON let shares settle after a change.
_ROUND = AUTOTUNE_INTERVAL * 0.8
_PAST_HORIZON = int(BULK_HORIZON / _ROUND) + 2


def _rounds(
    client: YamuxSession, server: YamuxSession, streams: Sequence[int], now: float, rounds: int
) -> float:
    for _ in range(rounds):
        now += _ROUND
        for sid in streams:
            _pump(client, server, sid, now)
    return now


def _budget_pair(budget: int) -> tuple[YamuxSession, YamuxSession]:
    """A pair whose bulk streams share ``budget``, which one stream alone may fill."""
    return pair(max_window=budget, receive_budget=budget)


def _open(client: YamuxSession, server: YamuxSession, count: int) -> list[int]:
    streams = [client.open_stream() for _ in range(count)]
    roundtrip(client, server)
    return streams


def _full_stream_and_three_newcomers(
    budget: int,
) -> tuple[YamuxSession, YamuxSession, int, list[int], float]:
    """One bulk stream that has grown to the whole budget, then three new streams."""
    client, server = _budget_pair(budget)
    [first] = _open(client, server, 1)
    now = _rounds(client, server, [first], 100.0, _PAST_HORIZON + 2)
    # Alone, one bulk stream grows to the whole budget.
    assert server.receive_window(first) == budget
    return client, server, first, _open(client, server, 3), now


def test_bulk_streams_share_the_receive_budget_and_the_sender_sees_each_share() -> None:
    budget = 8 * INITIAL_WINDOW
    client, server, first, others, now = _full_stream_and_three_newcomers(budget)
    streams = [first, *others]
    now = _rounds(client, server, streams, now, _PAST_HORIZON + 4)
    windows = [server.receive_window(sid) for sid in streams]
    # Four bulk streams: a quarter each; the first gave back what it had above its share.
    assert windows == [budget // 4] * 4
    # The sender's window is exactly what the receiver now grants: nothing lost or invented.
    assert [client.send_window(sid) for sid in streams] == windows

    # The others stop; once they are no longer bulk the first grows back to the budget.
    now += BULK_HORIZON * 2
    _rounds(client, server, [first], now, _PAST_HORIZON + 4)
    assert server.receive_window(first) == budget
    assert client.send_window(first) == budget


def test_an_active_interactive_stream_leaves_bulk_streams_a_fraction_of_the_budget() -> None:
    budget = 32 * INITIAL_WINDOW
    client, server = _budget_pair(budget)
    *bulk, typing = _open(client, server, 3)
    now = _rounds(client, server, bulk, 100.0, _PAST_HORIZON + 4)
    assert [server.receive_window(sid) for sid in bulk] == [budget // 2] * 2

    # A keystroke on the third stream; from the bulk streams' next updates on, they share
    # a fraction of the budget.
    client.send_data(typing, b"k")
    _, events = roundtrip(client, server)
    assert payload(events, typing) == b"k"
    server.acknowledge(typing, 1, now=now)
    now = _rounds(client, server, bulk, now, 3)
    reduced = budget // INTERACTIVE_BUDGET_DIVISOR // 2
    assert reduced > INITIAL_WINDOW
    assert [server.receive_window(sid) for sid in bulk] == [reduced] * 2
    assert [client.send_window(sid) for sid in bulk] == [reduced] * 2
    assert server.receive_window(typing) == INITIAL_WINDOW

    # Typing stops: past the horizon the bulk streams grow back to half the budget each.
    now = _rounds(client, server, bulk, now, _PAST_HORIZON + 4)
    assert [server.receive_window(sid) for sid in bulk] == [budget // 2] * 2

    # A closed interactive stream stops counting at once, without waiting for the horizon.
    client.send_data(typing, b"k")
    roundtrip(client, server)
    server.acknowledge(typing, 1, now=now)
    now = _rounds(client, server, bulk, now, 3)
    assert [server.receive_window(sid) for sid in bulk] == [reduced] * 2
    client.reset_stream(typing)
    roundtrip(client, server)
    _rounds(client, server, bulk, now, 4)
    assert [server.receive_window(sid) for sid in bulk] == [budget // 2] * 2


def test_a_background_stream_does_not_make_bulk_streams_give_way() -> None:
    budget = 32 * INITIAL_WINDOW
    client, server = _budget_pair(budget)
    *bulk, heartbeats = _open(client, server, 3)
    server.set_background(heartbeats)
    now = _rounds(client, server, bulk, 100.0, _PAST_HORIZON + 4)
    for _ in range(3):
        client.send_data(heartbeats, b"beat")
        roundtrip(client, server)
        server.acknowledge(heartbeats, 4, now=now)
        now = _rounds(client, server, bulk, now, 1)
    assert [server.receive_window(sid) for sid in bulk] == [budget // 2] * 2


def test_a_new_bulk_stream_does_not_slow_itself_down_as_interactive() -> None:
    budget = 32 * INITIAL_WINDOW
    client, server = _budget_pair(budget)
    [sid] = _open(client, server, 1)
    # Well within one horizon: its first half-window looked interactive, but once it is
    # known as bulk that no longer counts, so it doubles all the way.
    _rounds(client, server, [sid], 100.0, 7)
    assert server.receive_window(sid) == budget


def test_a_stream_over_its_share_shrinks_by_at_most_what_it_consumed() -> None:
    budget = 4 * INITIAL_WINDOW
    client, server, big, others, now = _full_stream_and_three_newcomers(budget)
    now = _rounds(client, server, others, now, 2)
    # The big stream fills its window; its consumer takes half, then the rest.
    assert client.send_data(big, bytes(budget)) == budget
    roundtrip(client, server)
    now += _ROUND
    server.acknowledge(big, budget // 2, now=now)
    assert not server.has_output()  # shrank by exactly what was consumed: nothing to grant
    assert server.receive_window(big) == budget // 2
    server.acknowledge(big, budget // 2, now=now)
    roundtrip(client, server)
    # Its share is the initial window (budget / 4 bulk streams, reduced further while the
    # others ramped up, never below the initial window).
    assert server.receive_window(big) == client.send_window(big) == INITIAL_WINDOW


def test_shares_never_drop_below_the_initial_window() -> None:
    client, server = pair(max_window=4 * INITIAL_WINDOW, receive_budget=INITIAL_WINDOW)
    streams = _open(client, server, 3)
    now = 100.0
    for _ in range(6):
        now += _ROUND
        for sid in streams:
            assert _pump(client, server, sid, now)[1] == INITIAL_WINDOW
    assert [client.send_window(sid) for sid in streams] == [INITIAL_WINDOW] * 3


def test_a_closed_bulk_stream_stops_taking_a_share() -> None:
    budget = 4 * INITIAL_WINDOW
    client, server = _budget_pair(budget)
    a, b = _open(client, server, 2)
    now = _rounds(client, server, [a, b], 100.0, _PAST_HORIZON + 4)
    assert server.receive_window(a) == server.receive_window(b) == budget // 2
    client.reset_stream(b)
    roundtrip(client, server)
    _rounds(client, server, [a], now, 3)
    assert server.receive_window(a) == budget


def test_larger_initial_window_is_announced_with_syn_and_ack() -> None:
    big = 4 * INITIAL_WINDOW
    client, server = pair(initial_window=big, max_window=big)
    sid = client.open_stream()
    roundtrip(client, server)
    assert client.send_window(sid) == big
    assert server.send_window(sid) == big
    assert client.send_data(sid, bytes(big + 1)) == big
    _, s_events = roundtrip(client, server)
    assert len(payload(s_events, sid)) == big


def test_window_settings_are_validated() -> None:
    with pytest.raises(LocalProtocolError):
        YamuxSession(is_client=True, initial_window=INITIAL_WINDOW - 1)
    with pytest.raises(LocalProtocolError):
        YamuxSession(is_client=True, initial_window=2 * INITIAL_WINDOW, max_window=INITIAL_WINDOW)
    with pytest.raises(LocalProtocolError):
        YamuxSession(is_client=True, max_window=2**32)


def test_data_beyond_the_window_is_a_protocol_error() -> None:
    client, server = pair()
    sid = client.open_stream()
    roundtrip(client, server)
    expect_remote_error(server, frame(TYPE_DATA, 0, sid, INITIAL_WINDOW + 1), "mux_window_exceeded")
    # Cumulative: two frames within the window each, beyond it together.
    client, server = pair()
    sid = client.open_stream()
    roundtrip(client, server)
    half = bytes(INITIAL_WINDOW // 2 + 1)
    server.receive_data(data_frame(sid, half))
    expect_remote_error(server, data_frame(sid, half), "mux_window_exceeded")


def test_window_overflow_is_a_protocol_error() -> None:
    client, server = pair()
    sid = client.open_stream()
    roundtrip(client, server)
    expect_remote_error(
        client, frame(TYPE_WINDOW_UPDATE, 0, sid, 2**32 - INITIAL_WINDOW), "mux_window_overflow"
    )


# --- peer misbehaviour --------------------------------------------------------------------


def test_syn_with_the_wrong_parity_is_a_protocol_error() -> None:
    client, server = pair()
    expect_remote_error(server, frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0), "mux_bad_stream")
    expect_remote_error(client, frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0), "mux_bad_stream")
    expect_remote_error(pair()[1], data_frame(4, b"x", FLAG_SYN), "mux_bad_stream")


def test_stream_frame_on_stream_zero_is_a_protocol_error() -> None:
    _, server = pair()
    expect_remote_error(server, data_frame(0, b"x"), "mux_bad_stream")
    expect_remote_error(pair()[1], frame(TYPE_WINDOW_UPDATE, 0, 0, 1), "mux_bad_stream")


def test_duplicate_syn_is_a_protocol_error() -> None:
    client, server = pair()
    sid = client.open_stream()
    roundtrip(client, server)
    expect_remote_error(server, frame(TYPE_WINDOW_UPDATE, FLAG_SYN, sid, 0), "mux_duplicate_stream")


def test_data_after_fin_is_a_protocol_error() -> None:
    client, server = pair()
    sid = client.open_stream()
    client.close_stream(sid)
    roundtrip(client, server)
    # An empty Data frame after FIN is tolerated; one with payload is not.
    assert server.receive_data(frame(TYPE_DATA, 0, sid, 0)) == []
    expect_remote_error(server, data_frame(sid, b"zombie"), "mux_data_after_fin")


def test_unknown_frame_type_and_bad_version_are_protocol_errors() -> None:
    expect_remote_error(pair()[1], frame(4, 0, 0, 0), "mux_bad_type")
    expect_remote_error(pair()[1], frame(255, 0, 1, 0), "mux_bad_type")
    expect_remote_error(pair()[1], HEADER.pack(1, TYPE_PING, FLAG_SYN, 0, 1), "mux_bad_version")


def test_max_streams_refuses_with_rst_not_a_connection_error() -> None:
    client, server = pair(max_streams=2)
    a = client.open_stream()
    b = client.open_stream()
    c = client.open_stream()
    client.send_data(c, b"refused payload is skipped")
    c_events, s_events = roundtrip(client, server)
    assert s_events == [StreamOpened(a), StreamOpened(b)]
    assert c_events == [StreamReset(c)]
    assert client.stream_count == server.stream_count == 2
    # The connection is fine: existing streams carry data, pings work.
    client.send_data(a, b"still here")
    client.ping(5)
    c_events, s_events = roundtrip(client, server)
    assert payload(s_events, a) == b"still here"
    assert c_events == [PongReceived(5)]
    # Once a stream closes there is room again.
    client.reset_stream(a)
    roundtrip(client, server)
    d = client.open_stream()
    _, s_events = roundtrip(client, server)
    assert s_events == [StreamOpened(d)]


# --- ping and go-away ---------------------------------------------------------------------


def test_ping_pong() -> None:
    client, server = pair()
    client.ping(0xDEADBEEF)
    assert headers(client.data_to_send()) == [(0, TYPE_PING, FLAG_SYN, 0, 0xDEADBEEF)]
    client.ping(2**32 + 7)  # the opaque value is 32 bits
    c_events, s_events = roundtrip(client, server)
    assert s_events == [PingReceived(7)]
    assert c_events == [PongReceived(7)]
    server.ping(1)
    c_events, s_events = roundtrip(client, server)
    assert (c_events, s_events) == ([PingReceived(1)], [PongReceived(1)])


def test_go_away() -> None:
    client, server = pair()
    sid = client.open_stream()
    roundtrip(client, server)
    client.go_away()
    client.go_away()  # idempotent
    assert headers(client.data_to_send()) == [(0, TYPE_GO_AWAY, 0, 0, GOAWAY_NORMAL)]
    assert client.go_away_sent
    assert server.receive_data(frame(TYPE_GO_AWAY, 0, 0, GOAWAY_NORMAL)) == [
        GoAwayReceived(GOAWAY_NORMAL)
    ]
    assert server.go_away_received
    with pytest.raises(LocalProtocolError):
        client.open_stream()
    with pytest.raises(LocalProtocolError):
        server.open_stream()
    # Existing streams keep working.
    server.send_data(sid, b"drain")
    c_events, _ = roundtrip(client, server)
    assert payload(c_events, sid) == b"drain"
    # A stream the peer opens after our GoAway is refused with RST.
    assert client.receive_data(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0)) == []
    assert headers(client.data_to_send()) == [(0, TYPE_WINDOW_UPDATE, FLAG_RST, 2, 0)]


def test_protocol_error_goaway() -> None:
    client, server = pair()
    with pytest.raises(RemoteProtocolError):
        client.receive_data(frame(9, 0, 0, 0))
    client.protocol_error_goaway()
    _, s_events = roundtrip(client, server)
    assert s_events == [GoAwayReceived(GOAWAY_PROTOCOL_ERROR)]


# --- incremental parsing ------------------------------------------------------------------


def _transcript() -> tuple[bytes, dict[int, bytes]]:
    """Bytes a client sends in a busy session, and the payload per stream."""
    client = YamuxSession(is_client=True, max_frame=3000)
    rng = random.Random(7)
    sent: dict[int, bytes] = {}
    for _ in range(3):
        sid = client.open_stream()
        blob = rng.randbytes(rng.randrange(1, 10_000))
        client.send_data(sid, blob)
        sent[sid] = blob
    client.ping(3)
    client.send_data(1, b"tail")
    sent[1] += b"tail"
    client.close_stream(3)
    client.reset_stream(5)
    client.go_away()
    return client.data_to_send(), sent


def test_byte_at_a_time_equals_whole_feeding() -> None:
    raw, sent = _transcript()
    whole = YamuxSession(is_client=False)
    bytewise = YamuxSession(is_client=False)
    events_whole = whole.receive_data(raw)
    events_bytes = feed(bytewise, raw, chunk=1)
    assert non_data(events_bytes) == non_data(events_whole)
    assert non_data(events_whole) == [
        StreamOpened(1),
        StreamOpened(3),
        StreamOpened(5),
        PingReceived(3),
        StreamEnded(3),
        StreamReset(5),
        GoAwayReceived(GOAWAY_NORMAL),
    ]
    for sid in (1, 3, 5):
        assert payload(events_bytes, sid) == payload(events_whole, sid) == sent[sid]
    assert bytewise.data_to_send() == whole.data_to_send()  # the same pong and ACKs


def test_big_frame_is_delivered_progressively() -> None:
    client, server = pair()
    sid = client.open_stream()
    roundtrip(client, server)
    blob = random.Random(3).randbytes(200 * KIB)
    raw = data_frame(sid, blob)
    assert server.receive_data(raw[:5]) == []  # not even a header yet
    got = bytearray()
    pos = 5
    while pos < len(raw):
        piece = raw[pos : pos + 4096]
        events = server.receive_data(piece)
        new = payload(events, sid)
        if pos + len(piece) > HEADER_SIZE:
            # Every read past the header hands over its bytes at once.
            assert new, f"no data delivered for the read at {pos}"
        got += new
        pos += len(piece)
    assert bytes(got) == blob


def test_whole_frame_in_one_chunk_is_zero_copy() -> None:
    client, server = pair()
    sid = client.open_stream()
    roundtrip(client, server)
    chunk = data_frame(sid, b"zero-copy")
    (event,) = server.receive_data(chunk)
    assert isinstance(event, DataReceived)
    assert isinstance(event.data, memoryview)
    assert event.data.obj is chunk
    assert bytes(event.data) == b"zero-copy"


def test_buffered_partial_header_is_copied_not_aliased() -> None:
    client, server = pair()
    sid = client.open_stream()
    roundtrip(client, server)
    raw = bytearray(data_frame(sid, b"abcdef"))
    events = server.receive_data(raw[:3]) + server.receive_data(raw[3:])
    raw[:] = bytes(len(raw))  # the caller reuses its buffer
    assert payload(events, sid) == b"abcdef"


# --- fuzzing ------------------------------------------------------------------------------


@given(st.binary(max_size=300), st.booleans(), st.integers(1, 40))
@settings(max_examples=400)
def test_random_bytes_only_raise_remote_protocol_error(
    raw: bytes, is_client: bool, chunk: int
) -> None:
    session = YamuxSession(is_client=is_client)
    session.open_stream()
    try:
        feed(session, raw, chunk)
    except RemoteProtocolError as exc:
        assert exc.code.startswith("mux_")


frames = st.builds(
    lambda v, t, f, sid, length, body: (
        HEADER.pack(v, t, f, sid, length) + (body[:length] if t == TYPE_DATA else b"")
    ),
    st.sampled_from([0, 0, 0, 1]),
    st.integers(0, 4),
    st.integers(0, 15),
    st.integers(0, 6),
    st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
    st.binary(max_size=64),
)


@given(st.lists(frames, max_size=20), st.booleans(), st.integers(1, 40))
@settings(max_examples=400)
def test_random_frames_only_raise_remote_protocol_error(
    raw_frames: list[bytes], is_client: bool, chunk: int
) -> None:
    session = YamuxSession(is_client=is_client, max_streams=3)
    session.open_stream()
    try:
        feed(session, b"".join(raw_frames), chunk)
    except RemoteProtocolError as exc:
        assert exc.code.startswith("mux_")
    session.data_to_send()


class _Side:
    """One end of the model: what it sent and received per stream, and data still pending."""

    def __init__(self, session: YamuxSession) -> None:
        self.session = session
        self.sent: dict[int, bytearray] = {}
        self.received: dict[int, bytearray] = {}
        self.pending: dict[int, bytes] = {}
        self.close_wanted: set[int] = set()
        self.reset: set[int] = set()

    def push(self, sid: int) -> None:
        data = self.pending.get(sid, b"")
        if data and self.session.stream_state(sid) in (StreamState.OPEN, StreamState.REMOTE_CLOSED):
            taken = self.session.send_data(sid, data)
            self.pending[sid] = data[taken:]
        if sid in self.close_wanted and not self.pending.get(sid):
            self.session.close_stream(sid)
            self.close_wanted.discard(sid)

    def on_events(self, events: list[Event], now: float) -> None:
        for event in events:
            if isinstance(event, DataReceived):
                self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
                self.session.acknowledge(event.stream_id, len(event.data), now=now)
            elif isinstance(event, StreamReset):
                self.reset.add(event.stream_id)
            elif isinstance(event, SendWindowOpened):
                self.push(event.stream_id)


def _exchange(a: _Side, b: _Side, chunk: int, now: float) -> None:
    for _ in range(10_000):
        for side in (a, b):
            for sid in list(side.pending):
                side.push(sid)
        out_a = a.session.data_to_send()
        out_b = b.session.data_to_send()
        if not out_a and not out_b:
            return
        b.on_events(feed(b.session, out_a, chunk), now)
        a.on_events(feed(a.session, out_b, chunk), now)
    raise AssertionError("never quiet")


operations = st.lists(
    st.tuples(
        st.sampled_from(["open", "send", "send", "send", "close", "reset", "exchange", "ping"]),
        st.booleans(),  # which side acts
        st.integers(0, 7),  # which of its known streams
        st.integers(1, 200_000),  # how many bytes
    ),
    max_size=30,
)


@given(operations, st.integers(1, 70_000), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_random_operations_never_lose_or_reorder_bytes(
    ops: list[tuple[str, bool, int, int]], chunk: int, seed: int
) -> None:
    rng = random.Random(seed)
    # A budget below two full windows makes bulk streams shrink as well as grow.
    limits = {"max_frame": 16 * KIB, "max_window": 1024 * KIB, "receive_budget": 1536 * KIB}
    a = _Side(YamuxSession(is_client=True, **limits))
    b = _Side(YamuxSession(is_client=False, **limits))
    streams: list[int] = []
    now = 1.0
    for op, first, index, size in ops:
        side = a if first else b
        now += 0.001
        if op == "open":
            streams.append(side.session.open_stream())
            continue
        if op == "exchange":
            _exchange(a, b, chunk, now)
            continue
        if op == "ping":
            side.session.ping(index)
            continue
        if not streams:
            continue
        sid = streams[index % len(streams)]
        state = side.session.stream_state(sid)
        if op == "send":
            if sid in side.close_wanted or state not in (
                StreamState.OPEN,
                StreamState.REMOTE_CLOSED,
            ):
                continue
            blob = rng.randbytes(size)
            side.sent.setdefault(sid, bytearray()).extend(blob)
            side.pending[sid] = side.pending.get(sid, b"") + blob
            side.push(sid)
        elif op == "close":
            side.close_wanted.add(sid)
            side.push(sid)
        elif op == "reset" and state is not StreamState.CLOSED:
            side.session.reset_stream(sid)
            side.reset.add(sid)
    _exchange(a, b, chunk, now)

    for sender, receiver in ((a, b), (b, a)):
        for sid, sent in sender.sent.items():
            received = bytes(receiver.received.get(sid, b""))
            assert sent.startswith(received), f"stream {sid}: bytes lost or reordered"
            if sid not in sender.reset and sid not in receiver.reset:
                assert received == bytes(sent), f"stream {sid}: bytes missing"


def test_reset_mid_frame_drops_the_rest_of_that_frame() -> None:
    client, server = pair()
    sid = client.open_stream()
    roundtrip(client, server)
    client.send_data(sid, bytes(10_000))
    client.ping(9)
    raw = client.data_to_send()
    assert len(payload(server.receive_data(raw[:5000]), sid)) == 5000 - HEADER_SIZE
    server.reset_stream(sid)
    # "Data in flight is dropped": the rest of the frame must not surface as events.
    assert server.receive_data(raw[5000:]) == [PingReceived(9)]
