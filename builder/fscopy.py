"""COPY as a file operation: sources written inside a mounted root with Docker's rules.

The destination follows BuildKit's copier (``fsutil/copy``): a trailing ``/`` makes it a
directory; a directory source copies its contents; a file goes into the destination when that
is an existing directory, else becomes it. The destination path is resolved inside the root
(symlinks followed with the root as ``/``), so a hostile image never redirects a write to the
host; below it nothing is followed: an entry in the way is replaced, or is an error when a
directory would replace a non-directory or the other way round. Owners, modes (``--chmod``),
times, xattrs and hard links within one copy are kept.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.errors import ContextError
from builder.rootpath import is_real_dir, resolve_in_root
from builder.users import Identity

__all__ = [
    "Chmod",
    "CopySource",
    "Walker",
    "copy_sources",
    "make_dirs",
    "parse_chmod",
    "travelling_xattrs",
]

Walker = Callable[[], Iterator[tuple[str, Path]]]

_CHUNK = 1 << 20
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CLAUSE = re.compile(r"([ugoa]*)((?:[-+=](?:[ugo]|[rwxXst]*))+)|([-+=])([0-7]+)")
_ACTION = re.compile(r"([-+=])([ugo]|[rwxXst]*)")
_CLASS_BITS = {"u": 0o700, "g": 0o070, "o": 0o007}
_CLASS_SPECIAL = {"u": 0o4000, "g": 0o2000, "o": 0}


@dataclass(frozen=True)
class CopySource:
    """A file, link or directory to copy; ``children`` lists a directory's contents.

    ``parents`` are directories recreated below the destination first, outermost first, as
    (name, host path): with ``--parents``, the path from the pivot down to the source, a
    directory source included (its contents then go into it).
    """

    path: Path
    name: str
    children: Walker
    parents: tuple[tuple[str, Path], ...] = ()


@dataclass(frozen=True)
class Chmod:
    """A ``--chmod`` value: an octal mode, or chmod(1) symbolic clauses such as ``u+x,g-w``.

    A symbolic clause without ``ugoa`` applies to all (no umask is involved, as in BuildKit).
    """

    text: str
    octal: int | None

    def apply(self, mode: int, *, is_dir: bool) -> int:
        """The permission bits (07777) a copied entry with ``mode`` gets."""
        if self.octal is not None:
            return self.octal
        result = stat.S_IMODE(mode)
        for clause in self.text.split(","):
            match = _CLAUSE.fullmatch(clause)
            assert match is not None  # parse_chmod checked it
            if match[3]:  # an operator with octal bits: +111, =644
                result = _operate(result, match[3], int(match[4], 8) & 0o7777, 0o7777)
                continue
            who = match[1].replace("a", "ugo") or "ugo"
            for op, perms in _ACTION.findall(match[2]):
                bits = _perm_bits(who, perms, result, mode, is_dir=is_dir)
                result = _operate(result, op, bits, _who_mask(who))
        return result


def _operate(mode: int, op: str, bits: int, scope: int) -> int:
    if op == "+":
        return mode | bits
    if op == "-":
        return mode & ~bits
    return (mode & ~scope) | bits


def _who_mask(who: str) -> int:
    return sum(_CLASS_BITS[c] | _CLASS_SPECIAL[c] for c in set(who))


def _perm_bits(who: str, perms: str, current: int, original: int, *, is_dir: bool) -> int:
    """The bits ``perms`` stand for in the classes ``who``."""
    classes = set(who)
    if perms in _CLASS_BITS:  # copy another class's permissions: g=u
        shift = {"u": 6, "g": 3, "o": 0}[perms]
        triple = (current >> shift) & 0o7
        return sum(triple << {"u": 6, "g": 3, "o": 0}[c] for c in classes)
    spread = 0
    for char in perms:
        if char == "r":
            spread |= 0o444
        elif char == "w":
            spread |= 0o222
        elif char == "x" or (char == "X" and (is_dir or original & 0o111)):
            spread |= 0o111
    bits = spread & sum(_CLASS_BITS[c] for c in classes)
    if "s" in perms:
        bits |= sum(_CLASS_SPECIAL[c] for c in classes)
    if "t" in perms and "o" in classes:
        bits |= 0o1000
    return bits


def parse_chmod(text: str) -> Chmod:
    """``--chmod`` in octal (``755``, ``0644``) or symbolic (``u+x,g-w``, ``a=rX``)."""
    if text.isdigit():
        try:
            mode = int(text, 8)
        except ValueError:
            mode = -1
        if not 0 <= mode <= 0o7777:
            raise ContextError(f"--chmod={text} is not an octal mode between 0 and 7777.")
        return Chmod(text, mode)
    if not text or not all(_CLAUSE.fullmatch(clause) for clause in text.split(",")):
        raise ContextError(
            f"--chmod={text} is neither an octal mode (such as 755) nor a symbolic one (such as u+x,g-w)."
        )
    return Chmod(text, None)


def make_dirs(root: Path, path: str, owner: Identity | None) -> None:
    """Create the missing directories of a container path (0755, owned by ``owner``).

    Each component is resolved inside ``root``; what is missing is made where the symlinks
    lead, never through anything that is not a directory.
    """
    current = "/"
    for part in [p for p in path.split("/") if p]:
        current = f"{current.rstrip('/')}/{part}"
        host = resolve_in_root(root, current)
        if not is_real_dir(host):
            _make_physical(root, host, owner, path)


def _make_physical(root: Path, host: Path, owner: Identity | None, wanted: str) -> None:
    """Make ``host`` and its missing parents below ``root``, none of which may be a symlink."""
    target = root
    for part in host.relative_to(root).parts:
        target = target / part
        info = _lstat(target)
        if info is not None and not stat.S_ISDIR(info.st_mode):
            where = "/" + str(target.relative_to(root))
            raise ContextError(f"cannot create {wanted}: {where} exists and is not a directory.")
        if info is None:
            target.mkdir(mode=0o755)
            os.chmod(target, 0o755)
            if owner is not None:
                os.chown(target, owner.uid, owner.gid)


def copy_sources(
    sources: Sequence[CopySource],
    root: Path,
    dest: str,
    *,
    owner: Identity | None,
    chmod: Chmod | None,
) -> None:
    """Copy ``sources`` to the container path ``dest`` inside ``root`` (``dest/`` is a directory).

    ``owner`` None keeps the sources' owners.
    """
    copier = _Copier(root, owner, chmod)
    try:
        make_dirs(root, dest if dest.endswith("/") else os.path.dirname(dest.rstrip("/")), owner)
        for source in sources:
            copier.copy_source(source, dest)
        copier.finish()
    except OSError as exc:
        name = os.fsdecode(exc.filename) if exc.filename else ""
        where = copier.container_path(Path(name)) if name.startswith(f"{root}/") else name
        raise ContextError(f"copying to {dest} failed: {where or dest}: {exc.strerror}.") from exc


class _Copier:
    def __init__(self, root: Path, owner: Identity | None, chmod: Chmod | None) -> None:
        self.root = root
        self.owner = owner
        self.chmod = chmod
        self.dir_times: list[tuple[Path, os.stat_result]] = []
        self.links: dict[tuple[int, int], Path] = {}

    def copy_source(self, source: CopySource, dest: str) -> None:
        is_dir = is_real_dir(source.path)
        target = resolve_in_root(self.root, dest)
        if not is_dir and not dest.endswith("/") and not is_real_dir(target):
            # A file replaces a symlink in its way rather than writing where the link points.
            target = resolve_in_root(self.root, dest, follow_last=False)
        if source.parents or (is_real_dir(target) and not is_dir):
            target = self._parents(target, dest, source.parents)
            if not is_dir:
                target = target / source.name
        if not is_dir:
            self.copy_entry(source.path, target, source.name)
            return
        if not os.path.lexists(target):
            make_dirs(self.root, self.container_path(target), self.owner)
        elif not is_real_dir(target):
            raise ContextError(
                f"cannot copy the directory {source.name or '.'} to {dest}: it exists and is not a directory."
            )
        for rel, path in source.children():
            self.copy_entry(path, target / rel, rel)

    def _parents(self, target: Path, dest: str, parents: tuple[tuple[str, Path], ...]) -> Path:
        """The directory the source goes into: ``target``, made if missing, and the parents below."""
        if not is_real_dir(target):
            if os.path.lexists(target):
                raise ContextError(f"cannot copy into {dest}: it exists and is not a directory.")
            make_dirs(self.root, self.container_path(target), self.owner)
        for name, path in parents:
            target = target / name
            self.copy_entry(path, target, name, overwrite=False)
        return target

    def container_path(self, path: Path) -> str:
        return "/" + str(path.relative_to(self.root)) if path != self.root else "/"

    def copy_entry(self, src: Path, dst: Path, name: str, *, overwrite: bool = True) -> None:
        """Copy one entry; a directory already there keeps its metadata unless ``overwrite``."""
        info = src.lstat()
        existing = _lstat(dst)
        if stat.S_ISDIR(info.st_mode):
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                raise ContextError(
                    f"cannot copy the directory {name} over {self.container_path(dst)}, "
                    "which is not a directory."
                )
            if existing is None:
                os.mkdir(dst, 0o700)
            if existing is None or overwrite:
                self._set_metadata(src, dst, info)
                self.dir_times.append((dst, info))
            return
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise ContextError(
                f"cannot replace the directory {self.container_path(dst)} with the file {name}."
            )
        if existing is not None:
            os.unlink(dst)
        if self._make(src, dst, info):
            self._set_metadata(src, dst, info)
            os.utime(dst, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)

    def _make(self, src: Path, dst: Path, info: os.stat_result) -> bool:
        """Create ``dst`` like ``src``; False when it is a link to a file copied before, or a socket."""
        mode = info.st_mode
        if stat.S_ISREG(mode):
            key = (info.st_dev, info.st_ino)
            if info.st_nlink > 1 and key in self.links:
                os.link(self.links[key], dst, follow_symlinks=False)
                return False
            _copy_file(src, dst)
            self.links.setdefault(key, dst)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            os.mknod(dst, stat.S_IFMT(mode) | 0o600, info.st_rdev)
        else:
            return False  # a socket is a running process's endpoint, not content
        return True

    def _set_metadata(self, src: Path, dst: Path, info: os.stat_result) -> None:
        uid, gid = (self.owner.uid, self.owner.gid) if self.owner else (info.st_uid, info.st_gid)
        os.chown(dst, uid, gid, follow_symlinks=False)
        if not stat.S_ISLNK(info.st_mode):  # after chown, which clears setuid and setgid
            mode = stat.S_IMODE(info.st_mode)
            if self.chmod is not None:
                mode = self.chmod.apply(info.st_mode, is_dir=stat.S_ISDIR(info.st_mode))
            os.chmod(dst, mode)
        _copy_xattrs(src, dst)

    def finish(self) -> None:
        """Directory times last, deepest first: writing into a directory changes its mtime."""
        for path, info in reversed(self.dir_times):
            os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)


def _copy_file(src: Path, dst: Path) -> None:
    with open(os.open(src, _READ), "rb") as reader, open(os.open(dst, _NEW_FILE, 0o600), "wb") as writer:
        size = os.fstat(reader.fileno()).st_size
        offset = 0
        while offset < size:  # in the kernel; a short count means the file shrank meanwhile
            sent = os.sendfile(writer.fileno(), reader.fileno(), offset, min(_CHUNK * 64, size - offset))
            if sent == 0:
                break
            offset += sent


def travelling_xattrs(path: Path) -> list[tuple[str, bytes]]:
    """The extended attributes a copy carries: capabilities and user.*, not the host's labels."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return []
        raise ContextError(f"cannot read the attributes of {path}: {exc.strerror}.") from exc
    found = []
    for name in sorted(names):
        if name == "security.selinux" or not name.startswith(("user.", "security.")):
            continue
        try:
            found.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise ContextError(f"cannot read the attributes of {path}: {exc.strerror}.") from exc
    return found


def _copy_xattrs(src: Path, dst: Path) -> None:
    try:
        for name, value in travelling_xattrs(src):
            os.setxattr(dst, name, value, follow_symlinks=False)
    except OSError as exc:
        # Unsupported here, or user.* on a symlink: the kernel forbids it.
        if exc.errno not in (errno.ENOTSUP, errno.EPERM):
            raise


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None
