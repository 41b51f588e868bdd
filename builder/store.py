"""The content-addressed store: blobs, image tags, cache records and the layer index.

Layout under the root::

    blobs/sha256/<hex>      content, written once through a temp file and a rename
    tags/<name>             the manifest digest a tag points at (names are URL-quoted)
    cache/<key hex>.json    what a build step produced (see executor)
    memo/<key hex>.json     values derived from content (checksums of a stage's files; of a
                            context's files, by their lstat)
    explain/<id hex>.json   the last build's keys per Dockerfile and target, to explain misses
    layers/<diff hex>.json  the stored blobs (compressed forms) of an uncompressed layer
    sources/<hex>.json      registry repositories a blob was pulled from or pushed to
    snapshots/, l/          unpacked layers, used as overlay lower dirs (see snapshot)
    tmp/                    work dirs of running builds, removed by the next build when stale

Every write is atomic (a rename), so concurrent builds on one store never see half a file,
and a killed build leaves nothing half written: the page cache outlives the process.

Durability against a power cut costs one syncfs(2) per tag instead of an fsync per write. Blobs
and records are renamed into place unsynced; before a tag is written, the whole store file
system is synced (snapshots included, which were never synced one by one, and the new tag's
bytes, not yet renamed into place), then the tag is renamed into place and its directory
synced: a tag never points at anything that is not durably there, for two flushes a tag. What a power cut
can take before that barrier is only what a tag does not reach yet: a cache record or memo that
is lost or left empty reads as absent (a cache miss); a blob it cuts short is no longer the size
its descriptor says, which ``has_blob`` with a size and the layer index check (ext4 and xfs cut
unsynced files short, never fill them with stale data); every blob is verified when read whole
or unpacked, and ``builder check`` verifies and repairs the rest.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import io
import json
import os
import stat
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from builder.digest import StreamSha256, digest_hex, is_digest, sha256_digest
from builder.errors import StoreError
from builder.signals import deferred_signals

# typing only for the type checker: a build's shortcut (builder.shortcut) loads this module and
# nothing else of builder's that would import typing (start-up time).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes
    from typing import Any, BinaryIO, Protocol

    class ReadLog(Protocol):
        """Told of the records a build reads and the cache records it uses (builder.shortcut)."""

        def record(self, path: Path, data: bytes | None) -> None: ...

        def used(self, key: str) -> None: ...

        def blob(self, path: Path, size: int | None) -> None: ...


__all__ = ["BlobWriter", "Store", "default_root", "remove_tree", "unique_name"]

ROOT_ENV = "BUILDER_ROOT"
DEFAULT_ROOT = "/var/lib/builder"
_OVERLAYFS_MAGIC = 0x794C7630
# Failures of the store's file system itself: reported as a StoreError naming the store.
_STORAGE_ERRNOS = {
    errno.ENOSPC: " Free some space (builder prune) or pass --root on a larger file system.",
    errno.EDQUOT: " Free some space (builder prune) or pass --root on a larger file system.",
    errno.EROFS: " Remount it read-write or pass --root on a writable file system.",
    errno.EIO: " The file system reports an I/O error; check the disk.",
}
# Temp entries in tmp/ that a process flock()s while it uses them; unlocked ones are stale.
_TEMP_PREFIXES = ("build-", "blob-", "rec-")

_SYNC_FILE_RANGE_WRITE = 2
_WRITEBACK_EVERY = 8 << 20  # bytes of a blob between two starts of its writeback


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, for the calls Python's os module lacks (loaded on first use: a build's
    shortcut tags an image without them)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syncfs.argtypes = (ctypes.c_int,)
    libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return libc


def default_root() -> Path:
    """The store root: ``$BUILDER_ROOT`` or /var/lib/builder."""
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def write_back(fd: int, offset: int = 0) -> None:
    """Have the kernel start writing a file's dirty pages from ``offset`` on to disk, without
    waiting: what is written back while a build works, the sync before its tag need not wait
    for. Advisory: a failure shows in that sync, if anywhere."""
    _libc().sync_file_range(fd, offset, 0, _SYNC_FILE_RANGE_WRITE)


class _BlobFile(io.BufferedWriter):
    """A blob's temp file whose pages are written back as it grows (see :func:`write_back`)."""

    def __init__(self, fd: int) -> None:
        super().__init__(io.FileIO(fd, "wb"))
        self._fd = fd
        self._written = 0
        self._started = 0  # where the last writeback started

    def write(self, data: Any) -> int:
        count = super().write(data)
        self._written += count
        if self._written - self._started >= _WRITEBACK_EVERY:
            write_back(self._fd, self._started)
            self._started = self._written
        return count


