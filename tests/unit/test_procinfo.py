"""Process attribution for local connections: real subprocesses on IPv4/IPv6 loopback, and
a fabricated /proc tree for the parsing rules and races."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from limen.client.procinfo import _words_hex, process_for_peer, process_info

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.isdir("/proc/self/fd"),
    reason="needs Linux /proc",
)

# Connects to argv[1]:argv[2] (from a given source address when argv[3] is set), then holds
# the connection open until a line arrives on stdin.
CHILD = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.connect((host, port))
sys.stdin.readline()
s.close()
"""


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextmanager
def connected_child(
    listen_host: str, connect_host: str, *, dual_stack: bool = False
) -> Iterator[tuple[subprocess.Popen[str], tuple[str, int]]]:
    """A child process connected to a listener of ours; yields (process, peer address)."""
    family = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        if dual_stack:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((listen_host, 0))
        listener.listen()
        listener.settimeout(30)  # bounds the wait for the child, never a synchronisation
        port = listener.getsockname()[1]
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, connect_host, str(port)],
            stdin=subprocess.PIPE,
            text=True,
        )
        try:
            conn, peer = listener.accept()
            with conn:
                yield child, (peer[0], peer[1])
        finally:
            assert child.stdin is not None
            child.stdin.write("done\n")
            child.stdin.close()
            child.wait(timeout=30)
    assert child.returncode == 0


def expected_comm() -> str:
    # The kernel names a process after the basename of the file it executed, 15 bytes max.
    return os.path.basename(sys.executable)[:15]


@linux_only
def test_finds_the_child_over_ipv4_loopback() -> None:
    with connected_child("127.0.0.1", "127.0.0.1") as (child, (host, port)):
        assert host == "127.0.0.1"
        assert process_info(host, port) == (child.pid, expected_comm())
        assert process_for_peer(host, port) == expected_comm()
        assert Path(f"/proc/{child.pid}/comm").read_text().strip() == expected_comm()


@linux_only
@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_finds_the_child_over_ipv6_loopback() -> None:
    with connected_child("::1", "::1") as (child, (host, port)):
        assert host == "::1"
        assert process_info(host, port) == (child.pid, expected_comm())
        assert process_info(f"{host}%lo", port) == (child.pid, expected_comm())


@linux_only
@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv4_client_on_a_dual_stack_listener() -> None:
    # The listener sees ::ffff:127.0.0.1; the child's socket is an IPv4 one in /proc/net/tcp.
    with connected_child("::", "127.0.0.1", dual_stack=True) as (child, (host, port)):
        assert host == "::ffff:127.0.0.1"
        assert process_info(host, port) == (child.pid, expected_comm())


@linux_only
def test_own_socket_is_found_in_this_process() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname(), timeout=10) as client:
            conn, peer = listener.accept()
            with conn:
                assert client.getsockname() == peer
                info = process_info(peer[0], peer[1])
                assert info is not None
                assert info[0] == os.getpid()


@linux_only
def test_nothing_there_gives_none() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    assert process_info("127.0.0.1", free_port) is None
    # A listening socket is never the client end of a connection.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert process_info("127.0.0.1", listener.getsockname()[1]) is None


@pytest.mark.parametrize(
    ("host", "port"),
    [("not-an-ip", 80), ("", 80), ("127.0.0.1", 0), ("127.0.0.1", 65536), ("127.0.0.1", -1)],
)
def test_bad_input_gives_none(host: str, port: int) -> None:
    assert process_info(host, port) is None
    assert process_for_peer(host, port) is None


def test_not_linux_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert process_info("127.0.0.1", 1234) is None


def test_missing_proc_gives_none(tmp_path: Path) -> None:
    assert process_info("127.0.0.1", 1234, proc_root=str(tmp_path / "nope")) is None


# --- a fabricated /proc tree -------------------------------------------------------------

TCP_TITLE = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode\n"
)


def tcp_row(local: str, state: str, uid: int, inode: int) -> str:
    return (
        f"   0: {local} 0100007F:1F90 {state} 00000000:00000000 00:00000000 00000000 "
        f"{uid:>5}        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
    )


def fake_proc(
    root: Path,
    tcp: list[str],
    tcp6: list[str] | None,
    processes: dict[int, tuple[bytes, list[str]]],
) -> None:
    """processes: pid → (comm bytes, fd symlink targets)."""
    (root / "net").mkdir(parents=True)
    (root / "net" / "tcp").write_text(TCP_TITLE + "".join(tcp))
    if tcp6 is not None:
        (root / "net" / "tcp6").write_text(TCP_TITLE + "".join(tcp6))
    (root / "self").mkdir()  # not a pid: ignored
    for pid, (comm, links) in processes.items():
        (root / str(pid) / "fd").mkdir(parents=True)
        (root / str(pid) / "comm").write_bytes(comm)
        for n, link in enumerate(links):
            os.symlink(link, root / str(pid) / "fd" / str(n))


