"""The client's saved state: where the service is, whom to trust, and the tokens.

Kept in one private file (mode 0600) under the user's config directory. Tokens are never
logged; ``status`` shows only their expiry.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from limen.errors import AuthError, ConfigError
from limen.files import write_private


def default_client_dir() -> Path:
    env = os.environ.get("LIMEN_CLIENT_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "limen"


@dataclass
class ClientState:
    api_url: str = ""
    edge: str = ""
    ca_pem: str = ""
    username: str = ""
    access_token: str = ""
    refresh_token: str = ""
    expires_at: float = 0.0
    device_id: str = ""
    capabilities: list[str] = field(default_factory=lambda: ["cp1"])

    @property
    def signed_in(self) -> bool:
        return bool(self.refresh_token or self.access_token)

    def token_fresh(self, now: float | None = None, margin: float = 60.0) -> bool:
        return bool(self.access_token) and self.expires_at - margin > (now or time.time())


class StateFile:
    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_client_dir()
        self.path = self.directory / "client.json"

    def load(self) -> ClientState:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return ClientState()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {self.path}: {exc}") from exc
        known = set(ClientState.__dataclass_fields__)
        return ClientState(**{k: v for k, v in data.items() if k in known})

    def save(self, state: ClientState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(self.path, json.dumps(asdict(state), indent=2), atomic=True)

    def require(self) -> ClientState:
        state = self.load()
        if not state.signed_in:
            raise AuthError("not signed in: run `limen client login`", code="not_signed_in")
        return state


def device_facts() -> dict[str, str]:
    return {
        "hostname": platform.node(),
        "os": platform.system().lower(),
        "os_version": platform.release(),
    }


def new_device_id() -> str:
    return f"dev_{secrets.token_hex(10)}"