class BlobWriter:
    """A temp file inside the store that hashes what is written and becomes a blob on commit."""

    def __init__(self, store: Store) -> None:
        self._store = store
        fd, self.path = store.temp_file("blob-")
        self.file: BinaryIO = _BlobFile(fd)
        self._hash = StreamSha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def commit(self, expected: str | None = None) -> str:
        """Rename into place; with ``expected``, refuse content of another digest."""
        digest = self.digest
        if expected is not None and digest != expected:
            self.discard()
            raise StoreError(f"content has digest {digest}, not the expected {expected}; nothing was stored.")
        return self.commit_hashed(digest)

    def commit_hashed(self, digest: str) -> str:
        """Commit bytes written straight to ``file`` by a producer that hashed them itself.
        Not synced: the store's sync before a tag makes it durable (see the module's text)."""
        self.file.flush()
        os.chmod(self.path, 0o644)
        os.replace(self.path, self._store.blob_path(digest))
        self.file.close()  # only now: the lock on the open file marks the temp file as in use
        return digest

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class Store:
    """One store root; safe to share between concurrent builds."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))  # overlay options and mount points need it absolute
        self.read_log: ReadLog | None = None  # set while a build may leave a shortcut

    @classmethod
    def open(cls, root: Path) -> Store:
        """Create the layout if needed; refuse a root on overlayfs (overlay cannot nest)."""
        try:
            for sub in (
                "blobs/sha256",
                "tags",
                "cache",
                "explain",
                "memo",
                "layers",
                "snapshots",
                "l",
                "tmp",
            ):
                (root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store at {root}: {exc.strerror}.") from exc
        if _fs_type(root) == _OVERLAYFS_MAGIC:
            raise StoreError(
                f"the store {root} is on an overlay file system, and overlay mounts cannot stack "
                "on one; pass --root on another file system (a tmpfs or a volume)."
            )
        return cls(root)

    # blobs

    def blob_path(self, digest: str) -> Path:
        try:
            return self.root / "blobs" / "sha256" / digest_hex(digest)
        except ValueError as exc:
            raise StoreError(f"{digest!r} is not a sha256 digest.") from exc

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        """Whether the blob is stored, and when ``size`` is given, whole (not cut by a power cut)."""
        path = self.blob_path(digest)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            found = None
        else:
            found = st.st_size if stat.S_ISREG(st.st_mode) else None
        if self.read_log is not None:
            self.read_log.blob(path, found)
        return found is not None and size in (None, found)

    @contextlib.contextmanager
    def blob_writer(self) -> Iterator[BlobWriter]:
        """A writer whose temp file is removed unless committed."""
        writer = None
        try:
            with deferred_signals():  # made whole, or not at all: never a temp file unknown here
                writer = BlobWriter(self)
            yield writer
        except OSError as exc:
            if exc.errno in _STORAGE_ERRNOS:
                raise self.storage_error(exc) from exc
            raise
        finally:
            with deferred_signals():
                if writer is not None and writer.path.exists():
                    writer.discard()

    def write_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        if not self.has_blob(digest):
            with self.blob_writer() as writer:
                writer.file.write(data)
                writer.commit_hashed(digest)  # hashed above
        return digest

    def read_blob(self, digest: str) -> bytes:
        """The blob's bytes, verified against its digest."""
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise StoreError(f"blob {digest} is not in the store {self.root}.") from exc
        if self.read_log is not None:
            self.read_log.blob(path, len(data))
        if sha256_digest(data) != digest:
            raise StoreError(f"blob {digest} in {self.root} is corrupt: its content has another digest.")
        return data

    def read_json(self, digest: str) -> dict[str, Any]:
        try:
            document = json.loads(self.read_blob(digest))
        except ValueError as exc:
            raise StoreError(f"blob {digest} is not a JSON document.") from exc
        if not isinstance(document, dict):
            raise StoreError(f"blob {digest} is not a JSON object.")
        return document

    # small JSON records, each replaced atomically

    def _write_record(self, path: Path, document: Any, *, durable: bool = False, alone: bool = False) -> None:
        """Replace a record atomically. A ``durable`` one is on disk when this returns, and so
        is everything written to the store before it: the store is synced (the record's
        bytes with it) before the record is renamed into place, and the rename after; with
        ``alone``, only the record's bytes are (what it reaches is known to be durable)."""
        with deferred_signals():  # a small file: written whole, never left half way in tmp/
            fd, name = self.temp_file("rec-")
            try:
                with os.fdopen(fd, "w") as file:
                    json.dump(document, file, sort_keys=True)
                    file.flush()
                    if durable and alone:
                        os.fsync(file.fileno())
                    elif durable:
                        self.sync()
                    os.replace(name, path)  # before the close ends the lock that marks it in use
                if durable:
                    _fsync_dir(path.parent)
            except BaseException as exc:
                name.unlink(missing_ok=True)
                if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
                    raise self.storage_error(exc) from exc
                raise

    @staticmethod
    def _read_record(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # a record that does not parse is treated as absent, never trusted

    def _read_input(self, path: Path) -> Any:
        """A record a build's result depends on (a tag, a cache record, the layer index), told
        to the read log when there is one."""
        if self.read_log is None:
            return self._read_record(path)
        try:
            data: bytes | None = path.read_bytes()
        except FileNotFoundError:
            data = None
        self.read_log.record(path, data)
        try:
            return None if data is None else json.loads(data)
        except ValueError:
            return None

    # tags

    def _tag_path(self, name: str) -> Path:
        return self.root / "tags" / urllib.parse.quote(name, safe="")

    def set_tag(self, name: str, manifest_digest: str, *, image_durable: bool = False) -> None:
        """Point a tag at a manifest, durably, once all it reaches is durable (see the module's
        text). ``image_durable``: the image is known to be (a shortcut's, whose build synced
        the store): the tag's own bytes are flushed, not the whole store's."""
        if self.get_tag(name) == manifest_digest:
            return  # set durably before, after a sync: nothing to write
        self._write_record(
            self._tag_path(name), {"manifest": manifest_digest}, durable=True, alone=image_durable
        )

    def get_tag(self, name: str) -> str | None:
        record = self._read_input(self._tag_path(name))
        digest = record.get("manifest") if isinstance(record, dict) else None
        return digest if isinstance(digest, str) and is_digest(digest) else None

    def tags(self) -> dict[str, str]:
        found = {}
        for path in sorted((self.root / "tags").iterdir()):
            digest = self.get_tag(urllib.parse.unquote(path.name))
            if digest:
                found[urllib.parse.unquote(path.name)] = digest
        return found

    def remove_tag(self, name: str) -> bool:
        """Forget a tag (its blobs stay); False when there was no such tag."""
        try:
            self._tag_path(name).unlink()
        except FileNotFoundError:
            return False
        return True

    # where blobs came from: repositories a registry push can mount them from

    def _sources_path(self, digest: str) -> Path:
        return self.root / "sources" / f"{digest_hex(digest)}.json"

    def blob_sources(self, digest: str) -> list[str]:
        """Repositories (``host/name``) known to hold the blob ``digest``, oldest first."""
        record = self._read_record(self._sources_path(digest))
        return [name for name in record if isinstance(name, str)] if isinstance(record, list) else []

    def add_blob_source(self, digest: str, repository: str) -> None:
        self._sources_path(digest).parent.mkdir(exist_ok=True)
        with self.lock("sources"):
            known = self.blob_sources(digest)
            if repository not in known:
                self._write_record(self._sources_path(digest), [*known, repository])

    # cache records and the layer index

    def get_cache(self, key: str) -> dict[str, Any] | None:
        record = self._read_input(self.root / "cache" / f"{digest_hex(key)}.json")
        return record if isinstance(record, dict) else None

    def touch_cache(self, key: str) -> None:
        """Mark a record as just used: prune keeps the most recently used ones."""
        if self.read_log is not None:
            self.read_log.used(key)
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.root / "cache" / f"{digest_hex(key)}.json")

    def put_cache(self, key: str, record: dict[str, Any]) -> None:
        self._write_record(self.root / "cache" / f"{digest_hex(key)}.json", record)

    def get_memo(self, key: str) -> Any:
        """A value derived from content named by ``key``, or None: a lost one is recomputed."""
        return self._read_record(self.root / "memo" / f"{digest_hex(key)}.json")

    def put_memo(self, key: str, value: Any) -> None:
        self._write_record(self.root / "memo" / f"{digest_hex(key)}.json", value)

    def get_explanation(self, build_id: str) -> dict[str, Any]:
        """The cache keys of the last build of one Dockerfile and target (see cachekey)."""
        record = self._read_record(self.root / "explain" / f"{digest_hex(build_id)}.json")
        return record if isinstance(record, dict) else {}

    def put_explanation(self, build_id: str, keys: dict[str, Any]) -> None:
        self._write_record(self.root / "explain" / f"{digest_hex(build_id)}.json", keys)

    def layer_blobs(self, diff_id: str) -> list[dict[str, Any]]:
        """Descriptors of stored blobs whose uncompressed content is ``diff_id``."""
        record = self._read_input(self.root / "layers" / f"{digest_hex(diff_id)}.json")
        blobs = record if isinstance(record, list) else []
        return [desc for desc in blobs if isinstance(desc, dict) and self._has_described(desc)]

    def _has_described(self, desc: dict[str, Any]) -> bool:
        size = desc.get("size")
        return self.has_blob(str(desc.get("digest")), size if isinstance(size, int) else None)

    def add_layer_blob(self, diff_id: str, desc: dict[str, Any]) -> None:
        path = self.root / "layers" / f"{digest_hex(diff_id)}.json"
        with self.lock("layers"):
            blobs = [d for d in self.layer_blobs(diff_id) if d.get("digest") != desc["digest"]]
            self._write_record(path, [*blobs, desc])

    def sync(self) -> None:
        """Make everything written to the store's file system durable: one syncfs(2).
        It covers other processes' unsynced writes too, which a tag set here may reach."""
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if _libc().syncfs(fd) != 0:
                    import ctypes

                    code = ctypes.get_errno()
                    raise OSError(code, os.strerror(code), str(self.root))
            finally:
                os.close(fd)
        except OSError as exc:
            raise self.storage_error(exc) from exc

    # locks and temp dirs

    def storage_error(self, exc: OSError) -> StoreError:
        """The error for an operation the store's file system refused (full, read-only, ...)."""
        where = f" ({exc.filename})" if exc.filename else ""
        verb = "write to" if exc.errno in _STORAGE_ERRNOS else "use"
        hint = _STORAGE_ERRNOS.get(exc.errno or 0, "")
        return StoreError(f"cannot {verb} the store {self.root}: {exc.strerror}{where}.{hint}")

    @contextlib.contextmanager
    def _flock(self, name: str, operation: int) -> Iterator[None]:
        # Opened read-only: a read-only store can still be locked, and so read and checked.
        try:
            fd = os.open(self.root / "tmp" / name, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise self.storage_error(exc) from exc
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)

    def lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        """A short exclusive lock between processes (never held across a RUN)."""
        return self._flock(f"{name}.lock", fcntl.LOCK_EX)

    def lease(self) -> contextlib.AbstractContextManager[None]:
        """Held (shared) by every build for its whole run: prune waits until no build runs."""
        return self._flock("gc.lock", fcntl.LOCK_SH)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Held by prune: no build runs meanwhile, and none starts until it is done."""
        return self._flock("gc.lock", fcntl.LOCK_EX)

    def temp_file(self, prefix: str) -> tuple[int, Path]:
        """A new file in tmp/, flock()ed for as long as the returned descriptor is open."""
        while True:
            name = self.root / "tmp" / unique_name(prefix)
            try:
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise self.storage_error(exc) from exc
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _names(name, fd):
                return fd, name
            os.close(fd)  # a cleaner took it for stale between its creation and flock

    @contextlib.contextmanager
    def workdir(self) -> Iterator[Path]:
        """A private temp dir for one build, locked while in use and removed afterwards."""
        self.remove_stale_workdirs()
        made = None
        try:
            with deferred_signals():  # made whole, or not at all: never a dir unknown here
                made = self._new_workdir()
            yield made[0]
        finally:
            with deferred_signals():
                if made is not None:
                    self._remove_workdir(made[0])
                    os.close(made[1])

    def _new_workdir(self) -> tuple[Path, int]:
        """A new dir in tmp/ and the descriptor of its flock()ed lock file."""
        while True:
            path = self.root / "tmp" / unique_name("build-")
            try:
                path.mkdir(0o700)
            except FileExistsError:
                continue
            except OSError as exc:
                raise self.storage_error(exc) from exc
            try:
                fd = os.open(path / ".lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                with contextlib.suppress(OSError):  # without its lock no cleaner would take it for stale
                    path.rmdir()
                raise self.storage_error(exc) from exc
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _names(path / ".lock", fd):
                return path, fd
            os.close(fd)  # a cleaner took it for stale between creating and locking it

    @staticmethod
    def _remove_workdir(path: Path) -> None:
        # The lock file goes last: a dir this cannot empty (a mount still on it) keeps its
        # lock, so the next build can tell it is stale and remove it.
        for child in path.iterdir():
            if child.name != ".lock":
                remove_tree(child)
        if [child.name for child in path.iterdir()] == [".lock"]:
            remove_tree(path / ".lock")
            remove_tree(path)

    def stale_temp(self, *, remove: bool) -> list[Path]:
        """Work dirs and temp files in tmp/ that no process holds: left by one that was killed.
        With ``remove``, each is removed while locked here, so nothing in use ever is."""
        found = []
        for path in sorted((self.root / "tmp").iterdir()):
            if not path.name.startswith(_TEMP_PREFIXES) or path.name.endswith(".lock"):
                continue
            lock = path / ".lock" if path.name.startswith("build-") else path
            try:
                fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue  # gone already, or a work dir whose lock is still being made
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not _names(lock, fd):
                    continue  # removed by another cleaner since it was opened here: not ours
                found.append(path)
                if remove and path.name.startswith("build-"):
                    self._remove_workdir(path)
                elif remove:
                    remove_tree(path)
            except BlockingIOError:
                continue
            finally:
                os.close(fd)
        return found

    def remove_stale_workdirs(self) -> None:
        """Remove what builds, loads and pulls that died left in tmp/ (see stale_temp)."""
        self.stale_temp(remove=True)


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def unique_name(prefix: str) -> str:
    """A new temp name: 48 random bits, as tempfile's names have about 41. The caller creates it
    exclusively and takes another on a clash. Not tempfile itself: with shutil and random it
    is about 4 % of a build that runs a step (start-up time)."""
    return prefix + os.urandom(6).hex()


def remove_tree(path: Path) -> None:
    """Remove a file or a directory tree, as far as it can be; a file or an empty dir without
    importing shutil (start-up time)."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    if os.path.lexists(path):
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make the renames into a directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fs_type(path: Path) -> int:
    """The file system magic number of ``path`` (statfs f_type)."""
    import ctypes

    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    buf = StatFs()
    if _libc().statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return 0
    return int(buf.f_type)
