from __future__ import annotations

import os
import stat
from pathlib import Path

from limen.files import write_private


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    write_private(path, "secret")
    assert path.read_text() == "secret" and _mode(path) == 0o600


def test_existing_wider_file_is_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("old")
    os.chmod(path, 0o644)
    write_private(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o600


def test_atomic_write_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "client.json"
    write_private(path, "{}", atomic=True)
    write_private(path, '{"a": 1}', atomic=True)
    assert path.read_text() == '{"a": 1}' and _mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client.json"]
