"""Transparent capture on Linux: nftables rules in Limen's own table, the original destination
of a redirected connection (``SO_ORIGINAL_DST``), and the listener that turns each captured
connection into a flow through the edge.

How a packet gets here::

    curl → connect(198.18.3.10:80) → nft `inet limen` output chain (type nat, priority -100):
        redirect to :PORT  → our listener on 127.0.0.1:PORT accepts;
        getsockopt(SO_ORIGINAL_DST) → 198.18.3.10:80 → EdgeSession.open("tcp", ...)

Rules this module keeps:

* **One table, replaced atomically.** Everything lives in ``table inet limen``; every change
  is one ``nft -f`` transaction that declares the table, deletes it and defines it again, so
  the kernel never holds half a ruleset, and removing Limen is deleting one table.
* **Never capture ourselves.** The chains start with ``return`` for loopback, for the edge and
  API addresses the client talks to, and for packets carrying :data:`SOCKET_MARK` (set with
  ``SO_MARK`` on the sockets the client dials directly for ``pass`` rules), so the client's own
  traffic can never loop back into the listener.
* **Hardening in the kernel.** While the edge is unreachable a ``block`` rule becomes
  ``reject with tcp reset`` in a filter chain (the application fails at once with "connection
  refused"), and a ``pass`` rule is left out (the application goes direct). When paused, no
  capture rule is installed at all.
* Rendering (:func:`render_ruleset`) is pure and unit-tested; :class:`NftTable` only runs
  ``nft``.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import ipaddress
import logging
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from limen.client.forwarding import (
    Action,
    ForwardingProfile,
    ForwardingRule,
    Match,
    Outcome,
    SyntheticMap,
    decide,
)
from limen.client.tunnel import EdgeSession, FlowRefused
from limen.errors import ConfigError
from limen.net.endpoints import TransportEndpoint
from limen.net.mux import EarlyData
from limen.net.relay import CloseReason, Relay
from limen.net.tasks import spawn

log = logging.getLogger(__name__)

TABLE_FAMILY = "inet"
TABLE_NAME = "limen"
#: ``SO_MARK`` value on sockets the client dials directly ("LM" + 1); the chains skip it.
SOCKET_MARK = 0x4C4D0001
#: Mark on captured UDP packets: a policy-routing rule sends them to the local table, where
#: the ``tproxy`` rule hands them to the UDP listener (IPv4 only).
UDP_MARK = 0x4C4D0002
#: The routing table holding ``local 0.0.0.0/0 dev lo`` for marked packets ("LM" = 19533).
ROUTE_TABLE = 0x4C4D
#: ``SO_ORIGINAL_DST`` (linux/netfilter_ipv4.h) and ``IP6T_SO_ORIGINAL_DST``: both 80.
SO_ORIGINAL_DST = 80
_SOL_IPV6 = 41
#: Closed flows kept for ``limen client traffic``.
RECENT_FLOWS = 200
#: Seconds to dial a ``pass`` destination directly.
DIRECT_DIAL_TIMEOUT = 10.0
#: Seconds ``nft`` may take: it is a local netlink transaction, normally milliseconds.
NFT_TIMEOUT = 15.0


class CaptureState(enum.StrEnum):
    """Which rules the packet filter holds."""

    ACTIVE = "active"  # tunnel rules redirect to the listener
    EDGE_DOWN = "edge_down"  # block rules reject, pass rules go direct
    PAUSED = "paused"  # nothing is captured


# --- rendering ----------------------------------------------------------------------------------


def _ports_expr(rule: ForwardingRule) -> str:
    ranges = rule.parsed.port_ranges
    items = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges]
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _daddr_expr(rule: ForwardingRule) -> str:
    family = "ip" if rule.parsed.ip_version == 4 else "ip6"
    return f"{family} daddr {rule.destination}"


def _comment(text: str) -> str:
    # nft comments are quoted strings of at most 128 bytes; ids and names are plain ASCII.
    safe = "".join(c for c in text if c.isalnum() or c in "-_.:/ ")[:120]
    return f'comment "{safe}"'


def _exclusions(excludes: Iterable[tuple[str, int]], mark: int) -> list[str]:
    lines = [
        f"meta mark {mark:#x} return",
        "ip daddr 127.0.0.0/8 return",
        "ip6 daddr ::1 return",
    ]
    for host, port in excludes:
        addr = ipaddress.ip_address(host)
        family = "ip" if addr.version == 4 else "ip6"
        lines.append(f"{family} daddr {addr} tcp dport {port} return")
    return lines


def render_ruleset(
    profile: ForwardingProfile,
    *,
    state: CaptureState,
    listen_ports: dict[int, int],
    excludes: Iterable[tuple[str, int]] = (),
    mark: int = SOCKET_MARK,
    owner: str = "",
    synthetic: str | None = None,
    udp_port: int | None = None,
) -> str:
    """The ``nft -f`` script that makes the table match ``profile`` in ``state``.

    ``listen_ports`` maps an IP version (4, 6) to the transparent listener's port on loopback;
    rules of a version without a listener are left out. ``excludes`` are (address, port)
    pairs never captured (the edge, the API).

    ``synthetic`` is the IPv4 range the DNS stub answers private names from: connections to
    it on the ports of a tunnel name rule are redirected to the listener whether the edge is
    up or not — the kernel cannot tell which name an address stands for, so the listener
    (which can) applies the hardening: a reset for ``block``, a direct connection to the
    real name for ``pass``.

    ``udp_port`` is the transparent UDP listener's port on 127.0.0.1: UDP to IPv4 tunnel rules
    is marked with :data:`UDP_MARK` in a route chain (so it is routed to ``lo`` by the rule
    :class:`PolicyRoute` installs) and handed to the listener by ``tproxy`` in prerouting.
    With the edge down a ``block`` UDP rule rejects, a ``pass`` one is left out."""
    excludes = list(excludes)
    nat: list[str] = []
    harden: list[str] = []
    rules = profile.ip_rules("tcp") if state is not CaptureState.PAUSED else []
    named: list[str] = []
    if synthetic is not None and state is not CaptureState.PAUSED and 4 in listen_ports:
        net = ipaddress.IPv4Network(synthetic)
        seen: set[str] = set()
        for rule in profile.name_rules():
            if rule.action is not Action.TUNNEL or "tcp" not in rule.parsed.protocols:
                continue
            ports = _ports_expr(rule)
            if ports in seen:
                continue
            seen.add(ports)
            note = _comment(f"synthetic {rule.id} {rule.app_name}".strip())
            named.append(f"ip daddr {net} tcp dport {ports} redirect to :{listen_ports[4]} {note}")
    for rule in rules:
        version = rule.parsed.ip_version
        match = f"{_daddr_expr(rule)} tcp dport {_ports_expr(rule)}"
        note = _comment(f"{rule.id} {rule.action.value} {rule.app_name}".strip())
        if rule.action is Action.BYPASS:
            nat.append(f"{match} return {note}")
            harden.append(f"{match} return {note}")
        elif state is CaptureState.ACTIVE:
            if version in listen_ports:
                nat.append(f"{match} redirect to :{listen_ports[version]} {note}")
        elif rule.hardening == "block":
            harden.append(f"{match} reject with tcp reset {note}")
    udp_mark: list[str] = []
    udp_rules = profile.ip_rules("udp") if state is not CaptureState.PAUSED else []
    for rule in udp_rules:
        if rule.parsed.ip_version != 4 or udp_port is None:
            continue
        match = f"ip daddr {rule.destination} udp dport {_ports_expr(rule)}"
        note = _comment(f"{rule.id} udp {rule.action.value} {rule.app_name}".strip())
        if rule.action is Action.BYPASS:
            udp_mark.append(f"{match} return {note}")
            harden.append(f"{match} return {note}")
        elif state is CaptureState.ACTIVE:
            udp_mark.append(f"{match} meta mark set {UDP_MARK:#x} {note}")
        elif rule.hardening == "block":
            harden.append(f"{match} reject {note}")
    head = _exclusions(excludes, mark)
    out = [
        f"table {TABLE_FAMILY} {TABLE_NAME}",
        f"delete table {TABLE_FAMILY} {TABLE_NAME}",
        f"table {TABLE_FAMILY} {TABLE_NAME} {{",
    ]
    if owner:
        out.append(f"\t{_comment(owner)}")
    out += [
        "\tchain capture {",
        "\t\ttype nat hook output priority -100; policy accept;",
        *(f"\t\t{line}" for line in head + nat + named),
        "\t}",
        "\tchain harden {",
        "\t\ttype filter hook output priority 0; policy accept;",
        *(f"\t\t{line}" for line in head + harden),
        "\t}",
    ]
    if udp_port is not None:
        out += [
            "\tchain udp_route {",
            "\t\ttype route hook output priority mangle; policy accept;",
            *(f"\t\t{line}" for line in head + udp_mark),
            "\t}",
            "\tchain udp_tproxy {",
            "\t\ttype filter hook prerouting priority mangle; policy accept;",
            f"\t\tmeta mark {UDP_MARK:#x} meta l4proto udp tproxy ip to 127.0.0.1:{udp_port}",
            "\t}",
        ]
    out.append("}")
    return "\n".join(out) + "\n"


# --- nft --------------------------------------------------------------------------------------


def has_net_admin() -> bool:
    """Whether this process may change the packet filter (``CAP_NET_ADMIN``, bit 12)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 12))
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


