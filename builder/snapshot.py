"""Snapshots: unpacked layers used as overlayfs lower dirs, and the mounts built on them.

A snapshot is the directory of one layer (by diff_id) in overlay form: whiteouts are 0/0
character devices, opaque directories carry ``trusted.overlay.opaque``. A RUN's upper dir is
already in that form, so it becomes the snapshot of the layer diffed from it, by a rename.

The lowerdir option must fit in one page, so mounts name lowers through short symlinks
(``l/<12 hex>``, Docker overlay2's trick) relative to the store root. Mounts are mount(2) calls
(a ``mount`` command costs 20 times as much); the kernel resolves those names against the calling
thread's working directory, which each mount moves to the store root only after unsharing it
from the other threads, so that stages built in parallel never see it move.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from msgspec import Struct

from builder.digest import digest_hex
from builder.errors import LayerError, StoreError
from builder.signals import deferred_signals
from builder.store import Store, remove_tree, unique_name

__all__ = ["MAX_LAYERS", "Mounted", "Snapshotter", "private_mount_namespace"]

_PAGE = 4096
_OVERLAY_OPTIONS = "index=off,redirect_dir=off,metacopy=off"
_SHORT = 12
# lowerdir=l/<12 hex>:... must fit in a page next to upperdir and workdir
MAX_LAYERS = 200
_CLONE_FS = 0x200
_CLONE_NEWNS = 0x20000
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)


class Mounted(Struct, frozen=True):
    """An overlay mount: ``merged`` is the root file system, ``upper`` holds the changes."""

    merged: Path
    upper: Path | None


class Snapshotter:
    """Snapshots and overlay mounts of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = store.root
        # lowerdir names by diff_id, each snapshot looked at once (the build's lease keeps it)
        self._lowers: dict[str, str] = {}
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

    def _lower(self, diff_id: str, workdir: Path) -> str:
        """The lowerdir name of a snapshot, unpacked first if need be."""
        name = self._lowers.get(diff_id)
        if name is None:
            self.ensure(diff_id, workdir)
            name = self._lowers[diff_id] = self.short(diff_id)
        return name

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
        from builder.layer import apply_blob  # a build whose snapshots are all there unpacks none

        # A name of its own: two threads may unpack the same layer at once, one wins commit.
        staging = workdir / unique_name(f"unpack-{digest_hex(diff_id)[:_SHORT]}-")
        try:
            staging.mkdir(0o755)
            staging.chmod(0o755)  # the image's root directory, whatever the umask
            digest = str(blobs[0]["digest"])
            with self.store.blob_path(digest).open("rb") as blob:
                apply_blob(blob, staging, diff_id=diff_id, overlay_whiteouts=True, name=digest)
            self.commit(diff_id, staging)
        except OSError as exc:
            raise self.store.storage_error(exc) from exc
        finally:
            remove_tree(staging)  # committed: renamed away already
        return target

    def commit(self, diff_id: str, upper: Path) -> None:
        """Make ``upper`` the snapshot of ``diff_id``; another build may have won the race."""
        try:
            os.rename(upper, self.path(diff_id))
        except OSError:
            if not self.has(diff_id):
                raise
            remove_tree(upper)
        self.short(diff_id)

    @contextlib.contextmanager
    def mount(self, diff_ids: Sequence[str], workdir: Path, *, writable: bool) -> Iterator[Mounted]:
        """Mount the layers (bottom first) with a fresh upper dir, or read-only; unmount after."""
        if len(diff_ids) > MAX_LAYERS:
            raise LayerError(
                f"the image has {len(diff_ids)} layers; overlay mounts here stack at most "
                f"{MAX_LAYERS}. Squash some RUN steps together."
            )
        lowers = [self._lower(d, workdir) for d in reversed(diff_ids)] + ["l/empty"]
        options = f"lowerdir={':'.join(lowers)},{_OVERLAY_OPTIONS}"
        upper = work = None
        try:
            merged = workdir / unique_name("mnt-")  # the work dir is this build's own
            merged.mkdir(0o700)
            if writable:  # beside the mount point, named after it (new inodes are not free)
                upper, work = Path(f"{merged}-upper"), Path(f"{merged}-work")
                upper.mkdir()
                upper.chmod(0o755)  # the root directory as the step sees it, whatever the umask
                work.mkdir()
                # volatile: no sync of the store's file system when it is unmounted (a whole
                # syncfs, slow when other work has dirty pages); the store syncs once before a tag.
                options += f",upperdir={upper},workdir={work},volatile"
        except OSError as exc:
            raise self.store.storage_error(exc) from exc
        if len(options) >= _PAGE:
            raise LayerError(f"the overlay mount options for {len(diff_ids)} layers exceed one page.")
        try:  # an interrupt may come right after mount(2): unmount whatever got mounted
            _mount_overlay(options, merged, self.root, layers=len(diff_ids))
            yield Mounted(merged, upper)
        finally:
            with deferred_signals():
                if os.path.ismount(merged):
                    _unmount(merged)
                # the upper dir outlives the mount: the caller diffs it, then commits or removes it
                remove_tree(merged)
                if work is not None:
                    _remove_work(work)


