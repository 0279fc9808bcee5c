"""Admin API tokens and the roles they carry.

A token is ``lat_`` + 43 URL-safe characters (256 bits); only its SHA-256 is stored
(:func:`limen.store.db.token_hash`), so the plaintext is shown once, when it is created.

Roles, each a superset of the next:

* ``admin``: everything, including users, groups and admin tokens;
* ``operator``: applications, segments, assignments, connector groups, connectors and
  enrollment tokens; reads everything; cannot touch users, groups or tokens;
* ``reader``: reads (GET) only.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from fastapi import Header
from sqlalchemy import select

from limen.errors import AuthError, ConfigError, PolicyDenied
from limen.ids import new_id
from limen.store.db import Store, token_hash
from limen.store.models import AdminToken

log = logging.getLogger(__name__)

TOKEN_PREFIX: Final = "lat_"
ROLES: Final = ("reader", "operator", "admin")
_RANK: Final = {role: rank for rank, role in enumerate(ROLES)}
#: Longer headers are not ours; refuse before hashing attacker-sized input.
MAX_TOKEN_LENGTH: Final = 256


def create_admin_token(store: Store, name: str, role: str) -> str:
    """Create an admin API token; returns the plaintext, which is not stored anywhere."""
    if role not in _RANK:
        raise ConfigError(f"role: {role!r} is not one of {', '.join(ROLES)}")
    if not name.strip():
        raise ConfigError("name: empty")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with store.session() as s:
        s.add(
            AdminToken(
                id=new_id("key"),
                name=name.strip(),
                token_hash=token_hash(token),
                role=role,
                created_at=time.time(),
                revoked=False,
            )
        )
    return token


def bootstrap_admin_token(store: Store, path: Path) -> str | None:
    """First start: create an ``admin`` token named ``bootstrap`` and write it to ``path``
    (mode 0600) unless that file already exists. Returns the new token, or None."""
    if path.exists():
        return None
    token = create_admin_token(store, "bootstrap", "admin")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    log.info("wrote the bootstrap admin token to %s", path)
    return token


def authenticate(store: Store, token: str) -> AdminToken:
    """The live token row for ``token``; :class:`AuthError` (``invalid_token``) otherwise."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_LENGTH:
        raise AuthError("missing or invalid admin API token")
    with store.session() as s:
        row = s.scalar(select(AdminToken).where(AdminToken.token_hash == token_hash(token)))
    if row is None or row.revoked:
        raise AuthError("missing or invalid admin API token")
    return row


def role_allows(role: str, required: str) -> bool:
    """Whether ``role`` may do what needs ``required``."""
    return _RANK.get(role, -1) >= _RANK[required]


def require_role(store: Store, required: str) -> Callable[[str | None], str]:
    """A FastAPI dependency: checks ``Authorization: Bearer lat_...`` and the role, and
    returns the actor name for audit records (``token:<name>``).

    Missing or bad token: 401 ``invalid_token``; role too low: 403 ``insufficient_role``.
    """
    if required not in _RANK:
        raise ValueError(f"unknown role {required!r}")

    def dependency(authorization: str | None = Header(default=None)) -> str:
        if not authorization:
            raise AuthError("missing admin API token (Authorization: Bearer lat_...)")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise AuthError("the Authorization header must be 'Bearer <token>'")
        row = authenticate(store, credentials.strip())
        if not role_allows(row.role, required):
            raise PolicyDenied(
                f"token {row.name!r} has role {row.role!r}; this needs {required!r}",
                code="insufficient_role",
            )
        return f"token:{row.name}"

    return dependency
