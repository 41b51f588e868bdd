"""COPY as a file operation: sources written inside a mounted root with Docker's rules.

The destination follows BuildKit's copier (``fsutil/copy``): a trailing ``/`` makes it a
directory; a directory source copies its contents; a file goes into the destination when that
is an existing directory, else becomes it. The destination path is resolved inside the root
(symlinks followed with the root as ``/``), so a hostile image never redirects a write to the
host; below it nothing is followed: an entry in the way is replaced, or is an error when a
directory would replace a non-directory or the other way round. Owners, modes (``--chmod``),
times, xattrs and hard links within one copy are kept.

What is copied is a :class:`CopyEntry`: a path as one look saw it (stat, link target, xattrs).
The cache key describes the same entries, and a file's bytes are checked against that look when
they are read, so the key and the copy never describe two different states of a file.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from msgspec import Struct

from builder.errors import ContextError
from builder.rootpath import is_real_dir, resolve_in_root
from builder.users import Identity

__all__ = [
    "Chmod",
    "CopyEntry",
    "CopySource",
    "Walker",
    "check_unchanged",
    "copy_sources",
    "describe",
    "make_dirs",
    "open_source",
    "parse_chmod",
    "travelling_xattrs",
]

_CHUNK = 1 << 20
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a file swapped for a FIFO since it was looked at must not hang the build
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Patterns are compiled on first use (re's own cache), not at import: most builds use few of them.
_CLAUSE = r"([ugoa]*)((?:[-+=](?:[ugo]|[rwxXst]*))+)|([-+=])([0-7]+)"
_ACTION = r"([-+=])([ugo]|[rwxXst]*)"
_CLASS_BITS = {"u": 0o700, "g": 0o070, "o": 0o007}
_CLASS_SPECIAL = {"u": 0o4000, "g": 0o2000, "o": 0}


class CopyEntry(Struct, frozen=True):
    """One path of a source as a single look saw it; the cache key and the copy both use it.

    The fields of its lstat that a copy needs, not the whole stat_result, and its host path in
    two parts, the first shared: a build keeps one of these for every path of the context it
    copies (about 0.5 KiB each).
    """

    base: str  # the walked directory on the host
    rel: str  # below it, "/"-separated; "" for the directory (or a file) itself
    mode: int
    uid: int
    gid: int
    size: int
    ino: int
    dev: int
    nlink: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    link: str  # a symlink's target, else ""
    xattrs: tuple[tuple[str, bytes], ...]  # the ones that travel (travelling_xattrs)

    @property
    def path(self) -> str:
        """Where it is on the host."""
        return f"{self.base}/{self.rel}" if self.rel else self.base

    def same_file(self, now: os.stat_result) -> bool:
        """Whether ``now`` is still this file with these bytes (a write moves the ctime)."""
        return (now.st_ino, now.st_dev, now.st_size, now.st_mtime_ns, now.st_ctime_ns) == (
            self.ino,
            self.dev,
            self.size,
            self.mtime_ns,
            self.ctime_ns,
        )


Walker = Callable[[], Iterable[CopyEntry]]


def describe(base: str, rel: str = "", info: os.stat_result | None = None) -> CopyEntry:
    """Look at ``rel`` below ``base``, or ``base`` itself (``info``: the lstat the caller has)."""
    path = f"{base}/{rel}" if rel else base
    info = os.lstat(path) if info is None else info
    mode = info.st_mode
    return CopyEntry(
        base,
        rel,
        mode,
        info.st_uid,
        info.st_gid,
        info.st_size,
        info.st_ino,
        info.st_dev,
        info.st_nlink,
        info.st_rdev,
        info.st_atime_ns,
        info.st_mtime_ns,
        info.st_ctime_ns,
        os.readlink(path) if stat.S_ISLNK(mode) else "",
        travelling_xattrs(path),
    )


def open_source(entry: CopyEntry) -> int:
    """A descriptor to read a regular file's bytes; :func:`check_unchanged` after reading them."""
    try:
        return os.open(entry.path, _READ)
    except OSError as exc:
        raise ContextError(f"cannot read {entry.path}: {exc.strerror}.") from exc


def check_unchanged(fd: int, entry: CopyEntry) -> None:
    """Refuse bytes read from a file that is no longer what ``entry`` describes.

    Checked after the read: a write meanwhile moves the ctime, which the kernel makes
    fine-grained once it has been looked at (multigrain timestamps, Linux 6.13).
    """
    if not entry.same_file(os.fstat(fd)):
        raise ContextError(f"{entry.path} changed during the build; build again when it is settled.")


