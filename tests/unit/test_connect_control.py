"""The client control-stream head (wire/connect.py): ``GET /.well-known/limen/control``
with ``Upgrade: limen-control`` is protocol "control", answered 101; other heads keep
their meaning."""

from __future__ import annotations

import pytest

from limen.errors import RemoteProtocolError
from limen.wire import connect as wire


def test_control_head_round_trips() -> None:
    head = wire.encode_request(
        "control", "edge.example", 8443, [("Authorization", "Bearer abc.def.ghi")]
    )
    reader = wire.FlowRequestReader()
    request = reader.feed(head + b"\x00\x00\x00\x02{}")
    assert request is not None
    assert request.protocol == "control" and request.host == "" and request.port == 0
    assert request.bearer_token == "abc.def.ghi"
    assert reader.trailing == b"\x00\x00\x00\x02{}"


def test_control_head_needs_the_upgrade() -> None:
    head = (
        f"GET {wire.CONTROL_PATH} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
        "Upgrade: websocket\r\n\r\n"
    ).encode()
    with pytest.raises(RemoteProtocolError) as exc:
        wire.FlowRequestReader().feed(head)
    assert exc.value.code == "bad_request"
    plain = f"GET {wire.CONTROL_PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with pytest.raises(RemoteProtocolError):
        wire.FlowRequestReader().feed(plain)


def test_other_heads_are_unchanged() -> None:
    tcp = wire.FlowRequestReader().feed(wire.encode_request("tcp", "a.example", 22))
    udp = wire.FlowRequestReader().feed(wire.encode_request("udp", "a.example", 53))
    assert tcp is not None and tcp.protocol == "tcp"
    assert udp is not None and udp.protocol == "udp"
    with pytest.raises(RemoteProtocolError) as exc:
        wire.FlowRequestReader().feed(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
    assert exc.value.code == "method_not_allowed"


def test_101_for_a_control_stream_switches_the_response_reader() -> None:
    response = wire.encode_response(101, upgrade=wire.CONTROL_UPGRADE)
    assert b"Upgrade: limen-control" in response and b"Capsule-Protocol" not in response
    reader = wire.FlowResponseReader("control")
    parsed = reader.feed(response + b"\x00\x00\x00\x01x")
    assert parsed is not None and parsed.ok and parsed.status == 101
    assert reader.trailing == b"\x00\x00\x00\x01x"
    udp = wire.encode_response(101)
    assert b"Upgrade: connect-udp" in udp and b"Capsule-Protocol: ?1" in udp


def test_a_refused_control_stream_reads_as_a_refusal() -> None:
    refusal = wire.encode_refusal(
        401, "invalid_token", "bad token", [("WWW-Authenticate", 'Bearer realm="limen"')]
    )
    parsed = wire.FlowResponseReader("control").feed(refusal)
    assert parsed is not None and not parsed.ok
    assert parsed.error() == ("invalid_token", "bad token")
    assert parsed.headers["www-authenticate"] == 'Bearer realm="limen"'
