"""Real third-party servers started inside a :class:`~.netns.Host` for end-to-end tests.

Each server gets a private directory (config, keys, pid file, logs) removed at teardown, runs
in the foreground as a tracked process of its host (killed when the topology is destroyed) and
is ready when its TCP port accepts connections from the host itself. A server that does not
come up raises :class:`ServerStartError` carrying the tail of its log, so a failing fixture
says why.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .netns import Host

# Seconds a freshly started server gets to accept connections. Generous: CI machines are slow.
READY_TIMEOUT = 15.0


class ServerStartError(RuntimeError):
    """A test server failed to start; the message includes the end of its log."""


def _start(
    host: Host, argv: Sequence[str], log: Path, port: int, addr: str | None = None
) -> subprocess.Popen[Any]:
    """Start ``argv`` on ``host`` with output in ``log`` and wait for ``port`` to accept."""
    logf: IO[bytes] = log.open("wb")
    try:
        proc = host.popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        logf.close()  # the child holds its own descriptor
    try:
        host.wait_port(addr or host.addr, port, timeout=READY_TIMEOUT)
    except TimeoutError as exc:
        status = proc.poll()
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise ServerStartError(
            f"{argv[0]} on {host.name} port {port} not ready (exit status {status}): {tail}"
        ) from exc
    return proc


@dataclass(frozen=True, slots=True)
class Server:
    """A server process running on :attr:`host`."""

    host: Host
    proc: subprocess.Popen[Any] = field(repr=False)

    def stop(self) -> None:
        """Stop the server now rather than at topology teardown."""
        self.host.stop(self.proc)


@dataclass(frozen=True, slots=True)
class SshdInfo(Server):
    """A running OpenSSH server that accepts ``root`` with :attr:`client_key`."""

    addr: str
    port: int
    client_key: Path
    """Private key (no passphrase) authorised for root."""
    workdir: Path
    log: Path

    def ssh_argv(
        self, *command: str, extra: Sequence[str] = (), addr: str | None = None
    ) -> list[str]:
        """The ``ssh`` argv to run ``command`` on this server (non-interactive, no host check).

        ``addr`` overrides the address dialled, e.g. a Limen-published name or local port.
        """
        return [
            "ssh",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(self.client_key),
            "-p",
            str(self.port),
            *extra,
            f"root@{addr or self.addr}",
            *command,
        ]


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


def start_sshd(host: Host, port: int = 22) -> SshdInfo:
    """Start ``sshd`` on ``host``: own host key, config and pid file; root logs in by key only."""
    d = host.tempdir("sshd")
    host_key = d / "ssh_host_ed25519_key"
    client_key = d / "client_ed25519"
    _keygen(host_key, "limen-e2e-host")
    _keygen(client_key, "limen-e2e-client")
    authorized = d / "authorized_keys"
    shutil.copyfile(client_key.with_suffix(".pub"), authorized)
    cfg = d / "sshd_config"
    cfg.write_text(
        f"Port {port}\n"
        "ListenAddress 0.0.0.0\n"
        f"HostKey {host_key}\n"
        f"PidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {authorized}\n"
        "UsePAM no\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        # The temp dir is not owned the way sshd insists on for real home directories.
        "StrictModes no\n"
        "AllowTcpForwarding yes\n"
        "UseDNS no\n"
        "LogLevel INFO\n"
        "Subsystem sftp internal-sftp\n"
    )
    # The privilege-separation directory; shared by every sshd, so never removed.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"  # sshd insists on an absolute path
    log = d / "sshd.log"
    proc = _start(host, [sshd, "-D", "-e", "-f", str(cfg)], log, port)
    return SshdInfo(
        host=host, proc=proc, addr=host.addr, port=port, client_key=client_key, workdir=d, log=log
    )


@dataclass(frozen=True, slots=True)
class NginxInfo(Server):
    """A running nginx serving a page whose body contains :attr:`marker`."""

    addr: str
    port: int
    path: str
    """URL path of the marker page, e.g. ``/index.html``."""
    marker: str
    """A random string in the page body: proves which server answered."""
    big_path: str
    """URL path of a 4 MiB file, for transfer tests."""
    big_size: int
    root: Path

    @property
    def url(self) -> str:
        """``http://addr:port/path`` of the marker page."""
        return f"http://{self.addr}:{self.port}{self.path}"