class CopySource(Struct, frozen=True):
    """A file, link or directory to copy; ``children`` lists a directory's contents.

    ``top`` is the source itself as the cache key saw it (None: looked at when copied).
    ``parents`` are directories recreated below the destination first, outermost first, as
    (name, host path): with ``--parents``, the path from the pivot down to the source, a
    directory source included (its contents then go into it).
    """

    path: Path
    name: str
    children: Walker
    parents: tuple[tuple[str, Path], ...] = ()
    top: CopyEntry | None = None


class Chmod(Struct, frozen=True):
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
            match = re.fullmatch(_CLAUSE, clause)
            assert match is not None  # parse_chmod checked it
            if match[3]:  # an operator with octal bits: +111, =644
                result = _operate(result, match[3], int(match[4], 8) & 0o7777, 0o7777)
                continue
            who = match[1].replace("a", "ugo") or "ugo"
            for op, perms in re.findall(_ACTION, match[2]):
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
    if not text or not all(re.fullmatch(_CLAUSE, clause) for clause in text.split(",")):
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
        where = copier.container_path(name) if name.startswith(f"{root}/") else name
        raise ContextError(f"copying to {dest} failed: {where or dest}: {exc.strerror}.") from exc
    finally:
        copier.close()


class _Copier:
    def __init__(self, root: Path, owner: Identity | None, chmod: Chmod | None) -> None:
        self.root = root
        self.owner = owner
        self.chmod = chmod
        self.dir_times: list[tuple[str, CopyEntry]] = []
        self.links: dict[tuple[int, int], str] = {}
        self.parent = ("", -1)  # the destination directory files were last created in, and its fd

    def copy_source(self, source: CopySource, dest: str) -> None:
        top = source.top or describe(str(source.path))
        is_dir = stat.S_ISDIR(top.mode)
        target = resolve_in_root(self.root, dest)
        if not is_dir and not dest.endswith("/") and not is_real_dir(target):
            # A file replaces a symlink in its way rather than writing where the link points.
            target = resolve_in_root(self.root, dest, follow_last=False)
        if source.parents or (is_real_dir(target) and not is_dir):
            target = self._parents(target, dest, source.parents)
            if not is_dir:
                target = target / source.name
        if not is_dir:
            self.copy_entry(top, str(target), source.name)
            return
        if not os.path.lexists(target):
            make_dirs(self.root, self.container_path(str(target)), self.owner)
        elif not is_real_dir(target):
            raise ContextError(
                f"cannot copy the directory {source.name or '.'} to {dest}: it exists and is not a directory."
            )
        for entry in source.children():
            self.copy_entry(entry, f"{target}/{entry.rel}", entry.rel)

    def _parents(self, target: Path, dest: str, parents: tuple[tuple[str, Path], ...]) -> Path:
        """The directory the source goes into: ``target``, made if missing, and the parents below."""
        if not is_real_dir(target):
            if os.path.lexists(target):
                raise ContextError(f"cannot copy into {dest}: it exists and is not a directory.")
            make_dirs(self.root, self.container_path(str(target)), self.owner)
        for name, path in parents:
            target = target / name
            self.copy_entry(describe(str(path)), str(target), name, overwrite=False)
        return target

    def container_path(self, path: str) -> str:
        root = str(self.root)
        return "/" + path[len(root) :].lstrip("/") if path.startswith(f"{root}/") else "/"

    def copy_entry(self, entry: CopyEntry, dst: str, name: str, *, overwrite: bool = True) -> None:
        """Copy one entry; a directory already there keeps its metadata unless ``overwrite``.

        Creation comes first and what is in the way is looked at only when it fails: below a
        directory this copy made, nothing can be.
        """
        if stat.S_ISDIR(entry.mode):
            self._copy_dir(entry, dst, name, overwrite=overwrite)
        elif not self._make(entry, dst):
            if stat.S_ISDIR(os.lstat(dst).st_mode):
                raise ContextError(
                    f"cannot replace the directory {self.container_path(dst)} with the file {name}."
                )
            os.unlink(dst)
            if not self._make(entry, dst):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)

    def _copy_dir(self, entry: CopyEntry, dst: str, name: str, *, overwrite: bool) -> None:
        try:
            os.mkdir(dst, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(dst).st_mode):
                raise ContextError(
                    f"cannot copy the directory {name} over {self.container_path(dst)}, "
                    "which is not a directory."
                ) from None
            if not overwrite:
                return
        self._set_metadata(dst, entry)
        self.dir_times.append((dst, entry))

    def _make(self, entry: CopyEntry, dst: str) -> bool:
        """Create ``dst`` like ``entry``, metadata included; False when something is in its way."""
        try:
            if stat.S_ISREG(entry.mode):
                return self._copy_file(entry, dst)
            if stat.S_ISLNK(entry.mode):
                os.symlink(entry.link, dst)
            elif stat.S_ISFIFO(entry.mode) or stat.S_ISCHR(entry.mode) or stat.S_ISBLK(entry.mode):
                os.mknod(dst, stat.S_IFMT(entry.mode) | 0o600, entry.rdev)
            else:
                return True  # a socket is a running process's endpoint, not content
        except FileExistsError:
            return False
        self._set_metadata(dst, entry)
        return True

    def _copy_file(self, entry: CopyEntry, dst: str) -> bool:
        """A regular file: a hard link to one copied before, else its bytes through descriptors."""
        key = (entry.dev, entry.ino)
        if entry.nlink > 1 and key in self.links:
            try:
                os.link(self.links[key], dst, follow_symlinks=False)
            except FileExistsError:
                return False
            return True
        parent, _, name = dst.rpartition("/")
        try:
            out = os.open(name, _NEW_FILE, 0o600, dir_fd=self._parent_fd(parent))
            try:
                self._fill(out, entry)
            finally:
                os.close(out)
        except FileExistsError:
            return False
        except OSError as exc:  # through a descriptor: name the file in the image
            raise OSError(exc.errno, exc.strerror, dst) from exc
        self.links.setdefault(key, dst)
        return True

    def _fill(self, out: int, entry: CopyEntry) -> None:
        source = open_source(entry)
        try:
            _copy_bytes(source, out, entry.size)
            check_unchanged(source, entry)
        finally:
            os.close(source)
        self._set_metadata(out, entry)

    def _parent_fd(self, parent: str) -> int:
        """A descriptor of the directory files are created in: a copy fills one directory at a time."""
        if self.parent[0] != parent:
            self.close()
            self.parent = (parent, os.open(parent, _DIR))
        return self.parent[1]

    def _set_metadata(self, target: str | int, entry: CopyEntry) -> None:
        """Owner, mode, xattrs and (but for directories) times, through a path or a descriptor."""
        by_path = isinstance(target, str)  # a path is never followed; a descriptor is the file
        uid, gid = (self.owner.uid, self.owner.gid) if self.owner else (entry.uid, entry.gid)
        os.chown(target, uid, gid, follow_symlinks=not by_path)
        if not stat.S_ISLNK(entry.mode):  # after chown, which clears setuid and setgid
            mode = stat.S_IMODE(entry.mode)
            if self.chmod is not None:
                mode = self.chmod.apply(entry.mode, is_dir=stat.S_ISDIR(entry.mode))
            os.chmod(target, mode)
        _set_xattrs(target, entry.xattrs, follow=not by_path)
        if not stat.S_ISDIR(entry.mode):  # finish() sets a directory's, once it is filled
            os.utime(target, ns=(entry.atime_ns, entry.mtime_ns), follow_symlinks=not by_path)

    def finish(self) -> None:
        """Directory times last, deepest first: writing into a directory changes its mtime."""
        for path, entry in reversed(self.dir_times):
            os.utime(path, ns=(entry.atime_ns, entry.mtime_ns), follow_symlinks=False)

    def close(self) -> None:
        if self.parent[1] >= 0:
            os.close(self.parent[1])
        self.parent = ("", -1)


def _copy_bytes(source: int, out: int, size: int) -> None:
    offset = 0
    while offset < size:  # in the kernel; a short count means the file shrank meanwhile
        sent = os.sendfile(out, source, offset, min(_CHUNK * 64, size - offset))
        if sent == 0:
            break
        offset += sent


def travelling_xattrs(path: str | Path) -> tuple[tuple[str, bytes], ...]:
    """The extended attributes a copy carries: capabilities and user.*, not the host's labels."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return ()
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
    return tuple(found)


def _set_xattrs(target: str | int, xattrs: tuple[tuple[str, bytes], ...], *, follow: bool) -> None:
    try:
        for name, value in xattrs:
            os.setxattr(target, name, value, follow_symlinks=follow)
    except OSError as exc:
        # Unsupported here, or user.* on a symlink: the kernel forbids it.
        if exc.errno not in (errno.ENOTSUP, errno.EPERM):
            raise


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None
