"""Limen's data-plane benchmark suite: Limen against socat, ssh -L and stunnel on loopback.

Run ``python -m benchmarks --help`` from the repository root; see ``benchmarks/README.md``.

To benchmark a Limen path, add a :class:`~benchmarks.common.PathSpec` with ``baseline=False``
to :data:`LIMEN_PATHS` (or return it from :func:`extra_paths`): its factory gets a scratch
directory and returns an object with ``name``, ``setup(target_port) -> listen_port``,
``teardown()`` and ``pids()`` (see :class:`~benchmarks.common.DataPath`).
"""

from __future__ import annotations

from .common import PathSpec

# >>> PLACEHOLDER for the lead: the Limen paths (client → edge → connector → target on
# loopback), e.g. PathSpec("limen", "limen client → edge → connector", LimenPath,
# baseline=False). Empty until the data plane lands; the suite then measures baselines only.
LIMEN_PATHS: list[PathSpec] = []


def extra_paths() -> list[PathSpec]:
    """Candidate paths measured besides the baselines (Limen's); a hook for the lead."""
    return list(LIMEN_PATHS)


def all_paths() -> list[PathSpec]:
    """Baselines first, then the candidates, in report order."""
    from .baselines import BASELINES

    return [*BASELINES, *extra_paths()]
