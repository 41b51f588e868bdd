"""Layers: diff an overlayfs upper dir into an OCI layer tar, compress it, read and apply layers.

The differ follows BuildKit's overlay differ (``util/overlay/overlay_linux.go``): it walks only
the upper dir and asks the lower snapshots whether an entry really changed or was only copied
up. The tar is deterministic by construction: PAX records only where ustar cannot hold a
value, integer mtimes, numeric owners, no atime/ctime, and entries in walk order: children
sorted by name bytes, each directory followed by its whole subtree (as BuildKit's walk and GNU
tar's --sort=name), a whiteout at the place of the name it deletes, and an opaque marker right
after its directory so that no applier meets it after siblings it must not hide.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, BinaryIO, NamedTuple, Protocol, cast

from msgspec import Struct

from builder.digest import HashingWriter
from builder.errors import LayerError
from builder.signals import deferred_signals
from builder.tarsafe import OPAQUE_XATTR, WHITEOUT_OPAQUE, WHITEOUT_PREFIX, apply_layer

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "COMPRESSIONS",
    "COMPRESSION_ANNOTATION",
    "Compression",
    "LayerBlob",
    "apply_blob",
    "apply_layer",
    "compress_stream",
    "diff_upperdir",
    "open_layer",
    "write_layer",
]

# ISA-L has levels 0-3; level 1 ran at about 250 MB/s here against zlib-6's 11 MB/s
# (DESIGN.md), and big layers are the wall, so speed wins over a few percent of size.
GZIP_DEFAULT_LEVEL = 1
# zstd's own default: ratio 2.4 against gzip's 1.4 at 120 MB/s per thread.
ZSTD_DEFAULT_LEVEL = 3
# The layer descriptor annotation that records Compression.settings: how to recompress.
COMPRESSION_ANNOTATION = "dev.builder.layer.compression"
# Both compressors cut their input into blocks, and the bytes out depend on where the cuts fall.
# Pinning the block and feeding whole blocks makes the output a function of the tar alone.
_BLOCK = 1 << 20
# The tar block's first size: the whole tar of most layers, and below malloc's mmap threshold.
_FIRST_BLOCK = 1 << 16
_CHUNK = 1 << 20
_BLOCKSIZE = tarfile.BLOCKSIZE
_ZEROS = bytes(_BLOCKSIZE)
# The ustar header's numeric fields hold 7 (ids, devices) or 11 (size, mtime) octal digits;
# a bigger value needs a PAX record. The checksum counts its own field as eight spaces.
_USTAR_ID_LIMIT = 8**7
_USTAR_NUMBER_LIMIT = 8**11
_USTAR_MAGIC = tarfile.POSIX_MAGIC
_USTAR_CHECKSUM_BASE = 8 * ord(" ") + sum(_USTAR_MAGIC)
_DEVICE_KINDS = (tarfile.CHRTYPE, tarfile.BLKTYPE)
_NO_DEVICE = bytes(16)

_OVERLAY_OPAQUE = (OPAQUE_XATTR, "user.overlay.opaque")
# redirect_dir and metacopy make the upper dir an incomplete picture of the change.
_OVERLAY_UNSUPPORTED = (
    "trusted.overlay.redirect",
    "trusted.overlay.metacopy",
    "user.overlay.redirect",
    "user.overlay.metacopy",
)
_CAPABILITY = "security.capability"
# The codecs (isal, zstandard) are imported where a blob is written or read, not here: a cached
# build only needs the table below (start-up of the cached path).
# Names and xattr values are bytes; surrogateescape carries any byte through tarfile and back.
_UTF8 = ("utf-8", "surrogateescape")


class Compression(Struct, frozen=True):
    """One way to store a layer blob: a row of :data:`COMPRESSIONS`."""

    name: str
    media_type: str

    def settings(self, level: int | None = None) -> str:
        """The encoder settings that make this kind of blob, for :data:`COMPRESSION_ANNOTATION`.

        Enough for a verifier to recompress a layer tar to the same bytes: the encoder, the
        level and the block size it is fed (the thread count does not change the bytes).
        """
        if self.name == "gzip":
            return f"gzip;encoder=isa-l;level={_codec_level(self, level)};block={_BLOCK}"
        if self.name == "zstd":
            return f"zstd;encoder=zstd-mt;level={_codec_level(self, level)};block={_BLOCK}"
        return self.name


COMPRESSIONS: Mapping[str, Compression] = MappingProxyType(
    {
        "gzip": Compression("gzip", "application/vnd.oci.image.layer.v1.tar+gzip"),
        "zstd": Compression("zstd", "application/vnd.oci.image.layer.v1.tar+zstd"),
        "uncompressed": Compression("uncompressed", "application/vnd.oci.image.layer.v1.tar"),
    }
)


class LayerBlob(Struct, frozen=True):
    """A layer as written: ``diff_id`` names the tar, ``digest`` and ``size`` the blob."""

    diff_id: str
    digest: str
    size: int
    media_type: str


# Takes each finished piece of the tar: a view that is valid only during the call.
_Sink = Callable[[memoryview], object]


# -- the differ -------------------------------------------------------------------------------


def diff_upperdir(upper: Path, lowers: Sequence[Path], out: BinaryIO, *, epoch: int | None = None) -> int:
    """Write the OCI layer tar (uncompressed) for an overlayfs upper dir to ``out``.

    ``lowers`` are the lower snapshots, topmost first. Returns the number of entries written;
    0 means the step changed nothing.
    """
    return _diff(upper, lowers, out.write, epoch)


def _diff(upper: Path, lowers: Sequence[Path], sink: _Sink, epoch: int | None) -> int:
    differ = _Differ(os.fsencode(upper), _TarWriter(_TarStream(sink), epoch))
    try:
        differ.walk(b"", tuple(os.fsencode(lower) for lower in lowers))
    except OSError as e:
        where = os.fsdecode(e.filename) if e.filename else str(upper)
        raise LayerError(f"Cannot diff the upper directory {upper}: {where}: {e.strerror}.") from e
    differ.tar.close()
    return differ.tar.count


def _lstat(path: bytes) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _getxattr(path: bytes, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def _xattr_names(path: bytes) -> list[str]:
    try:
        return sorted(os.listxattr(path, follow_symlinks=False))
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            return []
        raise


def _keep_xattr(name: str) -> bool:
    # security.selinux is the host's label, not the image's; overlay's own never leave it.
    if name == _CAPABILITY:
        return True
    if name == "security.selinux" or name.startswith(("user.overlay.", "security.overlay.")):
        return False
    return name.startswith(("user.", "security."))


def _is_opaque(path: bytes, names: Sequence[str] | None = None) -> bool:
    wanted = [key for key in _OVERLAY_OPAQUE if names is None or key in names]
    return any(_getxattr(path, key) == b"y" for key in wanted)


def _lookup(view: tuple[bytes, ...], name: bytes) -> tuple[bytes, os.stat_result] | None:
    """The entry ``name`` as the lower stack shows it, if any (a whiteout hides it)."""
    for lower_dir in view:
        path = lower_dir + b"/" + name
        st = _lstat(path)
        if st is not None:
            return None if _is_whiteout(st) else (path, st)
    return None


def _child_view(view: tuple[bytes, ...], name: bytes) -> tuple[bytes, ...]:
    """The lower directories that merge into ``name``, as overlayfs merges them."""
    merged: list[bytes] = []
    for lower_dir in view:
        path = lower_dir + b"/" + name
        st = _lstat(path)
        if st is None:
            continue
        if not stat.S_ISDIR(st.st_mode):  # a file or a whiteout ends the merge
            break
        merged.append(path)
        if _is_opaque(path):
            break
    return tuple(merged)


def _kept_xattrs(path: bytes, names: Sequence[str] | None = None) -> dict[str, bytes]:
    """The xattrs a layer carries, by name: capabilities, user.* and security.*."""
    found: dict[str, bytes] = {}
    for name in _xattr_names(path) if names is None else names:
        if _keep_xattr(name) and (value := _getxattr(path, name)) is not None:
            found[name] = value
    return found


def _same_dirent(lower: bytes, lst: os.stat_result, upper: bytes, ust: os.stat_result) -> bool:
    """Whether an upper entry is only a copy-up of the lower one (BuildKit's ``sameDirent``).

    BuildKit compares only security.capability; comparing every xattr the layer would carry
    also catches a step that only ran setfattr (which moves ctime, not mtime).
    """
    if (lst.st_mode, lst.st_uid, lst.st_gid, lst.st_rdev) != (
        ust.st_mode,
        ust.st_uid,
        ust.st_gid,
        ust.st_rdev,
    ):
        return False
    if _kept_xattrs(lower) != _kept_xattrs(upper):
        return False
    if stat.S_ISDIR(ust.st_mode):
        return True
    if lst.st_size != ust.st_size:
        return False
    lsec, lns = divmod(lst.st_mtime_ns, 1_000_000_000)
    usec, uns = divmod(ust.st_mtime_ns, 1_000_000_000)
    if lsec != usec or lns != uns:
        return False
    if lns != 0:
        return True
    # Both times may have been truncated by a tar (the lower came from one): only the content
    # can tell a copy-up from a change made within the same second.
    if stat.S_ISLNK(ust.st_mode):
        return os.readlink(lower) == os.readlink(upper)
    if stat.S_ISREG(ust.st_mode) and ust.st_size:
        return _same_content(lower, upper)
    return True


def _same_content(a: bytes, b: bytes) -> bool:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(os.open(a, flags), "rb") as fa, open(os.open(b, flags), "rb") as fb:
        while True:
            ca, cb = fa.read(_CHUNK), fb.read(_CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


class _TarStream:
    """The tar as it is written, gathered into one block that goes to ``sink`` when full.

    Each byte is copied once: headers into the block, file data straight from the kernel
    (``readv`` into the block's free part). The sink gets whole ``_BLOCK``-sized pieces (the
    last one shorter), whatever sizes the writer used, because the compressors' output depends
    on where the cuts fall. The block starts small and doubles when full up to ``_BLOCK`` (a
    copy of the first MiB at most): most layers are a few KiB, and a fresh 1 MiB block cost
    about 0.2 ms a layer in a build, zeroed page by page.
    """

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink
        self._block = memoryview(bytearray(_FIRST_BLOCK))
        self._fill = 0

    def write(self, data: bytes) -> None:
        end = self._fill + len(data)
        if end < len(self._block):  # the common case: a header or padding that fits
            self._block[self._fill : end] = data
            self._fill = end
            return
        view = memoryview(data)
        while view:
            n = min(len(view), self._room())
            self._block[self._fill : self._fill + n] = view[:n]
            self._advance(n)
            view = view[n:]

    def fill_from(self, fd: int, size: int) -> int:
        """Read up to ``size`` bytes of ``fd`` into the block; returns how many it had."""
        left = size
        while left:
            room = self._room()  # before the slice: it may replace the block
            n = os.readv(fd, [self._block[self._fill : self._fill + min(left, room)]])
            if not n:
                break
            self._advance(n)
            left -= n
        return size - left

    def _room(self) -> int:
        """The free bytes in the block, doubled first if it is full (a full ``_BLOCK`` has gone on)."""
        if self._fill == len(self._block):
            grown = memoryview(bytearray(2 * self._fill))
            grown[: self._fill] = self._block
            self._block = grown
        return len(self._block) - self._fill

    def _advance(self, n: int) -> None:
        self._fill += n
        if self._fill == _BLOCK:
            self.flush()

    def flush(self) -> None:
        """Hand on what the block holds (only at the end may it be less than full)."""
        if self._fill:
            self._sink(self._block[: self._fill])
            self._fill = 0


class _Header(NamedTuple):
    """The fields of one tar header; names are bytes, a directory's ends with a slash."""

    name: bytes
    kind: bytes
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    size: int = 0
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()


def _header_bytes(header: _Header) -> bytes:
    return _ustar_header(header) or _pax_header(header)


def _ustar_header(h: _Header) -> bytes | None:
    """The header as one ustar block, or None if it needs PAX records (names, sizes, xattrs).

    For the entries it takes these are exactly the bytes of ``_pax_header``: PAX adds records
    only for what ustar cannot hold, and never splits a long name into ustar's prefix field.
    tarfile takes 35-40 us an entry; this takes a tenth of that (the unit tests compare them).
    """
    if h.xattrs or len(h.name) > 100 or len(h.linkname) > 100:
        return None
    if not (h.name.isascii() and h.linkname.isascii()):
        return None
    if max(h.uid, h.gid) >= _USTAR_ID_LIMIT or h.size >= _USTAR_NUMBER_LIMIT:
        return None
    if not 0 <= h.mtime < _USTAR_NUMBER_LIMIT:
        return None
    device = _NO_DEVICE
    if h.kind in _DEVICE_KINDS:
        if max(h.devmajor, h.devminor) >= _USTAR_ID_LIMIT:
            return None  # tarfile's error, from the fallback
        device = b"%07o\0%07o\0" % (h.devmajor, h.devminor)
    numbers = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (h.mode, h.uid, h.gid, h.size, h.mtime)
    checksum = _USTAR_CHECKSUM_BASE + sum(h.name) + sum(numbers) + h.kind[0] + sum(h.linkname) + sum(device)
    return (
        b"%s%s%06o\0 %s%s%s%s%s%s"
        % (
            h.name.ljust(100, b"\0"),
            numbers,
            checksum,
            h.kind,
            h.linkname.ljust(100, b"\0"),
            _USTAR_MAGIC,
            _ZEROS[:64],  # empty user and group names
            device,
            _ZEROS[:167],  # no prefix, and the block's padding
        )
    )


def _pax_header(h: _Header) -> bytes:
    # PAX format adds a record only for what ustar cannot hold (long or non-ASCII names,
    # big ids or sizes, xattrs); surrogateescape carries non-UTF-8 name bytes through.
    info = tarfile.TarInfo(h.name.decode(*_UTF8))
    info.type, info.mode, info.uid, info.gid = h.kind, h.mode, h.uid, h.gid
    info.mtime, info.size, info.linkname = h.mtime, h.size, h.linkname.decode(*_UTF8)
    info.devmajor, info.devminor = h.devmajor, h.devminor
    info.pax_headers = {"SCHILY.xattr." + k: v.decode(*_UTF8) for k, v in h.xattrs}
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


class _TarWriter:
    """Writes headers and streamed content; knows the epoch and counts the entries."""

    def __init__(self, stream: _TarStream, epoch: int | None) -> None:
        self.stream = stream
        self.epoch = epoch
        self.count = 0

    def mtime(self, st: os.stat_result) -> int:
        # Truncate, never round (tarfile rounds floats); clamp to SOURCE_DATE_EPOCH.
        seconds = st.st_mtime_ns // 1_000_000_000
        return seconds if self.epoch is None else min(seconds, self.epoch)

    def header(self, header: _Header) -> None:
        self.stream.write(_header_bytes(header))
        self.count += 1

    def content(self, path: bytes, st: os.stat_result) -> None:
        """Stream ``st.st_size`` bytes of ``path`` into the tar, then the padding."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_ino != st.st_ino:
                raise LayerError(f"{os.fsdecode(path)} was replaced while the layer was written.")
            if self.stream.fill_from(fd, st.st_size) != st.st_size:
                raise LayerError(f"{os.fsdecode(path)} shrank while the layer was written.")
        finally:
            os.close(fd)
        self.stream.write(_ZEROS[: -st.st_size % _BLOCKSIZE])

    def close(self) -> None:
        self.stream.write(bytes(2 * _BLOCKSIZE))  # end of archive, and no record padding (as Go writes)
        self.stream.flush()


_Entry = tuple[bytes, os.stat_result, list[str]]


class _Differ:
    """One walk of an upper dir; ``pending`` holds unchanged ancestors not yet written."""

    def __init__(self, upper: bytes, tar: _TarWriter) -> None:
        self.upper = upper
        self.tar = tar
        self.pending: list[_Entry] = []
        self.links: dict[tuple[int, int], bytes] = {}

    def walk(self, rel: bytes, view: tuple[bytes, ...]) -> None:
        for name in sorted(os.listdir(self.upper + b"/" + rel if rel else self.upper)):
            self.visit(rel + b"/" + name if rel else name, name, view)

    def visit(self, rel: bytes, name: bytes, view: tuple[bytes, ...]) -> None:
        path = self.upper + b"/" + rel
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode):
            return  # a socket is a running process's endpoint, not content
        names = _xattr_names(path)
        for key in _OVERLAY_UNSUPPORTED:
            if key in names:
                raise LayerError(
                    f"{os.fsdecode(path)} has the overlay attribute {key}; mount the overlay "
                    "with redirect_dir=off and metacopy=off so the upper dir holds the whole diff."
                )
        lower = _lookup(view, name)
        if _is_whiteout(st):
            if lower is not None:  # deleting what no lower layer shows needs no whiteout
                self.special(rel, whiteout=True)
        elif stat.S_ISDIR(st.st_mode):
            self.visit_dir(rel, name, view, (path, st, names), lower)
        elif lower is None or not _same_dirent(lower[0], lower[1], path, st):
            self.emit(rel, st, names)

    def visit_dir(
        self,
        rel: bytes,
        name: bytes,
        view: tuple[bytes, ...],
        entry: _Entry,
        lower: tuple[bytes, os.stat_result] | None,
    ) -> None:
        path, st, names = entry
        # Opaque over nothing hides nothing, so it is just a new directory (BuildKit's
        # checkOpaque); over a lower entry it becomes the OCI opaque marker.
        opaque = lower is not None and _is_opaque(path, names)
        if opaque or lower is None or not _same_dirent(lower[0], lower[1], path, st):
            self.emit(rel, st, names)
        else:
            self.pending.append((rel, st, names))
        if opaque:
            self.special(rel, whiteout=False)
        self.walk(rel, () if opaque else _child_view(view, name))
        if self.pending and self.pending[-1][0] == rel:
            self.pending.pop()

    def emit(self, rel: bytes, st: os.stat_result, names: list[str]) -> None:
        self.flush_parents()
        self.write(rel, st, names)

    def flush_parents(self) -> None:
        # containerd's includeParents: a changed entry brings its unchanged parents along,
        # each once, so that applying the tar recreates them with the right owner and mode.
        for parent in self.pending:
            self.write(*parent)
        self.pending.clear()

    def special(self, rel: bytes, *, whiteout: bool) -> None:
        """A whiteout for ``rel``, or the opaque marker inside it: an empty file, mode 0, time 0."""
        if whiteout:
            parent, _, base = rel.rpartition(b"/")
            name = WHITEOUT_PREFIX.encode() + base
        else:
            parent, name = rel, WHITEOUT_OPAQUE.encode()
        self.flush_parents()
        self.tar.header(_Header(parent + b"/" + name if parent else name, tarfile.REGTYPE))

    def write(self, rel: bytes, st: os.stat_result, names: list[str]) -> None:
        path = self.upper + b"/" + rel
        mode = st.st_mode
        owner = (stat.S_IMODE(mode), st.st_uid, st.st_gid, self.tar.mtime(st))
        xattrs = tuple(_kept_xattrs(path, names).items())  # sorted by name, as the PAX records
        key = (st.st_dev, st.st_ino)
        if stat.S_ISDIR(mode):
            header = _Header(rel + b"/", tarfile.DIRTYPE, *owner, xattrs=xattrs)
        elif st.st_nlink > 1 and key in self.links:
            header = _Header(rel, tarfile.LNKTYPE, *owner, linkname=self.links[key], xattrs=xattrs)
        elif stat.S_ISLNK(mode):
            header = _Header(rel, tarfile.SYMTYPE, *owner, linkname=os.readlink(path), xattrs=xattrs)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
            header = _Header(rel, kind, *owner, devmajor=major, devminor=minor, xattrs=xattrs)
        elif stat.S_ISFIFO(mode):
            header = _Header(rel, tarfile.FIFOTYPE, *owner, xattrs=xattrs)
        else:
            header = _Header(rel, tarfile.REGTYPE, *owner, size=st.st_size, xattrs=xattrs)
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            self.links.setdefault(key, rel)  # later names become hard links to this one
        self.tar.header(header)
        if header.kind == tarfile.REGTYPE and header.size:
            self.tar.content(path, st)


# -- compression ------------------------------------------------------------------------------


def _threads() -> int:
    """All the cores this process may use (tests pin it to prove the bytes do not depend on it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Codec(Protocol):
    def write(self, data: bytes | memoryview, /) -> int: ...

    def close(self) -> None: ...


class _IsalBlocks:
    """igzip_threaded's writer without the buffer in front of it: each block goes to its queue.

    The queue keeps a block until a worker has deflated it (and the next block uses its last
    32 KiB as dictionary), so it needs a copy of ours: made once here, where the BufferedWriter
    that ``igzip_threaded.open`` returns would add a second.
    """

    def __init__(self, buffered: io.BufferedWriter) -> None:
        self._buffered = buffered

    def write(self, data: bytes | memoryview, /) -> int:
        return cast(int, self._buffered.raw.write(bytes(data)))

    def close(self) -> None:
        self._buffered.close()


def _level(compression: Compression, level: int | None, default: int, top: int) -> int:
    if level is None:
        return default
    if not 0 < level <= top and not (compression.name == "gzip" and level == 0):
        raise LayerError(
            f"Compression level {level} is out of range for {compression.name}; "
            f"use {'0' if compression.name == 'gzip' else '1'} to {top}."
        )
    return level


def _codec_level(compression: Compression, level: int | None) -> int:
    """The level to compress at (the codec's default for None); a LayerError if there is none."""
    if compression.name == "gzip":
        return _level(compression, level, GZIP_DEFAULT_LEVEL, 3)
    if compression.name == "zstd":
        import zstandard  # see the note on the codecs

        return _level(compression, level, ZSTD_DEFAULT_LEVEL, zstandard.MAX_COMPRESSION_LEVEL)
    raise LayerError(f"Compression {compression.name!r} is not one of {', '.join(COMPRESSIONS)}.")


def _open_codec(dest: HashingWriter, compression: Compression, level: int) -> _Codec:
    if compression.name == "gzip":
        from isal import igzip_threaded  # see the note on the codecs

        gzip_open = cast("Callable[..., io.BufferedWriter]", igzip_threaded.open)  # isal has no types
        # igzip_threaded writes a gzip header with mtime 0 and no file name, and deflates each
        # block with the previous 32 KiB as dictionary: the bytes are the same for any thread
        # count, as long as the block size is pinned.
        return _IsalBlocks(gzip_open(dest, "wb", compresslevel=level, threads=_threads(), block_size=_BLOCK))
    # threads >= 1 selects zstd's multi-threaded encoder, whose output does not depend on the
    # number of workers; threads=0 would be the single-threaded encoder, other bytes. It
    # copies what it is given into its own job buffers, so it may read our block.
    import zstandard  # see the note on the codecs

    cctx = zstandard.ZstdCompressor(level=level, threads=_threads())
    return cast(_Codec, cctx.stream_writer(cast(BinaryIO, dest), closefd=False))


# igzip_threaded's stream: a header (magic, deflate, no flags, mtime 0, then what it means as
# OS "unknown" and XFL, 4 at level 0, in the other order than RFC 1952's), each block deflated
# alone by isal_zlib._ParallelCompress with a sync flush, the empty final block (what
# isal_zlib.compress(b"", wbits=-15) makes: a fixed-Huffman block of only the end code, a
# constant here as each such call allocates a level buffer), then the CRC and size of the whole
# (little-endian).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\xff"
_GZIP_LAST_BLOCK = b"\x03\x00"


def _gzip_block(block: bytes, dest: HashingWriter, level: int) -> None:
    """Write what igzip_threaded makes of a tar of at most one block, without its threads.

    Made in this thread from the primitive its workers call (isal's own, if private): the same
    bytes (the unit tests compare them), without starting three threads a layer (about 1 ms).
    """
    from isal import isal_zlib  # see the note on the codecs

    dest.write(_GZIP_HEADER + (b"\x04" if level == 0 else b"\x00"))
    crc = 0
    if block:  # igzip_threaded deflates the blocks it is given, and no empty one
        # Room for deflate's worst case (15 bits a byte); the bytes do not depend on it.
        deflater = isal_zlib._ParallelCompress(buffersize=2 * len(block) + 500, level=level)
        # The first block has no dictionary (igzip_threaded passes it an empty one).
        body, crc = deflater.compress_and_crc(block, b"")
        dest.write(body)
    dest.write(_GZIP_LAST_BLOCK + crc.to_bytes(4, "little") + len(block).to_bytes(4, "little"))


class _Encoder:
    """Turns the tar, piece by piece, into the blob in ``dest``, hashing both on the way.

    For ``uncompressed`` the blob is the tar, written as it comes and hashed once. For gzip
    the first piece waits: a tar that is one piece (most steps change a few files) is deflated
    at the end in this thread, and only a second piece starts igzip_threaded. zstd has no such
    path: its single-threaded encoder makes other bytes, and a compressor kept with its threads
    would leave the process multi-threaded, which stops ``sandboxserver`` from forking.

    An interrupt waits for each call into the compressor to return: igzip_threaded holds a lock
    meanwhile, and a KeyboardInterrupt raised inside would leave it held, so that closing the
    compressor (on the way out, or as Python exits) would wait for it forever.
    """

    def __init__(self, dest: BinaryIO, compression: Compression, level: int | None) -> None:
        self._compression = compression
        self._dest = dest
        self._tar = hashlib.sha256()
        self._tar_size = 0
        self._blob = HashingWriter(dest)
        self._compressed = compression.name != "uncompressed"
        self._level = _codec_level(compression, level) if self._compressed else 0
        self._first: bytes | None = None  # gzip's first piece, until a second one comes
        self._codec: _Codec | None = None
        if compression.name == "zstd":
            self._codec = self._open()

    def _open(self) -> _Codec:
        # The compressor's threads inherit this mask: a stop signal must never be taken by one
        # of them, which would raise it in the main thread while it holds signals back.
        with deferred_signals():
            return _open_codec(self._blob, self._compression, self._level)

    def write(self, piece: memoryview) -> None:
        self._tar.update(piece)
        self._tar_size += len(piece)
        if not self._compressed:
            self._dest.write(piece)
            return
        if self._codec is None:
            if self._first is None:
                self._first = bytes(piece)  # the view is valid only during this call
                return
            self._codec = self._open()
            with deferred_signals():
                self._codec.write(self._first)
            self._first = None
        with deferred_signals():
            self._codec.write(piece)

    def close(self) -> None:
        if self._codec is not None:
            with deferred_signals():
                self._codec.close()
        elif self._compressed:
            _gzip_block(self._first or b"", self._blob, self._level)

    def abort(self) -> None:
        if self._codec is not None:  # stop the compressor's threads; the blob is garbage
            with suppress(Exception), deferred_signals():
                self._codec.close()

    def result(self) -> LayerBlob:
        diff_id = "sha256:" + self._tar.hexdigest()
        if not self._compressed:
            return LayerBlob(diff_id, diff_id, self._tar_size, self._compression.media_type)
        return LayerBlob(diff_id, self._blob.digest, self._blob.size, self._compression.media_type)


@contextmanager
def _encoding(dest: BinaryIO, compression: Compression, level: int | None) -> Iterator[_Encoder]:
    encoder = _Encoder(dest, compression, level)
    try:
        yield encoder
    except BaseException:
        encoder.abort()
        raise
    encoder.close()


def write_layer(
    upper: Path,
    lowers: Sequence[Path],
    dest: BinaryIO,
    *,
    compression: Compression,
    level: int | None = None,
    epoch: int | None = None,
) -> LayerBlob | None:
    """Diff, hash (diff_id), compress and hash (digest) in one streaming pass into ``dest``.

    Returns None when nothing changed; ``dest`` then holds bytes the caller discards.
    """
    with _encoding(dest, compression, level) as encoder:
        count = _diff(upper, lowers, encoder.write, epoch)
    return encoder.result() if count else None


def compress_stream(
    src: BinaryIO, dest: BinaryIO, *, compression: Compression, level: int | None = None
) -> LayerBlob:
    """Re-compress an uncompressed tar stream (importing or converting layers)."""
    with _encoding(dest, compression, level) as encoder:
        stream = _TarStream(encoder.write)
        while chunk := src.read(_CHUNK):
            stream.write(chunk)
        stream.flush()
    return encoder.result()


# -- reading ----------------------------------------------------------------------------------


class _Reader(io.RawIOBase):
    """A raw stream over ``read`` that replays ``head`` first and words decoder failures."""

    def __init__(self, read: Callable[[int], bytes], head: bytes = b"", kind: str = "") -> None:
        super().__init__()
        self._read = read
        self._head = head
        self._kind = kind

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n], self._head = self._head[:n], self._head[n:]
            return n
        try:
            data = self._read(len(view))
        except Exception as e:  # each decoder has its own error types; name the format instead
            raise LayerError(f"The layer is not valid {self._kind or 'tar'} data: {e}.") from e
        view[: len(data)] = data
        return len(data)


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)


