"""TLS contexts. TLS 1.2+ everywhere, modern AEAD ciphers, ALPN to tell flows apart."""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path

ALPN_MUX = "limen/1"
ALPN_HTTP1 = "http/1.1"


def _load_chain(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    # ssl can only load key material from files; write them to a private temp dir briefly.
    with tempfile.TemporaryDirectory() as tmp:
        cert = Path(tmp) / "cert.pem"
        key = Path(tmp) / "key.pem"
        key.touch(mode=0o600)
        cert.write_text(cert_pem)
        key.write_text(key_pem)
        ctx.load_cert_chain(str(cert), str(key))


def server_context(cert_pem: str, key_pem: str, ca_pem: str) -> ssl.SSLContext:
    """The edge's context: any client may connect; a connector presents a certificate from
    our CA (verified when present, ``CERT_OPTIONAL``), a user presents a bearer token."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert_pem, key_pem)
    ctx.load_verify_locations(cadata=ca_pem)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols([ALPN_MUX, ALPN_HTTP1])
    # Session tickets let a reconnecting client resume without a full handshake.
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def api_server_context(cert_pem: str, key_pem: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert_pem, key_pem)
    return ctx


def client_context(
    ca_pem: str | None = None,
    *,
    cert_pem: str | None = None,
    key_pem: str | None = None,
    alpn: list[str] | None = None,
) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca_pem`` (or the system store)."""
    ctx = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_pem and key_pem:
        _load_chain(ctx, cert_pem, key_pem)
    ctx.set_alpn_protocols(alpn or [ALPN_MUX])
    return ctx
