"""Server side of SOCKS5 (RFC 1928), sans-IO, as used by ``limen client socks``.

Rules this core keeps (read them before changing anything):

- Only method 0x00, "no authentication required" (RFC 1928 §3), is offered: the proxy listens on
  loopback and the user's identity travels in the tunnel's bearer token, not in SOCKS. A greeting
  that does not list 0x00 gets the 0xFF "no acceptable methods" reply and the core enters ERROR.
- Commands: CONNECT (0x01) and UDP ASSOCIATE (0x03) (RFC 1928 §4). BIND (0x02) and anything
  else get reply 0x07 "command not supported" (§6) and the core enters ERROR.
- Address types: IPv4 (0x01), domain name (0x03), IPv6 (0x04) (§5). Any other gets reply 0x08.
- Every field is checked: VER must be 0x05, RSV must be 0x00 (§4: "fields marked RESERVED (RSV)
  must be set to X'00'"), a domain name must be 1-255 visible ASCII characters, CONNECT needs a
  non-zero port.
- Peer misbehaviour raises :class:`~limen.errors.RemoteProtocolError` with a stable ``code`` and
  moves the core to ERROR; whatever reply the RFC asks for is queued first, so the shell flushes
  :meth:`Socks5Server.data_to_send` and closes. Misuse by our own code (accepting twice, feeding
  data after the handshake) raises :class:`~limen.errors.LocalProtocolError`. Nothing else may
  escape, and no ``assert`` guards peer data.
- Buffers are bounded: see :data:`MAX_HANDSHAKE` and :data:`MAX_EARLY_DATA`.
- No I/O, no clock, no asyncio: bytes in, events and bytes out.

The UDP ASSOCIATE datagram header (RFC 1928 §7) is handled by :func:`parse_udp_datagram` and
:func:`build_udp_datagram`; fragmentation (FRAG != 0) is not supported, which §7 allows
("An implementation that does not support fragmentation MUST drop any datagram whose FRAG field
is other than X'00'").
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from limen.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_EARLY_DATA",
    "MAX_HANDSHAKE",
    "MAX_UDP_DATAGRAM",
    "ConnectRequested",
    "Event",
    "ReplyCode",
    "Socks5Server",
    "Socks5State",
    "UdpAssociateRequested",
    "build_udp_datagram",
    "parse_udp_datagram",
]

SOCKS_VERSION = 0x05
METHOD_NO_AUTH = 0x00
METHOD_NO_ACCEPTABLE = 0xFF

CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

# A greeting is at most 2 + 255 bytes (VER, NMETHODS, up to 255 METHODS; §3) and a request at
# most 4 + 1 + 255 + 2 = 262 bytes (VER CMD RSV ATYP, a length-prefixed domain, PORT; §4). 600
# covers both pipelined in one write with room to spare; a client that has sent more than this
# without the handshake being complete is not speaking SOCKS5.
MAX_HANDSHAKE = 600
# A client may send payload right after its request without waiting for our reply ("optimistic
# data"; RFC 1928 does not forbid it and some clients do it to save a round trip). We hold it
# until the shell has decided (policy, dial through the tunnel), which takes one or more round
# trips. 64 KiB is one socket read of the shell; a peer that sends more before we answered is
# ignoring flow control, and holding more would let each pending handshake pin memory.
MAX_EARLY_DATA = 64 * 1024
# Largest UDP payload any IP version carries without jumbograms (65,535 - 8-byte UDP header).
# A SOCKS UDP datagram (header + payload) bigger than this cannot be sent on the relay socket.
MAX_UDP_DATAGRAM = 65_535 - 8

_MAX_DOMAIN = 255  # one length byte (§5)


class ReplyCode(enum.IntEnum):
    """REP field of a SOCKS5 reply (RFC 1928 §6)."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


class Socks5State(enum.Enum):
    """Where the handshake is. ERROR and CLOSED are terminal."""

    AWAIT_GREETING = "await_greeting"  # waiting for VER NMETHODS METHODS
    AWAIT_REQUEST = "await_request"  # method 0x00 chosen, waiting for the request
    AWAIT_DECISION = "await_decision"  # request surfaced; the shell must accept() or reject()
    ESTABLISHED = "established"  # success reply queued; the connection now carries payload
    CLOSED = "closed"  # failure reply queued by reject(); the shell closes after flushing
    ERROR = "error"  # the peer broke the protocol; flush data_to_send() and close


