"""Content digests: parse and validate them, and hash while streaming.

Two implementations of the one SHA-256: small documents (cache keys, image configs, manifests,
context entries) are hashed by CPython's own ``_sha256``, and streams (layers, blobs, file
contents) by hashlib's, which is OpenSSL's and several times faster on big data. Loading
OpenSSL takes about 4 ms, which a fully cached build, hashing nothing big, does not pay.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, BinaryIO

try:
    from _sha256 import sha256 as _document_sha256  # type: ignore[import-not-found]
except ImportError:  # a Python built without it: hashlib's
    from hashlib import sha256 as _document_sha256

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = ["HashingWriter", "digest_hex", "is_digest", "sha256_digest", "sha256_hex", "stream_sha256"]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def sha256_digest(data: bytes) -> str:
    """The OCI digest string (``sha256:<hex>``) of ``data``, a small document."""
    return "sha256:" + sha256_hex(data)


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data``, a small document, in hex."""
    digest: str = _document_sha256(data).hexdigest()
    return digest


def stream_sha256() -> _Hash:
    """A SHA-256 to feed a stream to (hashlib's: imported on first use)."""
    import hashlib

    return hashlib.sha256()


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
        self._hash = stream_sha256()
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
