"""A tiny builder of hostile tars for tests, in the spirit of containerd's ``tartest``.

Names, link targets and PAX records go into the tar exactly as given: ``../x``, absolute
paths, ``.`` as a symlink, duplicates. tarfile's writer does not clean them.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field

__all__ = ["Entry", "build", "char", "directory", "fifo", "file", "hardlink", "symlink"]


@dataclass(frozen=True)
class Entry:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_600_000_000
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)


def file(name: str, data: bytes = b"", **kw: object) -> Entry:
    return Entry(name, tarfile.REGTYPE, data, **kw)  # type: ignore[arg-type]


def directory(name: str, mode: int = 0o755, **kw: object) -> Entry:
    return Entry(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def symlink(name: str, target: str) -> Entry:
    return Entry(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, tarfile.LNKTYPE, linkname=target)


def fifo(name: str) -> Entry:
    return Entry(name, tarfile.FIFOTYPE)


def char(name: str, major: int, minor: int) -> Entry:
    return Entry(name, tarfile.CHRTYPE, devmajor=major, devminor=minor)


def build(*entries: Entry) -> bytes:
    """The tar holding ``entries`` in order, PAX format, names untouched."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = entry.type
            info.size = len(entry.data)
            info.linkname = entry.linkname
            info.mode = entry.mode
            info.uid, info.gid = entry.uid, entry.gid
            info.mtime = entry.mtime
            info.devmajor, info.devminor = entry.devmajor, entry.devminor
            info.pax_headers = dict(entry.pax)
            tar.addfile(info, io.BytesIO(entry.data) if entry.data else None)
    return out.getvalue()
