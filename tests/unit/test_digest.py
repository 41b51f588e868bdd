"""SHA-256 of streams: the same digest whichever implementation hashes it, and OpenSSL loaded
only once a process has hashed more than a little."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pytest

from builder import digest
from builder.digest import StreamSha256, sha256_digest

REPO = Path(__file__).resolve().parents[2]
SMALL = digest._SMALL_WORK


@pytest.mark.parametrize("size", [0, 1, 511, SMALL - 1, SMALL, SMALL + 1, 3 * SMALL + 17])
def test_a_stream_hashes_as_hashlib_does_at_every_size(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    data = random.Random(size).randbytes(size)
    monkeypatch.delitem(sys.modules, "hashlib")  # as in a process that has not loaded it
    monkeypatch.setattr(digest, "_small_work", 0)
    hasher = StreamSha256()
    pieces = (bytes, bytearray, memoryview)
    for index, start in enumerate(range(0, size, 4099)):
        hasher.update(pieces[index % 3](data[start : start + 4099]))
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    assert hasher.hexdigest() == hasher.hexdigest()  # asked twice, the same


def test_documents_hash_as_hashlib_does() -> None:
    assert sha256_digest(b"{}") == "sha256:" + hashlib.sha256(b"{}").hexdigest()


def test_hashlib_loads_once_the_small_work_is_spent() -> None:
    """Many small streams add up: past the budget, every stream is hashed by hashlib's."""
    script = (
        "import sys\n"
        "from builder.digest import StreamSha256, _SMALL_WORK\n"
        "for _ in range(4):\n"
        "    small = StreamSha256(); small.update(b'x' * (_SMALL_WORK // 4)); small.hexdigest()\n"
        "print('hashlib' in sys.modules)\n"
        "last = StreamSha256(); last.update(b'x')\n"
        "print('hashlib' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.split() == ["False", "True"], result.stderr
