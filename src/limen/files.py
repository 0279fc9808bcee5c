"""Files that hold secrets (keys, tokens, passwords): readable by their owner only."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, text: str, *, atomic: bool = False) -> None:
    """Write ``text`` to ``path`` with mode 0600 — also when the file already existed with a
    wider mode. ``atomic``: write a sibling and rename it over ``path``, so a reader never
    sees half a file (state files rewritten while another process reads them)."""
    target = path.with_suffix(path.suffix + ".tmp") if atomic else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)
    if atomic:
        os.replace(target, path)
