"""Outbound connections through an HTTP CONNECT proxy (RFC 9110 §9.3.6), then TLS over the
tunnel: how a connector behind a corporate proxy reaches the edge.

Only unauthenticated ``http://`` proxies are supported: the proxy sees the edge's host and
port, never the TLS inside. The proxy's answer head is capped at :data:`MAX_PROXY_HEAD`
bytes and must arrive within the caller's timeout.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from limen.errors import ConfigError

#: A CONNECT answer is a status line and a few headers; 8 KiB bounds what a broken or
#: hostile proxy can make us buffer before the tunnel exists.
MAX_PROXY_HEAD = 8 * 1024


class ProxyError(ConnectionError):
    """The proxy refused or broke the CONNECT (an OSError: callers retry like any dial)."""


@dataclass(frozen=True, slots=True)
class ProxyAddress:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> ProxyAddress:
        """``http://HOST:PORT`` (a bare ``HOST:PORT`` is accepted too)."""
        text = url.strip()
        if "://" not in text:
            text = "http://" + text
        parts = urlsplit(text)
        if parts.scheme != "http":
            raise ConfigError(f"proxy {url!r}: only http:// proxies are supported")
        if parts.username or parts.password:
            raise ConfigError(f"proxy {url!r}: authenticated proxies are not supported")
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise ConfigError(f"proxy {url!r}: {exc}") from None
        if not parts.hostname:
            raise ConfigError(f"proxy {url!r}: no host")
        return cls(parts.hostname, port)


def proxy_from_env(target_host: str) -> ProxyAddress | None:
    """The proxy named by ``HTTPS_PROXY`` (or ``https_proxy``), unless ``NO_PROXY`` lists the
    target host (exact names, ``.suffix`` / ``suffix`` domain matches, or ``*``)."""
    url = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or ""
    if not url:
        return None
    no_proxy = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    host = target_host.lower().rstrip(".")
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return None
        suffix = entry.lstrip(".")
        if host == suffix or host.endswith("." + suffix):
            return None
    return ProxyAddress.parse(url)


class _ConnectTunnel(asyncio.Protocol):
    """Sends the CONNECT request and reads the proxy's answer head; then steps aside."""

    def __init__(self, host: str, port: int) -> None:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode("ascii")
        self.buffer = bytearray()
        self.established: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.established.done():
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_PROXY_HEAD:
                self._fail(ProxyError("the proxy's answer head is too large"))
            return
        if len(self.buffer) > end + 4:
            # The edge speaks only after our ClientHello: bytes here are the proxy's error.
            self._fail(ProxyError("the proxy sent data before the tunnel was ready"))
            return
        status_line = bytes(self.buffer[:end]).split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            self._fail(ProxyError(f"the proxy answered {status_line[:80]!r}"))
            return
        if parts[1] != "200":
            self._fail(ProxyError(f"the proxy refused the tunnel: {status_line[:120]}"))
            return
        assert self.transport is not None  # set in connection_made, before any data
        self.transport.pause_reading()
        self.established.set_result(None)

    def _fail(self, exc: ProxyError) -> None:
        if not self.established.done():
            self.established.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.established.done():
            self.established.set_exception(
                ProxyError(f"the proxy closed the connection: {exc or 'EOF'}")
            )


async def open_tls(
    protocol: asyncio.Protocol,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext,
    proxy: ProxyAddress | None = None,
    handshake_timeout: float = 10.0,
) -> asyncio.Transport:
    """Open a TLS connection to ``host:port`` (through ``proxy`` when given) with
    ``protocol`` as its protocol; return the TLS transport. Raises OSError (ProxyError
    included) or TimeoutError (TCP, CONNECT and TLS each within
    ``handshake_timeout``)."""
    loop = asyncio.get_running_loop()
    if proxy is None:
        transport, _ = await loop.create_connection(
            lambda: protocol,
            host,
            port,
            ssl=ssl_context,
            server_hostname=host,
            ssl_handshake_timeout=handshake_timeout,
        )
        return transport  # type: ignore[return-value]
    tunnel = _ConnectTunnel(host, port)
    async with asyncio.timeout(handshake_timeout):
        raw, _ = await loop.create_connection(lambda: tunnel, proxy.host, proxy.port)
        try:
            await tunnel.established
        except BaseException:
            raw.close()
            raise
    try:
        tls = await loop.start_tls(
            raw,
            protocol,
            ssl_context,
            server_hostname=host,
            ssl_handshake_timeout=handshake_timeout,
        )
    except BaseException:
        raw.close()
        raise
    if tls is None:  # pragma: no cover - only for a transport closed mid-handshake
        raw.close()
        raise ProxyError("the tunnel closed during the TLS handshake")
    # start_tls does not call connection_made on the new protocol.
    protocol.connection_made(tls)
    return tls  # type: ignore[return-value]
