"""This machine's own limits: what any builder's figures are measured against.

Throughputs in MiB/s (2^20 bytes per second) of the pieces a layer commit is made of: disk write
(with fsync) and read (cold, after dropping the file's pages, and warm), sha256, gzip through
zlib and through ISA-L (``isal``, as builder uses it), zstd, and GNU tar over a tree of files;
plus the fixed costs small steps pay: a Python start, a fork+exec, an overlay mount+unmount.

The data is the big-layer workload's mix: 53,688-byte pieces, alternately random and random
over 16 letters (4 bits of entropy a byte), so compression ratios match that workload's.
``isal`` and ``zstandard`` are builder's own dependencies; without them those rows are skipped.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
PIECE = 53688
TRIES = 2
LETTERS = bytes(b"abcdefghijklmnop"[i % 16] for i in range(256))


@dataclass(frozen=True)
class Limit:
    name: str
    value: float  # MiB/s for throughputs, milliseconds or files/s as ``unit`` says
    unit: str
    note: str = ""


def sample_data(size: int) -> bytes:
    """``size`` bytes of the big layer's mix: random pieces and 16-letter pieces, alternately."""
    raw = bytearray(os.urandom(size))
    view = memoryview(raw)
    for start in range(PIECE, size, 2 * PIECE):
        view[start : start + PIECE] = bytes(view[start : start + PIECE]).translate(LETTERS)
    return bytes(raw)


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / MIB / seconds if seconds > 0 else float("inf")


def _timed(func: Callable[[], object], tries: int = 1) -> float:
    """The best of ``tries`` runs: a limit is what the machine can do, not what it did once."""
    best = float("inf")
    for _ in range(tries):
        started = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - started)
    return best


def _feed(data: bytes | memoryview, write: Callable[[memoryview], object]) -> None:
    view = memoryview(data)
    for start in range(0, len(data), MIB):
        write(view[start : start + MIB])


