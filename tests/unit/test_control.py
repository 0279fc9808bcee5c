"""Control-stream codec: length-prefixed JSON frames and typed control messages."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limen.errors import LocalProtocolError, RemoteProtocolError
from limen.wire.control import (
    MAX_CONTROL_MESSAGE,
    ClaimsChallenge,
    ControlDecoder,
    ControlMessage,
    ControlReader,
    Drain,
    Heartbeat,
    Hello,
    ProfileUpdate,
    UnknownControl,
    encode_control,
    parse_control,
)


def frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


TYPED: list[ControlMessage] = [
    Hello("connector", "con_abc", "0.1.0"),
    Hello("client", "dev_xyz", "0.1.0"),
    Heartbeat(3, 10_000, 20_000, 1, 1_700_000_000.25),
    Drain("edge shutting down"),
    Drain(""),
    ClaimsChallenge('Bearer error="insufficient_claims", claims="eyJ9"', "user disabled"),
    ProfileUpdate(7, {"segments": [{"fqdn": "*.corp", "ports": [443]}], "dns_suffixes": []}),
]


def test_known_answer_frame() -> None:
    wire = encode_control({"type": "drain", "reason": "bye"})
    assert wire == b'\x00\x00\x00\x1f{"type":"drain","reason":"bye"}'
    assert ControlDecoder().feed(wire) == [{"type": "drain", "reason": "bye"}]
    assert encode_control(Drain("bye")) == wire


@pytest.mark.parametrize("message", TYPED, ids=lambda m: type(m).__name__)
def test_typed_round_trip(message: ControlMessage) -> None:
    (decoded,) = ControlDecoder().feed(encode_control(message))
    assert parse_control(decoded) == message
    assert decoded == message.to_dict()


def test_non_ascii_is_utf8_on_the_wire() -> None:
    wire = encode_control(Drain("maintenance — Zürich"))
    assert "Zürich".encode() in wire
    assert ControlDecoder().feed(wire) == [{"type": "drain", "reason": "maintenance — Zürich"}]


def test_byte_at_a_time_equals_whole() -> None:
    wire = b"".join(encode_control(m) for m in TYPED)
    whole = ControlDecoder().feed(wire)
    dec = ControlDecoder()
    split = []
    for i in range(len(wire)):
        split += dec.feed(wire[i : i + 1])
    assert split == whole
    assert [parse_control(m) for m in split] == TYPED
    assert dec.buffered == 0
    dec.feed_eof()


def test_unknown_type_is_kept() -> None:
    raw = {"type": "network_changed", "address": "192.0.2.7", "extra": [1, 2]}
    (decoded,) = ControlDecoder().feed(encode_control(raw))
    parsed = parse_control(decoded)
    assert parsed == UnknownControl("network_changed", raw)
    assert parsed.to_dict() == raw
    assert encode_control(parsed) == encode_control(raw)


def test_unknown_fields_of_known_types_are_ignored() -> None:
    raw = {"type": "drain", "reason": "r", "deadline": 30}
    assert parse_control(raw) == Drain("r")


def test_heartbeat_accepts_integer_now() -> None:
    hb = parse_control(
        {"type": "heartbeat", "active_flows": 0, "bytes_up": 0, "bytes_down": 0}
        | {"dials_failed": 0, "now": 1_700_000_000}
    )
    assert isinstance(hb, Heartbeat)
    assert hb.now == 1_700_000_000.0
    assert isinstance(hb.now, float)


def test_typed_messages_are_hashable() -> None:
    assert len({Drain("a"), Drain("a"), ProfileUpdate(1, {"a": 1})}) == 2


def test_oversize_length_refused_without_buffering() -> None:
    dec = ControlDecoder(max_message=100)
    body = json.dumps({"type": "x", "pad": "p" * 70}).encode()
    assert len(body) <= 100
    assert dec.feed(frame(body)) == [json.loads(body)]
    with pytest.raises(RemoteProtocolError) as exc:
        dec.feed(struct.pack("!I", 101))  # just the prefix: refused before any body arrives
    assert exc.value.code == "control_too_large"
    assert dec.buffered == 0
    with pytest.raises(LocalProtocolError):
        dec.feed(b"more")


def test_default_cap() -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        ControlDecoder().feed(struct.pack("!I", MAX_CONTROL_MESSAGE + 1))
    assert exc.value.code == "control_too_large"
    with pytest.raises(RemoteProtocolError):
        ControlDecoder().feed(b"\xff\xff\xff\xff")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'"drain"',
        b"{}",
        b'{"type": 5}',
        b'{"type": ""}',
        b'{"type": null}',
        b'{"type": "drain", "type": "hello"}',  # duplicate names: parsers disagree on these
        b'{"type": "x", "n": NaN}',
        b'{"type": "x", "n": -Infinity}',
        b'{"type": "x", "n": 1e999}',
        b'{"type": "x", "s": "\xff"}',  # not UTF-8
        b'{"type": "x", "n": ' + b"9" * 5000 + b"}",  # beyond int() digit limit
        b"[" * 60_000 + b"]" * 60_000,  # deep nesting
        b'{"type": "x"} trailing',
    ],
)
def test_malformed_bodies(body: bytes) -> None:
    dec = ControlDecoder(max_message=200_000)
    with pytest.raises(RemoteProtocolError) as exc:
        dec.feed(frame(body))
    assert exc.value.code == "control_malformed"
    with pytest.raises(LocalProtocolError):
        dec.feed(b"")


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "hello", "role": "admin", "node_id": "n", "version": "1"},
        {"type": "hello", "role": "client", "node_id": "", "version": "1"},
        {"type": "hello", "role": "client", "node_id": "n"},
        {"type": "heartbeat", "active_flows": -1, "bytes_up": 0, "bytes_down": 0}
        | {"dials_failed": 0, "now": 1.0},
        {"type": "heartbeat", "active_flows": True, "bytes_up": 0, "bytes_down": 0}
        | {"dials_failed": 0, "now": 1.0},
        {"type": "heartbeat", "active_flows": 0, "bytes_up": 0.5, "bytes_down": 0}
        | {"dials_failed": 0, "now": 1.0},
        {"type": "heartbeat", "active_flows": 0, "bytes_up": 0, "bytes_down": 0}
        | {"dials_failed": 0, "now": "soon"},
        {"type": "heartbeat", "active_flows": 0, "bytes_up": 0, "bytes_down": 0}
        | {"dials_failed": 0, "now": 10**400},
        {"type": "drain", "reason": 3},
        {"type": "claims_challenge", "reason": "r"},
        {"type": "profile_update", "version": 1, "profile": []},
        {"type": "profile_update", "version": "1", "profile": {}},
        {"no_type": 1},
        {"type": 1},
    ],
)
def test_parse_control_rejects_bad_fields_as_remote(raw: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        parse_control(raw)
    assert exc.value.code == "control_malformed"


def test_local_construction_errors_are_local() -> None:
    with pytest.raises(LocalProtocolError):
        Hello("admin", "n", "1")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        Heartbeat(0, 0, 0, 0, float("nan"))
    with pytest.raises(LocalProtocolError):
        ProfileUpdate(-1, {})


@pytest.mark.parametrize(
    "message",
    [
        {},
        {"type": ""},
        {"type": 3},
        {"type": "x", "v": float("inf")},
        {"type": "x", "v": object()},
        {"type": "x", "s": "\ud800"},  # lone surrogate
    ],
)
def test_encode_refuses_bad_messages(message: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        encode_control(message)


def test_encode_size_cap() -> None:
    big = {"type": "x", "pad": "p" * MAX_CONTROL_MESSAGE}
    with pytest.raises(LocalProtocolError) as exc:
        encode_control(big)
    assert exc.value.code == "control_too_large"
    assert len(encode_control(big, max_message=2 * MAX_CONTROL_MESSAGE)) > MAX_CONTROL_MESSAGE


def test_eof_mid_frame_is_truncated() -> None:
    dec = ControlDecoder()
    assert dec.feed(encode_control(Drain("x"))[:-1]) == []
    with pytest.raises(RemoteProtocolError) as exc:
        dec.feed_eof()
    assert exc.value.code == "control_truncated"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
messages = st.builds(
    lambda kind, rest: {**rest, "type": kind},
    st.text(min_size=1, max_size=20),
    st.dictionaries(st.text(max_size=8), json_values, max_size=5),
)


@given(st.lists(messages, max_size=6), st.data())
def test_round_trip_any_split(msgs: list[dict[str, Any]], data: st.DataObject) -> None:
    wire = b"".join(encode_control(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=5)))
    dec = ControlDecoder()
    got: list[dict[str, Any]] = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        got += dec.feed(wire[prev:cut])
        prev = cut
    assert got == msgs
    for m in got:
        try:
            parsed = parse_control(m)
        except RemoteProtocolError:
            continue  # a known type with random fields; covered by the tests below
        if isinstance(parsed, UnknownControl):
            assert parsed.raw == m


@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_truncated_input_yields_no_extra_message_and_no_error(
    msgs: list[dict[str, Any]], data: st.DataObject
) -> None:
    head = b"".join(encode_control(m) for m in msgs[:-1])
    last = encode_control(msgs[-1])
    cut = data.draw(st.integers(0, len(last) - 1))
    dec = ControlDecoder()
    assert dec.feed(head + last[:cut]) == msgs[:-1]
    assert dec.buffered == cut


@given(st.binary(max_size=300), st.integers(1, 40))
@settings(max_examples=300)
def test_random_input_only_remote_errors(data: bytes, chunk: int) -> None:
    dec = ControlDecoder(max_message=200)
    try:
        for i in range(0, len(data), chunk):
            for message in dec.feed(data[i : i + chunk]):
                assert isinstance(message["type"], str)
                parse_control(message)
        dec.feed_eof()
    except RemoteProtocolError as exc:
        assert exc.code.startswith("control_")


@given(messages)
def test_parse_control_on_random_objects_only_remote_errors(message: dict[str, Any]) -> None:
    for kind in ("hello", "heartbeat", "drain", "claims_challenge", "profile_update"):
        try:
            parsed = parse_control({**message, "type": kind})
        except RemoteProtocolError as exc:
            assert exc.code == "control_malformed"
        else:
            assert parsed.to_dict()["type"] == kind


def test_reader_skips_a_malformed_message_and_keeps_the_stream() -> None:
    reader = ControlReader()
    beat = Heartbeat(active_flows=2, bytes_up=1, bytes_down=2, dials_failed=0, now=1.0)
    data = (
        encode_control(beat)
        + frame(json.dumps({"type": "heartbeat", "active_flows": "many"}).encode())
        + encode_control(Drain("maintenance"))
    )
    # Byte by byte: messages come out as their last byte arrives.
    messages: list[ControlMessage] = []
    rejected: list[tuple[str, RemoteProtocolError]] = []
    for i in range(len(data)):
        got, bad = reader.feed(data[i : i + 1])
        messages += got
        rejected += bad
    assert messages == [beat, Drain("maintenance")]
    assert [(kind, exc.code) for kind, exc in rejected] == [("heartbeat", "control_malformed")]


def test_reader_raises_on_broken_framing() -> None:
    with pytest.raises(RemoteProtocolError):
        ControlReader().feed(frame(b"not json"))