def open_layer(fileobj: BinaryIO) -> BinaryIO:
    """A readable uncompressed stream over a layer or archive, whatever its compression.

    The format is told by magic bytes: gzip, zstd, bzip2, xz, or else plain. Nothing is
    decompressed until it is read.
    """
    head = b""
    while len(head) < 6 and (more := fileobj.read(6 - len(head))):
        head += more
    raw = io.BufferedReader(_Reader(fileobj.read, head), _CHUNK)
    kind = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    decoder: BinaryIO
    if kind is None:
        return cast(BinaryIO, raw)
    if kind == "gzip":
        from isal import igzip  # see the note on the codecs

        gzip_file = cast("Callable[..., BinaryIO]", igzip.IGzipFile)  # isal has no types
        decoder = gzip_file(fileobj=raw, mode="rb")
    elif kind == "zstd":
        import zstandard  # see the note on the codecs

        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
        decoder = cast(BinaryIO, reader)
    elif kind == "bzip2":
        import bz2  # only for archives made elsewhere

        decoder = cast(BinaryIO, bz2.BZ2File(raw))
    else:
        import lzma  # only for archives made elsewhere

        decoder = cast(BinaryIO, lzma.LZMAFile(raw))  # noqa: SIM115 - the caller owns the stream
    return cast(BinaryIO, io.BufferedReader(_Reader(decoder.read, kind=kind), _CHUNK))


class _HashingReader:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.hasher = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.hasher.update(data)
        return data


def apply_blob(blob: BinaryIO, root: Path, *, diff_id: str, overlay_whiteouts: bool, name: str) -> None:
    """Apply a stored layer blob (any compression) and check that its tar is ``diff_id``.

    The tar is hashed as the applier reads it, so a blob that lies about its layer is caught
    without a second pass; the caller discards ``root`` on a LayerError.
    """
    reader = _HashingReader(open_layer(blob))
    apply_layer(cast(BinaryIO, reader), root, overlay_whiteouts=overlay_whiteouts)
    while reader.read(_CHUNK):  # the tar's end-of-archive padding counts too
        pass
    found = "sha256:" + reader.hasher.hexdigest()
    if found != diff_id:
        raise LayerError(f"blob {name} unpacks to {found}, not to layer {diff_id}.")
