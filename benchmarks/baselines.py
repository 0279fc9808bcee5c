"""The baseline paths Limen is compared against, all on 127.0.0.1.

- ``direct``: the client connects to the target itself (the ceiling).
- ``socat``: ``TCP-LISTEN,fork`` → target: a process per flow, no encryption.
- ``ssh``: one ``ssh -N -L`` process to a private sshd, default cipher (chacha20-poly1305).
- ``ssh-aes128gcm``: the same with ``-c aes128-gcm@openssh.com`` (AES-NI).
- ``stunnel``: client-mode stunnel → TLS → server-mode stunnel → target.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .common import LOOPBACK, BenchmarkError, DataPath, PathSpec, Processes, free_port, wait_port


class DirectPath:
    """No forwarder at all: the client talks to the target."""

    name = "direct"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def setup(self, target_port: int) -> int:
        """The target port itself."""
        return target_port

    def teardown(self) -> None:
        """Nothing to stop."""

    def pids(self) -> Sequence[int]:
        """No processes."""
        return ()


class SocatPath:
    """``socat TCP-LISTEN:port,fork TCP:target``."""

    name = "socat"

    def __init__(self, workdir: Path) -> None:
        self.procs = Processes(workdir)
        self.socat_pid = 0

    def setup(self, target_port: int) -> int:
        """Start socat listening on a free port."""
        port = free_port()
        listen = f"TCP-LISTEN:{port},bind={LOOPBACK},reuseaddr,fork,backlog=1024,nodelay"
        proc = self.procs.start(
            ["socat", listen, f"TCP:{LOOPBACK}:{target_port},nodelay"], "socat.log"
        )
        self.socat_pid = proc.pid
        wait_port(port, proc=proc)
        return port

    def teardown(self) -> None:
        """Stop socat and its per-flow children."""
        self.procs.stop_all()
        self.socat_pid = 0

    def pids(self) -> Sequence[int]:
        """The listening socat (its forked children are found as descendants)."""
        return [p.pid for p in self.procs.procs]

    def hops(self) -> Mapping[str, int]:
        """One hop: the listening socat with its per-flow children."""
        return {"socat": self.socat_pid}


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


class SshPath:
    """One ``ssh -N -L`` forward through a private sshd on loopback (needs root for sshd)."""

    def __init__(self, workdir: Path, cipher: str | None = None, name: str = "ssh") -> None:
        self.name = name
        self.cipher = cipher
        self.workdir = workdir
        self.procs = Processes(workdir)
        self.sshd_port = 0
        self.client_key = workdir / "client_ed25519"
        self.sshd_pid = self.client_pid = 0

    def _start_sshd(self) -> None:
        d = self.workdir
        host_key = d / "ssh_host_ed25519_key"
        if not host_key.exists():  # setup may run again after teardown: keep the keys
            _keygen(host_key)
            _keygen(self.client_key)
        shutil.copyfile(self.client_key.with_suffix(".pub"), d / "authorized_keys")
        self.sshd_port = free_port()
        cfg = d / "sshd_config"
        cfg.write_text(
            f"Port {self.sshd_port}\n"
            f"ListenAddress {LOOPBACK}\n"
            f"HostKey {host_key}\n"
            f"PidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
            "UsePAM no\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "StrictModes no\n"
            "AllowTcpForwarding yes\n"
            "UseDNS no\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"  # sshd insists on an absolute path
        proc = self.procs.start([sshd, "-D", "-e", "-f", str(cfg)], "sshd.log")
        self.sshd_pid = proc.pid
        wait_port(self.sshd_port, proc=proc)

    def setup(self, target_port: int) -> int:
        """Start sshd (first time only) and one ``ssh -N -L`` forward to ``target_port``."""
        if not self.sshd_port:
            self._start_sshd()
        port = free_port()
        argv = ["ssh", "-F", "/dev/null", "-N"]
        argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        argv += ["-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes"]
        argv += ["-o", "ControlMaster=no", "-o", "ControlPath=none", "-o", "LogLevel=ERROR"]
        if self.cipher:
            argv += ["-c", self.cipher]
        argv += ["-i", str(self.client_key), "-p", str(self.sshd_port)]
        argv += ["-L", f"{LOOPBACK}:{port}:{LOOPBACK}:{target_port}", f"root@{LOOPBACK}"]
        proc = self.procs.start(argv, f"{self.name}-client.log")
        self.client_pid = proc.pid
        try:
            wait_port(port, proc=proc)
        except BenchmarkError as exc:
            tail = self.procs.log_tail(f"{self.name}-client.log")
            raise BenchmarkError(f"{exc}: {tail}") from exc
        return port

    def teardown(self) -> None:
        """Stop the forward and sshd."""
        self.procs.stop_all()
        self.sshd_port = 0
        self.sshd_pid = self.client_pid = 0

    def pids(self) -> Sequence[int]:
        """The ssh client and the sshd listener (per-connection sshd children are descendants)."""
        return [p.pid for p in self.procs.procs]

    def hops(self) -> Mapping[str, int]:
        """The ssh client, then sshd (the listener and its per-connection children)."""
        return {"ssh": self.client_pid, "sshd": self.sshd_pid}


def self_signed_cert(workdir: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """A P-256 self-signed certificate for ``hostname``; returns (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def _stunnel() -> str:
    return shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel4"


class StunnelPath:
    """Client-mode stunnel → TLS (verified self-signed cert) → server-mode stunnel → target."""

    name = "stunnel"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs = Processes(workdir)
        self.client_pid = self.server_pid = 0

    def _conf(self, role: str, body: str) -> Path:
        path = self.workdir / f"{role}.conf"
        path.write_text(
            "foreground = yes\n"
            f"pid = {self.workdir / (role + '.pid')}\n"
            "debug = 3\n"
            "socket = l:TCP_NODELAY=1\n"
            "socket = r:TCP_NODELAY=1\n"
            f"[{role}]\n" + body
        )
        return path

    def setup(self, target_port: int) -> int:
        """Start both stunnels; return the client-side listening port."""
        cert, key = self_signed_cert(self.workdir)
        tls_port, port = free_port(), free_port()
        server = self._conf(
            "server",
            f"accept = {LOOPBACK}:{tls_port}\n"
            f"connect = {LOOPBACK}:{target_port}\n"
            f"cert = {cert}\nkey = {key}\n",
        )
        client = self._conf(
            "client",
            "client = yes\n"
            f"accept = {LOOPBACK}:{port}\n"
            f"connect = {LOOPBACK}:{tls_port}\n"
            f"CAfile = {cert}\nverifyChain = yes\ncheckHost = localhost\n",
        )
        srv = self.procs.start([_stunnel(), str(server)], "stunnel-server.log")
        self.server_pid = srv.pid
        wait_port(tls_port, proc=srv)
        cli = self.procs.start([_stunnel(), str(client)], "stunnel-client.log")
        self.client_pid = cli.pid
        wait_port(port, proc=cli)
        return port

    def teardown(self) -> None:
        """Stop both stunnels."""
        self.procs.stop_all()
        self.client_pid = self.server_pid = 0

    def pids(self) -> Sequence[int]:
        """Both stunnel processes."""
        return [p.pid for p in self.procs.procs]

    def hops(self) -> Mapping[str, int]:
        """The client-mode stunnel, then the server-mode one."""
        return {"stunnel-client": self.client_pid, "stunnel-server": self.server_pid}


def _ssh_default(workdir: Path) -> DataPath:
    return SshPath(workdir)


def _ssh_aes(workdir: Path) -> DataPath:
    return SshPath(workdir, cipher="aes128-gcm@openssh.com", name="ssh-aes128gcm")


BASELINES: list[PathSpec] = [
    PathSpec("direct", "client connects to the target (ceiling)", DirectPath),
    PathSpec("socat", "socat TCP-LISTEN,fork, no encryption", SocatPath, tools=("socat",)),
    PathSpec(
        "ssh",
        "ssh -N -L, default cipher",
        _ssh_default,
        tools=("ssh", "sshd", "ssh-keygen"),
        needs_root=True,
    ),
    PathSpec(
        "ssh-aes128gcm",
        "ssh -N -L -c aes128-gcm@openssh.com",
        _ssh_aes,
        tools=("ssh", "sshd", "ssh-keygen"),
        needs_root=True,
    ),
    PathSpec("stunnel", "stunnel client → TLS → stunnel server", StunnelPath, tools=("stunnel4",)),
]
"""Every baseline, in report order."""
