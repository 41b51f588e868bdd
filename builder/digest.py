"""Content digests: parse and validate them, and hash while streaming."""

from __future__ import annotations

import hashlib
import re
from typing import BinaryIO

__all__ = ["HashingWriter", "digest_hex", "is_digest", "sha256_digest"]

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def sha256_digest(data: bytes) -> str:
    """The OCI digest string (``sha256:<hex>``) of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


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
        self._hash = hashlib.sha256()
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
