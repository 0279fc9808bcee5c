"""Developer helper: autogenerate an Alembic revision from the models.

.venv/bin/python scripts/new_migration.py "add foo"
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config

from limen.store.db import MIGRATIONS_DIR, Store

with tempfile.TemporaryDirectory() as tmp:
    store = Store(f"sqlite:///{Path(tmp) / 'x.db'}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = store.engine
    command.upgrade(cfg, "head")
    command.revision(cfg, message=sys.argv[1], autogenerate=True)
