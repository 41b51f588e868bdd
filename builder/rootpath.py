"""Paths inside a root directory, resolved as a process chrooted there would see them.

Symlinks are followed with the root as ``/``, so a hostile ``/etc/passwd -> /etc/shadow`` or
``../../..`` can never lead a read or a write of the builder out of an image. A build context
is stricter (``confine=True``): a symlink that points out of it is an error, not a path that
happens to exist inside.
"""

from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path

from builder.errors import ContextError

__all__ = ["RootEscapeError", "is_real_dir", "normalize", "resolve_in_root"]

_MAX_LINKS = 255


class RootEscapeError(ContextError):
    """A symbolic link met while resolving a path points out of the root."""

    def __init__(self, path: str, link: str, target: str) -> None:
        self.path = path
        self.link = link
        self.target = target
        super().__init__(f"{path} leads through the symbolic link {link} -> {target}, which points outside.")


def resolve_in_root(root: Path, path: str, *, follow_last: bool = True, confine: bool = False) -> Path:
    """The host path of ``path`` inside ``root``, following symlinks without leaving root.

    Missing components are fine (the result may not exist yet); a path that needs more than
    255 symlinks is an error, as it is for the kernel. ``path`` is cleaned lexically first, so
    its own ``..`` stop at the root; with ``confine`` a symlink whose target is absolute or
    climbs above the root raises :class:`RootEscapeError`.
    """
    pending = normalize(path).split("/")[1:]
    resolved: list[str] = []
    links = 0
    last_link = ("", "")  # the latest symlink followed, named when its target climbs out
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            elif confine:  # the path itself is clean: this ".." comes from a link's target
                raise RootEscapeError(path, *last_link)
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            mode = candidate.lstat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(part)
            continue
        if not stat.S_ISLNK(mode) or (not follow_last and not pending):
            resolved.append(part)
            continue
        links += 1
        if links > _MAX_LINKS:
            raise ContextError(f"Resolving {path} needs more than {_MAX_LINKS} symbolic links.")
        target = os.readlink(candidate)
        last_link = ("/" + "/".join([*resolved, part]), target)
        if confine and target.startswith("/"):
            raise RootEscapeError(path, *last_link)
        if target.startswith("/"):
            resolved = []
        pending = target.split("/") + pending
    return root.joinpath(*resolved) if resolved else root


def normalize(path: str) -> str:
    """An absolute, lexically cleaned container path."""
    return "/" + posixpath.normpath("/" + path).lstrip("/")


def is_real_dir(path: Path) -> bool:
    """Whether ``path`` is a directory itself, not a symlink to one (False when missing)."""
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False
