"""Tables of the identity service's second factors (TOTP, RFC 6238, and recovery codes).

They live apart from :mod:`limen.store.models` so the MFA work did not have to change the
``users`` table; importing this module registers them on the shared ``Base`` metadata, so the
migration generator and ``Store.create_all_for_tests`` see them. Rows hang off ``users.id``
with ``ON DELETE CASCADE``: deleting a user deletes its factors.
"""

from __future__ import annotations

from sqlalchemy import Float, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from limen.store.models import Base


class TotpUsage(Base):
    """Per-user TOTP bookkeeping: the last time step accepted, so that a code is never
    accepted twice (RFC 6238 §5.2), and the recent failures, so that guessing is bounded."""

    __tablename__ = "totp_usage"
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    #: The newest accepted time step (``floor(unix_time / 30)``); -1 before the first use.
    last_step: Mapped[int] = mapped_column(Integer, default=-1)
    #: Wrong codes (TOTP or recovery) since ``failures_since``.
    failures: Mapped[int] = mapped_column(Integer, default=0)
    failures_since: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)


class RecoveryCode(Base):
    """One single-use recovery code. Only its SHA-256 (salted with the user id) is kept: the
    codes carry 50 random bits each, so a slow hash would add little, and the TOTP secret
    beside them in the same database is worth more to a thief anyway."""

    __tablename__ = "recovery_codes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
