"""``python -m benchmarks.udp_dns``: UDP datagrams and private DNS through Limen (issue 3).

Everything runs on loopback as real processes (see :mod:`benchmarks.limen_path`):
``limen serve``, ``limen connector run --dns-server`` (the benchmark's DNS server),
``limen client forward --udp`` and ``limen client dns --upstream`` (the same DNS server, so
nothing leaves the machine). The targets run in their own interpreters so the measuring
process never competes with them for the GIL:

- a UDP echo server (plain blocking ``recvfrom`` / ``sendto``);
- a small authoritative DNS server (dnspython): every name gets an ``A`` record, TTL 300 s.

Figures, each measured the same way for the direct path and for Limen:

1. **UDP**: one connected socket (a warm-up echo first, so the flow is open) sends datagrams
   of 100 and 1,200 bytes for a fixed duration, paced at ``--rate`` datagrams/s and as fast
   as it can; echoes are counted until the path goes quiet. Delivered/s = echoes / send
   duration; loss = 1 - echoes / sent (round-trip loss: both directions count).
2. **DNS**: sequential queries, each timed with :func:`time.perf_counter`, for unique names
   (``q{i}.bench.test``: uncached at the connector) then the same names again (the
   connector's cache), and for public-looking names (``q{i}.example.com``), which the stub
   sends to its ``--upstream`` (the same local server: the "non-private passthrough", with the
   stub's own resolver cache on the repeat).

Results: a table with Limen / direct ratios, and JSON (``benchmarks/results/udp_dns.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import secrets
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from rich.console import Console
from rich.table import Table

from .common import LOOPBACK, REPO_ROOT, BenchmarkError, Processes, percentile
from .limen_path import LimenPath, ProbeEcho

DNS_SUFFIX = "bench.test"
PUBLIC_SUFFIX = "example.com"
ANSWER_TTL = 300
SIZES = (100, 1200)
# The client socket's receive buffer: echoes must not be lost in the measuring process.
RCVBUF = 4 * 2**20
# After sending stops, echoes are counted until none arrived for this long.
QUIET = 0.3


# ---------------------------------------------------------------------------------------------
# Targets (each in a child interpreter).


def serve_udp_echo() -> None:
    """Echo every datagram back to its sender on a free loopback port; print the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.bind((LOOPBACK, 0))
    print(sock.getsockname()[1], flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            data, addr = sock.recvfrom(65535)
            with contextlib.suppress(OSError):  # a full buffer drops, as UDP does
                sock.sendto(data, addr)


def dns_answer(wire: bytes) -> bytes | None:
    """The authoritative answer to one query: an A record for any name, or None if malformed."""
    try:
        query = dns.message.from_wire(wire)
    except dns.exception.DNSException:
        return None
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    for question in query.question:
        if question.rdtype == dns.rdatatype.A:
            response.answer.append(
                dns.rrset.from_text(question.name, ANSWER_TTL, dns.rdataclass.IN, "A", "10.0.0.1")
            )
    return response.to_wire()


def serve_dns() -> None:
    """A tiny authoritative DNS server (UDP) on a free loopback port; print the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    print(sock.getsockname()[1], flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            data, addr = sock.recvfrom(65535)
            answer = dns_answer(data)
            if answer is not None:
                sock.sendto(answer, addr)


def start_target(procs: Processes, function: str) -> int:
    """Run ``benchmarks.udp_dns.<function>`` in a child interpreter; return its UDP port."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from benchmarks.udp_dns import {function}; {function}()"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
        cwd=REPO_ROOT,
    )
    procs.procs.append(proc)
    assert proc.stdout is not None  # set by stdout=PIPE
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        raise BenchmarkError(f"{function} did not start")
    return int(line)


# ---------------------------------------------------------------------------------------------
# Limen: the UDP forward and the DNS stub.


