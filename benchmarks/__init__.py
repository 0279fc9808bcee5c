"""Limen's data-plane benchmark suite: Limen against socat, ssh -L and stunnel on loopback.

Run ``python -m benchmarks --help`` from the repository root; see ``benchmarks/README.md``.

To benchmark a Limen path, add a :class:`~benchmarks.common.PathSpec` with ``baseline=False``
to :data:`LIMEN_PATHS` (or return it from :func:`extra_paths`): its factory gets a scratch
directory and returns an object with ``name``, ``setup(target_port) -> listen_port``,
``teardown()`` and ``pids()`` (see :class:`~benchmarks.common.DataPath`).
"""

from __future__ import annotations

from .common import PathSpec
from .limen_path import LimenPath, limen_asyncio

# The Limen paths (client → edge → connector → target on loopback), compared with every
# baseline: as shipped (uvloop) and with the standard asyncio loop (LIMEN_UVLOOP=0). The plain
# CONNECT path (curl-style, one TLS connection per flow) is not a port forward, so it is not
# measured here.
LIMEN_PATHS: list[PathSpec] = [
    PathSpec(
        "limen",
        "limen client forward → edge → connector (yamux over TLS)",
        LimenPath,
        baseline=False,
    ),
    PathSpec(
        "limen-asyncio",
        "the same with the standard asyncio loop in every process (LIMEN_UVLOOP=0)",
        limen_asyncio,
        baseline=False,
    ),
]


def extra_paths() -> list[PathSpec]:
    """Candidate paths measured besides the baselines (Limen's); a hook for the lead."""
    return list(LIMEN_PATHS)


def all_paths() -> list[PathSpec]:
    """Baselines first, then the candidates, in report order."""
    from .baselines import BASELINES

    return [*BASELINES, *extra_paths()]
