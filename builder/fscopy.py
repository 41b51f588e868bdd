"""COPY as a file operation: sources from a context or a stage, written inside a mounted root.

Destinations are resolved inside the root (symlinks followed with the root as ``/``), so a
hostile image can never redirect a write to the host. Contents are copied in the kernel
(``shutil.copyfile`` uses sendfile); modes, times and links are kept, owners set as asked.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.errors import ContextError
from builder.rootpath import resolve_in_root
from builder.users import Identity

__all__ = ["CopySource", "copy_sources", "make_dirs", "parse_chmod", "walk_tree"]

Walker = Callable[[], Iterator[tuple[str, Path]]]


@dataclass(frozen=True)
class CopySource:
    """A file, link or directory to copy; ``children`` lists a directory's contents."""

    path: Path
    name: str
    children: Walker


def walk_tree(top: Path) -> Iterator[tuple[str, Path]]:
    """Every path below ``top`` (relative to it), sorted, a directory before its contents."""
    stack = [""]
    while stack:
        rel = stack.pop()
        entries = sorted(os.scandir(top / rel), key=lambda e: e.name)
        subdirs = []
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            yield child, top / child
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(child)
        stack.extend(reversed(subdirs))


def parse_chmod(text: str) -> int:
    """``--chmod`` in octal (``755``, ``0644``)."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ContextError(f"--chmod={text} is not an octal mode such as 755 or 0644.") from None
    if not 0 <= mode <= 0o7777:
        raise ContextError(f"--chmod={text} is out of range (0 to 7777).")
    return mode


def copy_sources(
    sources: Sequence[CopySource],
    root: Path,
    dest: str,
    *,
    into_dir: bool,
    owner: Identity | None,
    chmod: int | None,
) -> None:
    """Copy ``sources`` to ``dest`` inside ``root`` with Docker's COPY rules.

    A directory source copies its contents; a file goes to ``dest/name`` when ``dest`` is a
    directory (``into_dir``, or it exists as one), else to ``dest`` itself. ``owner`` None
    keeps the sources' owners.
    """
    copier = _Copier(root, owner, chmod)
    target = resolve_in_root(root, dest)
    into_dir = into_dir or target.is_dir()
    for source in sources:
        info = source.path.lstat()
        if stat.S_ISDIR(info.st_mode):
            copier.make_dirs(dest)
            copier.copy_dir(source, resolve_in_root(root, dest))
        elif into_dir:
            copier.make_dirs(dest)
            copier.copy_entry(source.path, resolve_in_root(root, dest) / source.name)
        else:
            parent = os.path.dirname(dest.rstrip("/")) or "/"
            copier.make_dirs(parent)
            copier.copy_entry(source.path, resolve_in_root(root, parent) / os.path.basename(dest))
    copier.finish()


def make_dirs(root: Path, path: str, owner: Identity | None) -> None:
    """Create the missing directories of a container path (0755, owned by ``owner``)."""
    current = "/"
    for part in [p for p in path.split("/") if p]:
        current = f"{current.rstrip('/')}/{part}"
        host = resolve_in_root(root, current)
        if host.is_dir():
            continue
        if os.path.lexists(host):
            raise ContextError(f"cannot create {path}: {current} exists and is not a directory.")
        host.mkdir(mode=0o755)
        os.chmod(host, 0o755)
        if owner is not None:
            os.chown(host, owner.uid, owner.gid)


class _Copier:
    def __init__(self, root: Path, owner: Identity | None, chmod: int | None) -> None:
        self.root = root
        self.owner = owner
        self.chmod = chmod
        self.dir_times: list[tuple[Path, int]] = []

    def make_dirs(self, path: str) -> None:
        make_dirs(self.root, path, self.owner)

    def copy_dir(self, source: CopySource, target: Path) -> None:
        for rel, path in source.children():
            self.copy_entry(
                path,
                resolve_in_root(self.root, str(target.relative_to(self.root) / rel)),
                top=False,
            )

    def copy_entry(self, src: Path, dst: Path, *, top: bool = True) -> None:
        info = src.lstat()
        if stat.S_ISDIR(info.st_mode):
            if not dst.is_dir():
                _remove(dst)
                dst.mkdir()
            self.dir_times.append((dst, info.st_mtime_ns))
        else:
            _remove(dst)
            if stat.S_ISLNK(info.st_mode):
                os.symlink(os.readlink(src), dst)
            elif stat.S_ISREG(info.st_mode):
                shutil.copyfile(src, dst)
            else:
                return  # sockets, devices and fifos are not copied, as in BuildKit
        self._set_metadata(dst, info)

    def _set_metadata(self, dst: Path, info: os.stat_result) -> None:
        uid, gid = (self.owner.uid, self.owner.gid) if self.owner else (info.st_uid, info.st_gid)
        os.chown(dst, uid, gid, follow_symlinks=False)
        if not stat.S_ISLNK(info.st_mode):
            os.chmod(dst, self.chmod if self.chmod is not None else stat.S_IMODE(info.st_mode))
        os.utime(dst, ns=(info.st_mtime_ns, info.st_mtime_ns), follow_symlinks=False)

    def finish(self) -> None:
        """Directory times last, deepest first: writing into a directory changes its mtime."""
        for path, mtime in reversed(self.dir_times):
            os.utime(path, ns=(mtime, mtime))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
