"""Fixtures for the end-to-end tests: one namespace topology per session, real servers on it.

Every test collected under ``tests/e2e`` gets the ``e2e`` marker, so ``-m "not e2e"`` selects
the fast suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .netns import Topology, require_root_and_tools
from .servers import (
    Iperf3Info,
    NginxInfo,
    SshdInfo,
    start_iperf3,
    start_nginx,
    start_sshd,
)

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test in this directory ``e2e``."""
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def topology() -> Iterator[Topology]:
    """The laptop / edge / branch / lan namespaces, destroyed at the end of the session."""
    require_root_and_tools("sysctl")
    with Topology() as topo:
        yield topo


@pytest.fixture(scope="session")
def lan_sshd(topology: Topology) -> SshdInfo:
    """sshd on the private LAN host, port 22."""
    require_root_and_tools("sshd", "ssh", "ssh-keygen")
    return start_sshd(topology.lan, port=22)


@pytest.fixture(scope="session")
def lan_nginx(topology: Topology) -> NginxInfo:
    """nginx on the private LAN host, port 80, serving a marker page."""
    require_root_and_tools("nginx", "curl")
    return start_nginx(topology.lan, port=80)


@pytest.fixture(scope="session")
def lan_iperf3(topology: Topology) -> Iperf3Info:
    """iperf3 server on the private LAN host, port 5201."""
    require_root_and_tools("iperf3")
    return start_iperf3(topology.lan, port=5201)
