"""Tables of conditional access: named locations, policies and their version history.

Times are UNIX epoch seconds (float), as in :mod:`limen.store.models`. A policy's document
is kept as its canonical JSON (:func:`limen.policy.conditional.spec_to_dict`) in ``spec``;
every change (create, edit, state change) writes an :class:`AccessPolicyVersion`, so "which
policy was in force when this flow was decided" has an answer.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from limen.store.models import Base


class NamedLocation(Base):
    """IP ranges with a name, trusted or not, matched against the source address the edge
    sees."""

    __tablename__ = "named_locations"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    #: Normalised CIDRs (``10.0.0.0/8``, ``2001:db8::/32``).
    cidrs: Mapped[list[str]] = mapped_column(JSON, default=list)
    trusted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)


class AccessPolicy(Base):
    """A conditional-access policy: its state and current (canonical) document."""

    __tablename__ = "access_policies"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    #: on | off | report_only
    state: Mapped[str] = mapped_column(String(16), default="on")
    #: 1 at creation, +1 on every change.
    version: Mapped[int] = mapped_column(Integer, default=1)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class AccessPolicyVersion(Base):
    """One version of a policy, as it was after a change. Deleted with its policy (the audit
    log keeps the last document)."""

    __tablename__ = "access_policy_versions"
    __table_args__ = (UniqueConstraint("policy_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    policy_id: Mapped[str] = mapped_column(
        ForeignKey("access_policies.id", ondelete="CASCADE"), index=True
    )
    version: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    changed_at: Mapped[float] = mapped_column(Float)
    #: Who made the change (``token:<name>``), as in audit records.
    actor: Mapped[str] = mapped_column(String(255), default="")
