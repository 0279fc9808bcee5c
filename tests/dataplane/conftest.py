"""Every data-plane test runs on both event loops: the `limen` command runs on uvloop, whose
transports differ from asyncio's in details (a read can arrive before a pause requested in
``connection_made`` takes effect, for one)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
