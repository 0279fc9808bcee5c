"""Building blocks shared by the e2e modules that run their own Limen deployment.

The usual deployment: ``limen serve`` on the edge (dialled by the laptop at 198.18.1.1, by the
branch at 198.18.2.1) with short traffic-log and configuration intervals, a tenant built with
``limen admin`` (users, a connector group, applications with an ``ip`` segment on the LAN host,
assignments), a connector enrolled and run on the branch, and users' clients on the laptop.
The helpers here build those pieces; each module composes the ones it needs and keeps its own
ports, names and assertions. Also here: the bounded :func:`poll` loop, ``curl`` and ``ssh``
argv builders and traffic-log reads.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .limen_procs import (
    LimenConnector,
    LimenProcess,
    LimenService,
    enroll_connector,
    limen_pids,
    start_service,
)
from .netns import Host, Topology
from .servers import SshdInfo

#: The private LAN host (sshd, nginx, iperf3), reachable only through Limen.
LAN = "198.18.3.10"
#: The laptop's address, as the edge sees it.
LAPTOP = "198.18.1.2"
#: The edge's address on the laptop's link: the service's public host.
EDGE_FOR_LAPTOP = "198.18.1.1"
#: The edge's address on the branch's link (the branch cannot reach 198.18.1.1).
EDGE_FOR_BRANCH = "198.18.2.1"
#: Short batching and polling intervals: the tests read the traffic log right after flows,
#: and expect policy changes at the edge within a fraction of a second.
FAST_SETTINGS: Mapping[str, str] = {
    "LIMEN_TRAFFIC_LOG_FLUSH_SECONDS": "0.2",
    "LIMEN_CONFIG_POLL_SECONDS": "0.2",
}
#: curl's exit codes for "could not connect" (7) and "timed out" (28).
CURL_CONNECT_FAILURES = frozenset({7, 28})
#: Default bound (seconds) of :func:`poll`: asynchronous effects (configuration reloads,
#: traffic-log batches, log lines).
WAIT = 20.0


def poll(what: str, probe: Callable[[], Any], timeout: float = WAIT, interval: float = 0.1) -> Any:
    """Call ``probe`` until it returns something truthy; that value. Bounded by ``timeout``
    (then :class:`AssertionError` naming ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --- commands run on the hosts ------------------------------------------------------------------


def curl(
    host: Host,
    *args: str,
    noproxy: str | None = "*",
    max_time: float = 10,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """``curl -sS --noproxy NOPROXY --max-time MAX_TIME ARGS`` on ``host`` (never checked).

    ``--noproxy '*'`` by default: an http_proxy of the runner's environment must not change
    the path taken. ``noproxy=None`` leaves it out, for args that name a proxy themselves
    (``--noproxy`` would also disable ``--socks5-hostname``/``-x``).
    """
    no_env_proxy = [] if noproxy is None else ["--noproxy", noproxy]
    argv = ["curl", "-sS", *no_env_proxy, "--max-time", f"{max_time:g}", *args]
    return host.run(argv, check=False, timeout=timeout)


def secret_file(directory: Path, name: str, text: str) -> Path:
    """A 0600 file holding ``text`` (a header with a token): secrets never go on a command
    line, where ``ps`` would show them."""
    path = directory / name
    path.write_text(text)
    path.chmod(0o600)
    return path


def proxy_header_file(directory: Path, token: str) -> Path:
    """``directory/proxy-header``: curl's ``--proxy-header @FILE`` with the bearer ``token``."""
    return secret_file(directory, "proxy-header", f"Proxy-Authorization: Bearer {token}\n")


def edge_proxy_args(service: LimenService, header_file: Path | None = None) -> list[str]:
    """curl args for its own HTTPS-proxy CONNECT through the edge (``-p --proxy …``), with
    the ``Proxy-Authorization`` header of ``header_file`` if given."""
    args = [
        "-p",
        "--proxy", f"https://{service.edge_address()}",
        "--proxy-cacert", str(service.ca_file),
    ]  # fmt: skip
    if header_file is not None:
        args += ["--proxy-header", f"@{header_file}"]
    return args


def ssh_via_forward(sshd: SshdInfo, port: int, *command: str) -> list[str]:
    """The ``ssh`` argv running ``command`` on ``sshd`` through a local forward on
    ``127.0.0.1:PORT``."""
    return dataclasses.replace(sshd, port=port).ssh_argv(*command, addr="127.0.0.1")


# --- the service and its tenant -----------------------------------------------------------------


def assert_no_limen_processes(topology: Topology) -> None:
    """Fail if any namespace of ``topology`` still runs a ``limen`` process."""
    left = {h.name: limen_pids(h) for h in topology}
    assert not any(left.values()), f"Limen processes left behind: {left}"


@contextmanager
def edge_service(
    topology: Topology,
    api_port: int,
    edge_port: int,
    settings: Mapping[str, str] | None = None,
    check_leftovers: bool = True,
) -> Iterator[LimenService]:
    """``limen serve`` on the edge for the laptop (public host) and the branch (extra SAN),
    with :data:`FAST_SETTINGS` and ``settings``. Stopped on exit, after which, if
    ``check_leftovers``, no Limen process may be left in any namespace."""
    service = start_service(
        topology.edge,
        public_host=EDGE_FOR_LAPTOP,
        extra_san=[EDGE_FOR_BRANCH],
        api_port=api_port,
        edge_port=edge_port,
        settings={**FAST_SETTINGS, **(settings or {})},
    )
    try:
        yield service
    finally:
        service.stop()
        if check_leftovers:
            assert_no_limen_processes(topology)


def add_user(service: LimenService, username: str, password: str) -> dict[str, Any]:
    """``limen admin user add USERNAME --password-stdin``; the new user."""
    user: dict[str, Any] = service.admin_json(
        "user", "add", username, "--password-stdin", input=password
    )
    return user


def publish_app(
    service: LimenService,
    name: str,
    group: str,
    ports: str,
    app_args: Sequence[str] = (),
    segment_args: Sequence[str] = (),
) -> dict[str, Any]:
    """An application ``name`` served by connector group ``group``, with one ``ip`` segment:
    the LAN host's ``ports``. ``app_args`` / ``segment_args`` are more options of ``limen
    admin app add`` / ``segment add``. The new application."""
    app: dict[str, Any] = service.admin_json(
        "app", "add", name, "--connector-group", group, *app_args
    )
    service.admin_json(
        "segment", "add", name,
        "--type", "ip", "--destination", LAN, "--ports", ports, *segment_args,
    )  # fmt: skip
    return app


def enroll_branch_connector(
    topology: Topology, service: LimenService, group: str, name: str
) -> LimenConnector:
    """A connector ``name`` of ``group`` enrolled on the branch (not started), through the
    edge's branch-facing address."""
    enrollment = service.admin_json(
        "connector", "enrollment-token", "--group", group, "--name", name
    )
    return enroll_connector(
        topology.branch,
        service,
        enrollment["token"],
        api_addr=EDGE_FOR_BRANCH,
        edge=service.edge_address(EDGE_FOR_BRANCH),
    )


def traffic_records(service: LimenService, *args: str) -> list[dict[str, Any]]:
    """``limen admin traffic list ARGS``: the records of the first page (newest first)."""
    items: list[dict[str, Any]] = service.admin_json("traffic", "list", *args)["items"]
    return items


def logs(service: LimenService, **processes: LimenProcess | None) -> str:
    """The ends of the service's log and of ``processes`` (by label), for failure messages."""
    parts = [f"\n--- service:\n{service.process.tail()}"]
    for label, lp in processes.items():
        parts.append(f"\n--- {label.replace('_', ' ')}:\n{lp.tail() if lp is not None else ''}")
    return "".join(parts)