# The state machine as data (h11 style): which API call moves which state where. Transitions
# driven by peer bytes are written out in receive_data() because each needs parsing first.
_API_TRANSITIONS: dict[str, dict[Socks5State, Socks5State]] = {
    "accept": {Socks5State.AWAIT_DECISION: Socks5State.ESTABLISHED},
    "reject": {Socks5State.AWAIT_DECISION: Socks5State.CLOSED},
}


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    """The client asked for a TCP connection to ``host:port`` (CMD 0x01).

    ``host`` is an IPv4 or IPv6 address in its canonical text form, or a domain name exactly as
    the client sent it (case and trailing dot kept: normalising is the policy layer's job).
    """

    host: str
    port: int

    def __post_init__(self) -> None:
        _check_endpoint(self.host, self.port, allow_port_zero=False)


@dataclass(frozen=True, slots=True)
class UdpAssociateRequested:
    """The client asked for a UDP relay (CMD 0x03).

    ``host:port`` is where the client expects to send datagrams from; RFC 1928 §4 lets it be all
    zeros when the client does not know yet, so port 0 and ``0.0.0.0`` are valid here.
    """

    host: str
    port: int

    def __post_init__(self) -> None:
        _check_endpoint(self.host, self.port, allow_port_zero=True)


Event = ConnectRequested | UdpAssociateRequested


def _check_endpoint(host: str, port: int, *, allow_port_zero: bool) -> None:
    if not isinstance(host, str) or not host:
        raise LocalProtocolError("host must be a non-empty string", code="socks_bad_event")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 0xFFFF:
        raise LocalProtocolError("port must be an int in 0..65535", code="socks_bad_event")
    if port == 0 and not allow_port_zero:
        raise LocalProtocolError("port 0 is not a valid destination", code="socks_bad_event")


def _remote(message: str, code: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, code=code)


def _is_visible_ascii(raw: bytes) -> bool:
    # Domain names on the wire are ASCII (IDNs arrive as punycode); control characters, spaces
    # and bytes >= 0x80 have no place in a name and would only confuse matching and logs.
    return all(0x21 <= b <= 0x7E for b in raw)


def _parse_address(buf: bytes | bytearray, offset: int) -> tuple[int, str, int, int] | None:
    """Parse ``ATYP DST.ADDR DST.PORT`` at ``offset``.

    Returns ``(atyp, host, port, end_offset)``, or None when the bytes are incomplete. Raises
    RemoteProtocolError for an unknown ATYP (code ``socks_bad_address_type``) or a bad domain
    name (``socks_bad_domain``).
    """
    if len(buf) <= offset:
        return None
    atyp = buf[offset]
    pos = offset + 1
    if atyp == ATYP_IPV4:
        end = pos + 4
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv4Address(bytes(buf[pos:end])))
    elif atyp == ATYP_IPV6:
        end = pos + 16
        if len(buf) < end + 2:
            return None
        host = ipaddress.IPv6Address(bytes(buf[pos:end])).compressed
    elif atyp == ATYP_DOMAIN:
        if len(buf) <= pos:
            return None
        length = buf[pos]
        pos += 1
        end = pos + length
        if len(buf) < end + 2:
            return None
        raw = bytes(buf[pos:end])
        if length == 0 or not _is_visible_ascii(raw):
            raise _remote("domain name is empty or not visible ASCII", "socks_bad_domain")
        host = raw.decode("ascii")
    else:
        raise _remote(f"unsupported address type {atyp:#04x}", "socks_bad_address_type")
    (port,) = struct.unpack_from("!H", buf, end)
    return atyp, host, port, end + 2


