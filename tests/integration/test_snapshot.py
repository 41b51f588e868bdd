"""Overlay mounts by mount(2), threads sharing one store, and what a power cut may leave.

Real overlay mounts in this process; a kernel without overlayfs is stood in for by a seccomp
filter that makes mount(2) fail with ENODEV, as that kernel does.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import platform
import struct
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from builder.snapshot import Snapshotter
from builder.store import Store
from tests.conftest import run_builder

pytestmark = pytest.mark.integration

THREADS = 4
ROUNDS = 8


@pytest.fixture
def snapshots(tmp_path: Path) -> Iterator[Snapshotter]:
    root = tmp_path / "store"
    yield Snapshotter(Store.open(root))
    assert str(root) not in Path("/proc/mounts").read_text(), "a mount was left behind"


def layer_tar(name: str, content: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def store_layer(store: Store, name: str, content: bytes) -> str:
    """Store a one-file layer blob and index it; its diff_id."""
    data = layer_tar(name, content)
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    digest = store.write_blob(data)
    desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": len(data)}
    store.add_layer_blob(diff_id, desc)
    return diff_id


def in_threads(work: Callable[[int], None]) -> None:
    """Run ``work(0..THREADS-1)`` at once; re-raise the first failure."""
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def run(index: int) -> None:
        try:
            start.wait()
            work(index)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_threads_mount_and_unpack_at_once_without_moving_the_working_directory(
    snapshots: Snapshotter, tmp_path: Path
) -> None:
    store = snapshots.store
    diff_ids = [store_layer(store, f"file{n}", f"layer {n}\n".encode()) for n in range(3)]
    workdir = tmp_path / "work"
    workdir.mkdir()
    cwd = os.getcwd()
    seen_cwds: set[str] = set()

    def build(index: int) -> None:
        for round_ in range(ROUNDS):
            seen_cwds.add(os.getcwd())
            with snapshots.mount(diff_ids, workdir, writable=True) as mounted:
                assert [(mounted.merged / f"file{n}").read_text() for n in range(3)] == [
                    f"layer {n}\n" for n in range(3)
                ]
                (mounted.merged / "mine").write_text(f"{index}/{round_}")
            assert mounted.upper is not None
            assert (mounted.upper / "mine").read_text() == f"{index}/{round_}"
            snapshot = f"sha256:{hashlib.sha256(f'{index}/{round_}'.encode()).hexdigest()}"
            snapshots.commit(snapshot, mounted.upper)
            assert (snapshots.path(snapshot) / "mine").read_text() == f"{index}/{round_}"
            assert not mounted.upper.exists()  # renamed into the snapshot

    in_threads(build)
    assert os.getcwd() == cwd and seen_cwds == {cwd}
    assert [p.name for p in workdir.iterdir()] == []


def test_threads_unpacking_one_layer_agree(snapshots: Snapshotter, tmp_path: Path) -> None:
    store = snapshots.store
    workdir = tmp_path / "work"
    workdir.mkdir()
    for round_ in range(ROUNDS):
        diff_id = store_layer(store, "shared", f"round {round_}\n".encode())

        def unpack(_: int, diff_id: str = diff_id) -> None:
            assert snapshots.ensure(diff_id, workdir) == snapshots.path(diff_id)

        in_threads(unpack)
        assert (snapshots.path(diff_id) / "shared").read_text() == f"round {round_}\n"
    assert [p.name for p in workdir.iterdir()] == []


def test_threads_write_blobs_and_records_at_once(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    blobs = [f"blob {n}".encode() * 1000 for n in range(ROUNDS)]
    key = "sha256:" + "ab" * 32

    def write(index: int) -> None:
        for n, data in enumerate(blobs):
            assert store.read_blob(store.write_blob(data)) == data
            store.put_cache(key, {"writer": index, "round": n})
            store.put_memo(key, [index, n])

    in_threads(write)
    record = store.get_cache(key)
    assert record is not None and record["round"] == ROUNDS - 1
    assert [p.name for p in (store.root / "tmp").iterdir() if not p.name.endswith(".lock")] == []


def test_a_blob_cut_short_is_not_offered_as_a_layer(tmp_path: Path) -> None:
    """An unsynced blob that a power cut truncated: the index and has_blob with a size skip it."""
    store = Store.open(tmp_path / "store")
    diff_id = store_layer(store, "file", b"x" * 5000)
    [desc] = store.layer_blobs(diff_id)
    assert store.has_blob(desc["digest"], desc["size"])
    os.truncate(store.blob_path(desc["digest"]), 0)
    assert store.has_blob(desc["digest"])
    assert not store.has_blob(desc["digest"], desc["size"])
    assert store.layer_blobs(diff_id) == []


def test_a_tag_is_written_once_durably(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    manifest = store.write_blob(b"{}")
    store.set_tag("app:1", manifest)
    tag = store.root / "tags" / "app%3A1"
    before = tag.stat().st_mtime_ns, tag.stat().st_ino
    store.set_tag("app:1", manifest)
    assert (tag.stat().st_mtime_ns, tag.stat().st_ino) == before
    assert store.get_tag("app:1") == manifest


# A classic BPF program for seccomp: on x86_64, a mount(2) without flags (an overlay's; the
# builder's other mounts all pass some) fails with ENODEV; everything else is allowed.
_AUDIT_ARCH_X86_64 = 0xC000003E
_SYS_MOUNT = 165
_SECCOMP_RET_ERRNO = 0x00050000
_SECCOMP_RET_ALLOW = 0x7FFF0000
_NO_OVERLAY = [
    (0x20, 0, 0, 4),  # ld arch
    (0x15, 0, 5, _AUDIT_ARCH_X86_64),  # jeq x86_64, else allow
    (0x20, 0, 0, 0),  # ld nr
    (0x15, 0, 3, _SYS_MOUNT),  # jeq mount, else allow
    (0x20, 0, 0, 40),  # ld the low half of args[3], the flags
    (0x15, 0, 1, 0),  # jeq 0, else allow
    (0x06, 0, 0, _SECCOMP_RET_ERRNO | 19),  # ret ENODEV
    (0x06, 0, 0, _SECCOMP_RET_ALLOW),
]
_WRAPPER = """
import ctypes, os, struct, sys
code = bytes.fromhex(sys.argv[1])
buf = ctypes.create_string_buffer(code)
prog = struct.pack("HxxxxxxP", len(code) // 8, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong)
assert libc.prctl(38, 1, None, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, prog, 0, 0) == 0, os.strerror(ctypes.get_errno())  # PR_SET_SECCOMP filter
os.execv(sys.executable, [sys.executable, "-m", "builder", *sys.argv[2:]])
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter is written for x86_64")
def test_no_overlay_support_is_a_clear_error(tmp_path: Path, store: Path) -> None:
    assert ctypes.sizeof(ctypes.c_void_p) == 8
    code = b"".join(struct.pack("HBBI", *insn) for insn in _NO_OVERLAY)
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM busybox:latest\nRUN echo built > /built\n")
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, code.hex(), "build", str(context)],
        capture_output=True,
        text=True,
        env={**os.environ, "BUILDER_ROOT": str(store)},
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "unknown filesystem type 'overlay'" in errors[0] and "modprobe overlay" in errors[0], errors
    assert str(store) in errors[0], errors
    check = run_builder("check", root=store, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
