"""One error root with stable machine codes.

Every error Limen raises on purpose derives from :class:`LimenError` and carries a ``code``: a
short, stable string used unchanged in HTTP responses, traffic-log records, audit records and
log lines, so an operator can grep for it and a client can branch on it.
"""

from __future__ import annotations


class LimenError(Exception):
    """Root of all deliberate Limen errors."""

    code = "limen_error"
    http_status = 500

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message or self.code)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ProtocolError(LimenError):
    code = "protocol_error"
    http_status = 400


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: close that connection, keep serving everyone else."""

    code = "remote_protocol_error"


class LocalProtocolError(ProtocolError):
    """Our own code misused a protocol core: a bug, never peer data."""

    code = "local_protocol_error"
    http_status = 500


class AuthError(LimenError):
    """Authentication failed: missing, malformed, forged, expired or revoked credentials."""

    code = "invalid_token"
    http_status = 401


class PolicyDenied(LimenError):
    """Authenticated, but policy says no (not assigned, no segment, blocked)."""

    code = "access_denied"
    http_status = 403


class ConfigError(LimenError):
    """Invalid configuration or invalid admin input."""

    code = "invalid_request"
    http_status = 400


class NotFound(LimenError):
    code = "not_found"
    http_status = 404


class Conflict(LimenError):
    code = "conflict"
    http_status = 409


class StoreError(LimenError):
    code = "store_error"
    http_status = 503


class UpstreamError(LimenError):
    """A connector or target could not be reached."""

    code = "bad_gateway"
    http_status = 502
