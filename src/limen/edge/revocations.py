"""Revocations the edge has heard on the bus but its snapshot may not show yet.

A revocation reaches the edge twice: at once on the bus (``SUBJECT_REVOKED``), and within
a reload as the user's new ``revoked_before`` in the store. Between the two, the snapshot
still holds the old revocation time, and a client whose live flows were just cut could open
new ones with its old token. So the bus event is applied to the snapshot at once, and kept
until a snapshot whose load began after the event has replaced it (that one reads the store
after the revocation's commit, which precedes the publish).

Only user-level revocations are applied here; a device's state (non-compliant, disabled)
arrives with the reload, and the device's flows are cut meanwhile by the bus handler.
"""

from __future__ import annotations

import dataclasses

from limen.edge.snapshot import Snapshot


class RevocationOverlay:
    """User id → revocation time, applied over each loaded snapshot until it catches up."""

    def __init__(self) -> None:
        #: user id → (revocation time, monotonic time the edge heard of it)
        self._pending: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def record(self, snapshot: Snapshot, user_id: str, at: float, heard: float) -> None:
        """A revocation of ``user_id`` at ``at`` (Unix time), heard at ``heard``
        (monotonic): tokens issued before ``at`` are refused from now on."""
        if not user_id:
            return
        previous = self._pending.get(user_id)
        if previous is not None:
            at = max(at, previous[0])
        self._pending[user_id] = (at, heard)
        _raise_revocation(snapshot, user_id, at)

    def apply(self, snapshot: Snapshot, load_began: float) -> None:
        """Apply what a freshly loaded snapshot may miss; forget what it cannot miss (heard
        before its load began, so committed before it read the store)."""
        for user_id, (at, heard) in list(self._pending.items()):
            if heard < load_began:
                del self._pending[user_id]
            else:
                _raise_revocation(snapshot, user_id, at)


def _raise_revocation(snapshot: Snapshot, user_id: str, at: float) -> None:
    user = snapshot.users.get(user_id)
    if user is not None and user.revoked_before < at:
        # Snapshot dicts are replaced wholesale on reload, never shared with another
        # snapshot, so patching this one entry is safe.
        snapshot.users[user_id] = dataclasses.replace(user, revoked_before=at)
