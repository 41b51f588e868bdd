"""A client of the OCI distribution API: the only module that speaks HTTP.

One :class:`RegistryClient` talks to one repository of one registry: manifests in and out
(every digest checked), blobs streamed into the store through its verifying writer, blobs
uploaded after a HEAD (monolithic, or chunked above ``chunk_size``), cross-repository mounts.
Authentication follows the ``WWW-Authenticate`` challenge: bearer tokens from the realm the
registry names (anonymous, or with the user's credentials as basic auth), or basic auth when
the registry asks for it. Connection errors and 429/5xx answers are retried with backoff.

Standard library only (http.client): nothing here needs more than HTTP/1.1 and TLS.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeVar

from msgspec import Struct

from builder.credentials import DOCKER_HUB, Credentials, RegistryOptions, docker_config_path, load_credentials
from builder.digest import is_digest, sha256_digest
from builder.errors import RegistryError
from builder.oci import (
    DOCKER_MANIFEST_LIST_MEDIA_TYPE,
    DOCKER_MANIFEST_MEDIA_TYPE,
    INDEX_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
)
from builder.store import Store

# http.client and ssl (with email, socket, certificates) are imported by the functions that talk
# to a registry, and this module by a pull or a push only (start-up of the cached path).
if TYPE_CHECKING:
    import http.client

__all__ = ["Manifest", "RegistryClient"]

T = TypeVar("T")
Json = dict[str, Any]

MANIFEST_TYPES = (
    MANIFEST_MEDIA_TYPE,
    INDEX_MEDIA_TYPE,
    DOCKER_MANIFEST_MEDIA_TYPE,
    DOCKER_MANIFEST_LIST_MEDIA_TYPE,
)
DOCKER_HUB_API = "registry-1.docker.io"
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKOFF = (0.5, 1.0, 2.0, 4.0)  # seconds before each retry
CHUNK_SIZE = 64 << 20  # blobs above this are uploaded in chunks of this size
USER_AGENT = "builder/0.1 (Python http.client)"
_MAX_MANIFEST = 4 << 20  # the distribution spec's suggested limit
_READ = 1 << 20
# Patterns are compiled on first use (re's own cache), not at import: most builds use few of them.
_CHALLENGE_PARAM = r'(\w+)=(?:"([^"]*)"|([^\s,]+))'


class Manifest(Struct, frozen=True):
    """A manifest or index as the registry sent it: its bytes are what the digest names."""

    media_type: str
    data: bytes
    digest: str

    def document(self) -> Json:
        try:
            value = json.loads(self.data)
        except ValueError as exc:
            raise RegistryError(f"the manifest {self.digest} is not valid JSON.") from exc
        if not isinstance(value, dict):
            raise RegistryError(f"the manifest {self.digest} is not a JSON object.")
        return value


class _Body(Protocol):
    """A request body that can be sent again after an auth challenge."""

    def read(self, size: int = -1, /) -> bytes: ...

    def seek(self, offset: int, /) -> Any: ...


class _Transient(Exception):
    """A failure worth retrying: a connection error or a 429/5xx answer."""


class _Token(Struct):
    authorization: str | None = None
    scopes: frozenset[str] = frozenset()
    scheme: str = ""


class RegistryClient:
    """One repository of one registry (``registry`` as written in references: host[:port])."""

    @classmethod
    def open(
        cls, options: RegistryOptions, registry: str, repository: str, *, push: bool = False
    ) -> RegistryClient:
        """A client reaching ``registry`` as ``options`` say: over plain HTTP or not, with the
        login the Docker config holds for it."""
        return cls(
            registry,
            repository,
            credentials=load_credentials(registry, options.docker_config),
            insecure=options.is_insecure(registry),
            push=push,
        )

    def __init__(
        self,
        registry: str,
        repository: str,
        *,
        credentials: Credentials | None = None,
        insecure: bool = False,
        push: bool = False,
        timeout: float = 60.0,
        chunk_size: int = CHUNK_SIZE,
        backoff: tuple[float, ...] = BACKOFF,
    ) -> None:
        self.registry = registry
        self.repository = repository
        self.credentials = credentials
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.backoff = backoff
        host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        self.base = f"{'http' if insecure else 'https'}://{host}"
        self._netloc = host
        # Safe to share between threads: each has its own connections; the token is locked.
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()  # the connections list
        self._auth_lock = threading.Lock()  # the token and the wanted scopes
        self._token = _Token()
        actions = "pull,push" if push else "pull"
        self._wanted = {f"repository:{repository}:{actions}"}

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the API ------------------------------------------------------------------------------

    def get_manifest(self, reference: str) -> Manifest:
        """The manifest or index a tag or digest names, its digest verified."""
        return self._retrying(f"GET manifest {reference}", lambda: self._get_manifest(reference))

    def has_blob(self, digest: str) -> bool:
        return self._retrying(f"HEAD blob {digest}", lambda: self._has_blob(digest))

    def get_blob_to(self, store: Store, digest: str, size: int | None = None) -> None:
        """Download a blob into the store unless it is there; verified before it is stored."""
        if not store.has_blob(digest):
            self._retrying(f"GET blob {digest}", lambda: self._get_blob(store, digest, size))

    def put_blob(self, path: Path, digest: str, size: int) -> None:
        """Upload the file ``path`` as the blob ``digest`` (the registry verifies it)."""
        self._retrying(f"upload of blob {digest}", lambda: self._put_blob(path, digest, size))

    def mount_blob(self, digest: str, source: str) -> bool:
        """Mount a blob from another repository of this registry; False when it was not mounted."""
        with self._auth_lock:
            self._wanted.add(f"repository:{source}:pull")
        return self._retrying(f"mount of blob {digest}", lambda: self._mount_blob(digest, source))

    def put_manifest(self, reference: str, media_type: str, data: bytes) -> str:
        """Store a manifest under a tag or its digest; returns its digest."""
        return self._retrying(
            f"PUT manifest {reference}", lambda: self._put_manifest(reference, media_type, data)
        )

    # -- one attempt of each -----------------------------------------------------------------

    def _get_manifest(self, reference: str) -> Manifest:
        path = f"/v2/{self.repository}/manifests/{reference}"
        response = self._request("GET", path, {"Accept": ", ".join(MANIFEST_TYPES)})
        shown = f"{self.name}{'@' if is_digest(reference) else ':'}{reference}"
        if response.status == 404:
            _drain(response)
            raise RegistryError(f"the image {shown} is not in the registry {self.registry}.")
        self._expect(response, (200,), f"GET manifest {shown}")
        data = response.read(_MAX_MANIFEST + 1)
        if len(data) > _MAX_MANIFEST:
            raise RegistryError(f"the manifest of {shown} is larger than {_MAX_MANIFEST} bytes.")
        digest = sha256_digest(data)
        claimed = response.getheader("Docker-Content-Digest")
        for expected in (reference if is_digest(reference) else None, claimed):
            if expected and expected != digest:
                raise RegistryError(
                    f"digest mismatch: the manifest of {shown} has digest {digest}, not {expected}."
                )
        media_type = (response.getheader("Content-Type") or "").split(";")[0].strip()
        if media_type not in MANIFEST_TYPES:
            media_type = str(Manifest("", data, digest).document().get("mediaType") or media_type)
        return Manifest(media_type, data, digest)

    def _has_blob(self, digest: str) -> bool:
        response = self._request("HEAD", f"/v2/{self.repository}/blobs/{digest}")
        _drain(response)
        if response.status == 404:
            return False
        self._expect(response, (200,), f"HEAD blob {digest}")
        return True

    def _get_blob(self, store: Store, digest: str, size: int | None) -> None:
        response = self._request("GET", f"/v2/{self.repository}/blobs/{digest}")
        response = self._follow(response)
        if response.status == 404:
            _drain(response)
            raise RegistryError(f"the blob {digest} is not in {self.name}.")
        self._expect(response, (200,), f"GET blob {digest}")
        import http.client  # see the note on the imports

        with store.blob_writer() as writer:
            try:
                while (chunk := response.read(_READ)) and (size is None or writer.size <= size):
                    writer.write(chunk)  # a blob longer than its descriptor says stops here
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(f"the download of blob {digest} broke off: {exc}") from exc
            if writer.digest != digest or (size is not None and writer.size != size):
                raise RegistryError(
                    f"digest mismatch: the blob {digest} from {self.name} has digest {writer.digest} "
                    f"and {writer.size} bytes; nothing was stored."
                )
            writer.commit(digest)

    def _put_blob(self, path: Path, digest: str, size: int) -> None:
        location = self._start_upload(f"/v2/{self.repository}/blobs/uploads/", f"upload of blob {digest}")
        with path.open("rb") as file:
            body: _Body | bytes = file
            length = size
            if size > self.chunk_size:
                location = self._upload_chunks(location, file, size, digest)
                body, length = b"", 0
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
            response = self._request("PUT", _with_query(location, digest=digest), headers, body)
        _drain(response)
        self._expect(response, (201,), f"upload of blob {digest}")

    def _upload_chunks(self, location: str, file: BinaryIO, size: int, digest: str) -> str:
        for start in range(0, size, self.chunk_size):
            length = min(self.chunk_size, size - start)
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(length),
                "Content-Range": f"{start}-{start + length - 1}",
            }
            response = self._request("PATCH", location, headers, _Window(file, start, length))
            _drain(response)
            self._expect(response, (202,), f"chunked upload of blob {digest}")
            location = self._location(response, f"chunked upload of blob {digest}")
        return location

    def _start_upload(self, target: str, what: str) -> str:
        response = self._request("POST", target, {"Content-Length": "0"}, b"")
        _drain(response)
        self._expect(response, (202,), what)
        return self._location(response, what)

    def _mount_blob(self, digest: str, source: str) -> bool:
        target = _with_query(f"/v2/{self.repository}/blobs/uploads/", mount=digest, **{"from": source})
        response = self._request("POST", target, {"Content-Length": "0"}, b"")
        _drain(response)
        if response.status == 201:
            return True
        self._expect(response, (202,), f"mount of blob {digest} from {source}")
        # The registry opened an upload instead; close it rather than leave it to expire.
        cancel = self._request("DELETE", self._location(response, "mount"))
        _drain(cancel)
        return False

    def _put_manifest(self, reference: str, media_type: str, data: bytes) -> str:
        headers = {"Content-Type": media_type, "Content-Length": str(len(data))}
        response = self._request("PUT", f"/v2/{self.repository}/manifests/{reference}", headers, data)
        _drain(response)
        self._expect(response, (201,), f"PUT manifest {self.name}:{reference}")
        digest = sha256_digest(data)
        claimed = response.getheader("Docker-Content-Digest")
        if claimed and claimed != digest:
            raise RegistryError(f"digest mismatch: {self.name} stored the manifest {digest} as {claimed}.")
        return digest

    # -- HTTP ---------------------------------------------------------------------------------

    def _retrying(self, what: str, attempt: Callable[[], T]) -> T:
        delays = iter(self.backoff)
        while True:
            try:
                return attempt()
            except _Transient as exc:
                delay = next(delays, None)
                if delay is None:
                    raise RegistryError(f"the {what} at {self.registry} failed: {exc}.") from exc
                time.sleep(delay)

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        import http.client  # see the note on the imports
        import ssl

        mine: dict[tuple[str, str], http.client.HTTPConnection] = self._local.__dict__.setdefault("mine", {})
        key = (scheme, netloc)
        if key not in mine:
            if scheme == "https":
                context = ssl.create_default_context()
                mine[key] = http.client.HTTPSConnection(
                    netloc, timeout=self.timeout, context=context, blocksize=_READ
                )
            else:
                mine[key] = http.client.HTTPConnection(netloc, timeout=self.timeout, blocksize=_READ)
            with self._lock:
                self._connections.append(mine[key])
        return mine[key]

    def _send(
        self, method: str, url: str, headers: dict[str, str], body: _Body | bytes | None
    ) -> http.client.HTTPResponse:
        """One HTTP exchange; connection failures and 429/5xx become :class:`_Transient`."""
        import http.client  # see the note on the imports
        import ssl

        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise RegistryError(f"the registry {self.registry} sent the unusable URL {url!r}.")
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection = self._connection(parts.scheme, parts.netloc)
        try:
            connection.request(method, target, body=body, headers={"User-Agent": USER_AGENT, **headers})
            response = connection.getresponse()
        except ssl.SSLError as exc:
            connection.close()
            raise RegistryError(
                f"the TLS connection to {parts.netloc} failed ({exc.reason}); if the registry "
                "serves plain HTTP, name it with --insecure-registry."
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            reason = (
                exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            )
            raise _Transient(f"cannot connect to {parts.netloc} ({reason})") from exc
        if response.status in _RETRY_STATUSES:
            _drain(response)
            raise _Transient(f"{method} {parts.path} answered {response.status} {response.reason}")
        return response

    def _request(
        self,
        method: str,
        target: str,
        headers: dict[str, str] | None = None,
        body: _Body | bytes | None = None,
    ) -> http.client.HTTPResponse:
        """A request to the registry (``target`` a path or a URL), authenticated as challenged."""
        url = urllib.parse.urljoin(self.base, target)
        own = urllib.parse.urlsplit(url).netloc == self._netloc
        sent = dict(headers or {})
        used = self._token.authorization
        if own and used:
            sent["Authorization"] = used
        response = self._send(method, url, sent, body)
        if response.status != 401 or not own:
            return response
        challenge = response.getheader("WWW-Authenticate") or ""
        _drain(response)
        with self._auth_lock:
            if not self._authenticate(challenge, used):
                return response
        if body is not None and not isinstance(body, bytes):
            body.seek(0)
        return self._send(method, url, {**sent, "Authorization": str(self._token.authorization)}, body)

    def _follow(self, response: http.client.HTTPResponse) -> http.client.HTTPResponse:
        """Follow a blob redirect (to a storage service: no registry credentials go along)."""
        for _ in range(5):
            if response.status not in (301, 302, 303, 307, 308):
                return response
            location = self._location(response, "blob redirect")
            _drain(response)
            response = self._send("GET", location, {}, None)
        raise RegistryError(f"{self.name} redirected a blob download more than 5 times.")

    def _location(self, response: http.client.HTTPResponse, what: str) -> str:
        location = response.getheader("Location")
        if not location:
            raise RegistryError(f"the registry {self.registry} gave no Location for the {what}.")
        return urllib.parse.urljoin(self.base + "/v2/", location)

    def _expect(self, response: http.client.HTTPResponse, ok: tuple[int, ...], what: str) -> None:
        if response.status in ok:
            return
        detail = _error_detail(response)
        if response.status == 401 and self.credentials is None:
            raise RegistryError(
                f"auth refused: {self.registry} requires a login for the {what} on {self.name}; "
                f"add one to {docker_config_path()} (docker login writes it)."
            )
        if response.status == 401:
            raise RegistryError(
                f"auth refused: {self.registry} did not accept the credentials for {what} "
                f"on {self.name}{detail}; check the login in {docker_config_path()}."
            )
        if response.status == 403:
            raise RegistryError(f"auth refused: {self.registry} denied the {what} on {self.name}{detail}.")
        raise RegistryError(
            f"the registry {self.registry} answered {response.status} {response.reason} "
            f"to the {what}{detail}."
        )

    # -- authentication -----------------------------------------------------------------------

    def _authenticate(self, challenge: str, used: str | None) -> bool:
        """Take up a 401 challenge (under the lock); False when there is nothing new to try."""
        if self._token.authorization != used:
            return True  # another thread got new credentials meanwhile: try those
        scheme, _, rest = challenge.partition(" ")
        matches = re.finditer(_CHALLENGE_PARAM, rest)
        params = {m[1].lower(): m[2] if m[2] is not None else m[3] for m in matches}
        if scheme.lower() == "basic":
            if self.credentials is None:
                raise RegistryError(
                    f"auth refused: {self.registry} requires a login for {self.name}; "
                    f"add one to {docker_config_path()} (docker login writes it)."
                )
            if self._token.scheme == "basic":
                return False
            self._token = _Token(self.credentials.basic(), frozenset(), "basic")
            return True
        if scheme.lower() != "bearer" or "realm" not in params:
            raise RegistryError(
                f"the registry {self.registry} asks for unsupported authentication {challenge!r}."
            )
        # A fresh token even when ours covers the scopes: it may have expired. The caller
        # retries once, so a token that is really refused ends in an error, not a loop.
        scopes = self._token.scopes | self._wanted | set(params.get("scope", "").split())
        self._token = _Token("Bearer " + self._fetch_token(params, scopes), scopes, "bearer")
        return True

    def _fetch_token(self, params: dict[str, str], scopes: frozenset[str]) -> str:
        query = [("service", params["service"])] if "service" in params else []
        query += [("scope", scope) for scope in sorted(scopes)]
        url = params["realm"] + ("&" if "?" in params["realm"] else "?") + urllib.parse.urlencode(query)
        headers = {"Authorization": self.credentials.basic()} if self.credentials else {}
        response = self._send("GET", url, headers, None)
        data = response.read(_MAX_MANIFEST)
        if response.status in (401, 403):
            who = (
                f"the credentials of {self.credentials.username}" if self.credentials else "anonymous access"
            )
            raise RegistryError(
                f"auth refused: the token service of {self.registry} refused {who} for {self.name}."
            )
        if response.status != 200:
            raise RegistryError(
                f"the token service of {self.registry} answered {response.status} {response.reason}."
            )
        try:
            document = json.loads(data)
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError) as exc:
            raise RegistryError(f"the token service of {self.registry} sent no token.") from exc
        if not isinstance(token, str) or not token:
            raise RegistryError(f"the token service of {self.registry} sent no token.")
        return token


class _Window:
    """``length`` bytes of ``file`` from ``start``, read as a file (one chunk of an upload)."""

    def __init__(self, file: BinaryIO, start: int, length: int) -> None:
        self._file = file
        self._start = start
        self._length = length
        self._left = 0
        self.seek(0)

    def seek(self, offset: int) -> None:
        self._file.seek(self._start + offset)
        self._left = self._length - offset

    def read(self, size: int = -1) -> bytes:
        size = self._left if size < 0 else min(size, self._left)
        data = self._file.read(size)
        self._left -= len(data)
        return data


def _with_query(url: str, **params: str) -> str:
    return url + ("&" if "?" in url else "?") + urllib.parse.urlencode(params)


def _drain(response: http.client.HTTPResponse) -> None:
    """Read what is left of a response so the connection can carry the next request."""
    import http.client  # see the note on the imports

    try:
        while response.read(_READ):
            pass
    except (OSError, http.client.HTTPException):
        response.close()


def _error_detail(response: http.client.HTTPResponse) -> str:
    """The registry's own words from an error body (``{"errors": [{code, message}]}``)."""
    import http.client  # see the note on the imports

    try:
        document = json.loads(response.read(1 << 16) or b"{}")
        errors: Iterator[Json] = iter(document.get("errors") or [])
        words = [f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors if isinstance(e, dict)]
    except (ValueError, AttributeError, OSError, http.client.HTTPException):
        words = []
    return f" ({'; '.join(words)})" if words else ""
