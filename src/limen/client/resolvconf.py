"""Making the DNS stub the system resolver while ``limen client up`` runs, and undoing it.

Two ways, chosen at start:

* **systemd-resolved** (``/etc/resolv.conf`` names its stub 127.0.0.53 and ``resolvectl``
  exists): a dummy link ``limen0`` carries the stub as its DNS server and the private names as
  routing domains (``~corp.example``), so only those names reach Limen; deleting the link
  undoes it (resolved forgets a link's settings when the link goes).
* **resolv.conf** otherwise: the file is rewritten to name only the stub (``search`` and
  ``options`` lines kept), the stub forwards every other name to the servers the original
  named. The original is saved in the client directory *before* the file changes, and
  written back byte for byte on exit, on ``limen client down`` and, after a crash, at the
  next start (:meth:`ResolvConf.recover`).

Rules it keeps:

* **Write in place.** ``/etc/resolv.conf`` may be a bind mount (``ip netns exec`` mounts
  ``/etc/netns/NS/resolv.conf`` over it, containers do the same); renaming over a mount point
  fails with EBUSY, so the file is truncated and rewritten through the same inode.
* **The saved copy is the truth.** It exists exactly while the system file is ours; restoring
  deletes it last, so a crash between the two steps restores again next time (idempotent).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from limen.errors import ConfigError
from limen.net.resolver import Upstream

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")
SAVED_NAME = "resolv.conf.limen-saved"
RESOLVED_STUB = "127.0.0.53"
LINK_NAME = "limen0"
#: Seconds a resolvectl or ip call may take (local D-Bus / netlink calls).
COMMAND_TIMEOUT = 15.0
_HEADER = "# Written by `limen client up`: restored when it stops (`limen client down`).\n"


def nameservers(text: str) -> list[Upstream]:
    """The ``nameserver`` entries of a resolv.conf text, in order."""
    out: list[Upstream] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            host = words[1].split("%", 1)[0]  # a scope id is not ours to keep
            out.append(Upstream(host))
    return out


def render_stub_conf(original: str, stub: str) -> str:
    """``original`` with its nameservers replaced by ``stub`` (search/domain/options kept)."""
    kept = [
        line
        for line in original.splitlines()
        if line.split()[:1] and line.split()[0] in ("search", "domain", "options", "sortlist")
    ]
    return _HEADER + f"nameserver {stub}\n" + "".join(f"{line}\n" for line in kept)


def _write_in_place(path: Path, data: bytes) -> None:
    # r+ keeps the inode: a bind-mounted file cannot be replaced by a rename (see above).
    with open(path, "r+b") as f:
        f.seek(0)
        f.write(data)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())


def uses_resolved(text: str) -> bool:
    """Whether ``text`` (a resolv.conf) points at systemd-resolved and resolvectl exists."""
    servers = [u.host for u in nameservers(text)]
    return servers == [RESOLVED_STUB] and shutil.which("resolvectl") is not None


class ResolvConf:
    """The resolv.conf takeover (see the module docstring). Blocking: call from a worker
    thread in asyncio code."""

    def __init__(self, client_dir: Path, path: Path = RESOLV_CONF) -> None:
        self.path = path
        self.saved = client_dir / SAVED_NAME
        #: The servers the original named (the stub's upstreams), set by :meth:`take_over`.
        self.upstreams: list[Upstream] = []

    def recover(self) -> bool:
        """Restore a file left changed by a client that died; True if one was."""
        return self.restore()

    def take_over(self, stub: str) -> list[Upstream]:
        """Point the system at ``stub``; the original's servers (never ``stub`` itself)."""
        self.recover()
        try:
            original = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read {self.path}: {exc}", code="resolv_conf_unreadable"
            ) from exc
        text = original.decode("utf-8", errors="replace")
        self.upstreams = [u for u in nameservers(text) if u.host != stub]
        fd = os.open(self.saved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(original)
            f.flush()
            os.fsync(f.fileno())
        try:
            _write_in_place(self.path, render_stub_conf(text, stub).encode())
        except OSError as exc:
            self.saved.unlink(missing_ok=True)
            raise ConfigError(
                f"cannot rewrite {self.path}: {exc}", code="resolv_conf_unwritable"
            ) from exc
        log.info("%s now names the DNS stub %s (original saved in %s)", self.path, stub, self.saved)
        return self.upstreams

    def restore(self) -> bool:
        """Write the saved original back; True if there was one. Idempotent."""
        try:
            original = self.saved.read_bytes()
        except FileNotFoundError:
            return False
        try:
            _write_in_place(self.path, original)
        except FileNotFoundError:
            self.path.write_bytes(original)
        self.saved.unlink(missing_ok=True)
        log.info("%s restored", self.path)
        return True


class ResolvedLink:
    """The systemd-resolved way: routing domains on a dummy link (see the module docstring).
    Blocking: call from a worker thread."""

    def __init__(self, link: str = LINK_NAME) -> None:
        self.link = link
        self.domains: tuple[str, ...] = ()

    @staticmethod
    def _run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )

    def recover(self) -> bool:
        """Delete a link left by a client that died; True if one was."""
        if self._run("ip", "link", "show", self.link).returncode != 0:
            return False
        self._run("ip", "link", "del", self.link)
        return True

    def take_over(self, stub: str, domains: list[str]) -> None:
        self.recover()
        for argv in (
            ("ip", "link", "add", self.link, "type", "dummy"),
            ("ip", "link", "set", self.link, "up"),
            ("resolvectl", "dns", self.link, stub),
        ):
            proc = self._run(*argv)
            if proc.returncode != 0:
                self.recover()
                raise ConfigError(
                    f"{' '.join(argv)} failed: {proc.stderr.strip()}", code="resolved_failed"
                )
        self.set_domains(domains)

    def set_domains(self, domains: list[str]) -> None:
        """Route ``domains`` (and the names under them) to the stub."""
        wanted = tuple(sorted(set(domains)))
        if wanted == self.domains:
            return
        proc = self._run("resolvectl", "domain", self.link, *(f"~{d}" for d in wanted))
        if proc.returncode != 0:
            log.warning("resolvectl domain failed: %s", proc.stderr.strip())
            return
        self.domains = wanted

    def restore(self) -> bool:
        return self.recover()


__all__ = [
    "RESOLV_CONF",
    "SAVED_NAME",
    "ResolvConf",
    "ResolvedLink",
    "nameservers",
    "render_stub_conf",
    "uses_resolved",
]
