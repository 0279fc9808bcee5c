"""Serve an ASGI app with a real uvicorn on a loopback port, in a thread (for sync tests).

``fastapi.testclient`` cannot be used: under ``filterwarnings = error`` its import warning
fails the test run; a real server is closer to production anyway."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


@contextmanager
def serve(app: Any, name: str = "api-test") -> Iterator[str]:
    """Run ``app`` on 127.0.0.1 with a free port; yields its base URL; stops it after."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:  # bounded: fails after 10 s
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