class NftTable:
    """Limen's nftables table, driven through the ``nft`` command (blocking: call from a
    worker thread in asyncio code)."""

    def __init__(self, nft: str | None = None) -> None:
        found = (
            nft
            or shutil.which("nft")
            or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None)
        )
        if found is None:
            raise ConfigError(
                "nft (nftables) is not installed: transparent mode needs it "
                "(apt install nftables), or use `limen client socks` / `forward`",
                code="nft_missing",
            )
        self.nft = found

    def _run(self, args: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.nft, *args],
            input=script,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT,
            check=False,
        )

    def apply(self, script: str) -> None:
        """Load ``script`` as one transaction; :class:`ConfigError` with nft's message."""
        proc = self._run(["-f", "-"], script)
        if proc.returncode != 0:
            raise ConfigError(f"nft refused the ruleset: {proc.stderr.strip()}", code="nft_failed")

    def exists(self) -> bool:
        return self._run(["list", "table", TABLE_FAMILY, TABLE_NAME]).returncode == 0

    def listing(self) -> str:
        """``nft list table inet limen``, or "" when there is none."""
        proc = self._run(["list", "table", TABLE_FAMILY, TABLE_NAME])
        return proc.stdout if proc.returncode == 0 else ""

    def delete(self) -> bool:
        """Delete the table; True if one existed."""
        if not self.exists():
            return False
        proc = self._run(["delete", "table", TABLE_FAMILY, TABLE_NAME])
        if proc.returncode != 0 and self.exists():
            raise ConfigError(f"nft could not delete the table: {proc.stderr.strip()}")
        return True


