"""A store that cannot take the build: full, read-only, on overlayfs, or no overlay support.

Each gives one clear error line (no traceback) and leaves the store as it was: ``builder check``
finds nothing wrong afterwards. Mounts made for a test live in a mount namespace of its own
(``unshare -m``), except the small tmpfs of the disk-full test, which its fixture unmounts.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Result, run_builder

pytestmark = pytest.mark.integration

RUN_STEP = "FROM busybox:latest\nRUN echo built > /built\n"


def context(tmp_path: Path, dockerfile: str) -> Path:
    path = tmp_path / "context"
    path.mkdir(exist_ok=True)
    (path / "Dockerfile").write_text(dockerfile)
    return path


def assert_clear_error(result: Result, *phrases: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for phrase in phrases:
        assert phrase in errors[0], result.stderr


def assert_store_sound(root: Path) -> None:
    """``builder check`` finds no problem, and no temp dir or file is left."""
    check = run_builder("check", root=root, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert [p.name for p in (root / "tmp").iterdir() if not p.name.endswith(".lock")] == []


def in_namespace(setup: str, *args: str, root: Path, env: dict[str, str] | None = None) -> Result:
    """Run the CLI after ``setup`` (shell commands) in a mount namespace of its own."""
    script = (
        f"mount --make-rprivate / && {setup} && exec {shlex.join([sys.executable, '-m', 'builder', *args])}"
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "BUILDER_ROOT": str(root), **(env or {})},
        timeout=120,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with its mode, size and mtime: what "left as it was" compares."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            found[os.path.relpath(os.path.join(dirpath, name), root)] = (
                st.st_mode,
                st.st_size,
                st.st_mtime_ns,
            )
    return found


@pytest.fixture
def small_store(tmp_path: Path, busybox_layout: Path) -> Iterator[Path]:
    """A store on a 12 MB tmpfs, holding busybox:latest (about 3 MB with its snapshot)."""
    root = tmp_path / "small"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(root)], check=True)
    try:
        run_builder("load", f"oci:{busybox_layout}", "-t", "busybox:latest", root=root)
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=True)


def test_disk_full_is_a_clear_error_and_the_store_stays_sound(tmp_path: Path, small_store: Path) -> None:
    # The step's own writes fill the disk: the step fails, and says why on its stderr.
    big_step = context(tmp_path, "FROM busybox:latest\nRUN head -c 20000000 /dev/zero > /big\n")
    result = run_builder("build", str(big_step), root=small_store, check=False)
    assert_clear_error(result, "Dockerfile:2: RUN", "exited with status 1")
    assert_store_sound(small_store)

    # The step fits, but its layer does not: the store says so, and keeps no partial blob.
    layer = context(tmp_path, "FROM busybox:latest\nRUN head -c 5000000 /dev/urandom > /big\n")
    result = run_builder("build", str(layer), root=small_store, check=False)
    assert_clear_error(result, f"cannot write to the store {small_store}: No space left on device", "prune")
    assert_store_sound(small_store)

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_store)], check=True)
    run_builder("build", str(layer), root=small_store)
    assert_store_sound(small_store)


def test_read_only_store_is_a_clear_error_and_is_left_as_it_was(
    tmp_path: Path, store: Path, busybox_layout: Path
) -> None:
    ctx = context(tmp_path, RUN_STEP)
    run_builder("build", "-t", "app:1", str(ctx), root=store)
    before = tree(store)
    read_only = f"mount --bind {store} {store} && mount -o remount,bind,ro {store}"

    result = in_namespace(read_only, "build", str(ctx), root=store)
    assert_clear_error(result, f"cannot write to the store {store}: Read-only file system", "read-write")
    result = in_namespace(read_only, "load", f"oci:{busybox_layout}", "-t", "other:1", root=store)
    assert_clear_error(result, f"cannot write to the store {store}: Read-only file system")

    images = in_namespace(read_only, "images", root=store)
    assert images.returncode == 0 and "app" in images.stdout, images.stderr
    check = in_namespace(read_only, "check", root=store)
    assert check.returncode == 0, check.stdout + check.stderr
    assert tree(store) == before, "the read-only store was changed"


def test_store_on_overlayfs_is_refused(tmp_path: Path, busybox_layout: Path) -> None:
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "merged")}
    for path in dirs.values():
        path.mkdir()
    root = dirs["merged"] / "store"
    overlay = (
        f"mount -t overlay overlay -o lowerdir={dirs['lower']},upperdir={dirs['upper']},"
        f"workdir={dirs['work']} {dirs['merged']}"
    )
    for args in (("load", f"oci:{busybox_layout}", "-t", "busybox:latest"), ("build", str(tmp_path))):
        result = in_namespace(overlay, *args, root=root)
        assert_clear_error(result, f"the store {root} is on an overlay file system", "--root")
    assert list(dirs["upper"].rglob("blobs/sha256/*")) == [], "a blob was stored on the overlay"
