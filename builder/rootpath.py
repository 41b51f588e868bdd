"""Paths inside an image's root file system, resolved as the container would see them.

Symlinks are followed with the root as ``/``, so a hostile ``/etc/passwd -> /etc/shadow``
or ``../../..`` can never lead a read or a write of the builder out of the image.
"""

from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path

from builder.errors import ContextError

__all__ = ["normalize", "resolve_in_root"]

_MAX_LINKS = 255


def resolve_in_root(root: Path, path: str, *, follow_last: bool = True) -> Path:
    """The host path of ``path`` inside ``root``, following symlinks without leaving root.

    Missing components are fine (the result may not exist yet); a path that needs more than
    255 symlinks is an error, as it is for the kernel.
    """
    pending = [part for part in path.split("/") if part not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        is_last = not pending
        try:
            mode = candidate.lstat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(part)
            continue
        if stat.S_ISLNK(mode) and (follow_last or not is_last):
            links += 1
            if links > _MAX_LINKS:
                raise ContextError(f"too many levels of symbolic links resolving {path} in the image.")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            continue
        resolved.append(part)
    return root.joinpath(*resolved) if resolved else root


def normalize(path: str) -> str:
    """An absolute, lexically cleaned container path."""
    return "/" + posixpath.normpath("/" + path).lstrip("/")