class LimenUdpDns(LimenPath):
    """``limen serve`` + connector (``--dns-server``) + ``client forward --udp`` + ``client dns``.

    Reuses :class:`~benchmarks.limen_path.LimenPath`'s helpers (commands, logs, readiness
    probe through the edge); the tenant has an application with a ``udp`` segment for the
    echo server (and a ``tcp`` one for the probe) and an application serving ``bench.test``.
    """

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, name="limen")
        self.udp_port = 0
        self.dns_port = 0

    def _udp_dns_tenant(
        self, api_url: str, data: Path, echo_port: int, probe_port: int, password: str
    ) -> str:  # the one-time enrollment token
        with self._admin(api_url, data) as http:
            user, group = self._user_and_group(http, password)
            udp_app = self._call(
                http,
                "POST",
                "/api/v1/apps",
                {"name": "bench-udp", "connector_group_id": group["id"]},
            )
            for ports, protocol in ((echo_port, "udp"), (probe_port, "tcp")):
                segment = {
                    "type": "ip",
                    "destination": LOOPBACK,
                    "ports": str(ports),
                    "protocol": protocol,
                }
                self._call(http, "POST", f"/api/v1/apps/{udp_app['id']}/segments", segment)
            dns_app = self._call(
                http,
                "POST",
                "/api/v1/apps",
                {
                    "name": "bench-dns",
                    "connector_group_id": group["id"],
                    "dns_suffixes": [DNS_SUFFIX],
                },
            )
            for app in (udp_app, dns_app):
                assignment = {"principal_id": user["id"]}
                self._call(http, "POST", f"/api/v1/apps/{app['id']}/assignments", assignment)
            return self._enrollment_token(http, group)

    def _bound_port(
        self, role: str, needle: str, pattern: str, proc: subprocess.Popen[bytes]
    ) -> int:
        """The port a client command printed in its log (it was started with port 0)."""
        self._wait_log(self._log(role), needle, proc)
        text = (self.workdir / self._log(role)).read_text(errors="replace")
        match = re.search(pattern.format(port=r"(\d+)"), text)
        if match is None:
            raise self._fail(f"no port in the {role} log", self._log(role))
        return int(match.group(1))

    def start(self, echo_port: int, dns_server_port: int) -> None:
        """Start everything; afterwards :attr:`udp_port` and :attr:`dns_port` are listening."""
        try:
            self._start(echo_port, dns_server_port)
        except BaseException:
            self.teardown()
            raise

    def _start(self, echo_port: int, dns_server_port: int) -> None:
        dep = self._start_service()
        self.probe = ProbeEcho()
        password = secrets.token_urlsafe(18)
        enrollment = self._udp_dns_tenant(
            dep.api_url, dep.data, echo_port, self.probe.port, password
        )
        dns_server = f"{LOOPBACK}:{dns_server_port}"
        self._connect(dep, enrollment, password, ("--dns-server", dns_server))
        env = dep.env

        forward = self.procs.start(
            [
                *(self.limen, "client", "forward", "--udp", f"{LOOPBACK}:{echo_port}"),
                *("--listen", f"{LOOPBACK}:0"),
            ],
            self._log("forward"),
            env=env,
        )
        self.udp_port = self._bound_port(
            "forward", "forwarding udp", r"forwarding udp [\d.]+:{port} ", forward
        )
        stub = self.procs.start(
            [
                *(self.limen, "client", "dns", "--listen", f"{LOOPBACK}:0"),
                *("--upstream", dns_server),
            ],
            self._log("dns"),
            env=env,
        )
        self.dns_port = self._bound_port("dns", "DNS stub on", r"DNS stub on [\d.]+:{port} ", stub)


# ---------------------------------------------------------------------------------------------
# UDP workload.


