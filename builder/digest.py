"""Content digests: parse and validate them, and hash while streaming.

Two implementations of the one SHA-256: CPython's own ``_sha256``, and hashlib's, which is
OpenSSL's: five times faster on big data, but about 3 ms to load. Documents (cache keys, image
configs, manifests, context entries) are hashed by the first; so are streams (layers, blobs,
files) until a process has fed them ``_SMALL_WORK`` bytes, and by the second from then on. A
fully cached build, or one of a few small steps, never loads OpenSSL; a big one pays at most
``_SMALL_WORK`` of the slower hashing.
"""

from __future__ import annotations

import re
import sys

try:
    from _sha256 import sha256 as _document_sha256  # type: ignore[import-not-found]
except ImportError:  # a Python built without it: hashlib's
    from hashlib import sha256 as _document_sha256

TYPE_CHECKING = False  # typing only for the type checker (see builder.store)
if TYPE_CHECKING:
    from hashlib import _Hash
    from typing import BinaryIO

__all__ = ["HashingWriter", "StreamSha256", "digest_hex", "is_digest", "sha256_digest", "sha256_hex"]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def sha256_digest(data: bytes) -> str:
    """The OCI digest string (``sha256:<hex>``) of ``data``, a small document."""
    return "sha256:" + sha256_hex(data)


def sha256_hex(data: bytes | bytearray) -> str:
    """The SHA-256 of ``data``, a small document, in hex."""
    digest: str = _document_sha256(data).hexdigest()
    return digest


# Streams hashed by CPython's SHA-256 in this process, and its budget: 256 KiB take it 0.8 ms,
# less than loading OpenSSL. Past it, hashlib's hashes every stream (the count may race
# between threads: it only picks the implementation, never the digest).
_SMALL_WORK = 256 << 10
_small_work = 0


class StreamSha256:
    """A SHA-256 fed a stream of any length (see the module's text). While the process's budget
    lasts, the bytes are kept and hashed by CPython's SHA-256 at the end; once it is spent,
    hashlib's takes over, from this stream's first byte."""

    __slots__ = ("_hash", "_head")

    def __init__(self) -> None:
        self._head = bytearray()
        self._hash: _Hash | None = None
        if "hashlib" in sys.modules:
            self._take_over()

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        global _small_work
        if self._hash is not None:
            self._hash.update(data)
            return
        self._head += data
        _small_work += len(data)
        if _small_work > _SMALL_WORK:
            self._take_over()

    def hexdigest(self) -> str:
        if self._hash is not None:
            return self._hash.hexdigest()
        return sha256_hex(self._head)

    def _take_over(self) -> None:
        import hashlib

        self._hash = hashlib.sha256(self._head)
        self._head = bytearray()


def is_digest(text: str) -> bool:
    """Whether ``text`` is a well-formed sha256 digest string."""
    return _DIGEST.fullmatch(text) is not None


def digest_hex(digest: str) -> str:
    """The hex part of a digest; raises ValueError for anything that is not a sha256 digest."""
    if not is_digest(digest):
        raise ValueError(f"{digest!r} is not a sha256 digest")
    return digest[len("sha256:") :]


class HashingWriter:
    """A write-only file object that hashes and counts what passes through to ``sink``.

    ``sink`` may be None to only hash (a null device that remembers the digest).
    """

    def __init__(self, sink: BinaryIO | None) -> None:
        self._sink = sink
        self._hash = StreamSha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hash.update(data)
        self.size += len(data)
        if self._sink is not None:
            self._sink.write(data)
        return len(data)

    def flush(self) -> None:
        if self._sink is not None:
            self._sink.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()