def start_nginx(host: Host, port: int = 80) -> NginxInfo:
    """Start nginx on ``host`` with its own prefix, config and logs; serves a marker page."""
    d = host.tempdir("nginx")
    www = d / "www"
    www.mkdir()
    marker = f"limen-e2e-{secrets.token_hex(8)}"
    (www / "index.html").write_text(f"<html><body><p>{marker}</p></body></html>\n")
    big_size = 4 * 1024 * 1024
    (www / "big.bin").write_bytes(secrets.token_bytes(big_size))
    for sub in ("body", "proxy", "fastcgi"):
        (d / sub).mkdir()
    cfg = d / "nginx.conf"
    cfg.write_text(
        "daemon off;\n"
        "master_process on;\n"
        "worker_processes 1;\n"
        # Workers read a root-only temp dir: no switch to an unprivileged user.
        "user root;\n"
        f"pid {d / 'nginx.pid'};\n"
        f"error_log {d / 'error.log'} info;\n"
        "events { worker_connections 512; }\n"
        "http {\n"
        f"  access_log {d / 'access.log'};\n"
        f"  client_body_temp_path {d / 'body'};\n"
        f"  proxy_temp_path {d / 'proxy'};\n"
        f"  fastcgi_temp_path {d / 'fastcgi'};\n"
        "  default_type text/html;\n"
        "  types { text/html html; application/octet-stream bin; }\n"
        "  server {\n"
        f"    listen {port};\n"
        f"    root {www};\n"
        "    location / { }\n"
        "  }\n"
        "}\n"
    )
    log = d / "stderr.log"
    proc = _start(host, ["nginx", "-p", str(d), "-c", str(cfg)], log, port)
    return NginxInfo(
        host=host,
        proc=proc,
        addr=host.addr,
        port=port,
        path="/index.html",
        marker=marker,
        big_path="/big.bin",
        big_size=big_size,
        root=www,
    )


@dataclass(frozen=True, slots=True)
class Iperf3Info(Server):
    """A running ``iperf3 -s`` (one test at a time, as iperf3 servers are)."""

    addr: str
    port: int
    log: Path


def start_iperf3(host: Host, port: int = 5201) -> Iperf3Info:
    """Start an iperf3 server on ``host``."""
    d = host.tempdir("iperf3")
    log = d / "iperf3.log"
    proc = _start(host, ["iperf3", "-s", "-p", str(port)], log, port)
    return Iperf3Info(host=host, proc=proc, addr=host.addr, port=port, log=log)


@dataclass(frozen=True, slots=True)
class SrvRecord:
    """One SRV record: ``name`` (e.g. ``_ldap._tcp.corp.test``) → ``target:port``."""

    name: str
    target: str
    port: int
    priority: int = 0
    weight: int = 0


@dataclass(frozen=True, slots=True)
class DnsmasqInfo(Server):
    """A running authoritative-style dnsmasq answering only the records it was given."""

    addr: str
    port: int
    records: Mapping[str, str]
    log: Path


def start_dnsmasq(
    host: Host,
    records: Mapping[str, str],
    txt: Mapping[str, str] | None = None,
    srv: Sequence[SrvRecord] = (),
    port: int = 53,
) -> DnsmasqInfo:
    """Start dnsmasq on ``host`` answering A ``records`` (name → IPv4), TXT and SRV records.

    No upstream servers and no /etc/hosts: unknown names get NXDOMAIN/REFUSED, so a test can
    tell a private-DNS answer from a leak to public DNS.
    """
    d = host.tempdir("dnsmasq")
    log = d / "dnsmasq.log"
    argv = [
        "dnsmasq",
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        f"--listen-address={host.addr}",
        f"--port={port}",
        f"--pid-file={d / 'dnsmasq.pid'}",
        "--user=root",
        "--log-queries",
        "--log-facility=-",
    ]
    for name, ip in records.items():
        argv.append(f"--host-record={name},{ip}")
    for name, text in (txt or {}).items():
        argv.append(f"--txt-record={name},{text}")
    for r in srv:
        argv.append(f"--srv-host={r.name},{r.target},{r.port},{r.priority},{r.weight}")
    proc = _start(host, argv, log, port)
    return DnsmasqInfo(
        host=host, proc=proc, addr=host.addr, port=port, records=dict(records), log=log
    )