def test_hex_words_match_the_kernel_format() -> None:
    # What a little-endian kernel prints for 127.0.0.1; a big-endian one prints 7F000001.
    expected = "0100007F" if sys.byteorder == "little" else "7F000001"
    assert _words_hex(bytes([127, 0, 0, 1])) == expected


@linux_only
def test_fabricated_tree_skips_listeners_time_wait_and_other_sockets(tmp_path: Path) -> None:
    local = f"{_words_hex(bytes([127, 0, 0, 1]))}:{40000:04X}"
    fake_proc(
        tmp_path,
        tcp=[
            tcp_row(local, "0A", 0, 111),  # a listener on the same address
            tcp_row(local, "06", 0, 0),  # TIME_WAIT: no owner
            tcp_row(local.lower(), "01", os.getuid(), 4242),
        ],
        tcp6=None,  # missing table: skipped
        processes={
            5: (b"bash\n", ["/dev/pts/0", "socket:[111]", "pipe:[9]"]),
            77: (b"curl\n", ["/dev/null", "socket:[4242]"]),
            78: (b"other\n", ["socket:[4242]"]),  # shares it, but 77 comes first
        },
    )
    assert process_info("127.0.0.1", 40000, proc_root=str(tmp_path)) == (77, "curl")
    assert process_info("::ffff:127.0.0.1", 40000, proc_root=str(tmp_path)) == (77, "curl")
    assert process_info("127.0.0.1", 40001, proc_root=str(tmp_path)) is None
    assert process_info("127.0.0.2", 40000, proc_root=str(tmp_path)) is None


@linux_only
def test_fabricated_tree_ipv6_and_mapped_rows(tmp_path: Path) -> None:
    v6 = _words_hex(bytes(15) + b"\x01")
    mapped = _words_hex(bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1]))
    fake_proc(
        tmp_path,
        tcp=[],
        tcp6=[
            tcp_row(f"{v6}:{50000:04X}", "01", 0, 600),
            tcp_row(f"{mapped}:{50001:04X}", "01", 0, 601),
        ],
        processes={10: (b"ssh\n", ["socket:[600]"]), 11: (b"psql\n", ["socket:[601]"])},
    )
    root = str(tmp_path)
    assert process_info("::1", 50000, proc_root=root) == (10, "ssh")
    assert process_info("0:0::1", 50000, proc_root=root) == (10, "ssh")
    # An IPv6 socket connected to a mapped IPv4 address, seen from an IPv4 listener.
    assert process_info("127.0.0.1", 50001, proc_root=root) == (11, "psql")


@linux_only
def test_fabricated_tree_name_is_made_header_safe(tmp_path: Path) -> None:
    local = f"{_words_hex(bytes([127, 0, 0, 1]))}:{40000:04X}"
    fake_proc(
        tmp_path,
        tcp=[tcp_row(local, "01", 0, 9)],
        tcp6=None,
        processes={3: (b"ev\\il\r\nX: 1\xff\n", ["socket:[9]"])},
    )
    name = process_for_peer("127.0.0.1", 40000, proc_root=str(tmp_path))
    assert name == "ev\\x5cil\\x0d\\x0aX: 1\\xff"
    assert name.isascii() and name.isprintable()


@linux_only
def test_fabricated_tree_races_and_malformed_rows_are_skipped(tmp_path: Path) -> None:
    local = f"{_words_hex(bytes([127, 0, 0, 1]))}:{40000:04X}"
    fake_proc(
        tmp_path,
        tcp=[
            "garbage\n",
            f"   0: {local} 0100007F:1F90 01 x\n",  # truncated
            tcp_row(local, "01", 0, 4242).replace(" 4242 ", " notanumber "),
            tcp_row(local, "01", 0, 4242),
        ],
        tcp6=None,
        processes={
            20: (b"gone\n", []),
            21: (b"late\n", ["socket:[4242]"]),
        },
    )
    # pid 20 exits while we scan: no fd directory at all; pid 19 lost its comm.
    os.rmdir(tmp_path / "20" / "fd")
    (tmp_path / "19" / "fd").mkdir(parents=True)
    os.symlink("socket:[4242]", tmp_path / "19" / "fd" / "0")
    assert process_info("127.0.0.1", 40000, proc_root=str(tmp_path)) == (21, "late")


@linux_only
def test_fabricated_tree_fd_budget_bounds_the_work(tmp_path: Path) -> None:
    local = f"{_words_hex(bytes([127, 0, 0, 1]))}:{40000:04X}"
    fake_proc(
        tmp_path,
        tcp=[tcp_row(local, "01", os.getuid(), 4242)],
        tcp6=None,
        processes={
            1: (b"busy\n", [f"/tmp/f{i}" for i in range(50)]),
            2: (b"target\n", ["socket:[4242]"]),
        },
    )
    root = str(tmp_path)
    assert process_info("127.0.0.1", 40000, proc_root=root, max_fd_links=51) == (2, "target")
    assert process_info("127.0.0.1", 40000, proc_root=root, max_fd_links=50) is None
