"""Which local process opened a connection to the client's local listener (Linux, best effort).

The client accepts connections from local programs (SOCKS5 or a forwarded port) on loopback.
The peer address of such a connection is the program's own socket address, so the program is
the process that owns the socket whose *local* address is that peer address:

1. ``/proc/net/tcp`` and ``/proc/net/tcp6`` list every TCP socket of our network namespace with
   its local address, state, owner uid and inode. Addresses are hex dumps of the in-memory
   (network order) address read as native 32-bit words, so on little-endian hosts each 4-byte
   word appears byte-reversed (``127.0.0.1`` → ``0100007F``); ports are plain hex numbers.
2. Every ``/proc/<pid>/fd/<n>`` is a symlink; a socket's reads ``socket:[<inode>]``.
3. ``/proc/<pid>/comm`` is the process name (at most 15 bytes, set from the executable name).

Rules this module keeps:

* Never raises: processes and sockets come and go while we look (a vanished pid, an fd closed
  under us, permission denied for another user's process), so every OS error means "skip".
  Not Linux, no ``/proc``, or nothing found → ``None``.
* Bounded work: at most ``MAX_SOCKET_ROWS`` socket rows and ``MAX_FD_LINKS`` fd symlinks are
  read per call, whatever the host holds.
* Blocking file I/O (a few ms on a desktop): call it from a worker thread in asyncio code.
* The name is made safe for logs and HTTP headers: printable ASCII, other bytes as ``\\xNN``.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import sys

#: Rows read from each socket table. A desktop has hundreds of sockets; a million rows is far
#: beyond any client host and stops a pathological table from stalling a new connection.
MAX_SOCKET_ROWS = 1_000_000
#: fd symlinks read per lookup. A desktop has tens of thousands of open fds in total; past
#: this we give up rather than spend unbounded time attributing one connection.
MAX_FD_LINKS = 262_144
#: /proc/<pid>/comm holds at most 16 bytes (TASK_COMM_LEN); read a little more to be safe.
_COMM_READ = 64
#: TCP_LISTEN in the ``st`` column: a listener never is the client end of a connection.
_STATE_LISTEN = "0A"

_V4_MAPPED_BASE = ipaddress.IPv6Address("::ffff:0.0.0.0")


def process_for_peer(
    local_peer_host: str,
    local_peer_port: int,
    *,
    proc_root: str = "/proc",
    max_fd_links: int = MAX_FD_LINKS,
) -> str | None:
    """Name (``/proc/<pid>/comm``, e.g. ``"curl"``) of the local process whose socket has the
    address ``(local_peer_host, local_peer_port)``, or ``None`` when it cannot be found."""
    info = process_info(
        local_peer_host, local_peer_port, proc_root=proc_root, max_fd_links=max_fd_links
    )
    return info[1] if info is not None else None


def process_info(
    local_peer_host: str,
    local_peer_port: int,
    *,
    proc_root: str = "/proc",
    max_fd_links: int = MAX_FD_LINKS,
) -> tuple[int, str] | None:
    """``(pid, name)`` of the local process owning the TCP socket whose local address is
    ``(local_peer_host, local_peer_port)``, or ``None`` (not Linux, not found, raced away).

    ``proc_root`` exists for tests; ``max_fd_links`` caps the fd symlinks read."""
    if not sys.platform.startswith("linux"):
        return None
    patterns = _local_address_patterns(local_peer_host, local_peer_port)
    if patterns is None:
        return None
    found = _find_socket(proc_root, patterns)
    if found is None:
        return None
    inode, uid = found
    return _find_owner(proc_root, f"socket:[{inode}]", uid, max_fd_links)


def _local_address_patterns(host: str, port: int) -> dict[str, str] | None:
    """The ``local_address`` column text to look for, per table (``tcp`` / ``tcp6``)."""
    if not isinstance(port, int) or not 0 < port < 65536:
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    port_hex = f"{port:04X}"
    if isinstance(address, ipaddress.IPv4Address):
        # An IPv4 client socket is in ``tcp``; an IPv6 one connected to a mapped address is in
        # ``tcp6`` with the mapped form.
        mapped = ipaddress.IPv6Address(int(_V4_MAPPED_BASE) | int(address))
        return {
            "tcp": f"{_words_hex(address.packed)}:{port_hex}",
            "tcp6": f"{_words_hex(mapped.packed)}:{port_hex}",
        }
    return {"tcp6": f"{_words_hex(address.packed)}:{port_hex}"}


def _words_hex(packed: bytes) -> str:
    """The kernel's ``%08X`` per native 32-bit word of an address in network order."""
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{word:08X}" for word in words)


def _find_socket(proc_root: str, patterns: dict[str, str]) -> tuple[int, int] | None:
    """(inode, uid) of the first non-listening socket with the wanted local address."""
    for table, wanted in patterns.items():
        try:
            with open(f"{proc_root}/net/{table}", encoding="ascii", errors="replace") as rows:
                next(rows, None)  # the column titles
                for count, row in enumerate(rows):
                    if count >= MAX_SOCKET_ROWS:
                        break
                    fields = row.split()
                    # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
                    if len(fields) < 10 or fields[1].upper() != wanted:
                        continue
                    if fields[3].upper() == _STATE_LISTEN:
                        continue
                    try:
                        inode = int(fields[9])
                        uid = int(fields[7])
                    except ValueError:
                        continue
                    if inode:  # 0: TIME_WAIT and friends, owned by no process
                        return inode, uid
        except OSError:
            continue
    return None


def _find_owner(proc_root: str, target: str, uid: int, max_fd_links: int) -> tuple[int, str] | None:
    """Scan ``/proc/<pid>/fd`` for ``target``: processes of the socket's uid first (cheap and
    almost always right), then the rest (a process may have changed uid since)."""
    try:
        pids = sorted(int(e.name) for e in os.scandir(proc_root) if e.name.isdigit())
    except OSError:
        return None
    mine: list[int] = []
    others: list[int] = []
    for pid in pids:
        try:
            owner = os.stat(f"{proc_root}/{pid}").st_uid
        except OSError:
            continue  # already gone
        (mine if owner == uid else others).append(pid)
    budget = max_fd_links
    for pid in mine + others:
        fd_dir = f"{proc_root}/{pid}/fd"
        try:
            entries = os.scandir(fd_dir)
        except OSError:
            continue  # gone, or another user's process we may not inspect
        with entries:
            for entry in entries:
                if budget <= 0:
                    return None
                budget -= 1
                try:
                    if os.readlink(entry.path) != target:
                        continue
                except OSError:
                    continue
                name = _comm(proc_root, pid)
                # Re-check after reading the name: if the process exited and its pid was
                # reused in between, the name would belong to someone else.
                try:
                    still_there = os.readlink(entry.path) == target
                except OSError:
                    still_there = False
                if name is not None and still_there:
                    return pid, name
    return None


def _comm(proc_root: str, pid: int) -> str | None:
    try:
        with open(f"{proc_root}/{pid}/comm", "rb") as f:
            raw = f.read(_COMM_READ)
    except OSError:
        return None
    raw = raw.removesuffix(b"\n")
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw)