def _encode_address(host: str, port: int) -> bytes:
    """Encode ``ATYP ADDR PORT`` for a reply or a UDP header; LocalProtocolError if impossible."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port out of range: {port!r}", code="socks_bad_address")
    if not isinstance(host, str) or not host:
        raise LocalProtocolError("host must be a non-empty string", code="socks_bad_address")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv4Address):
        return bytes([ATYP_IPV4]) + ip.packed + port.to_bytes(2, "big")
    if isinstance(ip, ipaddress.IPv6Address):
        return bytes([ATYP_IPV6]) + ip.packed + port.to_bytes(2, "big")
    try:
        raw = host.encode("ascii")
    except UnicodeEncodeError:
        raise LocalProtocolError(
            "domain names must be ASCII (punycode)", code="socks_bad_address"
        ) from None
    if len(raw) > _MAX_DOMAIN or not _is_visible_ascii(raw):
        raise LocalProtocolError(
            "domain name too long or not visible ASCII", code="socks_bad_address"
        )
    return bytes([ATYP_DOMAIN, len(raw)]) + raw + port.to_bytes(2, "big")


def _reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    return bytes([SOCKS_VERSION, code, 0x00]) + _encode_address(host, port)


class Socks5Server:
    """One client's SOCKS5 handshake, server side.

    Feed bytes with :meth:`receive_data`; it returns at most one event, a
    :class:`ConnectRequested` or :class:`UdpAssociateRequested`. Answer it with :meth:`accept`
    or :meth:`reject`, and write :meth:`data_to_send` to the socket after every call. After
    :meth:`accept`, :meth:`trailing_data` hands over payload bytes that came in early and the
    shell relays raw bytes from then on; this object is done.
    """

    def __init__(self) -> None:
        self._state = Socks5State.AWAIT_GREETING
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._trailing_taken = False

    @property
    def state(self) -> Socks5State:
        """The current :class:`Socks5State`."""
        return self._state

    def data_to_send(self) -> bytes:
        """Return and forget the bytes queued for the client. Valid in every state, ERROR
        included: a failure reply must still reach the client before the shell closes."""
        out = bytes(self._outbuf)
        self._outbuf.clear()
        return out

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the client; return the events they complete.

        Raises RemoteProtocolError when the client breaks the protocol (the core is then in
        ERROR, and any reply the RFC asks for is already queued), LocalProtocolError when called
        in a state where the shell should no longer feed this object.
        """
        state = self._state
        if state in (Socks5State.ESTABLISHED, Socks5State.CLOSED, Socks5State.ERROR):
            raise LocalProtocolError(
                f"receive_data() in state {state.value}", code="socks_bad_state"
            )
        try:
            return self._receive(data)
        except RemoteProtocolError:
            self._state = Socks5State.ERROR
            self._inbuf.clear()
            raise

    def _receive(self, data: bytes) -> list[Event]:
        if self._state is Socks5State.AWAIT_DECISION:
            if len(self._inbuf) + len(data) > MAX_EARLY_DATA:
                raise _remote("too much data before the reply", "socks_early_data_too_large")
            self._inbuf += data
            return []
        # Checked before copying, so a flood is refused without being buffered. While parsing,
        # the buffer holds at most one incomplete greeting or request (< MAX_HANDSHAKE by their
        # length fields) plus whatever followed a complete request (early data, checked below).
        if len(self._inbuf) + len(data) > MAX_HANDSHAKE + MAX_EARLY_DATA:
            raise _remote("handshake too large", "socks_handshake_too_large")
        self._inbuf += data
        buf = self._inbuf
        pos = 0
        events: list[Event] = []
        if self._state is Socks5State.AWAIT_GREETING:
            end = self._parse_greeting(buf)
            if end is None:
                return events
            pos = end
            self._state = Socks5State.AWAIT_REQUEST
        if self._state is Socks5State.AWAIT_REQUEST:
            parsed = self._parse_request(buf, pos)
            if parsed is None:
                del buf[:pos]
                return events
            event, pos = parsed
            events.append(event)
            self._state = Socks5State.AWAIT_DECISION
        # Whatever follows the request is early payload, kept for trailing_data().
        del buf[:pos]
        if len(buf) > MAX_EARLY_DATA:
            raise _remote("too much data before the reply", "socks_early_data_too_large")
        return events

    def _parse_greeting(self, buf: bytearray) -> int | None:
        # RFC 1928 §3: VER NMETHODS METHODS. The version is checked on the first byte so a
        # SOCKS4 or HTTP client is turned away at once instead of waiting for more bytes.
        if not buf:
            return None
        if buf[0] != SOCKS_VERSION:
            raise _remote(f"SOCKS version {buf[0]:#04x} in greeting", "socks_bad_version")
        if len(buf) < 2:
            return None
        nmethods = buf[1]
        end = 2 + nmethods
        if len(buf) < end:
            return None
        if METHOD_NO_AUTH not in buf[2:end]:
            # §3: "If the selected METHOD is X'FF', none of the methods listed by the client
            # are acceptable, and the client MUST close the connection."
            self._outbuf += bytes([SOCKS_VERSION, METHOD_NO_ACCEPTABLE])
            raise _remote("client offers no acceptable method", "socks_no_acceptable_method")
        self._outbuf += bytes([SOCKS_VERSION, METHOD_NO_AUTH])
        return end

    def _parse_request(self, buf: bytearray, pos: int) -> tuple[Event, int] | None:
        # RFC 1928 §4: VER CMD RSV ATYP DST.ADDR DST.PORT.
        if len(buf) <= pos:
            return None
        if buf[pos] != SOCKS_VERSION:
            raise _remote(f"SOCKS version {buf[pos]:#04x} in request", "socks_bad_version")
        if len(buf) < pos + 3:
            return None
        cmd, rsv = buf[pos + 1], buf[pos + 2]
        if cmd not in (CMD_CONNECT, CMD_UDP_ASSOCIATE):
            self._outbuf += _reply(ReplyCode.COMMAND_NOT_SUPPORTED)
            name = "BIND" if cmd == CMD_BIND else f"{cmd:#04x}"
            raise _remote(f"command {name} not supported", "socks_command_not_supported")
        if rsv != 0x00:
            self._outbuf += _reply(ReplyCode.GENERAL_FAILURE)
            raise _remote("reserved byte is not zero", "socks_malformed")
        try:
            parsed = _parse_address(buf, pos + 3)
        except RemoteProtocolError as exc:
            code = (
                ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
                if exc.code == "socks_bad_address_type"
                else ReplyCode.GENERAL_FAILURE
            )
            self._outbuf += _reply(code)
            raise
        if parsed is None:
            return None
        _atyp, host, port, end = parsed
        if cmd == CMD_CONNECT:
            if port == 0:
                self._outbuf += _reply(ReplyCode.GENERAL_FAILURE)
                raise _remote("CONNECT to port 0", "socks_bad_port")
            return ConnectRequested(host, port), end
        return UdpAssociateRequested(host, port), end

    def _transition(self, action: str) -> None:
        target = _API_TRANSITIONS[action].get(self._state)
        if target is None:
            raise LocalProtocolError(
                f"{action}() in state {self._state.value}", code="socks_bad_state"
            )
        self._state = target

    def accept(self, bind_host: str, bind_port: int) -> None:
        """Queue the success reply with BND.ADDR/BND.PORT (RFC 1928 §6).

        For CONNECT that is the address the proxy used toward the target (clients ignore it;
        ``0.0.0.0:0`` is customary when there is none); for UDP ASSOCIATE it is where the client
        must send its datagrams, and it matters.
        """
        reply = _reply(ReplyCode.SUCCEEDED, bind_host, bind_port)  # validate before moving
        self._transition("accept")
        self._outbuf += reply

    def reject(self, reply_code: int) -> None:
        """Queue a failure reply (any :class:`ReplyCode` except SUCCEEDED); the shell then
        flushes :meth:`data_to_send` and closes (RFC 1928 §6: the server closes within 10 s)."""
        try:
            code = ReplyCode(reply_code)
        except ValueError:
            raise LocalProtocolError(
                f"unknown reply code {reply_code!r}", code="socks_bad_reply"
            ) from None
        if code is ReplyCode.SUCCEEDED:
            raise LocalProtocolError(
                "reject() with SUCCEEDED; use accept()", code="socks_bad_reply"
            )
        self._transition("reject")
        self._outbuf += _reply(code)

    def trailing_data(self) -> bytes:
        """Payload bytes the client sent after its request, before our reply.

        Returned once, after :meth:`accept`; later calls return ``b""``. The shell must relay
        them to the target before anything it reads from the socket afterwards.
        """
        if self._state is not Socks5State.ESTABLISHED:
            raise LocalProtocolError(
                f"trailing_data() in state {self._state.value}", code="socks_bad_state"
            )
        if self._trailing_taken:
            return b""
        self._trailing_taken = True
        out = bytes(self._inbuf)
        self._inbuf = bytearray()
        return out


