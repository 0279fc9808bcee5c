"""The renewal messages of the control stream (connector certificate renewal, issue 4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from limen.errors import LocalProtocolError, RemoteProtocolError
from limen.pki import make_csr, new_key
from limen.wire.control import (
    MAX_PEM,
    ControlDecoder,
    RenewRefused,
    RenewRequest,
    RenewResponse,
    encode_control,
    parse_control,
)

CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def roundtrip(message: RenewRequest | RenewResponse | RenewRefused) -> object:
    (raw,) = ControlDecoder().feed(encode_control(message))
    return parse_control(raw)


def test_renew_messages_roundtrip() -> None:
    csr = make_csr(new_key(), "con_x")
    assert roundtrip(RenewRequest(csr)) == RenewRequest(csr)
    assert roundtrip(RenewResponse(CERT, 1700000000.5)) == RenewResponse(CERT, 1700000000.5)
    assert roundtrip(RenewRefused("connector_revoked", "")) == RenewRefused("connector_revoked", "")


def test_integer_not_after_is_a_float() -> None:
    message = parse_control({"type": "renew_response", "cert_pem": CERT, "not_after": 17})
    assert isinstance(message, RenewResponse) and message.not_after == 17.0


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "renew_request"},
        {"type": "renew_request", "csr_pem": "not a pem"},
        {"type": "renew_request", "csr_pem": CERT},  # a certificate is not a CSR
        {"type": "renew_request", "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----" + "A" * MAX_PEM},
        {"type": "renew_response", "cert_pem": CERT, "not_after": -1},
        {"type": "renew_response", "cert_pem": CERT, "not_after": True},
        {"type": "renew_response", "cert_pem": CERT, "not_after": "soon"},
        {"type": "renew_response", "cert_pem": 5, "not_after": 1.0},
        {"type": "renew_refused", "code": ""},
        {"type": "renew_refused", "code": "x", "message": 3},
    ],
)
def test_bad_fields_from_the_peer_are_remote_errors(raw: dict[str, object]) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        parse_control(raw)
    assert exc.value.code == "control_malformed"


def test_building_a_bad_message_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        RenewRequest("nope")
    with pytest.raises(LocalProtocolError):
        RenewResponse(CERT, float("inf"))


@given(st.dictionaries(st.sampled_from(["csr_pem", "cert_pem", "not_after", "code"]), st.text()))
def test_random_members_never_escape_as_other_errors(members: dict[str, str]) -> None:
    for kind in ("renew_request", "renew_response", "renew_refused"):
        try:
            message = parse_control({"type": kind, **members})
        except RemoteProtocolError as exc:
            assert exc.code == "control_malformed"
        else:
            assert isinstance(message, RenewRequest | RenewResponse | RenewRefused)
            assert kind == message.TYPE
