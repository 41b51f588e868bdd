"""What a build imports: start-up is most of a cached build's time and much of one that runs a
step, so the modules each path has no use for must stay out of it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

# Neither path writes a tar from scratch nor reads one, reaches a registry, or hashes enough to
# want OpenSSL; a Dockerfile it parsed before is not parsed again.
NEVER = {"tarfile", "builder.tarsafe", "socket", "http", "hashlib", "dockerfile_parse", "logging"}
# Temp names are the store's own, and trees are removed by hand where they are known.
NOT_AT_ALL = {"shutil", "tempfile", "random"}
# A fully cached build also mounts, copies and writes nothing.
NOT_CACHED = {"base64", "builder.layer", "builder.sandboxserver", "isal"}
# A rebuild its shortcut answers loads none of the build's modules, nor what they need.
NOT_ANSWERED = {"builder.cli", "builder.build", "msgspec", "typing", "ctypes", "dockerfile_parse"}
# Runs the command as its console script does and writes the names of the modules it ended
# with. What the interpreter loaded before (a site .pth file may import shutil and tempfile) is
# forgotten first, so that only the command's own imports count.
_LISTING = (
    "import atexit, sys\n"
    f"for name in {sorted(NEVER | NOT_AT_ALL | NOT_CACHED | NOT_ANSWERED)!r}: sys.modules.pop(name, None)\n"
    "atexit.register(lambda: open(sys.argv.pop(1), 'w').write('\\n'.join(sorted(sys.modules))))\n"
    "from builder.__main__ import main\n"
    "main(sys.argv[2:])\n"
)


def _modules(store: Path, tmp_path: Path, context: Path) -> set[str]:
    """What the command imported."""
    listing = tmp_path / "modules"
    subprocess.run(
        [sys.executable, "-c", _LISTING, str(listing), "build", "-q", "-t", "startup:1", str(context)],
        env={**os.environ, "BUILDER_ROOT": str(store)},
        check=True,
        capture_output=True,
    )
    return set(listing.read_text().split())


def test_a_build_imports_nothing_its_path_does_not_use(tmp_path: Path, store: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM busybox:latest\nCOPY app.sh /app.sh\nRUN sh /app.sh > /out\n")
    (context / "app.sh").write_text("echo one\n")
    time.sleep(2.1)  # files old enough that their digests are remembered (not racily clean)
    first = _modules(store, tmp_path, context)
    assert {"builder.layer", "builder.sandboxserver"} <= first, "the probe missed the path that runs"
    cached = _modules(store, tmp_path, context)
    assert "builder.executor" in cached
    assert not cached & (NEVER | NOT_AT_ALL | NOT_CACHED), sorted(cached & (NEVER | NOT_AT_ALL | NOT_CACHED))
    answered = _modules(store, tmp_path, context)  # the cached build left its shortcut
    assert "builder.shortcut" in answered
    unwanted = NEVER | NOT_AT_ALL | NOT_CACHED | NOT_ANSWERED
    assert not answered & unwanted, sorted(answered & unwanted)
    (context / "app.sh").write_text("echo two\n")
    edited = _modules(store, tmp_path, context)
    assert {"builder.layer", "builder.sandboxserver"} <= edited
    assert not edited & (NEVER | NOT_AT_ALL), sorted(edited & (NEVER | NOT_AT_ALL))
