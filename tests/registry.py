"""A real registry for tests: Debian's docker-registry on 127.0.0.1, optionally behind auth.

``start_registry`` writes a config and a temp storage dir, starts the registry on a free port
and waits until it answers; ``Registry.stop`` ends it. Auth is basic (an htpasswd file) or
bearer tokens from :class:`TokenServer`, a small token service that signs RS256 JWTs with a
key made by ``openssl`` and sends its certificate in ``x5c``, as the registry verifies them.
"""

from __future__ import annotations

import base64
import http.server
import json
import socket
import subprocess
import threading
import time
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGISTRY = "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT, as references name it
    storage: Path
    process: subprocess.Popen[bytes]
    log: Path
    token_server: TokenServer | None = None

    def blob_data(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (to tamper with it)."""
        hexa = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.token_server is not None:
            self.token_server.stop()


def start_registry(workdir: Path, auth: dict[str, Any] | None = None) -> Registry:
    """A registry storing under ``workdir``; ``auth`` is the registry config's ``auth`` section."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "storage")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "builder-tests"},
    }
    if auth:
        config["auth"] = auth
    (workdir / "config.yml").write_text(json.dumps(config))  # JSON is YAML
    log = workdir / "registry.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [REGISTRY, "serve", str(workdir / "config.yml")], stdout=out, stderr=subprocess.STDOUT
        )
    registry = Registry(f"127.0.0.1:{port}", workdir / "storage", process, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"docker-registry exited: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return registry
        except OSError:
            time.sleep(0.05)
    registry.stop()
    raise AssertionError(f"docker-registry did not start: {log.read_text()}")


def htpasswd_auth(workdir: Path, users: dict[str, str]) -> dict[str, Any]:
    """A registry ``auth`` section for basic auth with bcrypt passwords."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # crypt goes in 3.13; bcrypt is all we need
        import crypt as libcrypt

        lines = [
            f"{user}:{libcrypt.crypt(pw, libcrypt.mksalt(libcrypt.METHOD_BLOWFISH))}"
            for user, pw in users.items()
        ]
    path = workdir / "htpasswd"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return {"htpasswd": {"realm": "builder-tests", "path": str(path)}}


def docker_config(directory: Path, registry: str, user: str, password: str) -> dict[str, str]:
    """A Docker config dir holding one login; returns the environment that points at it."""
    directory.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {registry: {"auth": auth}}}))
    return {"DOCKER_CONFIG": str(directory)}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """A token service: basic-auth users get the scopes they ask for; anonymous users pull only."""

    workdir: Path
    users: dict[str, str]
    service: str = "builder-test-registry"
    issuer: str = "builder-test-issuer"
    requests: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key, self.cert = self.workdir / "token.key", self.workdir / "token.crt"
        self.workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=builder-token", "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True, capture_output=True
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.answer(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self._httpd.server_port}/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def auth_section(self) -> dict[str, Any]:
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.cert),
            }
        }

    def answer(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        user = self._user(handler.headers.get("Authorization", ""))
        self.requests.append({"user": user, "scope": query.get("scope", [])})
        if user == "":
            handler.send_response(401)
            handler.end_headers()
            return
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":")
            allowed = actions.split(",") if user else [a for a in actions.split(",") if a == "pull"]
            access.append({"type": kind, "name": name, "actions": allowed})
        body = json.dumps({"token": self._token(user or "anonymous", access)}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _user(self, header: str) -> str | None:
        """The authenticated user; None for anonymous; "" for wrong credentials."""
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == password else ""

    def _token(self, subject: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self._x5c]}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": f"{now}-{len(self.requests)}", "access": access}  # fmt: skip
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        return f"{signing_input}.{_b64url(signature)}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start_token_registry(workdir: Path, users: dict[str, str]) -> Registry:
    tokens = TokenServer(workdir / "token", users)
    try:
        registry = start_registry(workdir, tokens.auth_section())
    except BaseException:
        tokens.stop()
        raise
    registry.token_server = tokens
    return registry