def parse_udp_datagram(data: bytes) -> tuple[str, int, bytes]:
    """Split a SOCKS5 UDP datagram (RFC 1928 §7) into ``(host, port, payload)``.

    ``RSV(2) FRAG(1) ATYP DST.ADDR DST.PORT DATA``. A datagram is complete by nature, so a
    short one is malformed (code ``socks_udp_malformed``); FRAG != 0 raises code
    ``socks_udp_fragment`` (the caller drops the datagram, as §7 requires).
    """
    if len(data) < 4:
        raise _remote("UDP datagram shorter than its header", "socks_udp_malformed")
    if data[0] != 0 or data[1] != 0:
        raise _remote("UDP datagram reserved bytes are not zero", "socks_udp_malformed")
    if data[2] != 0:
        raise _remote("fragmented UDP datagrams are not supported", "socks_udp_fragment")
    try:
        parsed = _parse_address(data, 3)
    except RemoteProtocolError as exc:
        raise _remote(f"UDP datagram: {exc.message}", "socks_udp_malformed") from None
    if parsed is None:
        raise _remote("UDP datagram shorter than its header", "socks_udp_malformed")
    _atyp, host, port, end = parsed
    if port == 0:
        raise _remote("UDP datagram to port 0", "socks_udp_malformed")
    return host, port, data[end:]


def build_udp_datagram(host: str, port: int, payload: bytes) -> bytes:
    """Build a SOCKS5 UDP datagram (RFC 1928 §7) carrying ``payload`` from ``host:port``.

    Raises LocalProtocolError when the address cannot be encoded or the result would exceed
    :data:`MAX_UDP_DATAGRAM`.
    """
    datagram = b"\x00\x00\x00" + _encode_address(host, port) + payload
    if len(datagram) > MAX_UDP_DATAGRAM:
        raise LocalProtocolError("UDP datagram too large", code="socks_udp_too_large")
    return datagram
