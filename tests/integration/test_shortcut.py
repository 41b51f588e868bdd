"""The shortcut (builder.shortcut): a rebuild whose inputs are all as they were answers with the
image of the build before, without loading the build's modules; any change of an input, in the
context, the Dockerfile, a base image's tag or a cache record, runs the build again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_builder

pytestmark = pytest.mark.integration

# Runs the command as its console script does and writes whether the full command was loaded.
_PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: open(sys.argv.pop(1), 'w').write(str('builder.cli' in sys.modules)))\n"
    "from builder.__main__ import main\n"
    "main(sys.argv[2:])\n"
)

DOCKERFILE = (
    "FROM busybox:latest\nARG NOTE=one\nCOPY app/ /app/\nCOPY *.txt /txt/\nRUN cat /app/a /txt/* > /out\n"
)


def _build(
    store: Path, tmp_path: Path, context: Path, *args: str, check: bool = True
) -> tuple[subprocess.CompletedProcess[str], bool]:
    """Build; the result and whether the shortcut answered."""
    loaded = tmp_path / "loaded"
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(loaded), "build", *args, str(context)],
        env={**os.environ, "BUILDER_ROOT": str(store)},
        capture_output=True,
        text=True,
        check=check,
    )
    return proc, loaded.read_text() == "False"


def _context(tmp_path: Path) -> Path:
    context = tmp_path / "ctx"
    (context / "app").mkdir(parents=True)
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "app" / "a").write_text("a\n")
    (context / "app" / "b").write_text("b\n")
    (context / "one.txt").write_text("one\n")
    time.sleep(2.1)  # older than the racy window: a cached build may then leave a shortcut
    return context


def _cached(store: Path, tmp_path: Path, context: Path) -> str:
    """Build cold, then cached (which leaves the shortcut); the image's digest."""
    cold, _ = _build(store, tmp_path, context, "-q", "-t", "app:cold")
    cached, answered = _build(store, tmp_path, context, "-q", "-t", "app:cached")
    assert not answered
    assert cached.stdout == cold.stdout
    return cold.stdout.strip()


def test_an_unchanged_rebuild_is_answered_by_its_shortcut(store: Path, tmp_path: Path) -> None:
    context = _context(tmp_path)
    _build(store, tmp_path, context, "-t", "app:cold", "--build-arg", "UNUSED=1")
    full, answered = _build(store, tmp_path, context, "-t", "app:cached", "--build-arg", "UNUSED=1")
    assert not answered
    again, answered = _build(store, tmp_path, context, "-t", "app:other", "--build-arg", "UNUSED=1")
    assert answered, "the unchanged rebuild ran the whole build"
    assert again.stdout == full.stdout
    assert again.stderr == full.stderr  # every CACHED line, the warning, the image line
    assert "warning: build arg UNUSED is not consumed" in again.stderr
    digest = full.stdout.strip()
    rows = [line.split()[:3] for line in run_builder("images", root=store).stdout.splitlines()]
    assert ["app", "other", digest] in rows
    quiet, answered = _build(store, tmp_path, context, "-q", "--build-arg", "UNUSED=1", "--tag=app:q")
    assert answered and quiet.stdout == full.stdout
    assert quiet.stderr == "warning: build arg UNUSED is not consumed by any ARG\n"
    # --qu is --quiet to the command's parser: the shortcut leaves it to the build.
    abbreviated, answered = _build(store, tmp_path, context, "--qu", "--build-arg", "UNUSED=1")
    assert not answered and abbreviated.stdout == full.stdout
    # Another command line is another build: it runs (and is cached).
    _, answered = _build(store, tmp_path, context, "-q", "--build-arg", "UNUSED=2")
    assert not answered


CHANGES = [
    "edit a copied file",
    "add a file to a copied dir",
    "add a wildcard match",
    "ignore a file",
    "edit the Dockerfile",
]


@pytest.mark.parametrize("change", CHANGES)
def test_a_changed_input_runs_the_build(store: Path, tmp_path: Path, change: str) -> None:
    context = _context(tmp_path)
    before = _cached(store, tmp_path, context)
    if change == "edit a copied file":
        (context / "app" / "a").write_text("A\n")  # same size, another content
    elif change == "add a file to a copied dir":
        (context / "app" / "c").write_text("c\n")
    elif change == "add a wildcard match":
        (context / "two.txt").write_text("two\n")
    elif change == "ignore a file":
        (context / ".dockerignore").write_text("app/b\n")
    else:
        (context / "Dockerfile").write_text(DOCKERFILE.replace("NOTE=one", "NOTE=two"))
    after, answered = _build(store, tmp_path, context, "-q", "-t", "app:after")
    assert not answered
    if change != "edit the Dockerfile":  # an unused ARG's default changes no layer
        assert after.stdout.strip() != before


def test_a_retagged_base_image_runs_the_build(store: Path, tmp_path: Path) -> None:
    context = _context(tmp_path)
    before = _cached(store, tmp_path, context)
    run_builder("tag", "app:cold", "busybox:latest", root=store)  # the base is now another image
    after, answered = _build(store, tmp_path, context, "-q")
    assert not answered
    assert after.stdout.strip() != before


def test_records_a_no_cache_build_replaced_are_not_answered_for(store: Path, tmp_path: Path) -> None:
    """--no-cache makes new records for the same keys: the next build uses them, as BuildKit does."""
    context = _context(tmp_path)
    (context / "Dockerfile").write_text("FROM busybox:latest\nRUN head -c 16 /dev/urandom > /random\n")
    time.sleep(2.1)
    before = _cached(store, tmp_path, context)
    fresh, _ = _build(store, tmp_path, context, "-q", "--no-cache")
    assert fresh.stdout.strip() != before
    after, answered = _build(store, tmp_path, context, "-q")
    assert not answered
    assert after.stdout == fresh.stdout


def test_a_pruned_image_is_built_again(store: Path, tmp_path: Path) -> None:
    context = _context(tmp_path)
    _cached(store, tmp_path, context)
    run_builder("rmi", "app:cold", "app:cached", root=store)
    run_builder("prune", root=store)
    after, answered = _build(store, tmp_path, context, "-q", "-t", "app:after")
    assert not answered
    assert run_builder("inspect", "app:after", root=store).returncode == 0
    assert after.stdout.startswith("sha256:")


def test_a_base_image_blob_gone_is_not_answered_for(store: Path, tmp_path: Path) -> None:
    """The build reads the base image's config: without it, it fails, and so must the rebuild."""
    context = _context(tmp_path)
    _cached(store, tmp_path, context)
    tag = json.loads((store / "tags" / "docker.io%2Flibrary%2Fbusybox%3Alatest").read_text())
    manifest = json.loads((store / "blobs" / "sha256" / tag["manifest"].removeprefix("sha256:")).read_text())
    (store / "blobs" / "sha256" / manifest["config"]["digest"].removeprefix("sha256:")).unlink()
    after, answered = _build(store, tmp_path, context, "-q", check=False)
    assert not answered
    assert after.returncode == 1 and "is not in the store" in after.stderr


def test_a_build_through_a_symlinked_source_leaves_no_shortcut(store: Path, tmp_path: Path) -> None:
    context = _context(tmp_path)
    (context / "link").symlink_to("app")
    (context / "Dockerfile").write_text("FROM busybox:latest\nCOPY link/ /app/\n")
    time.sleep(2.1)
    _cached(store, tmp_path, context)
    _, answered = _build(store, tmp_path, context, "-q")
    assert not answered
