"""Capsule Protocol codec (RFC 9297) and QUIC varints (RFC 9000 §16)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limen.errors import LocalProtocolError, RemoteProtocolError
from limen.wire.capsule import (
    DATAGRAM,
    MAX_CAPSULE,
    MAX_VARINT,
    Capsule,
    CapsuleDecoder,
    decode_datagram,
    decode_varint,
    encode_capsule,
    encode_datagram,
    encode_varint,
)

# RFC 9000 Appendix A.1, "Sample Variable-Length Integer Decoding".
RFC9000_VECTORS = [
    ("c2197c5eff14e88c", 151288809941952652),
    ("9d7f3e7d", 494878333),
    ("7bbd", 15293),
    ("25", 37),
]


@pytest.mark.parametrize(("hexstr", "value"), RFC9000_VECTORS)
def test_varint_rfc9000_vectors(hexstr: str, value: int) -> None:
    raw = bytes.fromhex(hexstr)
    assert decode_varint(raw) == (value, len(raw))
    assert encode_varint(value) == raw  # the RFC's samples are all minimal


def test_varint_non_minimal_is_accepted() -> None:
    # RFC 9000 A.1: "the two-byte sequence 0x40 0x25 also decodes to 37".
    assert decode_varint(bytes.fromhex("4025")) == (37, 2)
    assert decode_varint(bytes.fromhex("c000000000000025")) == (37, 8)


@pytest.mark.parametrize(
    ("value", "size"),
    [(0, 1), (63, 1), (64, 2), (16383, 2), (16384, 4), (2**30 - 1, 4), (2**30, 8), (MAX_VARINT, 8)],
)
def test_varint_sizes_at_boundaries(value: int, size: int) -> None:
    raw = encode_varint(value)
    assert len(raw) == size
    assert decode_varint(raw) == (value, size)


@pytest.mark.parametrize("bad", [-1, MAX_VARINT + 1, True])
def test_varint_out_of_range_is_local(bad: int) -> None:
    with pytest.raises(LocalProtocolError):
        encode_varint(bad)


def test_decode_varint_truncated_and_offset() -> None:
    assert decode_varint(b"") is None
    assert decode_varint(bytes.fromhex("9d7f3e")) is None
    assert decode_varint(b"\xff\x25", 1) == (37, 2)
    assert decode_varint(b"\x25", 1) is None


@given(st.integers(0, MAX_VARINT))
def test_varint_round_trip(value: int) -> None:
    raw = encode_varint(value)
    assert decode_varint(raw + b"tail") == (value, len(raw))


def test_capsule_known_answer() -> None:
    assert encode_capsule(0x00, b"abc") == b"\x00\x03abc"
    assert encode_datagram(b"dns") == b"\x00\x04\x00dns"
    assert encode_capsule(0x2D, b"") == b"\x2d\x00"
    # A type that needs a 4-byte varint, value of 64 bytes (2-byte length).
    assert encode_capsule(0x12345, b"x" * 64) == bytes.fromhex("80012345") + b"\x40\x40" + b"x" * 64


def test_datagram_round_trip_through_decoder() -> None:
    dec = CapsuleDecoder()
    wire = encode_datagram(b"one") + encode_capsule(0x1234, b"ext") + encode_datagram(b"", 2)
    capsules = dec.feed(wire)
    assert capsules == [
        Capsule(DATAGRAM, b"\x00one"),
        Capsule(0x1234, b"ext"),  # unknown type surfaced, not an error
        Capsule(DATAGRAM, b"\x02"),
    ]
    assert decode_datagram(capsules[0]) == (0, b"one")
    assert decode_datagram(capsules[2]) == (2, b"")
    with pytest.raises(LocalProtocolError):
        decode_datagram(capsules[1])
    assert dec.buffered == 0
    dec.feed_eof()  # clean end


def test_decode_datagram_without_context_id_is_remote() -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        decode_datagram(Capsule(DATAGRAM, b""))
    assert exc.value.code == "capsule_malformed"
    with pytest.raises(RemoteProtocolError):
        decode_datagram(Capsule(DATAGRAM, b"\x40"))  # 2-byte varint cut short


def test_byte_at_a_time_equals_whole() -> None:
    wire = b"".join(encode_datagram(bytes([i]) * i) for i in range(70)) + encode_capsule(
        2**40, b"z" * 300
    )
    whole = CapsuleDecoder().feed(wire)
    dec = CapsuleDecoder()
    split = []
    for i in range(len(wire)):
        split += dec.feed(wire[i : i + 1])
    assert split == whole
    assert len(whole) == 71
    assert whole[-1] == Capsule(2**40, b"z" * 300)


def test_size_cap_refused_at_header_before_buffering() -> None:
    dec = CapsuleDecoder(max_capsule=100)
    assert dec.feed(encode_capsule(0, b"x" * 100)) == [Capsule(0, b"x" * 100)]
    with pytest.raises(RemoteProtocolError) as exc:
        dec.feed(encode_varint(0) + encode_varint(101))  # header only: no body sent yet
    assert exc.value.code == "capsule_too_large"
    assert dec.buffered == 0
    with pytest.raises(LocalProtocolError):
        dec.feed(b"\x00")


def test_default_cap_fits_largest_udp_payload() -> None:
    dec = CapsuleDecoder()
    payload = b"u" * 65_535
    (capsule,) = dec.feed(encode_datagram(payload))
    assert decode_datagram(capsule) == (0, payload)
    with pytest.raises(RemoteProtocolError):
        CapsuleDecoder().feed(encode_varint(0) + encode_varint(MAX_CAPSULE + 1))
    with pytest.raises(LocalProtocolError):
        encode_datagram(b"u" * MAX_CAPSULE)


def test_eof_mid_capsule_is_truncated() -> None:
    dec = CapsuleDecoder()
    assert dec.feed(encode_datagram(b"abcdef")[:-1]) == []
    with pytest.raises(RemoteProtocolError) as exc:
        dec.feed_eof()
    assert exc.value.code == "capsule_truncated"


def test_api_misuse_is_local() -> None:
    with pytest.raises(LocalProtocolError):
        encode_datagram("text")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        encode_datagram(b"x", context_id=-1)
    with pytest.raises(LocalProtocolError):
        encode_capsule(0, 5)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        Capsule(-1, b"")
    with pytest.raises(LocalProtocolError):
        CapsuleDecoder(max_capsule=-1)


capsule_lists = st.lists(
    st.tuples(st.integers(0, MAX_VARINT), st.binary(max_size=200)), max_size=10
)


@given(capsule_lists, st.data())
def test_round_trip_any_split(items: list[tuple[int, bytes]], data: st.DataObject) -> None:
    wire = b"".join(encode_capsule(t, v) for t, v in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=5)))
    dec = CapsuleDecoder()
    got: list[Capsule] = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        got += dec.feed(wire[prev:cut])
        prev = cut
    assert got == [Capsule(t, v) for t, v in items]
    dec.feed_eof()


@given(capsule_lists.filter(bool), st.data())
def test_truncated_input_yields_no_extra_capsule_and_no_error(
    items: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    head = b"".join(encode_capsule(t, v) for t, v in items[:-1])
    last = encode_capsule(*items[-1])
    cut = data.draw(st.integers(0, len(last) - 1))
    dec = CapsuleDecoder()
    assert dec.feed(head + last[:cut]) == [Capsule(t, v) for t, v in items[:-1]]
    assert dec.buffered == cut


@given(st.binary(max_size=400), st.integers(1, 50))
@settings(max_examples=300)
def test_random_input_only_remote_errors(data: bytes, chunk: int) -> None:
    dec = CapsuleDecoder(max_capsule=256)
    try:
        for i in range(0, len(data), chunk):
            for capsule in dec.feed(data[i : i + chunk]):
                assert len(capsule.value) <= 256
                if capsule.type == DATAGRAM:
                    try:
                        decode_datagram(capsule)
                    except RemoteProtocolError:
                        pass
        dec.feed_eof()
    except RemoteProtocolError as exc:
        assert exc.code in {"capsule_too_large", "capsule_truncated"}
