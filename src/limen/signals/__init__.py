"""Continuous access evaluation's signals: the Shared Signals receiver (SSF 1.0 push and
poll, CAEP and RISC events), admin signals, the actions they trigger and their audit.

- :mod:`limen.signals.set_validation` — SET validation (RFC 8417 + SSF), pure.
- :mod:`limen.signals.events` — event → action mapping and subject identifiers, pure.
- :mod:`limen.signals.actions` — applying an action to the store, publishing
  ``SUBJECT_REVOKED``, recording the signal and what the edges cut.
- :mod:`limen.signals.receiver` — push endpoint, poll loops, stream management, JWKS cache.
"""

from __future__ import annotations

#: Bus topic an edge publishes after cutting a user's live flows for a signal. Payload:
#: ``signal_id`` (may be empty), ``user_id``, ``at`` (the revocation's time, as received),
#: ``flows_cut`` (int), ``done_at`` (epoch seconds when the last flow was aborted), ``node``.
SIGNAL_ENFORCED = "signal.enforced"
#: Bus topic the admin API publishes after adding, changing or removing a transmitter, so
#: the poll supervisor re-reads them at once.
TRANSMITTERS_CHANGED = "ssf.transmitters_changed"