class _Count:
    """A sink that only counts (and keeps the compressor honest by taking its output)."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def compression_limits(data: bytes, slow: bytes, cores: int) -> list[Limit]:
    limits = []
    seconds = _timed(lambda: _feed(data, hashlib.sha256().update), TRIES)
    limits.append(Limit("sha256", _rate(len(data), seconds), "MiB/s", "hashlib, one core"))
    for level in (6, 1):
        out = _Count()

        def deflate(level: int = level, out: _Count = out) -> None:
            out.size = 0
            comp = zlib.compressobj(level, zlib.DEFLATED, 31)
            _feed(slow, lambda chunk: out.write(comp.compress(chunk)))
            out.write(comp.flush())

        seconds = _timed(deflate, TRIES)
        limits.append(
            Limit(
                f"gzip zlib -{level}",
                _rate(len(slow), seconds),
                "MiB/s",
                f"one core, ratio {len(slow) / out.size:.2f}" + (" (the usual default level)" * (level == 6)),
            )
        )
    try:
        from isal import igzip_threaded, isal_zlib
    except ImportError:
        limits.append(Limit("gzip isal", 0.0, "MiB/s", "isal is not installed"))
    else:
        out = _Count()

        def isal_one() -> None:
            out.size = 0
            comp = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
            _feed(data, lambda chunk: out.write(comp.compress(chunk)))
            out.write(comp.flush())

        seconds = _timed(isal_one, TRIES)
        ratio = len(data) / out.size
        limits.append(
            Limit("gzip isal -1", _rate(len(data), seconds), "MiB/s", f"one core, ratio {ratio:.2f}")
        )
        out = _Count()

        def isal_threads() -> None:
            writer = igzip_threaded.open(out, "wb", compresslevel=1, threads=cores, block_size=MIB)
            _feed(data, writer.write)
            writer.close()

        seconds = _timed(isal_threads, TRIES)
        limits.append(
            Limit(
                f"gzip isal -1, {cores} threads",
                _rate(len(data), seconds),
                "MiB/s",
                "igzip_threaded, 1 MiB blocks, as builder writes gzip layers",
            )
        )
    try:
        import zstandard
    except ImportError:
        limits.append(Limit("zstd", 0.0, "MiB/s", "zstandard is not installed"))
    else:
        for threads, label in ((0, "one core"), (cores, f"{cores} threads")):
            out = _Count()

            def zstd(threads: int = threads, out: _Count = out) -> None:
                out.size = 0
                cctx = zstandard.ZstdCompressor(level=3, threads=threads)
                with cctx.stream_writer(out, closefd=False) as writer:  # type: ignore[arg-type]
                    _feed(data, writer.write)

            seconds = _timed(zstd, TRIES)
            ratio = len(data) / out.size
            limits.append(
                Limit(f"zstd -3, {label}", _rate(len(data), seconds), "MiB/s", f"ratio {ratio:.2f}")
            )
    return limits


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_limits(data: bytes, workdir: Path, total: int) -> list[Limit]:
    path = workdir / "disk.bin"

    def write() -> None:
        with path.open("wb", buffering=0) as f:
            written = 0
            while written < total:
                chunk = memoryview(data)[: min(len(data), total - written)]
                _feed(chunk, f.write)
                written += len(chunk)
            os.fsync(f.fileno())

    def read() -> None:
        buf = bytearray(MIB)
        with path.open("rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    limits = [
        Limit("disk write + fsync", _rate(total, _timed(write)), "MiB/s", f"{total // MIB} MiB, one file")
    ]
    _drop_cache(path)
    limits.append(Limit("disk read, cold", _rate(total, _timed(read)), "MiB/s", "after dropping its pages"))
    limits.append(Limit("read, page cache", _rate(total, _timed(read)), "MiB/s"))
    path.unlink()
    return limits


def tree_limits(data: bytes, workdir: Path, files: int, small_files: int) -> list[Limit]:
    """GNU tar over a tree like the big layer's, and creating many small files."""
    tree = workdir / "tree"
    tree.mkdir()
    size = min(PIECE, len(data) // files)
    view = memoryview(data)
    for i in range(files):
        (tree / f"f{i}").write_bytes(view[(i * size) % (len(data) - size) :][:size])
    os.sync()
    total = files * size
    count = _Count()

    def gnu_tar() -> None:
        count.size = 0
        proc = subprocess.Popen(["tar", "-C", str(tree), "-cf", "-", "."], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        while chunk := proc.stdout.read(MIB):
            count.write(chunk)
        proc.wait()

    seconds = _timed(gnu_tar, TRIES)
    limits = [
        Limit(
            "GNU tar -c, page cache",
            _rate(total, seconds),
            "MiB/s",
            f"{files} files of {size} bytes: {files / seconds:,.0f} files/s",
        )
    ]
    infos = [tarfile.TarInfo(f"dir/file{i}") for i in range(20000)]
    seconds = _timed(lambda: [info.tobuf(tarfile.PAX_FORMAT) for info in infos], TRIES)
    limits.append(Limit("tarfile headers", len(infos) / seconds, "files/s", "TarInfo.tobuf, PAX"))
    shutil.rmtree(tree)
    payload = data[:1024]
    rounds: list[float] = []
    for round_no in range(3):
        small = workdir / f"small{round_no}"
        small.mkdir()

        def create(small: Path = small) -> None:
            for i in range(small_files):
                sub = small / f"d{i // 1000}"
                if i % 1000 == 0:
                    sub.mkdir()
                fd = os.open(sub / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, payload)
                os.close(fd)

        rounds.append(small_files / _timed(create))
    for round_no in range(3):
        shutil.rmtree(workdir / f"small{round_no}")
    spread = ", ".join(f"{rate:,.0f}" for rate in rounds)
    limits.append(
        Limit("create 1 KiB files", max(rounds), "files/s", f"open, write, close; best of rounds {spread}")
    )
    return limits


def fixed_costs(workdir: Path) -> list[Limit]:
    """What one small step cannot avoid paying here, in milliseconds."""

    def avg(argv: list[str], n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            subprocess.run(argv, check=True, capture_output=True)
        return (time.perf_counter() - started) / n * 1000

    limits = [
        Limit("fork+exec /bin/true", avg(["/bin/true"], 50), "ms"),
        Limit(
            "python3 -I -S -c pass",
            avg([sys.executable, "-I", "-S", "-c", "pass"], 10),
            "ms",
            "a bare Python start (no site-packages)",
        ),
    ]
    lower, upper, work, merged = (workdir / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, merged):
        d.mkdir()
    options = (
        f"lowerdir={lower},upperdir={upper},workdir={work},index=off,redirect_dir=off,metacopy=off,volatile"
    ).encode()
    libc = ctypes.CDLL(None, use_errno=True)

    def cycle() -> None:
        for d in (upper, work):
            d.mkdir()
        if libc.mount(b"overlay", bytes(merged), b"overlay", 0, options) != 0:
            raise OSError(ctypes.get_errno(), "mount")
        if libc.umount2(bytes(merged), 0) != 0:
            raise OSError(ctypes.get_errno(), "umount2")
        for d in (upper, work):
            shutil.rmtree(d)

    try:
        cycle()
    except OSError:
        limits.append(Limit("overlay mount+umount", 0.0, "ms", "overlay cannot be mounted here"))
    else:
        n = 20
        seconds = _timed(lambda: [cycle() for _ in range(n)])
        note = "a fresh writable overlay: its dirs made, mount(2), umount2(2), dirs removed"
        limits.append(Limit("overlay mount+umount", seconds / n * 1000, "ms", note))
    for d in (lower, upper, work, merged):
        shutil.rmtree(d, ignore_errors=True)
    return limits


def measure(workdir: Path, *, quick: bool, log: Callable[[str], None]) -> list[Limit]:
    cores = len(os.sched_getaffinity(0))
    scratch = Path(tempfile.mkdtemp(prefix="limits-", dir=workdir))
    try:
        size = (64 if quick else 256) * MIB
        data = sample_data(size)
        slow = data[: (16 if quick else 64) * MIB]
        log("  compression and hashing")
        limits = compression_limits(data, slow, cores)
        log("  disk")
        limits += disk_limits(data, scratch, (256 if quick else 1024) * MIB)
        log("  trees of files")
        limits += tree_limits(data, scratch, 2000 if quick else 20000, 2000 if quick else 10000)
        log("  fixed costs")
        limits += fixed_costs(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return limits