class PolicyRoute:
    """The routing rule that delivers UDP marked :data:`UDP_MARK` locally (for ``tproxy``):
    ``ip rule fwmark UDP_MARK lookup ROUTE_TABLE`` and ``local 0.0.0.0/0 dev lo`` in that
    table. Blocking: call from a worker thread."""

    def __init__(self, ip: str | None = None) -> None:
        self.ip = ip or shutil.which("ip") or "/usr/sbin/ip"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.ip, *args], capture_output=True, text=True, timeout=NFT_TIMEOUT, check=False
        )

    def install(self) -> None:
        self.remove()
        for args in (
            ("rule", "add", "fwmark", f"{UDP_MARK:#x}", "lookup", str(ROUTE_TABLE)),
            ("route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE)),
        ):
            proc = self._run(*args)
            if proc.returncode != 0:
                raise ConfigError(
                    f"ip {' '.join(args)}: {proc.stderr.strip()}", code="policy_route_failed"
                )

    def remove(self) -> bool:
        """Remove the rule and the table's routes; True if there was a rule."""
        found = False
        for _ in range(16):  # one rule normally; a few if earlier runs crashed mid-way
            proc = self._run("rule", "del", "fwmark", f"{UDP_MARK:#x}", "lookup", str(ROUTE_TABLE))
            if proc.returncode != 0:
                break
            found = True
        self._run("route", "flush", "table", str(ROUTE_TABLE))
        return found


# --- original destination ---------------------------------------------------------------------


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination a redirected connection was made to (``OSError`` if not redirected)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(_SOL_IPV6, SO_ORIGINAL_DST, 28)
        # struct sockaddr_in6: family, port (network order), flowinfo, 16-byte address, scope
        port = struct.unpack_from("!H", raw, 2)[0]
        addr = ipaddress.IPv6Address(raw[8:24])
        host = str(addr.ipv4_mapped or addr)
        return host, port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    # struct sockaddr_in: family, port (network order), 4-byte address, padding
    port = struct.unpack_from("!H", raw, 2)[0]
    return str(ipaddress.IPv4Address(raw[4:8])), port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- live flows -------------------------------------------------------------------------------


@dataclass
class LiveFlow:
    """One captured connection, for ``limen client traffic``."""

    started_at: float
    process: str
    pid: int
    destination: str
    protocol: str
    rule_id: str
    app_name: str
    outcome: str
    state: str = "opening"
    error: str = ""
    ended_at: float | None = None
    relay: Relay | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, object]:
        up = self.relay.bytes_a_to_b if self.relay is not None else 0
        down = self.relay.bytes_b_to_a if self.relay is not None else 0
        return {
            "time": round(self.started_at, 3),
            "ended_at": round(self.ended_at, 3) if self.ended_at else None,
            "process": self.process,
            "pid": self.pid,
            "destination": self.destination,
            "protocol": self.protocol,
            "rule": self.rule_id,
            "app": self.app_name,
            "action": self.outcome,
            "state": self.state,
            "error": self.error,
            "bytes_up": up,
            "bytes_down": down,
        }