def _remove_work(work: Path) -> None:
    """An overlay's work dir after its unmount: ``work/`` and a volatile mount's marker,
    ``work/incompat/volatile/dirty``, removed one by one (a build that runs a step need not
    import shutil: start-up time); whatever else a kernel left, as a tree."""
    marker = work / "work" / "incompat" / "volatile" / "dirty"
    with contextlib.suppress(OSError):
        marker.unlink()
        for directory in (*marker.parents[:3], work):
            directory.rmdir()
    remove_tree(work)


def private_mount_namespace() -> None:
    """Move the calling (single-threaded) process into a private mount namespace of its own.

    What it mounts afterwards is invisible to the host and vanishes with the process, even
    when the process is killed: a build can never leave a mount behind. Raises OSError.
    """
    if _libc.unshare(_CLONE_NEWNS) != 0:
        raise OSError(f"cannot create a mount namespace: {os.strerror(ctypes.get_errno())}")
    if _libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise OSError(f"cannot make the mount namespace private: {os.strerror(ctypes.get_errno())}")


def _mount_overlay(options: str, merged: Path, root: Path, *, layers: int) -> None:
    """mount(2) an overlay whose lowerdir names are relative to ``root``."""
    here = os.open(".", os.O_PATH | os.O_CLOEXEC)
    try:
        # The working directory is shared by all threads unless unshared: move this thread's alone.
        if _libc.unshare(_CLONE_FS) != 0:
            code = ctypes.get_errno()
            raise StoreError(f"cannot give the mount of {merged} a working directory: {os.strerror(code)}.")
        os.chdir(root)
        failed = _libc.mount(b"overlay", os.fsencode(merged), b"overlay", 0, options.encode())
        code = ctypes.get_errno()
    finally:
        os.fchdir(here)
        os.close(here)
    if failed:
        raise StoreError(_mount_failure(code, merged, root, layers))


def _mount_failure(code: int, merged: Path, root: Path, layers: int) -> str:
    what = f"cannot mount an overlay of {layers} layers on {merged}"
    if code == errno.ENODEV:
        return (
            f"{what}: this kernel has no overlay file system (unknown filesystem type 'overlay'); "
            "load it (modprobe overlay) or build elsewhere."
        )
    if code == errno.EINVAL:  # the kernel writes the reason to its log, not to errno
        return (
            f"{what}: the kernel refused the options (see dmesg); the store {root} must be on a "
            "local file system with extended attributes, not on overlay, NFS or FUSE."
        )
    return f"{what}: {os.strerror(code)}."


def _unmount(merged: Path) -> None:
    path = os.fsencode(merged)
    if _libc.umount2(path, 0) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.EBUSY:  # detached all the same, so that no mount outlives the build
        _libc.umount2(path, _MNT_DETACH)
    raise StoreError(f"cannot unmount the overlay on {merged}: {os.strerror(code)}.")
