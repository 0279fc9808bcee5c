"""Identifiers with a type prefix (``usr_``, ``app_``, ``con_``...), so a log line tells what an
id names, as Boundary's do."""

from __future__ import annotations

import secrets

PREFIXES = {
    "user": "usr",
    "group": "grp",
    "application": "app",
    "segment": "seg",
    "assignment": "asg",
    "connector": "con",
    "connector_group": "cng",
    "enrollment": "enr",
    "device": "dev",
    "session": "ses",
    "refresh_family": "rtf",
    "flow": "flw",
    "connection": "cxn",
    "policy": "pol",
    "location": "loc",
    "audit": "aud",
    "signal": "sig",
    "key": "key",
}


def new_id(kind: str) -> str:
    """A fresh random id such as ``usr_4kq3x0c9mz1b``: 80 bits of randomness, URL-safe."""
    prefix = PREFIXES[kind]
    return f"{prefix}_{secrets.token_hex(10)}"


def kind_of(identifier: str) -> str | None:
    prefix = identifier.split("_", 1)[0]
    for kind, known in PREFIXES.items():
        if known == prefix:
            return kind
    return None