class FlowTable:
    """Open flows and the most recent closed ones (bounded)."""

    def __init__(self, keep: int = RECENT_FLOWS) -> None:
        self.open: set[int] = set()
        self._flows: dict[int, LiveFlow] = {}
        self.recent: collections.deque[LiveFlow] = collections.deque(maxlen=keep)
        self._next = 0

    def add(self, flow: LiveFlow) -> int:
        self._next += 1
        self._flows[self._next] = flow
        return self._next

    def end(self, key: int, state: str, error: str = "") -> None:
        flow = self._flows.pop(key, None)
        if flow is None:
            return
        flow.state = state
        flow.error = error or flow.error
        flow.ended_at = time.time()
        self.recent.append(flow)

    def snapshot(self) -> list[dict[str, object]]:
        live = [f.to_json() for f in self._flows.values()]
        return [f.to_json() for f in self.recent] + live

    def __len__(self) -> int:
        return len(self._flows)

    def abort_all(self) -> None:
        for flow in list(self._flows.values()):
            if flow.relay is not None:
                flow.relay.abort(CloseReason.SHUTDOWN)


# --- the listener -----------------------------------------------------------------------------

ProcessLookup = Callable[[str, int], "tuple[int, str] | None"]


def _default_process_lookup(host: str, port: int) -> tuple[int, str] | None:
    from limen.client.procinfo import process_info

    return process_info(host, port)


