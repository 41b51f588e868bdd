#!/usr/bin/env python3
"""The layer commit alone: builder's ``write_layer`` over a generated tree, piece by piece.

    python3 bench/layer_profile.py                      # 1 GiB in 20,000 files, every mode
    python3 bench/layer_profile.py --files 2000 --modes gzip --profile /tmp/layer.prof
    python3 bench/layer_profile.py --rev HEAD           # builder as committed at HEAD
    python3 bench/layer_profile.py --files 10 --size 100 --calls 300 --modes gzip   # a small layer

The tree is the big-layer workload's (half random, half random over 16 letters), written
straight into a directory that plays the upper dir over no lower (no overlay, no RUN, no
root needed). Each mode adds one piece to the last, so their differences say what each costs:

- ``walk``: the differ and tar writer into a sink that drops everything (no hashing);
- ``sha256``: the same through the diff_id hash (``HashingWriter``);
- ``uncompressed``, ``gzip``, ``zstd``: ``write_layer`` itself, into a file (then fsync);
- ``gzip-pipe``, ``zstd-pipe``: an experiment, not builder's code path: the differ and the
  diff_id hash in this process, the tar piped to a child process that compresses, hashes the
  blob and writes it, so that no compressor thread competes for this process's GIL. The bytes
  are not builder's (one stream, no pinned blocks); only the time is of interest.

CPU is this process's user + system time, all threads included. With ``--calls`` each
compressing mode instead writes the layer into memory that many times (no file, no fsync) and
the best per-call time is shown: what committing a step's few files costs beyond the walk.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

from engines import builder_source
from limits import LETTERS

MIB = 1 << 20


def make_tree(root: Path, files: int, size: int) -> None:
    root.mkdir()
    for i in range(files):
        data = os.urandom(size)
        (root / f"f{i:05}").write_bytes(data if i % 2 else data.translate(LETTERS))
    os.sync()


class _Null:
    def write(self, data: Any) -> int:
        return len(data)

    def flush(self) -> None:
        pass


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# The child of the pipe modes: compress stdin, hash the result, write it to argv[2], fsync.
_CHILD = """
import hashlib, os, sys
kind, dest = sys.argv[1], sys.argv[2]
digest = hashlib.sha256()
out = open(dest, "wb")
class Sink:
    def write(self, data):
        digest.update(data)
        return out.write(data)
    def flush(self):
        out.flush()
if kind == "gzip":
    from isal import isal_zlib
    comp = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
    write, end = (lambda b: Sink().write(comp.compress(b))), (lambda: Sink().write(comp.flush()))
else:
    import zstandard
    writer = zstandard.ZstdCompressor(level=3, threads=len(os.sched_getaffinity(0))).stream_writer(
        Sink(), closefd=False)
    write, end = writer.write, writer.close
while chunk := sys.stdin.buffer.read(1 << 20):
    write(chunk)
end()
out.flush()
os.fsync(out.fileno())
print(digest.hexdigest())
"""


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_mode(mode: str, tree: Path, out_dir: Path) -> tuple[float, float, int]:
    """One mode: (wall s, CPU s, bytes written)."""
    from builder import compression as codecs  # imported late: the source tree is chosen at run time
    from builder import layer
    from builder.digest import HashingWriter

    started, cpu = time.perf_counter(), _cpu() + _cpu_children()
    if mode.endswith("-pipe"):
        path = out_dir / f"blob-{mode}"
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, mode.removesuffix("-pipe"), str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        assert child.stdin is not None
        layer.diff_upperdir(tree, [], HashingWriter(child.stdin))  # type: ignore[arg-type]
        child.stdin.close()
        child.wait()
        size = path.stat().st_size
        path.unlink()
        return time.perf_counter() - started, _cpu() + _cpu_children() - cpu, size
    if mode == "walk":
        layer.diff_upperdir(tree, [], _Null())  # type: ignore[arg-type]
        size = 0
    elif mode == "sha256":
        sink = HashingWriter(None)
        layer.diff_upperdir(tree, [], sink)  # type: ignore[arg-type]
        size = sink.size
    else:
        path = out_dir / f"blob-{mode}"
        with path.open("wb") as dest:
            blob = layer.write_layer(tree, [], dest, compression=codecs.COMPRESSIONS[mode])
            dest.flush()
            os.fsync(dest.fileno())
        size = blob.size if blob else 0
        path.unlink()
    return time.perf_counter() - started, _cpu() + _cpu_children() - cpu, size


def time_calls(mode: str, tree: Path, calls: int) -> float:
    """The best of five rounds of ``calls`` write_layer calls into memory: seconds per call."""
    from builder import compression as codecs  # imported late: the source tree is chosen at run time
    from builder import layer

    compression = codecs.COMPRESSIONS[mode]

    def call() -> None:
        layer.write_layer(tree, [], io.BytesIO(), compression=compression)

    return min(timeit.repeat(call, number=calls, repeat=5)) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--size", type=int, default=53688, help="bytes per file")
    parser.add_argument("--modes", default="walk,sha256,uncompressed,gzip,zstd")
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode (the best is shown)")
    parser.add_argument("--calls", type=int, help="time this many calls into memory per mode (small layers)")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the last mode to this file")
    parser.add_argument("--rev", help="measure builder as committed at REV (default: the working tree)")
    parser.add_argument("--source", type=Path, help="measure the builder package in this tree instead")
    parser.add_argument("--dir", type=Path, default=Path("/tmp"), help="where the tree goes")
    args = parser.parse_args()
    if args.calls and not set(args.modes.split(",")) <= {"uncompressed", "gzip", "zstd"}:
        parser.error("--calls times write_layer alone: give --modes from uncompressed, gzip, zstd")
    work = Path(tempfile.mkdtemp(prefix="builder-layer-", dir=args.dir))
    try:
        if args.source is not None:
            source, revision = args.source, str(args.source)
        else:
            source, revision = builder_source(args.rev, work)
        sys.path.insert(0, str(source))
        total = args.files * args.size
        print(f"builder {revision}: {args.files:,} files, {total / MIB:,.0f} MiB", flush=True)
        make_tree(work / "upper", args.files, args.size)
        modes = args.modes.split(",")
        if args.calls:
            for mode in modes:
                per_call = time_calls(mode, work / "upper", args.calls)
                print(f"{mode:<14}{per_call * 1e3:9.3f} ms a call", flush=True)
            return 0
        print(f"{'mode':<14}{'wall s':>9}{'CPU s':>9}{'MiB/s':>9}{'out MiB':>10}")
        for mode in modes:
            best: tuple[float, float, int] | None = None
            for _ in range(args.repeat):
                result = run_mode(mode, work / "upper", work)
                best = result if best is None or result[0] < best[0] else best
            assert best is not None
            wall, cpu, size = best
            print(
                f"{mode:<14}{wall:>9.2f}{cpu:>9.2f}{total / MIB / wall:>9,.0f}{size / MIB:>10,.0f}",
                flush=True,
            )
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(run_mode, modes[-1], work / "upper", work)
            profiler.dump_stats(args.profile)
            print(f"profile of {modes[-1]} in {args.profile}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
