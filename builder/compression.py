"""Layer compression: the ways to store a layer blob, and the codecs that make and read them.

:data:`COMPRESSIONS` is the table (a row a media type); the encoder turns a layer tar, piece
by piece, into its blob while hashing both (the diff_id and the digest); :func:`open_layer`
reads any blob or archive back as a tar. The codecs (isal, zstandard) are imported where a blob
is written or read, not here: a cached build only needs the table (start-up of the cached
path), and this module is the only one that speaks to them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from types import MappingProxyType
from typing import TYPE_CHECKING, BinaryIO, Protocol, cast

from msgspec import Struct

from builder.digest import HashingWriter, StreamSha256
from builder.errors import LayerError
from builder.signals import deferred_signals

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "BLOCK",
    "COMPRESSIONS",
    "COMPRESSION_ANNOTATION",
    "GZIP_DEFAULT_LEVEL",
    "ZSTD_DEFAULT_LEVEL",
    "Compression",
    "LayerBlob",
    "encoding",
    "open_layer",
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
BLOCK = 1 << 20
_CHUNK = 1 << 20


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
            return f"gzip;encoder=isa-l;level={_codec_level(self, level)};block={BLOCK}"
        if self.name == "zstd":
            return f"zstd;encoder=zstd-mt;level={_codec_level(self, level)};block={BLOCK}"
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


# -- writing ----------------------------------------------------------------------------------


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
        return _IsalBlocks(gzip_open(dest, "wb", compresslevel=level, threads=_threads(), block_size=BLOCK))
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
        self._tar = StreamSha256()
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
def encoding(dest: BinaryIO, compression: Compression, level: int | None) -> Iterator[_Encoder]:
    encoder = _Encoder(dest, compression, level)
    try:
        yield encoder
    except BaseException:
        encoder.abort()
        raise
    encoder.close()


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