class TransparentListener:
    """Accepts redirected connections on loopback and carries each as a flow."""

    def __init__(
        self,
        session: EdgeSession,
        *,
        profile: Callable[[], ForwardingProfile],
        edge_up: Callable[[], bool],
        paused: Callable[[], bool],
        on_edge_unreachable: Callable[[], None],
        process_lookup: ProcessLookup = _default_process_lookup,
        mark: int = SOCKET_MARK,
        synthetic: SyntheticMap | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        #: The DNS stub's name ↔ address map: a flow to a synthetic address is a flow to its
        #: name (the connector resolves it on the private side).
        self.synthetic = synthetic
        self.clock = clock
        self.profile = profile
        self.edge_up = edge_up
        self.paused = paused
        self.on_edge_unreachable = on_edge_unreachable
        self.process_lookup = process_lookup
        self.mark = mark
        self.flows = FlowTable()
        self.servers: list[asyncio.Server] = []
        #: IP version → port on loopback
        self.ports: dict[int, int] = {}

    async def start(self, port: int = 0) -> dict[int, int]:
        """Listen on 127.0.0.1 (and ::1 when IPv6 is available)."""
        loop = asyncio.get_running_loop()
        for version, host in ((4, "127.0.0.1"), (6, "::1")):
            try:
                server = await loop.create_server(self._factory, host, port, backlog=1024)
            except OSError as exc:
                if version == 4:
                    raise
                log.info("no IPv6 transparent listener (%s): IPv6 rules are not captured", exc)
                continue
            self.servers.append(server)
            self.ports[version] = server.sockets[0].getsockname()[1]
        return self.ports

    def close(self) -> None:
        for server in self.servers:
            server.close()
        self.servers = []
        self.flows.abort_all()

    def _factory(self) -> TransportEndpoint:
        local = TransportEndpoint()
        spawn(self._handle(local), name="transparent flow")
        return local

    async def _handle(self, local: TransportEndpoint) -> None:
        try:
            await local.connected
        except (ConnectionError, OSError):
            return
        assert local.transport is not None  # set before ``connected`` resolves
        sock = local.transport.get_extra_info("socket")
        try:
            host, port = original_dst(sock)
        except (OSError, struct.error):
            local.abort()  # a direct connection to the listener: nothing to carry
            return
        if port in self.ports.values() and ipaddress.ip_address(host).is_loopback:
            local.abort()
            return
        if self.synthetic is not None and host in self.synthetic:
            name = self.synthetic.name_for(host, self.clock())
            if name is None:
                # An answer older than the map remembers: no way to know the name.
                log.info("flow to %s:%s: synthetic address not (or no longer) mapped", host, port)
                local.abort()
                return
            host = name
        peer_host, peer_port = local.peer()
        found = await asyncio.to_thread(self.process_lookup, peer_host, peer_port)
        pid, pname = found if found is not None else (0, "")
        match = self.profile().match(host, port, "tcp")
        outcome = decide(match, edge_up=self.edge_up(), paused=self.paused())
        rule = match.rule
        dest = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        flow = LiveFlow(
            started_at=time.time(),
            process=pname,
            pid=pid,
            destination=dest,
            protocol="tcp",
            rule_id=rule.id if rule else "",
            app_name=rule.app_name if rule else "",
            outcome=outcome.value,
        )
        key = self.flows.add(flow)
        label = f"{pname} ({pid})" if pname else ""
        try:
            await self._carry(local, host, port, match, outcome, flow, label)
        finally:
            if flow.state in ("opening", "open"):
                self.flows.end(key, "closed")
            else:
                self.flows.end(key, flow.state)

    async def _carry(
        self,
        local: TransportEndpoint,
        host: str,
        port: int,
        match: Match,
        outcome: Outcome,
        flow: LiveFlow,
        label: str,
    ) -> None:
        early: EarlyData | None = None
        if outcome is Outcome.TUNNEL:
            early = EarlyData(local)
            try:
                stream, _ = await self.session.open("tcp", host, port, process=label, early=early)
            except FlowRefused as exc:
                flow.error = exc.code
                if exc.code != "edge_unreachable":
                    log.info("flow to %s:%s refused: %s (%s)", host, port, exc.message, exc.code)
                    flow.state = "refused"
                    local.abort()
                    return
                self.on_edge_unreachable()
                outcome = decide(match, edge_up=False, paused=self.paused())
                flow.outcome = outcome.value
            else:
                flow.state = "open"
                relay = Relay(local, stream)
                flow.relay = relay
                relay.start(sent_to_b=len(early.data))
                await relay.done
                return
        if outcome is Outcome.DIRECT:
            # What the application sent while the tunnel was tried goes first.
            sent = bytes(early.data) if early is not None else b""
            await self._direct(local, host, port, flow, sent)
            return
        flow.state = "blocked"
        local.abort()  # hardening "block": a reset, at once

    async def _direct(
        self, local: TransportEndpoint, host: str, port: int, flow: LiveFlow, first: bytes = b""
    ) -> None:
        """Carry the connection straight to its destination on a marked socket (which the
        packet filter does not capture again)."""
        loop = asyncio.get_running_loop()
        if not _is_ip(host):
            # A name behind a synthetic address (hardening "pass", or a port no rule covers):
            # resolve it for real. The stub answers such names from the upstream resolver
            # then; a synthetic answer would only loop back here.
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                flow.state, flow.error = "failed", f"resolve: {exc}"
                local.abort()
                return
            real = [
                str(i[4][0])
                for i in infos
                if self.synthetic is None or i[4][0] not in self.synthetic
            ]
            if not real:
                flow.state, flow.error = "failed", "no real address"
                local.abort()
                return
            host = real[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            sock.setblocking(False)
            async with asyncio.timeout(DIRECT_DIAL_TIMEOUT):
                await loop.sock_connect(sock, (host, port))
            _, remote = await loop.create_connection(TransportEndpoint, sock=sock)
        except (OSError, TimeoutError) as exc:
            sock.close()
            flow.state = "failed"
            flow.error = type(exc).__name__
            local.abort()
            return
        flow.state = "open"
        relay = Relay(local, remote)
        flow.relay = relay
        relay.start(initial_to_b=first)
        await relay.done


__all__ = [
    "SOCKET_MARK",
    "TABLE_NAME",
    "UDP_MARK",
    "CaptureState",
    "FlowTable",
    "LiveFlow",
    "NftTable",
    "PolicyRoute",
    "TransparentListener",
    "has_net_admin",
    "original_dst",
    "render_ruleset",
]
