"""Snapshots: unpacked layers used as overlayfs lower dirs, and the mounts built on them.

A snapshot is the directory of one layer (by diff_id) in overlay form: whiteouts are 0/0
character devices, opaque directories carry ``trusted.overlay.opaque``. A RUN's upper dir is
already in that form, so it becomes the snapshot of the layer diffed from it, by a rename.

The lowerdir option must fit in one page, so mounts name lowers through short symlinks
(``l/<12 hex>``, Docker overlay2's trick) relative to the store root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.digest import digest_hex
from builder.errors import LayerError, StoreError
from builder.layer import apply_blob
from builder.signals import deferred_signals
from builder.store import Store

__all__ = ["MAX_LAYERS", "Mounted", "Snapshotter"]

_PAGE = 4096
_OVERLAY_OPTIONS = "index=off,redirect_dir=off,metacopy=off"
_SHORT = 12
# lowerdir=l/<12 hex>:... must fit in a page next to upperdir and workdir
MAX_LAYERS = 200
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Mounted:
    """An overlay mount: ``merged`` is the root file system, ``upper`` holds the changes."""

    merged: Path
    upper: Path | None


class Snapshotter:
    """Snapshots and overlay mounts of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = store.root
        empty = self.root / "snapshots" / "empty"
        try:
            empty.mkdir(0o755, exist_ok=True)
            if empty.stat().st_mode & 0o7777 != 0o755:  # whatever the umask; a read-only store has it
                empty.chmod(0o755)
            self._link("empty", empty)
        except OSError as exc:
            raise store.storage_error(exc) from exc

    def path(self, diff_id: str) -> Path:
        return self.root / "snapshots" / digest_hex(diff_id)

    def has(self, diff_id: str) -> bool:
        return self.path(diff_id).is_dir()

    def _link(self, short: str, target: Path) -> str:
        link = self.root / "l" / short
        wanted = os.path.relpath(target, link.parent)
        try:
            os.symlink(wanted, link)
        except FileExistsError:
            if os.readlink(link) != wanted:
                raise StoreError(
                    f"the short layer link {link} points elsewhere; run builder check."
                ) from None
        return f"l/{short}"

    def short(self, diff_id: str) -> str:
        """The lowerdir name of a snapshot, relative to the store root."""
        return self._link(digest_hex(diff_id)[:_SHORT], self.path(diff_id))

    def ensure(self, diff_id: str, workdir: Path) -> Path:
        """The snapshot of ``diff_id``, unpacked from a stored blob if it is not there yet.
        It is unpacked in ``workdir`` (a build's, which the next build removes if this one dies)
        and renamed into place."""
        target = self.path(diff_id)
        if target.is_dir():
            return target
        blobs = self.store.layer_blobs(diff_id)
        if not blobs:
            raise StoreError(f"no stored blob holds layer {diff_id}; pull or load its image again.")
        staging = workdir / f"unpack-{digest_hex(diff_id)}"
        try:
            staging.mkdir(0o755)  # the image's root directory, whatever the umask
            staging.chmod(0o755)
            digest = str(blobs[0]["digest"])
            with self.store.blob_path(digest).open("rb") as blob:
                apply_blob(blob, staging, diff_id=diff_id, overlay_whiteouts=True, name=digest)
            self.commit(diff_id, staging)
        except OSError as exc:
            raise self.store.storage_error(exc) from exc
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return target

    def commit(self, diff_id: str, upper: Path) -> None:
        """Make ``upper`` the snapshot of ``diff_id``; another build may have won the race."""
        try:
            os.rename(upper, self.path(diff_id))
        except OSError:
            if not self.has(diff_id):
                raise
            shutil.rmtree(upper, ignore_errors=True)
        self.short(diff_id)

    @contextlib.contextmanager
    def mount(self, diff_ids: Sequence[str], workdir: Path, *, writable: bool) -> Iterator[Mounted]:
        """Mount the layers (bottom first) with a fresh upper dir, or read-only; unmount after."""
        if len(diff_ids) > MAX_LAYERS:
            raise LayerError(
                f"the image has {len(diff_ids)} layers; overlay mounts here stack at most "
                f"{MAX_LAYERS}. Squash some RUN steps together."
            )
        for diff_id in diff_ids:
            self.ensure(diff_id, workdir)
        lowers = [self.short(d) for d in reversed(diff_ids)] + ["l/empty"]
        options = f"lowerdir={':'.join(lowers)},{_OVERLAY_OPTIONS}"
        upper = None
        try:
            scratch = Path(tempfile.mkdtemp(dir=workdir, prefix="mnt-"))
            merged = scratch / "merged"
            merged.mkdir()
            if writable:
                upper, work = scratch / "upper", scratch / "work"
                upper.mkdir()
                upper.chmod(0o755)  # the root directory as the step sees it, whatever the umask
                work.mkdir()
                options += f",upperdir={upper},workdir={work}"
        except OSError as exc:
            raise self.store.storage_error(exc) from exc
        if len(options) >= _PAGE:
            raise LayerError(f"the overlay mount options for {len(diff_ids)} layers exceed one page.")
        try:  # an interrupt may come while mount(8) runs: unmount whatever it got to mount
            _run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], cwd=self.root)
            yield Mounted(merged, upper)
        finally:
            with deferred_signals():
                if os.path.ismount(merged):
                    _run(["umount", str(merged)], cwd=self.root)
                # the upper dir outlives the mount: the caller diffs it, then commits or drops it
                for leftover in (merged, scratch / "work"):
                    shutil.rmtree(leftover, ignore_errors=True)
                if upper is None:
                    shutil.rmtree(scratch, ignore_errors=True)


def _run(argv: list[str], cwd: Path) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        message = result.stderr.strip() or f"exit status {result.returncode}"
        hint = ""
        if "unknown filesystem type" in message:
            hint = " This kernel has no overlay file system: load it (modprobe overlay) or build elsewhere."
        raise StoreError(f"{argv[0]} of an overlay failed: {message.rstrip('.')}.{hint}")
