"""The file system both tools work on: a fresh journaled ext4 on a loop device (the default), or
whatever holds the scratch directory (``--filesystem here``).

Everything a run writes lives under its scratch directory: builder's store, dockerd's data root,
the contexts, the exports. Where that directory sits decides more than the tools do on this VM:
its root file system is an ext4 made without a journal, and such an ext4 passes over inodes
freed in the last minutes when it allocates new ones. After a reset deletes a store (thousands
of files, before every cold build, for both tools), creating a file there took 0.1 to 0.5 ms
instead of 0.015 ms, a fifth of a 20-step cold build. A fresh ext4 with mkfs's defaults (a
journal) on a sparse file is what both tools would find on a usual machine, and it is the same
for both. The loop device does direct I/O on its file, so pages are cached once, above it;
``discard`` gives deleted blocks back to the host file system.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from engines import EngineError

KINDS = ("loop", "here")
_MAX_SIZE = 64 << 30
_IMAGE_DIR = "/var/tmp"


def _run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        command = " ".join(argv)
        raise EngineError(f"cannot make the scratch file system: {command} failed: {result.stderr.strip()}")
    return result.stdout.strip()


@contextlib.contextmanager
def scratch_filesystem(workdir: Path, kind: str, *, keep: bool) -> Iterator[str]:
    """Mount the scratch file system on ``workdir`` (``loop``) or use it as it is (``here``);
    yield a line that says which. Unmounted and its image removed at the end, unless ``keep``."""
    if kind == "here":
        yield "the scratch directory's own file system"
        return
    free = shutil.disk_usage(_IMAGE_DIR).free
    size = min(_MAX_SIZE, int(free * 0.8)) & ~((1 << 20) - 1)
    fd, name = tempfile.mkstemp(prefix="builder-bench-", suffix=".ext4", dir=_IMAGE_DIR)
    os.close(fd)
    image = Path(name)
    device = ""
    mounted = False
    try:
        os.truncate(image, size)
        # Inode tables and journal written now, not by a kernel thread while the tools are timed.
        _run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))
        device = _run("losetup", "--find", "--show", "--direct-io=on", str(image))
        _run("mount", "-o", "discard", device, str(workdir))
        mounted = True
        yield f"a fresh ext4 with a journal on {device} (a {size >> 30} GiB sparse file, {image})"
    finally:
        if keep and mounted:
            print(f"kept: umount {workdir} && losetup -d {device} && rm {image}", flush=True)
        else:
            if mounted and subprocess.run(["umount", str(workdir)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(workdir)], check=False)  # busy: detached once free
            if device:
                subprocess.run(["losetup", "-d", device], check=False)
            image.unlink(missing_ok=True)
