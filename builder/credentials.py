"""How to reach registries: which ones speak plain HTTP (:class:`RegistryOptions`), and the
logins from the Docker config file (``$DOCKER_CONFIG/config.json`` or
``~/.docker/config.json``), as ``docker login`` writes them: ``auths`` entries with ``auth``
(base64 of user:password) or ``username`` and ``password``. Credential helpers are not run.

Every build carries its RegistryOptions; the registry client (``registry``) is imported by a
pull or a push only (start-up of the cached path).
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path

from msgspec import Struct

from builder.errors import RegistryError

__all__ = ["DOCKER_HUB", "Credentials", "RegistryOptions", "docker_config_path", "load_credentials"]

DOCKER_HUB = "docker.io"
_DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io")


class Credentials(Struct, frozen=True):
    username: str
    password: str

    def basic(self) -> str:
        import base64  # only a registry that asks for credentials needs it (start-up time)

        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _config_host(key: str) -> str:
    """``https://index.docker.io/v1/`` → ``index.docker.io``; ``host:5000`` stays."""
    return urllib.parse.urlsplit(key if "://" in key else f"//{key}").netloc or key


def load_credentials(registry: str, path: Path | None = None) -> Credentials | None:
    """The login for ``registry`` in a Docker config file (``auths``), if there is one."""
    path = path or docker_config_path()
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read the credentials in {path}: {exc}.") from exc
    import base64  # only registries need it (start-up of the cached path)

    wanted = _DOCKER_HUB_KEYS if registry == DOCKER_HUB else (registry,)
    auths = document.get("auths") if isinstance(document, dict) else None
    for key, entry in (auths or {}).items():
        if _config_host(key) not in wanted or not isinstance(entry, dict):
            continue
        if entry.get("username") and entry.get("password"):
            return Credentials(str(entry["username"]), str(entry["password"]))
        try:
            user, sep, password = base64.b64decode(str(entry.get("auth", ""))).decode().partition(":")
        except ValueError as exc:
            raise RegistryError(f"the auth entry for {key} in {path} is not base64 user:password.") from exc
        if sep:
            return Credentials(user, password)
    return None


class RegistryOptions(Struct, frozen=True):
    """How to reach registries: which speak plain HTTP, where the credentials are."""

    insecure: tuple[str, ...] = ()  # hosts (host[:port]) reached over plain HTTP
    docker_config: Path | None = None

    def is_insecure(self, registry: str) -> bool:
        """localhost, 127.0.0.0/8, ::1 and the hosts named as insecure use plain HTTP."""
        host = urllib.parse.urlsplit(f"//{registry}").hostname or registry
        local = host in ("localhost", "::1") or host.startswith("127.")
        return local or registry in self.insecure or host in self.insecure
