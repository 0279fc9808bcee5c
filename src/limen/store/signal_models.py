"""Tables of continuous access evaluation's signals: Shared Signals transmitters Limen
receives from, the audit of every signal, the SET replay cache, and the mapping of upstream
identities (``iss`` + ``sub``) to Limen users.

Importing this module registers the tables on the shared ``Base`` metadata (as
:mod:`limen.store.identity_models` does). Times are UNIX epoch seconds (float).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from limen.store.models import Base


class SsfTransmitter(Base):
    """An upstream Shared Signals transmitter (SSF 1.0) and Limen's stream with it.

    ``auth_token`` is the bearer token Limen presents to the transmitter's stream-management
    API: a secret kept as is (it must be sent), never logged nor returned by the API.
    ``push_token_hash`` is the hash of the bearer token Limen issued for the transmitter to
    authenticate its pushes (RFC 8935 §2): only the hash is kept.
    """

    __tablename__ = "ssf_transmitters"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    #: The transmitter's issuer (``iss`` of its SETs).
    issuer: Mapped[str] = mapped_column(String(512))
    jwks_uri: Mapped[str] = mapped_column(String(1024), default="")
    #: The transmitter's SSF metadata (discovery document), as fetched.
    metadata_doc: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    configuration_endpoint: Mapped[str] = mapped_column(String(1024), default="")
    #: push (``urn:ietf:rfc:8935``) | poll (``urn:ietf:rfc:8936``)
    delivery_method: Mapped[str] = mapped_column(String(8), default="push")
    #: Poll delivery: the transmitter's endpoint; push: ours (as given to the transmitter).
    endpoint_url: Mapped[str] = mapped_column(String(1024), default="")
    auth_token: Mapped[str] = mapped_column(Text, default="")
    push_token_hash: Mapped[str] = mapped_column(String(64), default="")
    #: The ``aud`` Limen requires in this transmitter's SETs.
    audience: Mapped[str] = mapped_column(String(512), default="")
    stream_id: Mapped[str] = mapped_column(String(255), default="")
    events_requested: Mapped[list[str]] = mapped_column(JSON, default=list)
    events_delivered: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: enabled | paused | disabled (the stream's, as last known) | error
    status: Mapped[str] = mapped_column(String(16), default="enabled")
    status_reason: Mapped[str] = mapped_column(Text, default="")
    #: Verification (SSF §8.1.4): the last state sent, when, and when its event arrived.
    verification_state: Mapped[str] = mapped_column(String(128), default="")
    verification_requested_at: Mapped[float] = mapped_column(Float, default=0.0)
    verified_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_event_at: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class SignalRecord(Base):
    """One signal, whatever its source: what arrived, whom it named, what Limen did, and how
    many live flows the edges cut and how long that took after the signal was accepted."""

    __tablename__ = "signals"
    __table_args__ = (
        Index("ix_signals_received", "received_at"),
        Index("ix_signals_user", "user_id", "received_at"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    #: admin | scim | ssf:<issuer>
    source: Mapped[str] = mapped_column(String(600))
    #: The subject as it arrived (``email:alice@example.com``, ``iss_sub:<iss>|<sub>``...).
    subject: Mapped[str] = mapped_column(Text, default="")
    #: The Limen user it resolved to, if any.
    user_id: Mapped[str] = mapped_column(String(40), default="")
    device_id: Mapped[str] = mapped_column(String(40), default="")
    event_type: Mapped[str] = mapped_column(String(255))
    #: ``jti`` of the SET, for SSF signals.
    jti: Mapped[str] = mapped_column(String(255), default="")
    received_at: Mapped[float] = mapped_column(Float)
    #: When the event happened (``event_timestamp``, else the SET's ``iat``).
    event_timestamp: Mapped[float] = mapped_column(Float)
    #: What Limen did: revoke_sessions | disable_user | ... | "ignored: <why>"
    action: Mapped[str] = mapped_column(String(255))
    #: Live flows closed by the edges (None until an edge reports).
    flows_cut: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: Milliseconds from ``received_at`` to the last edge report.
    time_to_cut_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ReplayCache(Base):
    """``(iss, jti)`` of every accepted SET until it could no longer be accepted anyway
    (``iat`` + the maximum age), so a replayed SET is refused (RFC 8417 §4.2)."""

    __tablename__ = "set_replay_cache"
    __table_args__ = (Index("ix_set_replay_expires", "expires_at"),)
    iss: Mapped[str] = mapped_column(String(512), primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[float] = mapped_column(Float)


class ExternalIdentity(Base):
    """An upstream identity (``iss`` + ``sub``, RFC 9493 ``iss_sub``) mapped to a Limen user,
    so a signal naming it reaches the right user. Without a row, a signal's ``sub`` is also
    matched against the user's id, username and email (see :mod:`limen.signals.actions`)."""

    __tablename__ = "external_identities"
    __table_args__ = (UniqueConstraint("issuer", "subject"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    issuer: Mapped[str] = mapped_column(String(512))
    subject: Mapped[str] = mapped_column(String(255))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[float] = mapped_column(Float)