@dataclass(frozen=True, slots=True)
class UdpRun:
    """One UDP run: what was sent and what came back."""

    path: str
    size: int
    mode: str
    """``"paced"`` (at ``rate``) or ``"flood"`` (as fast as the sender can)."""
    seconds: float
    sent: int
    received: int

    @property
    def sent_per_s(self) -> float:
        """Datagrams sent per second."""
        return self.sent / self.seconds

    @property
    def delivered_per_s(self) -> float:
        """Echoes received per second of sending."""
        return self.received / self.seconds

    @property
    def loss_pct(self) -> float:
        """Round-trip loss in percent."""
        return 100.0 * (1 - self.received / self.sent) if self.sent else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON form, with the derived figures."""
        return {
            **asdict(self),
            "sent_per_s": self.sent_per_s,
            "delivered_per_s": self.delivered_per_s,
            "loss_pct": self.loss_pct,
        }


def _drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(65535)
        except BlockingIOError:
            return count
        count += 1


def udp_warm_up(port: int, timeout: float = 30.0) -> socket.socket:
    """A connected socket whose flow answered one echo (bounded retries)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.connect((LOOPBACK, port))
    sock.settimeout(0.5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            sock.send(b"warm-up")
            if sock.recv(65535) == b"warm-up":
                sock.setblocking(False)
                _drain(sock)  # late duplicates of earlier tries
                return sock
    sock.close()
    raise BenchmarkError(f"no UDP echo through port {port} after {timeout}s")


def udp_run(path: str, port: int, size: int, seconds: float, rate: float | None) -> UdpRun:
    """Send ``size``-byte datagrams for ``seconds`` (at ``rate``/s, or flat out); count echoes."""
    sock = udp_warm_up(port)
    payload = secrets.token_bytes(size)
    sent = received = 0
    try:
        start = time.perf_counter()
        end = start + seconds
        while (now := time.perf_counter()) < end:
            burst = 32 if rate is None else min(64, int((now - start) * rate) - sent)
            for _ in range(burst):
                try:
                    sock.send(payload)
                    sent += 1
                except BlockingIOError:
                    break  # the socket buffer is full: the path is saturated
            received += _drain(sock)
            if rate is not None and burst <= 0:
                # Nothing due: wait for echoes until the next datagram is.
                wait = (sent + 1) / rate - (time.perf_counter() - start)
                select.select([sock], [], [], max(0.0, min(wait, end - time.perf_counter())))
        elapsed = time.perf_counter() - start
        # Count what is still in flight, until the path has been quiet for QUIET seconds.
        while select.select([sock], [], [], QUIET)[0]:
            received += _drain(sock)
    finally:
        sock.close()
    return UdpRun(path, size, "flood" if rate is None else "paced", elapsed, sent, received)


# ---------------------------------------------------------------------------------------------
# DNS workload.


def dns_latencies(port: int, names: Sequence[str]) -> tuple[list[float], int]:
    """One A query per name, sequentially; (latencies in seconds of the good answers, failures)."""
    out: list[float] = []
    failed = 0
    for name in names:
        query = dns.message.make_query(name, dns.rdatatype.A)
        start = time.perf_counter()
        try:
            answer = dns.query.udp(query, LOOPBACK, port=port, timeout=2.0)
        except (dns.exception.DNSException, OSError):
            failed += 1
            continue
        elapsed = time.perf_counter() - start
        if answer.rcode() != dns.rcode.NOERROR or not answer.answer:
            failed += 1
            continue
        out.append(elapsed)
    return out, failed


def dns_case(path: str, case: str, port: int, names: Sequence[str]) -> dict[str, Any]:
    """One DNS row: p50/p99 ms and failures."""
    lat, failed = dns_latencies(port, names)
    if not lat:
        raise BenchmarkError(f"{path} {case}: no DNS answer at all ({failed} failures)")
    return {
        "path": path,
        "case": case,
        "queries": len(names),
        "failed": failed,
        "p50_ms": percentile(lat, 50) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
    }


# ---------------------------------------------------------------------------------------------
# Running and reporting.


@dataclass(frozen=True, slots=True)
class Params:
    """How much of each workload to run."""

    seconds: float
    rate: float
    queries: int


QUICK = Params(seconds=0.5, rate=2000, queries=20)
FULL = Params(seconds=5, rate=5000, queries=1000)


def run(params: Params, workdir: Path, console: Console) -> dict[str, Any]:
    """Start the targets and Limen, run every workload on both paths; the report's body."""
    targets = Processes(workdir)
    limen = LimenUdpDns(workdir / "limen")
    (workdir / "limen").mkdir()
    udp: list[UdpRun] = []
    dns_rows: list[dict[str, Any]] = []
    try:
        echo_port = start_target(targets, "serve_udp_echo")
        dns_port = start_target(targets, "serve_dns")
        console.print("starting limen serve, connector, client forward --udp, client dns …")
        limen.start(echo_port, dns_port)
        paths = (("direct", echo_port), ("limen", limen.udp_port))
        for size in SIZES:
            for rate in (params.rate, None):
                for path, port in paths:
                    udp.append(udp_run(path, port, size, params.seconds, rate))
        private = [f"q{i}.{DNS_SUFFIX}" for i in range(params.queries)]
        public = [f"q{i}.{PUBLIC_SUFFIX}" for i in range(params.queries)]
        for path, port, names in (
            ("direct", dns_port, private),
            ("limen", limen.dns_port, private),
        ):
            dns_rows.append(dns_case(path, "private, first", port, names))
            dns_rows.append(dns_case(path, "private, repeated", port, names))
        dns_rows.append(dns_case("direct", "passthrough, first", dns_port, public))
        dns_rows.append(dns_case("direct", "passthrough, repeated", dns_port, public))
        dns_rows.append(dns_case("limen", "passthrough, first", limen.dns_port, public))
        dns_rows.append(dns_case("limen", "passthrough, repeated", limen.dns_port, public))
    finally:
        limen.teardown()
        targets.stop_all()
    return {"udp": [r.as_dict() for r in udp], "dns": dns_rows}


def ratios(body: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Limen's figures divided by the direct path's, per UDP run and per DNS case."""

    def pair(rows: list[dict[str, Any]], key: tuple[str, ...]) -> list[tuple[Any, Any]]:
        direct = {tuple(r[k] for k in key): r for r in rows if r["path"] == "direct"}
        return [
            (r, direct[tuple(r[k] for k in key)])
            for r in rows
            if r["path"] == "limen" and tuple(r[k] for k in key) in direct
        ]

    def div(a: float, b: float) -> float | None:
        return a / b if b else None

    udp = [
        {
            "size": lim["size"],
            "mode": lim["mode"],
            "delivered_per_s": div(lim["delivered_per_s"], d["delivered_per_s"]),
            "loss_pct_points": lim["loss_pct"] - d["loss_pct"],
        }
        for lim, d in pair(body["udp"], ("size", "mode"))
    ]
    dns_ = [
        {
            "case": lim["case"],
            "p50": div(lim["p50_ms"], d["p50_ms"]),
            "p99": div(lim["p99_ms"], d["p99_ms"]),
        }
        for lim, d in pair(body["dns"], ("case",))
    ]
    return {"udp": udp, "dns": dns_}


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def print_report(
    console: Console, body: dict[str, Any], ratio: dict[str, Any], rate: float
) -> None:
    """The UDP and DNS tables, then the ratios."""
    ut = Table(title=f"UDP echo through the path (127.0.0.1; paced = {rate:.0f} datagrams/s)")
    for col in ("path", "size B", "mode", "sent/s", "delivered/s ↑", "loss % ↓"):
        ut.add_column(col, justify="left" if col in ("path", "mode") else "right")
    for r in body["udp"]:
        ut.add_row(
            r["path"],
            str(r["size"]),
            r["mode"],
            f"{r['sent_per_s']:.0f}",
            f"{r['delivered_per_s']:.0f}",
            f"{r['loss_pct']:.2f}",
        )
    console.print(ut)
    dt = Table(title="DNS A queries, sequential (ms)")
    for col in ("path", "case", "queries", "failed", "p50 ↓", "p99 ↓"):
        dt.add_column(col, justify="left" if col in ("path", "case") else "right")
    for r in body["dns"]:
        dt.add_row(
            r["path"],
            r["case"],
            str(r["queries"]),
            str(r["failed"]),
            f"{r['p50_ms']:.3f}",
            f"{r['p99_ms']:.3f}",
        )
    console.print(dt)
    rt = Table(title="Ratios: limen / direct")
    for col in ("UDP run", "delivered/s", "loss Δ points"):
        rt.add_column(col, justify="left" if col == "UDP run" else "right")
    for r in ratio["udp"]:
        rt.add_row(
            f"{r['size']} B {r['mode']}", _x(r["delivered_per_s"]), f"{r['loss_pct_points']:+.2f}"
        )
    console.print(rt)
    rd = Table(title="Ratios: limen / direct")
    for col in ("DNS case", "p50", "p99"):
        rd.add_column(col, justify="left" if col == "DNS case" else "right")
    for r in ratio["dns"]:
        rd.add_row(r["case"], _x(r["p50"]), _x(r["p99"]))
    console.print(rd)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run, print and save; 1 when the run failed."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.udp_dns", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny runs (smoke test)")
    parser.add_argument("--seconds", type=float, help="duration of each UDP run")
    parser.add_argument("--rate", type=float, help="paced UDP rate, datagrams/s")
    parser.add_argument("--queries", type=int, help="DNS queries per case")
    parser.add_argument(
        "--json",
        type=Path,
        default=REPO_ROOT / "benchmarks" / "results" / "udp_dns.json",
        help="where to write the results (default: benchmarks/results/udp_dns.json)",
    )
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    params = Params(
        seconds=args.seconds or base.seconds,
        rate=args.rate or base.rate,
        queries=args.queries or base.queries,
    )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="limen-bench-udp-dns-") as tmp:
        try:
            body = run(params, Path(tmp), console)
        except (BenchmarkError, OSError, subprocess.SubprocessError) as exc:
            console.print(f"[red]udp/dns benchmark failed: {exc}[/red]")
            return 1
    ratio = ratios(body)
    print_report(console, body, ratio, params.rate)
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "quick": args.quick,
            "params": asdict(params),
            "elapsed_s": round(time.monotonic() - started, 1),
        },
        **body,
        "ratios": ratio,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
