"""Apply a hostile layer tar to a directory without touching anything outside it.

Every path is resolved one component at a time through directory file descriptors opened with
O_NOFOLLOW, so the kernel never follows a symlink on our behalf; symlinked parents are resolved
by hand and scoped to the root (umoci's securejoin), and every change is made relative to a
descriptor of the directory that holds it.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, BinaryIO

from builder.errors import LayerError
from builder.oci import OPAQUE_XATTR, WHITEOUT_OPAQUE, WHITEOUT_PREFIX

__all__ = ["apply_layer"]

# Other ".wh..wh." names are aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs), never content.
_WHITEOUT_META = ".wh..wh."
_XATTR_PAX = "SCHILY.xattr."
_MAX_SYMLINKS = 40  # Linux's MAXSYMLINKS: past this, resolution is a loop
_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_CHUNK))
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

Parts = tuple[str, ...]


def apply_layer(tar_stream: BinaryIO, root: Path, *, overlay_whiteouts: bool) -> None:
    """Extract a (hostile) uncompressed tar into ``root``.

    With ``overlay_whiteouts`` the result is an overlayfs layer directory: ``.wh.x`` becomes a
    0/0 character device and ``.wh..wh..opq`` the opaque xattr. Without it, whiteouts delete
    what lower layers put in ``root``, never what this tar wrote itself.
    """
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        extractor = _Extractor(root_fd, overlay=overlay_whiteouts)
        try:
            with tarfile.open(
                fileobj=tar_stream, mode="r|", encoding="utf-8", errors="surrogateescape"
            ) as tar:
                for member in tar:
                    extractor.apply(member, tar)
        except (tarfile.TarError, EOFError) as e:
            raise LayerError(f"The layer applied to {root} is not a valid tar: {e}.") from e
        except OSError as e:  # reading the stream itself failed
            raise LayerError(f"Cannot read the layer applied to {root}: {e}.") from e
        extractor.finish()
    finally:
        os.close(root_fd)


def clean_name(name: str, *, strict: bool = False) -> Parts:
    """The components of a tar name, with ``..`` resolved lexically so it never leaves the root.

    ``strict`` refuses a name that climbs above the root instead of stopping it there.
    """
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part != "..":
            parts.append(part)
        elif parts:
            parts.pop()
        elif strict:
            raise ValueError(name)
    return tuple(parts)


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _remove(name: str, dir_fd: int, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)  # the fd-based rmtree never follows symlinks
    else:
        os.unlink(name, dir_fd=dir_fd)


def _mtime_ns(member: tarfile.TarInfo) -> int:
    # A PAX mtime is a decimal string; tarfile turns it into a float, which loses nanoseconds.
    text = member.pax_headers.get("mtime")
    if text is not None:
        from decimal import Decimal, InvalidOperation  # only unpacking needs it (start-up time)

        try:
            return int(Decimal(text) * 1_000_000_000)
        except InvalidOperation:
            pass
    return int(member.mtime) * 1_000_000_000


class _Extractor:
    """The state of one extraction: what this tar wrote, and directory times to set last."""

    def __init__(self, root_fd: int, *, overlay: bool) -> None:
        self.root_fd = root_fd
        self.overlay = overlay
        # Paths this tar wrote plus all their ancestors: a whiteout or an opaque marker only
        # hides what came from lower layers, whatever the order of the entries.
        self.touched: set[Parts] = set()
        self.dir_times: dict[Parts, int] = {}

    def apply(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        try:
            self._apply(member, tar)
        except LayerError:
            raise
        except (OSError, ValueError, OverflowError) as e:
            # ValueError: a NaN time; OverflowError: ids, devices or times too big.
            detail = (e.strerror if isinstance(e, OSError) else None) or str(e)
            raise LayerError(f"Cannot apply layer entry {member.name!r}: {detail}.") from e

    def _apply(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        if "\0" in member.name or "\0" in member.linkname:  # only a PAX record can hold one
            raise LayerError(f"Layer entry {member.name!r} has a NUL byte in its name or link.")
        parts = clean_name(member.name)
        if not parts:
            self._apply_root(member)
            return
        name = parts[-1]
        if name == WHITEOUT_OPAQUE:
            self._opaque(parts[:-1], member)
        elif name.startswith(_WHITEOUT_META):
            return
        elif name.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts[:-1], name[len(WHITEOUT_PREFIX) :], member)
        else:
            with self._parent(parts[:-1], member, create=True) as (pfd, canon):
                assert pfd is not None
                self._create(pfd, name, (*canon, name), member, tar)

    def finish(self) -> None:
        """Set directory times last: creating entries inside a directory moves its mtime."""
        for parts, ns in self.dir_times.items():
            fd = self._walk_nofollow(parts)
            if fd is not None:
                try:
                    os.utime(fd, ns=(ns, ns))
                finally:
                    os.close(fd)

    # -- resolving --------------------------------------------------------------------------

    @contextmanager
    def _parent(
        self, parts: Parts, member: tarfile.TarInfo, *, create: bool
    ) -> Iterator[tuple[int | None, Parts]]:
        """A descriptor for directory ``parts`` inside the root (None if missing and not created)."""
        found = self._resolve(parts, member, create=create)
        if found is None:
            yield None, ()
            return
        try:
            yield found
        finally:
            os.close(found[0])

    def _resolve(self, parts: Parts, member: tarfile.TarInfo, *, create: bool) -> tuple[int, Parts] | None:
        stack: list[int] = []  # descriptors below the root, the current directory last
        canon: list[str] = []
        todo = list(reversed(parts))
        links = 0
        try:
            while todo:
                part = todo.pop()
                cur = stack[-1] if stack else self.root_fd
                if part in ("", "."):
                    continue
                if part == "..":
                    if stack:  # ".." at the root stays at the root, as in a chroot
                        os.close(stack.pop())
                        canon.pop()
                    continue
                st = self._lookup_dir(part, cur, create=create)
                if st is None:
                    return None
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise LayerError(f"Layer entry {member.name!r} has a symlink loop in its parents.")
                    target = os.readlink(part, dir_fd=cur)
                    if target.startswith("/"):  # absolute targets start again at the root
                        while stack:
                            os.close(stack.pop())
                        canon.clear()
                    todo.extend(reversed(target.split("/")))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    where = "/".join([*canon, part])
                    raise LayerError(
                        f"Layer entry {member.name!r} needs {where!r} to be a directory, but it is not."
                    )
                stack.append(os.open(part, _DIR_FLAGS, dir_fd=cur))
                canon.append(part)
            fd = stack.pop() if stack else os.dup(self.root_fd)
            return fd, tuple(canon)
        finally:
            for fd in stack:
                os.close(fd)

    def _lookup_dir(self, name: str, dir_fd: int, *, create: bool) -> os.stat_result | None:
        st = _lstat(name, dir_fd)
        if st is not None and self.overlay and _is_whiteout(st):
            if not create:
                return None
            # A directory that replaces a whiteout must not show the lower one: make it opaque.
            os.unlink(name, dir_fd=dir_fd)
            self._mkdir(name, dir_fd, opaque=True)
            return _lstat(name, dir_fd)
        if st is None and create:
            self._mkdir(name, dir_fd, opaque=False)
            return _lstat(name, dir_fd)
        return st

    def _mkdir(self, name: str, dir_fd: int, *, opaque: bool) -> None:
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o755)  # not the umask's idea of 0755
            if opaque:
                os.setxattr(fd, OPAQUE_XATTR, b"y")
        finally:
            os.close(fd)

    def _walk_nofollow(self, parts: Parts) -> int | None:
        """A descriptor for ``parts`` if every component is still a real directory."""
        fd = os.dup(self.root_fd)
        for part in parts:
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                nxt = None
            os.close(fd)
            if nxt is None:
                return None
            fd = nxt
        return fd

    def _mark(self, path: Parts) -> None:
        while path not in self.touched:
            self.touched.add(path)
            if not path:
                return
            path = path[:-1]

    # -- whiteouts --------------------------------------------------------------------------

    def _whiteout(self, parent: Parts, target: str, member: tarfile.TarInfo) -> None:
        if target in ("", ".", ".."):
            raise LayerError(f"Layer entry {member.name!r} is a whiteout that names no file.")
        # In a layer directory the parent must exist to hold the whiteout device; in a full
        # root filesystem a missing parent means there is nothing to delete.
        with self._parent(parent, member, create=self.overlay) as (pfd, canon):
            if pfd is None:
                return
            path = (*canon, target)
            st = _lstat(target, pfd)
            if path in self.touched:
                # The OCI rule: a whiteout hides lower layers only, never this tar's own entry.
                if st is not None and stat.S_ISDIR(st.st_mode):
                    self._hide_lower(target, pfd, path)
                return
            if st is not None:
                _remove(target, pfd, st)
            if self.overlay:
                os.mknod(target, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)

    def _opaque(self, parent: Parts, member: tarfile.TarInfo) -> None:
        with self._parent(parent, member, create=self.overlay) as (pfd, canon):
            if pfd is None:
                return
            if self.overlay:
                os.setxattr(pfd, OPAQUE_XATTR, b"y")
            else:
                self._prune(pfd, canon)

    def _hide_lower(self, name: str, dir_fd: int, path: Parts) -> None:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            if self.overlay:
                os.setxattr(fd, OPAQUE_XATTR, b"y")
            else:
                self._prune(fd, path)
        finally:
            os.close(fd)

    def _prune(self, dir_fd: int, path: Parts) -> None:
        """Delete what this tar did not write below ``path``, which may arrive after siblings."""
        for name in sorted(os.listdir(dir_fd)):
            st = _lstat(name, dir_fd)
            if st is None:
                continue
            if (*path, name) not in self.touched:
                _remove(name, dir_fd, st)
            elif stat.S_ISDIR(st.st_mode):
                self._hide_lower(name, dir_fd, (*path, name))

    # -- creating ---------------------------------------------------------------------------

    def _apply_root(self, member: tarfile.TarInfo) -> None:
        if not member.isdir():
            raise LayerError(
                f"Layer entry {member.name!r} would replace the root directory with "
                "something that is not a directory."
            )
        fd = os.dup(self.root_fd)
        try:
            self._restore_fd(fd, member)
        finally:
            os.close(fd)
        self.dir_times[()] = _mtime_ns(member)
        self._mark(())

    def _create(
        self, pfd: int, name: str, path: Parts, member: tarfile.TarInfo, tar: tarfile.TarFile
    ) -> None:
        st = _lstat(name, pfd)
        if member.islnk():
            self._hardlink(pfd, name, st, member)
            self._mark(path)
            return
        over_whiteout = st is not None and self.overlay and _is_whiteout(st)
        if st is not None and not (member.isdir() and stat.S_ISDIR(st.st_mode)):
            _remove(name, pfd, st)  # duplicates: the later entry wins
        if member.isdir():
            if st is None or not stat.S_ISDIR(st.st_mode):
                self._mkdir(name, pfd, opaque=over_whiteout)
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            try:
                self._restore_fd(fd, member)
            finally:
                os.close(fd)
            self.dir_times[path] = _mtime_ns(member)
        elif member.isreg():
            self._write_file(pfd, name, member, tar)
        else:
            self._make_node(pfd, name, member)
        self._mark(path)

    def _write_file(self, pfd: int, name: str, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=pfd)
        try:
            src = tar.extractfile(member)
            if src is None:
                raise LayerError(f"Layer entry {member.name!r} has no readable content.")
            _copy_sparse(src, fd, member)
            self._restore_fd(fd, member)
            ns = _mtime_ns(member)
            os.utime(fd, ns=(ns, ns))
        finally:
            os.close(fd)

    def _make_node(self, pfd: int, name: str, member: tarfile.TarInfo) -> None:
        if member.issym():
            os.symlink(member.linkname, name, dir_fd=pfd)
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            dev = os.makedev(member.devmajor, member.devminor)
            os.mknod(name, kind | 0o600, dev, dir_fd=pfd)
        elif member.isfifo():
            os.mkfifo(name, 0o600, dir_fd=pfd)
        else:
            raise LayerError(f"Layer entry {member.name!r} has the unsupported tar type {member.type!r}.")
        os.chown(name, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
        if not member.issym():  # Linux has no lchmod; a symlink's mode means nothing
            os.chmod(name, member.mode & 0o7777, dir_fd=pfd)
        # setxattr has no dir_fd form; the parent's /proc link pins the directory we resolved.
        self._set_xattrs(f"/proc/self/fd/{pfd}/{name}", member, symlink=member.issym())
        ns = _mtime_ns(member)
        os.utime(name, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, pfd: int, name: str, st: os.stat_result | None, member: tarfile.TarInfo) -> None:
        try:
            target = clean_name(member.linkname, strict=True)
        except ValueError:
            raise LayerError(
                f"Layer entry {member.name!r} is a hard link to {member.linkname!r}, "
                "which is outside the root."
            ) from None
        with self._parent(target[:-1], member, create=False) as (tfd, _):
            tst = _lstat(target[-1], tfd) if target and tfd is not None else None
            if tfd is None or tst is None or stat.S_ISDIR(tst.st_mode):
                raise LayerError(
                    f"Layer entry {member.name!r} is a hard link to {member.linkname!r}, "
                    "which is not a file this layer or the ones below it contain."
                )
            if st is not None and (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino):
                return  # already that very inode
            if st is not None:
                _remove(name, pfd, st)
            # Link the target itself, even a symlink, never what it points to.
            os.link(target[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)

    # -- metadata ---------------------------------------------------------------------------

    def _restore_fd(self, fd: int, member: tarfile.TarInfo) -> None:
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode & 0o7777)  # after chown, which clears setuid and setgid
        self._set_xattrs(fd, member, symlink=False)

    def _set_xattrs(self, target: int | str, member: tarfile.TarInfo, *, symlink: bool) -> None:
        for key, value in sorted(member.pax_headers.items()):
            if not key.startswith(_XATTR_PAX):
                continue
            attr = key[len(_XATTR_PAX) :]
            # Only the namespaces an image may carry: trusted.overlay.* from a tar could forge
            # whiteouts and redirects in a layer directory.
            if not attr.startswith(("user.", "security.")):
                continue
            data = value.encode("utf-8", "surrogateescape")
            try:
                if isinstance(target, int):
                    os.setxattr(target, attr, data)
                else:
                    os.setxattr(target, attr, data, follow_symlinks=False)
            except OSError as e:
                # Unsupported by the filesystem, or user.* on a symlink: the kernel forbids it.
                if e.errno == errno.ENOTSUP or (e.errno == errno.EPERM and symlink):
                    continue
                raise


def _copy_sparse(src: IO[bytes], fd: int, member: tarfile.TarInfo) -> None:
    """Stream the content, seeking over zero blocks so sparse files stay sparse."""
    left = member.size
    while left:
        chunk = src.read(min(_CHUNK, left))
        if not chunk:
            raise LayerError(f"Layer entry {member.name!r} ends before its declared size.")
        if chunk == _ZEROS[: len(chunk)]:
            os.lseek(fd, len(chunk), os.SEEK_CUR)
        else:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        left -= len(chunk)
    os.ftruncate(fd, member.size)
