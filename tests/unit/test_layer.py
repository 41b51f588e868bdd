"""Layers: the overlay differ, deterministic tars and blobs, and applying hostile tars.

The differ tests mount real overlays (as root) with the options the builder uses, make a change
through the merged view and diff the upper dir; the hostile-tar table follows umoci's and
containerd's breakout tests: whatever the tar says, nothing outside the root may change.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import resource
import shutil
import socket
import stat
import struct
import subprocess
import tarfile
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder import compression as codecs
from builder import layer
from builder.compression import COMPRESSIONS, open_layer
from builder.digest import HashingWriter
from builder.errors import LayerError
from builder.layer import compress_stream, diff_upperdir, write_layer
from builder.tarsafe import apply_layer
from tests.unit import tartest
from tests.unit.tartest import char, directory, fifo, file, hardlink, symlink

# On a failure, hypothesis' pytest plugin imports libcst, whose import warns; with warnings as
# errors that would hide the failure behind an INTERNALERROR. Import it quietly now instead.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="layers are built as root")

GZIP, ZSTD, PLAIN = COMPRESSIONS["gzip"], COMPRESSIONS["zstd"], COMPRESSIONS["uncompressed"]
OVERLAY_OPTIONS = "index=off,redirect_dir=off,metacopy=off"
T0 = 1_600_000_000  # a whole second: what a lower unpacked from a tar has

# A VFS_CAP_REVISION_2 capability set granting cap_net_bind_service (10), effective.
CAP_NET_BIND = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A temp dir that is unmounted and removed afterwards, whatever happened."""
    path = Path(tempfile.mkdtemp(prefix="layer-test-"))
    try:
        yield path
    finally:
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1] for line in mounts]
        for point in reversed(points):
            if point.startswith(str(path) + "/"):
                subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(path)


class Overlay:
    """One overlay mount made of ``lowers`` (topmost first) and a fresh upper dir."""

    def __init__(self, base: Path, lowers: list[Path]) -> None:
        self.lowers = lowers
        n = len(list(base.glob("ovl*")))
        top = base / f"ovl{n}"
        self.upper, self.work, self.merged = top / "upper", top / "work", top / "merged"
        for d in (self.upper, self.work, self.merged):
            d.mkdir(parents=True)

    @contextmanager
    def mounted(self) -> Iterator[Path]:
        lowerdir = ":".join(str(p) for p in self.lowers)
        options = f"lowerdir={lowerdir},upperdir={self.upper},workdir={self.work},{OVERLAY_OPTIONS}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, self.merged], check=True)
        try:
            yield self.merged
        finally:
            subprocess.run(["umount", self.merged], check=True)

    def diff(self, epoch: int | None = None) -> list[tarfile.TarInfo]:
        return members(diff_bytes(self.upper, self.lowers, epoch))


def diff_bytes(upper: Path, lowers: list[Path], epoch: int | None = None) -> bytes:
    out = io.BytesIO()
    diff_upperdir(upper, lowers, out, epoch=epoch)
    return out.getvalue()


def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as t:
        return t.getmembers()


def names(infos: list[tarfile.TarInfo]) -> list[str]:
    return [i.name + ("/" if i.isdir() else "") for i in infos]


def content(data: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        f = t.extractfile(name)
        assert f is not None
        return f.read()


def make_lower(base: Path, *entries: tartest.Entry, name: str = "lower") -> Path:
    """A lower snapshot as the builder makes them: a tar applied in overlay form."""
    lower = base / name
    lower.mkdir()
    apply_layer(io.BytesIO(tartest.build(*entries)), lower, overlay_whiteouts=True)
    return lower


def write(path: Path, data: bytes, mtime: int | None = None) -> None:
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def tree(root: Path, *, host: bool = False) -> dict[str, tuple[object, ...]]:
    """Everything a layer can carry about each path below ``root``, for comparing trees.

    The root's own mtime and trusted.* xattrs (overlay's bookkeeping) count only for ``host``.
    """
    result: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames), *([""] if dirpath == str(root) else [])]:
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            kind = stat.S_IFMT(st.st_mode)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            xattrs = tuple(
                (k, os.getxattr(path, k, follow_symlinks=False))
                for k in sorted(os.listxattr(path, follow_symlinks=False))
                if host or not k.startswith("trusted.")
            )
            keep_time = not stat.S_ISDIR(st.st_mode) or (rel != "." or host)
            mtime = st.st_mtime_ns // 10**9 if keep_time else None
            result[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_rdev)
            result[rel] += (st.st_size if kind == stat.S_IFREG else 0, extra, xattrs, mtime)
    return result


# -- the differ, on real overlay mounts -------------------------------------------------------


def test_new_file_and_unchanged_parents_are_emitted(scratch: Path) -> None:
    lower = make_lower(scratch, directory("d", mode=0o750, uid=5, gid=6), directory("d/e"))
    ovl = Overlay(scratch, [lower])
    with ovl.mounted() as m:
        write(m / "d/e/new", b"fresh")
    infos = ovl.diff()
    assert names(infos) == ["d/", "d/e/", "d/e/new"]
    parent = infos[0]
    assert (parent.mode, parent.uid, parent.gid) == (0o750, 5, 6)  # the parent's own stat
    assert content(diff_bytes(ovl.upper, [lower]), "d/e/new") == b"fresh"


def test_modified_file(scratch: Path) -> None:
    lower = make_lower(scratch, directory("d"), file("d/a", b"one"), file("b", b"same"))
    ovl = Overlay(scratch, [lower])
    with ovl.mounted() as m:
        write(m / "d/a", b"two")
    data = diff_bytes(ovl.upper, [lower])
    assert names(members(data)) == ["d/", "d/a"]
    assert content(data, "d/a") == b"two"


def test_deleted_file_and_dir_become_whiteouts(scratch: Path) -> None:
    lower = make_lower(scratch, file("a", b"x"), directory("d"), file("d/f"), directory("k"))
    lower_k = lower / "k"
    write(lower_k / "gone", b"1")
    ovl = Overlay(scratch, [lower])
    with ovl.mounted() as m:
        (m / "a").unlink()
        shutil.rmtree(m / "d")
        (m / "k/gone").unlink()
    infos = ovl.diff()
    assert names(infos) == [".wh.a", ".wh.d", "k/", "k/.wh.gone"]
    whiteout = infos[0]
    assert (whiteout.type, whiteout.size, whiteout.mode, whiteout.mtime) == (tarfile.REGTYPE, 0, 0, 0)


def test_recreated_dir_is_opaque(scratch: Path) -> None:
    lower = make_lower(scratch, directory("d"), file("d/old", b"old"))
    ovl = Overlay(scratch, [lower])
    with ovl.mounted() as m:
        shutil.rmtree(m / "d")
        (m / "d").mkdir()
        write(m / "d/new", b"new")
    assert names(ovl.diff()) == ["d/", "d/.wh..wh..opq", "d/new"]


def test_chmod_only_and_chown_only(scratch: Path) -> None:
    lower = make_lower(scratch, file("a", b"a"), file("b", b"b"), file("c", b"c"))
    ovl = Overlay(scratch, [lower])
    with ovl.mounted() as m:
        os.chmod(m / "a", 0o600)
        os.chown(m / "b", 1000, 1001)
    infos = {i.name: i for i in ovl.diff()}
    assert sorted(infos) == ["a", "b"]
    assert infos["a"].mode == 0o600
    assert (infos["b"].uid, infos["b"].gid) == (1000, 1001)


@pytest.mark.parametrize("lower_ns", [0, 123456789], ids=["tar-lower", "ns-lower"])
def test_move_away_and_back_is_no_change(scratch: Path, lower_ns: int) -> None:
    lower = make_lower(scratch, directory("d"), file("d/a", b"payload"))
    os.utime(lower / "d/a", ns=(T0 * 10**9 + lower_ns,) * 2)
    ovl = Overlay(scratch, [lower])
    with ovl.mounted() as m:
        os.rename(m / "d/a", m / "d/t")
        os.rename(m / "d/t", m / "d/a")
    assert ovl.diff() == []
    assert write_layer(ovl.upper, [lower], io.BytesIO(), compression=GZIP) is None


def test_same_second_change_found_by_content(scratch: Path) -> None:
    lower = make_lower(scratch, file("a", b"before", mtime=T0))
    ovl = Overlay(scratch, [lower])
    with ovl.mounted() as m:
        write(m / "a", b"after!", mtime=T0)  # same size, same truncated time
    assert names(ovl.diff()) == ["a"]


def test_user_xattr_only_change_counts(scratch: Path) -> None:
    lower = make_lower(scratch, file("a", b"same"))
    ovl = Overlay(scratch, [lower])
    with ovl.mounted() as m:
        os.setxattr(m / "a", "user.note", b"added")
    infos = ovl.diff()
    assert names(infos) == ["a"] and infos[0].pax_headers == {"SCHILY.xattr.user.note": "added"}


def test_mtime_only_change_counts(scratch: Path) -> None:
    lower = make_lower(scratch, file("a", b"same"))
    ovl = Overlay(scratch, [lower])
    with ovl.mounted() as m:
        os.utime(m / "a", (T0 + 60, T0 + 60))
    infos = ovl.diff()
    assert names(infos) == ["a"]
    assert infos[0].mtime == T0 + 60


def test_hardlinks_symlink_fifo_device_and_socket(scratch: Path) -> None:
    lower = make_lower(scratch, directory("etc"))
    ovl = Overlay(scratch, [lower])
    with ovl.mounted() as m:
        write(m / "h1", b"shared")
        os.link(m / "h1", m / "h2")
        os.link(m / "h1", m / "etc/h3")
        os.symlink("../target with space", m / "s")
        os.mkfifo(m / "fifo")
        os.mknod(m / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(m / "loop", stat.S_IFBLK, os.makedev(7, 0))
        os.chmod(m / "loop", 0o660)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(m / "sock"))
    infos = {i.name: i for i in ovl.diff()}
    assert sorted(infos) == ["etc", "etc/h3", "fifo", "h1", "h2", "loop", "null", "s"]
    # The first name in walk order carries the content; the others link to it.
    assert infos["etc/h3"].isreg() and infos["etc/h3"].size == 6
    assert [(infos[n].islnk(), infos[n].linkname) for n in ("h1", "h2")] == [(True, "etc/h3")] * 2
    assert infos["s"].issym() and infos["s"].linkname == "../target with space"
    assert infos["fifo"].isfifo()
    assert (infos["null"].ischr(), infos["null"].devmajor, infos["null"].devminor) == (True, 1, 3)
    assert (infos["loop"].isblk(), infos["loop"].devmajor, infos["loop"].mode) == (True, 7, 0o660)


def test_special_modes_and_xattrs(scratch: Path) -> None:
    lower = make_lower(scratch, file("ping", b"elf"), directory("tmp"))
    ovl = Overlay(scratch, [lower])
    with ovl.mounted() as m:
        os.setxattr(m / "ping", "security.capability", CAP_NET_BIND)  # a caps-only change
        os.chmod(m / "tmp", 0o1777)
        write(m / "su", b"#!")
        os.chmod(m / "su", 0o6755)
        write(m / "tagged", b"t")
        os.setxattr(m / "tagged", "user.origin", b"\xff binary")
        os.setxattr(m / "tagged", "trusted.secret", b"no")
    infos = {i.name: i for i in ovl.diff()}
    assert sorted(infos) == ["ping", "su", "tagged", "tmp"]
    cap = infos["ping"].pax_headers["SCHILY.xattr.security.capability"]
    assert cap.encode("utf-8", "surrogateescape") == CAP_NET_BIND
    assert infos["tmp"].mode == 0o1777 and infos["su"].mode == 0o6755
    tagged = infos["tagged"].pax_headers
    assert tagged["SCHILY.xattr.user.origin"].encode("utf-8", "surrogateescape") == b"\xff binary"
    assert not any("trusted" in key for info in infos.values() for key in info.pax_headers)


WEIRD = [b"with space", b"new\nline", b"\xff\xfe not utf-8", "ünïcødé".encode(), b"x" * 200]


def test_weird_names_round_trip_as_bytes(scratch: Path) -> None:
    lower = make_lower(scratch, directory("d"))
    ovl = Overlay(scratch, [lower])
    with ovl.mounted() as m:
        for name in WEIRD:
            (m / "d").joinpath(os.fsdecode(name)).write_bytes(name)
    data = diff_bytes(ovl.upper, [lower])
    got = [i.name.encode("utf-8", "surrogateescape") for i in members(data)]
    assert got == [b"d", *sorted(b"d/" + name for name in WEIRD)]
    target = scratch / "applied"
    target.mkdir()
    apply_layer(io.BytesIO(data), target, overlay_whiteouts=False)
    for name in WEIRD:
        assert (target / "d" / os.fsdecode(name)).read_bytes() == name


def test_lower_stack_visibility(scratch: Path) -> None:
    """An upper file equal to a lower one is a copy-up only if that lower one is visible."""
    bottom = make_lower(scratch, directory("d"), file("d/y", b"y"), file("x", b"x"), name="l1")
    top = scratch / "l0"
    (top / "d").mkdir(parents=True)
    os.setxattr(top / "d", "trusted.overlay.opaque", b"y")  # hides l1's d/y
    os.mknod(top / "x", stat.S_IFCHR, os.makedev(0, 0))  # hides l1's x
    upper = scratch / "upper"
    (upper / "d").mkdir(parents=True)
    shutil.copy2(bottom / "x", upper / "x")
    shutil.copy2(bottom / "d/y", upper / "d/y")
    shutil.copystat(bottom / "d", upper / "d")
    assert names(members(diff_bytes(upper, [top, bottom]))) == ["d/", "d/y", "x"]
    assert members(diff_bytes(upper, [bottom])) == []  # the same upper over l1 alone


def test_crafted_upper_whiteouts_and_opaque_without_lower(scratch: Path) -> None:
    lower = make_lower(scratch, file("kept"))
    upper = scratch / "upper"
    (upper / "newdir").mkdir(parents=True)
    os.setxattr(upper / "newdir", "trusted.overlay.opaque", b"y")
    os.mknod(upper / "never-existed", stat.S_IFCHR, os.makedev(0, 0))
    # BuildKit: a whiteout for nothing is skipped, an opaque dir over nothing is a plain dir.
    assert names(members(diff_bytes(upper, [lower]))) == ["newdir/"]


@pytest.mark.parametrize(
    "xattr", ["trusted.overlay.redirect", "trusted.overlay.metacopy", "user.overlay.redirect"]
)
def test_redirect_and_metacopy_are_refused(scratch: Path, xattr: str) -> None:
    upper = scratch / "upper"
    (upper / "d").mkdir(parents=True)
    os.setxattr(upper / "d", xattr, b"/elsewhere")
    with pytest.raises(LayerError, match=xattr):
        diff_upperdir(upper, [], io.BytesIO())


def test_sparse_multi_gigabyte_file_is_streamed(scratch: Path) -> None:
    upper = scratch / "upper"
    upper.mkdir()
    size = 2 * 2**30 + 1
    with open(upper / "sparse", "wb") as f:
        f.truncate(size)
        f.seek(size - 1)
        f.write(b"!")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sink = HashingWriter(None)
    assert diff_upperdir(upper, [], sink) == 1  # type: ignore[arg-type]
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert sink.size == 512 + size + (-size % 512) + 1024
    assert grown_kib < 64 * 1024, "the differ held the file in memory"


# -- determinism ------------------------------------------------------------------------------


def mixed_upper(base: Path) -> Path:
    """An upper dir with several compressor blocks of mixed content and many small files."""
    upper = base / "upper"
    (upper / "a/b").mkdir(parents=True)
    write(upper / "random.bin", os.urandom(3 * 2**20 + 12345), mtime=T0)
    write(upper / "text.txt", b"the quick brown fox\n" * 200_000, mtime=T0)
    for i in range(50):
        write(upper / f"a/b/f{i:03}", str(i).encode() * i, mtime=T0 + i)
    os.symlink("random.bin", upper / "link")
    os.link(upper / "text.txt", upper / "a/hard")
    return upper


def test_same_upper_thirty_times_gives_one_digest(scratch: Path) -> None:
    upper = mixed_upper(scratch)
    blobs = {write_layer(upper, [], io.BytesIO(), compression=PLAIN) for _ in range(30)}
    assert len(blobs) == 1
    gz = {write_layer(upper, [], io.BytesIO(), compression=GZIP) for _ in range(3)}
    assert len(gz) == 1


@pytest.mark.parametrize("compression", [GZIP, ZSTD], ids=lambda c: c.name)
def test_compressed_bytes_do_not_depend_on_threads(
    scratch: Path, compression: codecs.Compression, monkeypatch: pytest.MonkeyPatch
) -> None:
    upper = mixed_upper(scratch)
    results = set()
    for threads in sorted({1, 2, 4, os.cpu_count() or 1}):
        monkeypatch.setattr(codecs, "_threads", lambda threads=threads: threads)
        out = io.BytesIO()
        blob = write_layer(upper, [], out, compression=compression)
        assert blob is not None
        assert (blob.digest, blob.size) == (hashlib_digest(out.getvalue()), len(out.getvalue()))
        # Re-compressing the same tar, written in other slices, gives the same blob.
        tar = diff_bytes(upper, [])
        again = compress_stream(io.BytesIO(tar), io.BytesIO(), compression=compression)
        assert again == blob
        results.add(out.getvalue())
    assert len(results) == 1
    assert open_layer(io.BytesIO(results.pop())).read() == diff_bytes(upper, [])


def hashlib_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_gzip_header_has_no_time_and_no_name(scratch: Path) -> None:
    upper = mixed_upper(scratch)
    out = io.BytesIO()
    blob = write_layer(upper, [], out, compression=GZIP)
    assert blob is not None and blob.media_type.endswith("tar+gzip")
    header = out.getvalue()[:10]
    assert header[:3] == b"\x1f\x8b\x08" and header[3] == 0  # flags: no FNAME, no FEXTRA
    assert header[4:8] == b"\0\0\0\0"  # mtime 0


def test_uncompressed_blob_is_the_tar(scratch: Path) -> None:
    upper = mixed_upper(scratch)
    blob = write_layer(upper, [], io.BytesIO(), compression=PLAIN)
    assert blob is not None and blob.digest == blob.diff_id
    assert blob.diff_id == hashlib_digest(diff_bytes(upper, []))


def test_tar_has_no_needless_records_and_clamps_to_epoch(scratch: Path) -> None:
    upper = scratch / "upper"
    (upper / "dir").mkdir(parents=True)
    write(upper / "old", b"o")
    os.utime(upper / "old", ns=(1000 * 10**9 + 999_999_999,) * 2)  # .999...: truncate, not round
    write(upper / "new", b"n")
    os.utime(upper / "new", ns=(T0 * 10**9 + 500_000_000,) * 2)
    os.utime(upper / "dir", (T0 + 5, T0 + 5))
    data = diff_bytes(upper, [])
    for needless in (b"atime", b"ctime", b"mtime=", b"uname", b"gname", b"PaxHeader"):
        assert needless not in data
    infos = {i.name: i for i in members(data)}
    assert (infos["old"].mtime, infos["new"].mtime, infos["dir"].mtime) == (1000, T0, T0 + 5)
    assert all(i.uname == "" and i.gname == "" for i in infos.values())
    assert names(members(data)) == ["dir/", "new", "old"]
    clamped = {i.name: i.mtime for i in members(diff_bytes(upper, [], epoch=T0 - 1))}
    assert clamped == {"dir": T0 - 1, "new": T0 - 1, "old": 1000}


def test_entries_keep_a_subtree_together_in_name_byte_order(scratch: Path) -> None:
    upper = scratch / "upper"
    for rel in ("a/c", "a-b", "B", "a/\xe9"):
        (upper / rel).parent.mkdir(parents=True, exist_ok=True)
        write(upper / rel, b"")
    assert names(members(diff_bytes(upper, []))) == ["B", "a/", "a/c", "a/\xe9", "a-b"]


# -- the same bytes as before: fast headers, block buffer ------------------------------------------


def golden_upper(base: Path) -> tuple[Path, list[Path]]:
    """A fixed upper dir over one lower, with every kind of entry and every header edge case.

    Its digests below were produced by the writer before the fast header path and the block
    buffer existed: the same tree must keep giving the same layer (reproducibility promise).
    """
    lower = make_lower(base, directory("gone-dir"), file("gone-dir/x"), directory("opq"), file("opq/o"))
    lower_file = lower / "gone"
    write(lower_file, b"old")
    upper = base / "upper"
    upper.mkdir()
    rng = random.Random(20240601)
    entries: list[tuple[str, bytes, int]] = [
        ("random.bin", rng.randbytes(3 * 2**20 + 12345), T0),
        ("text.txt", b"the quick brown fox\n" * 60_000, T0 + 1),
        ("n" * 100, b"exactly 100", T0),
        ("n" * 101, b"101", T0),
        ("p" * 90 + "/" + "q" * 60, b"prefix split in ustar, a path record in pax", T0),
        ("\u00fcn\u00efc\u00f8d\u00e9", b"non-ascii", T0),
        ("epoch-zero", b"0", 0),
        ("before-1970", b"-", -5),
        ("year-2300", b"+", 8**11 + 7),
        ("empty", b"", T0),
    ]
    for i in range(40):
        entries.append((f"small/f{i:03}", bytes([i]) * (i * 37), T0 + i))
    for rel, data, mtime in entries:
        (upper / rel).parent.mkdir(parents=True, exist_ok=True)
        write(upper / rel, data, mtime)
    write(upper / os.fsdecode(b"\xff\xfe raw"), b"not utf-8", T0)
    os.chown(upper / "text.txt", 3_000_000, 7)
    os.chmod(upper / "empty", 0o4711)
    os.setxattr(upper / "text.txt", "user.note", b"\xff binary")
    os.link(upper / "random.bin", upper / "small/hard")
    os.symlink("t" * 200, upper / "long-link")
    os.symlink("text.txt", upper / "short-link")
    os.mkfifo(upper / "fifo")
    os.mknod(upper / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(upper / "big-dev", 0o600 | stat.S_IFBLK, os.makedev(4095, 2**20 - 1))
    for rel in ("long-link", "short-link", "fifo", "null", "big-dev"):
        os.utime(upper / rel, (T0 + 3, T0 + 3), follow_symlinks=False)
    os.mknod(upper / "gone", stat.S_IFCHR, os.makedev(0, 0))
    (upper / "opq").mkdir()
    os.setxattr(upper / "opq", "trusted.overlay.opaque", b"y")
    write(upper / "opq/new", b"new", T0)
    for rel in ("small", "p" * 90, "opq", "."):
        os.utime(upper / rel, (T0 + 99, T0 + 99))
    return upper, [lower]


# Made by the writer as it was before the ustar fast path and the block buffer (commit adee8b9):
# a change that moves one of these breaks the promise that a Dockerfile keeps its digest.
GOLDEN_DIFF_ID = "sha256:25ec9d2920588e90e8fcbd3fcc3b5d259c6572b6b7cf34daabaed3e311c5220b"
GOLDEN_BLOBS = {
    "uncompressed": (GOLDEN_DIFF_ID, 4444160),
    "gzip": ("sha256:b26a0147ea4074bfb094620dc10c8c4700468c337d94b9a11563a215e5d8d3d1", 3172071),
    "zstd": ("sha256:75eb451f1bf819f9b37a140240da17e0e8a5731eafd059720ed32c52f2322179", 3161249),
}
GOLDEN_EPOCH_DIFF_ID = "sha256:b1a9030cc4b0bf62b4d95bb36953ad43f722812f55329513c403af0c9af682d4"


@pytest.mark.parametrize("name", sorted(GOLDEN_BLOBS))
def test_layer_digests_are_those_of_the_previous_writer(scratch: Path, name: str) -> None:
    upper, lowers = golden_upper(scratch)
    out = io.BytesIO()
    blob = write_layer(upper, lowers, out, compression=COMPRESSIONS[name])
    assert blob is not None
    assert (blob.diff_id, (blob.digest, blob.size)) == (GOLDEN_DIFF_ID, GOLDEN_BLOBS[name])
    assert (hashlib_digest(out.getvalue()), len(out.getvalue())) == GOLDEN_BLOBS[name]
    assert hashlib_digest(diff_bytes(upper, lowers)) == GOLDEN_DIFF_ID
    clamped = write_layer(upper, lowers, io.BytesIO(), compression=PLAIN, epoch=T0)
    assert clamped is not None and clamped.diff_id == GOLDEN_EPOCH_DIFF_ID


# -- small layers: deflated in this thread, to the bytes igzip_threaded makes ------------------


BLOCK = codecs.BLOCK
TEXT = bytes(b"abcd \n"[i % 6] for i in range(256))  # a translate table to compressible bytes


def step_upper(base: Path) -> Path:
    """An upper dir as a typical step leaves it: ten small files and a symlink (a 12.5 KiB tar)."""
    upper = base / "step"
    (upper / "app/work").mkdir(parents=True)
    for i in range(1, 11):
        write(upper / f"app/work/file{i}.txt", f"line {i}\n".encode(), T0 + i)
    os.symlink("/app/bin/main.sh", upper / "app/main")
    os.utime(upper / "app/main", (T0, T0), follow_symlinks=False)
    for rel in ("app/work", "app"):
        os.utime(upper / rel, (T0 + 20, T0 + 20))
    return upper


def one_file_upper(base: Path, tar_size: int) -> Path:
    """An upper dir of one text file whose tar is ``tar_size`` bytes (header, data, end: 512-aligned)."""
    upper = base / f"tar-{tar_size}"
    upper.mkdir()
    write(upper / "f", random.Random(tar_size).randbytes(tar_size - 3 * 512).translate(TEXT), T0)
    return upper


# Made by the writer before a one-block tar was deflated in the calling thread (commit 3ff1318),
# by level. A tar of exactly one block is one piece, a full one; one 512 bytes longer is two.
GOLDEN_SMALL_GZIP = {
    "step": {
        1: ("sha256:e828e392bc13507e546feb272bb0798a1b6045e5566b409f29e99b740e14ed34", 386),
        0: ("sha256:a0f4a2c34360ca9d14a32d5e5c6f26914ebf9b601702fd5e991bdd86aac219d5", 592),
    },
    "tar-1536": {
        1: ("sha256:6b84ed9846499b4403b937c116fd523b69eabeb5d0a16c3ba6546c4d5d3fc74f", 92),
        0: ("sha256:9d09087265783b529330b0aba4364699123afdd71ebd5f80e302eadb231dc4f4", 205),
    },
    "tar-1048576": {
        1: ("sha256:2e85455b5670bf7e35f3c306466ae2044b846232402e5b58e4717187b06d4d19", 413213),
        0: ("sha256:38403a229238f291b3ff390161079a6aa274a4a4ad56bf7c8d218834eb353de5", 467822),
    },
    "tar-1049088": {
        1: ("sha256:aaa013e04233e209f390ecfb66c4caaf9f3a3925e89fc2b7907820852cef9886", 413412),
        0: ("sha256:4d9bd5b59679af09cb41afff737bcf1b57ac4552a30ceecc83ab2e3107a31b44", 468059),
    },
}


def small_upper(base: Path, name: str) -> Path:
    return step_upper(base) if name == "step" else one_file_upper(base, int(name.removeprefix("tar-")))


@pytest.mark.parametrize("name", sorted(GOLDEN_SMALL_GZIP))
def test_small_gzip_layers_keep_their_digests(scratch: Path, name: str) -> None:
    upper = small_upper(scratch, name)
    for level, expected in GOLDEN_SMALL_GZIP[name].items():
        out = io.BytesIO()
        blob = write_layer(upper, [], out, compression=GZIP, level=level)
        assert blob is not None
        assert (blob.digest, blob.size) == expected
        assert (hashlib_digest(out.getvalue()), len(out.getvalue())) == expected


def igzip_threaded_bytes(data: bytes, level: int) -> bytes:
    """What igzip_threaded makes of ``data`` cut into the writer's blocks: the reference."""
    from isal import igzip_threaded

    gzip_open = cast("Callable[..., io.BufferedWriter]", igzip_threaded.open)  # isal has no types
    out = io.BytesIO()
    writer = gzip_open(out, "wb", compresslevel=level, threads=2, block_size=BLOCK)
    if data:  # the writer hands on no empty piece
        writer.raw.write(data)  # which cuts it into blocks of block_size
    writer.close()
    return out.getvalue()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(0, 4096) | st.integers(BLOCK - 1024, BLOCK + 1024) | st.integers(0, 2 * BLOCK + 1024),
    seed=st.integers(0, 2**32 - 1),
    text=st.booleans(),
    level=st.integers(0, 3),
)
def test_gzip_blob_is_what_igzip_threaded_makes(size: int, seed: int, text: bool, level: int) -> None:
    """A tar of one block is deflated in this thread, a longer one by igzip_threaded: both are
    byte for byte what igzip_threaded makes, for any content, length and level."""
    data = random.Random(seed).randbytes(size)
    if text:
        data = data.translate(TEXT)
    out = io.BytesIO()
    blob = compress_stream(io.BytesIO(data), out, compression=GZIP, level=level)
    assert out.getvalue() == igzip_threaded_bytes(data, level)
    assert (blob.digest, blob.size) == (hashlib_digest(out.getvalue()), len(out.getvalue()))
    assert blob.diff_id == hashlib_digest(data)


def test_one_block_gzip_layer_starts_no_thread(scratch: Path) -> None:
    started: list[str] = []

    def note(frame: object, event: str, arg: object) -> None:  # runs first in each new thread
        started.append(threading.current_thread().name)

    threading.settrace(note)
    try:
        assert write_layer(small_upper(scratch, "tar-1048576"), [], io.BytesIO(), compression=GZIP)
        assert started == []
        assert write_layer(small_upper(scratch, "tar-1049088"), [], io.BytesIO(), compression=GZIP)
        assert started, "the control: two blocks start igzip_threaded's threads"
    finally:
        threading.settrace(None)


def tarfile_header(h: layer._Header) -> bytes:
    """The header as the writer made it before the fast path: a TarInfo in PAX format."""
    name = h.name.removesuffix(b"/") if h.kind == tarfile.DIRTYPE else h.name  # tarfile adds it
    info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
    info.type, info.mode, info.uid, info.gid = h.kind, h.mode, h.uid, h.gid
    info.mtime, info.size = h.mtime, h.size
    info.linkname = h.linkname.decode("utf-8", "surrogateescape")
    info.devmajor, info.devminor = h.devmajor, h.devminor
    info.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape") for k, v in h.xattrs}
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def near(*limits: int) -> st.SearchStrategy[int]:
    """Integers at and around each limit, where the fields overflow into PAX records."""
    return st.sampled_from(limits).flatmap(lambda n: st.integers(n - 2, n + 2))


HEADER_FUZZ = settings(
    max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
NAME_BYTE = st.sampled_from([*b"abz09._-/ ~", 0x7F, 0xC3, 0xA9, 0xFF, 0x80])
# Never empty, no NUL, no slash at the end: the names the differ makes (a directory's slash is
# added below, as the differ adds it).
header_name = st.one_of(
    st.binary(min_size=1, max_size=3).map(lambda b: b.replace(b"\0", b"x")),
    st.integers(95, 160).flatmap(lambda n: st.lists(NAME_BYTE, min_size=n, max_size=n).map(bytes)),
    st.lists(NAME_BYTE, min_size=1, max_size=260).map(bytes),
).map(lambda name: name.rstrip(b"/") or b"x")
ids = st.integers(0, 2**32 - 1) | near(8**7)
numbers = st.integers(0, 2**40) | near(8**11, 2**33)
mtimes = st.integers(-(2**40), 2**40) | near(0, 8**11, T0)
header_kind = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE])
header_kind |= st.sampled_from([tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
xattr_sets = st.lists(st.tuples(st.sampled_from(["user.a", "security.capability"]), st.binary(max_size=8)))


@st.composite
def headers(draw: st.DrawFn) -> layer._Header:
    kind = draw(header_kind)
    name = draw(header_name)
    linked = kind in (tarfile.SYMTYPE, tarfile.LNKTYPE)
    device = kind in (tarfile.CHRTYPE, tarfile.BLKTYPE)
    return layer._Header(
        name + b"/" if kind == tarfile.DIRTYPE else name,
        kind,
        mode=draw(st.integers(0, 0o7777)),
        uid=draw(ids),
        gid=draw(ids),
        mtime=draw(mtimes),
        size=draw(numbers) if kind == tarfile.REGTYPE else 0,
        linkname=draw(header_name) if linked else b"",
        devmajor=draw(st.integers(0, 4095) | near(8**7)) if device else 0,
        devminor=draw(st.integers(0, 2**20 - 1) | near(8**7)) if device else 0,
        xattrs=tuple(sorted(dict(draw(xattr_sets)).items())) if draw(st.integers(0, 9)) == 0 else (),
    )


EDGE_HEADERS = [
    layer._Header(b"n" * 100, tarfile.REGTYPE, 0o644, size=1),  # the longest ustar name
    layer._Header(b"n" * 99 + b"/", tarfile.DIRTYPE, 0o755),  # a directory's slash counts
    layer._Header(b"n" * 100 + b"/", tarfile.DIRTYPE, 0o755),
    layer._Header(b"n" * 101, tarfile.REGTYPE, 0o644),
    layer._Header(b"p" * 90 + b"/" + b"q" * 60, tarfile.REGTYPE, 0o644),  # ustar would split
    layer._Header("ünïcødé".encode(), tarfile.REGTYPE, 0o644),
    layer._Header(b"\xff\xfe raw", tarfile.REGTYPE, 0o644),
    layer._Header(b"uid", tarfile.REGTYPE, 0o4755, uid=8**7 - 1, gid=8**7),
    layer._Header(b"big", tarfile.REGTYPE, 0o644, size=8 * 2**30),  # 8 GiB: a size record
    layer._Header(b"just-fits", tarfile.REGTYPE, 0o644, size=8 * 2**30 - 1),
    layer._Header(b"epoch", tarfile.REGTYPE, 0o644, mtime=0),
    layer._Header(b"before-1970", tarfile.REGTYPE, 0o644, mtime=-1),
    layer._Header(b"far-future", tarfile.REGTYPE, 0o644, mtime=8**11),
    layer._Header(b"null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3),
    layer._Header(b"loop", tarfile.BLKTYPE, 0o660, devmajor=4095, devminor=2**20 - 1),
    layer._Header(b"h", tarfile.LNKTYPE, 0o644, linkname=b"l" * 100),
    layer._Header(b"s", tarfile.SYMTYPE, 0o777, linkname=b"t" * 101),  # a linkpath record
    layer._Header(b"s", tarfile.SYMTYPE, 0o777, linkname="é".encode()),
    layer._Header(b"fifo", tarfile.FIFOTYPE, 0o600, mtime=T0),
    layer._Header(b"caps", tarfile.REGTYPE, 0o755, xattrs=(("security.capability", CAP_NET_BIND),)),
    layer._Header(b".wh..wh..opq", tarfile.REGTYPE),
]


@HEADER_FUZZ
@given(headers())
def test_fast_header_is_byte_for_byte_tarfiles(header: layer._Header) -> None:
    try:
        expected = tarfile_header(header)
    except ValueError:  # tarfile refuses a device number it cannot store: so must the writer
        with pytest.raises(ValueError):
            layer._header_bytes(header)
        return
    assert layer._header_bytes(header) == expected
    fast = layer._ustar_header(header)
    assert fast is None or fast == expected


@pytest.mark.parametrize("header", EDGE_HEADERS, ids=lambda h: h.name.decode("utf-8", "replace")[:24])
def test_edge_case_headers_are_byte_for_byte_tarfiles(header: layer._Header) -> None:
    assert layer._header_bytes(header) == tarfile_header(header)


def test_the_tar_constants_are_tarfiles() -> None:
    """The writer spells the format's constants itself (it does not import tarfile)."""
    kinds = ("REGTYPE", "LNKTYPE", "SYMTYPE", "CHRTYPE", "BLKTYPE", "DIRTYPE", "FIFOTYPE")
    assert [getattr(layer, f"_{kind}") for kind in kinds] == [getattr(tarfile, kind) for kind in kinds]
    assert (layer._BLOCKSIZE, layer._USTAR_MAGIC) == (tarfile.BLOCKSIZE, tarfile.POSIX_MAGIC)


def test_common_entries_take_the_fast_path() -> None:
    """The comparisons above mean something only if the fast path is taken where it can be."""
    fast = {h.name for h in EDGE_HEADERS if layer._ustar_header(h) is not None}
    assert fast == {
        b"n" * 100,
        b"n" * 99 + b"/",
        b"just-fits",
        b"epoch",
        b"null",
        b"loop",
        b"h",
        b"fifo",
        b".wh..wh..opq",
    }
    for header in EDGE_HEADERS:
        if header.name in fast:
            assert layer._ustar_header(header) == tarfile_header(header)


def test_tar_is_the_same_whatever_the_read_sizes(scratch: Path) -> None:
    """Pieces that straddle the block edge come out whole: the sink only sees full blocks.

    Pieces come as bytes (headers) and read from a file (contents), while the block grows
    from its first size to a full one and after each full block handed on.
    """
    upper = mixed_upper(scratch)
    tar = diff_bytes(upper, [])
    (scratch / "tar").write_bytes(tar)
    seen: list[int] = []
    out = io.BytesIO()

    def sink(piece: memoryview) -> None:
        seen.append(len(piece))
        out.write(piece)

    stream = layer._TarStream(sink)
    rng = random.Random(7)
    at = 0
    fd = os.open(scratch / "tar", os.O_RDONLY)
    try:
        while at < len(tar):
            n = rng.choice([1, 511, 512, 4096, 2**16 - 1, 2**16, 2**16 + 1, 2**20 - 1, 2**20, 3 * 2**20])
            if rng.random() < 0.5:
                stream.write(tar[at : at + n])
            else:
                os.lseek(fd, at, os.SEEK_SET)
                assert stream.fill_from(fd, n) == min(n, len(tar) - at)
            at += n
    finally:
        os.close(fd)
    stream.flush()
    assert out.getvalue() == tar
    assert set(seen[:-1]) == {2**20} and 0 < seen[-1] <= 2**20


def test_open_layer_detects_every_format(scratch: Path) -> None:
    import bz2
    import lzma

    tar = tartest.build(file("f", b"hello"))
    gz, zs = io.BytesIO(), io.BytesIO()
    compress_stream(io.BytesIO(tar), gz, compression=GZIP)
    compress_stream(io.BytesIO(tar), zs, compression=ZSTD)
    for blob in (tar, gz.getvalue(), zs.getvalue(), bz2.compress(tar), lzma.compress(tar)):
        assert open_layer(io.BytesIO(blob)).read() == tar
    assert open_layer(io.BytesIO(b"")).read() == b""
    with pytest.raises(LayerError, match="gzip"):
        open_layer(io.BytesIO(b"\x1f\x8b" + b"garbage" * 10)).read()


def test_truncated_tar_is_a_layer_error(scratch: Path) -> None:
    data = tartest.build(file("big", b"x" * 5000))[:2048]
    with pytest.raises(LayerError, match="not a valid tar"):
        apply_layer(io.BytesIO(data), scratch, overlay_whiteouts=False)


def test_compression_level_out_of_range_is_a_sentence(scratch: Path) -> None:
    with pytest.raises(LayerError, match="out of range for gzip"):
        compress_stream(io.BytesIO(b""), io.BytesIO(), compression=GZIP, level=9)


# -- round trip -------------------------------------------------------------------------------


BASE = (
    directory("etc"),
    directory("usr"),
    directory("var"),
    file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    directory("usr/bin", mode=0o755),
    file("usr/bin/tool", b"\x7fELF" + b"\0" * 100, mode=0o4755),
    hardlink("usr/bin/tool2", "usr/bin/tool"),
    symlink("bin", "usr/bin"),
    directory("var/cache"),
    file("var/cache/a", b"cached a"),
    file("var/cache/b", b"cached b"),
    directory("data"),
    file("data/keep", b"keep"),
    file("data/gone", b"gone"),
    fifo("run.fifo"),
    char("null", 1, 3),
    file("tagged", b"x", pax={"SCHILY.xattr.user.k": "v"}),
)


def change_everything(m: Path) -> None:
    write(m / "etc/passwd", b"root:x:0:0::/root:/bin/bash\n")
    (m / "data/gone").unlink()
    shutil.rmtree(m / "var/cache")
    (m / "var/cache").mkdir()
    write(m / "var/cache/c", b"new cache")
    os.chmod(m / "usr/bin/tool", 0o755)
    os.symlink("../etc/passwd", m / "usr/bin/pw")
    (m / "deep/er/est").mkdir(parents=True)
    write(m / "deep/er/est/file", os.urandom(2**20 + 7))
    os.link(m / "deep/er/est/file", m / "deep/link")
    os.setxattr(m / "data/keep", "security.capability", CAP_NET_BIND)
    os.mkfifo(m / "new.fifo")
    os.utime(m / "deep/er", (T0, T0))


def test_diff_then_apply_gives_the_same_tree(scratch: Path) -> None:
    base_tar = tartest.build(*BASE)
    lower = make_lower(scratch, *BASE)
    ovl = Overlay(scratch, [lower])
    with ovl.mounted() as m:
        change_everything(m)
    with ovl.mounted() as m:
        expected = tree(m)
    data = diff_bytes(ovl.upper, [lower])

    full = scratch / "full"  # a whole root file system: whiteouts delete
    full.mkdir()
    apply_layer(io.BytesIO(base_tar), full, overlay_whiteouts=False)
    apply_layer(io.BytesIO(data), full, overlay_whiteouts=False)
    assert tree(full) == expected

    snap = scratch / "snap"  # a layer directory stacked on the lower again
    snap.mkdir()
    apply_layer(io.BytesIO(data), snap, overlay_whiteouts=True)
    with Overlay(scratch, [snap, lower]).mounted() as m:
        assert tree(m) == expected
    assert stat.S_ISCHR(os.lstat(snap / "data/gone").st_mode)  # an overlay whiteout
    assert os.getxattr(snap / "var/cache", "trusted.overlay.opaque") == b"y"


def test_applied_sparse_file_stays_sparse(scratch: Path) -> None:
    size = 64 * 2**20
    upper = scratch / "upper"
    upper.mkdir()
    with open(upper / "holes", "wb") as f:
        f.write(b"head")
        f.truncate(size)
    root = scratch / "root"
    root.mkdir()
    apply_layer(io.BytesIO(diff_bytes(upper, [])), root, overlay_whiteouts=False)
    st = os.stat(root / "holes")
    assert st.st_size == size and st.st_blocks * 512 < size // 4


# -- hostile tars -----------------------------------------------------------------------------

Build = Callable[[str], list[tartest.Entry]]  # given the absolute host dir
Check = Callable[[Path, str], None]  # given the root and the absolute host dir


def payload_at(rel: Callable[[str], str], data: bytes = b"payload") -> Check:
    def check(root: Path, host: str) -> None:
        assert (root / rel(host).lstrip("/")).read_bytes() == data

    return check


def missing(*rels: str) -> Check:
    def check(root: Path, host: str) -> None:
        for rel in rels:
            assert not os.path.lexists(root / rel), rel

    return check


def check_all(*checks: Check) -> Check:
    def check(root: Path, host: str) -> None:
        for c in checks:
            c(root, host)

    return check


def is_opaque_dir(rel: str, *present: str) -> Check:
    def check(root: Path, host: str) -> None:
        assert os.getxattr(root / rel, "trusted.overlay.opaque") == b"y"
        for name in present:
            assert (root / rel / name).exists()

    return check


def mode_of(rel: str, mode: int) -> Check:
    def check(root: Path, host: str) -> None:
        assert stat.S_IMODE(os.lstat(root / rel).st_mode) == mode

    return check


def regular(rel: str, data: bytes) -> Check:
    def check(root: Path, host: str) -> None:
        assert stat.S_ISREG(os.lstat(root / rel).st_mode)
        assert (root / rel).read_bytes() == data

    return check


P = b"payload"
ERROR = LayerError
BOTH, FULL, OVERLAY = (False, True), (False,), (True,)

# (id, whiteout modes to run in, entries, LayerError or a check on the contained result)
HOSTILE: list[tuple[str, tuple[bool, ...], Build, type[LayerError] | Check]] = [
    ("dotdot-name", BOTH, lambda h: [file("../host/victim", P)], payload_at(lambda h: "host/victim")),
    (
        "many-dotdots-to-abs",
        BOTH,
        lambda h: [file("../../../../../../../.." + h + "/victim", P)],
        payload_at(lambda h: h + "/victim"),
    ),
    ("absolute-name", BOTH, lambda h: [file(h + "/victim", P)], payload_at(lambda h: h + "/victim")),
    ("dot-slash-dotdot", BOTH, lambda h: [file("./../host/victim", P)], payload_at(lambda h: "host/victim")),
    ("inner-dotdot", BOTH, lambda h: [file("a/../../host/victim", P)], payload_at(lambda h: "host/victim")),
    (
        "symlink-parent-relative",
        BOTH,
        lambda h: [symlink("link", "../host"), file("link/victim", P)],
        payload_at(lambda h: "host/victim"),
    ),
    (
        "symlink-parent-absolute",
        BOTH,
        lambda h: [symlink("link", h), file("link/victim", P)],
        payload_at(lambda h: h + "/victim"),
    ),
    (
        "symlink-chain",
        BOTH,
        lambda h: [symlink("a", "b"), symlink("b", "../../host"), file("a/victim", P)],
        payload_at(lambda h: "host/victim"),
    ),
    (
        "file-replaces-symlink-not-its-target",
        BOTH,
        lambda h: [symlink("victim", h + "/victim"), file("victim", P)],
        regular("victim", P),
    ),
    (
        "dir-replaces-symlink-to-host-dir",
        BOTH,
        lambda h: [symlink("d", h + "/dir"), directory("d", mode=0o700), file("d/x", P)],
        check_all(mode_of("d", 0o700), regular("d/x", P)),
    ),
    ("hardlink-to-etc-passwd", BOTH, lambda h: [hardlink("pw", "/etc/passwd")], ERROR),
    ("hardlink-dotdot", BOTH, lambda h: [hardlink("v", "../host/victim")], ERROR),
    ("hardlink-absolute-host", BOTH, lambda h: [hardlink("v", h + "/victim")], ERROR),
    (
        "hardlink-through-symlink-parent",
        BOTH,
        lambda h: [symlink("link", h), hardlink("v", "link/victim")],
        ERROR,
    ),
    (
        "hardlink-to-symlink-then-write",
        BOTH,
        lambda h: [symlink("s", h + "/victim"), hardlink("h", "s"), file("h", P)],
        check_all(regular("h", P), lambda root, h: None),
    ),
    ("hardlink-to-dir", BOTH, lambda h: [directory("d"), hardlink("h", "d")], ERROR),
    ("whiteout-dotdot", BOTH, lambda h: [file("../host/.wh.victim")], lambda root, h: None),
    ("whiteout-absolute", BOTH, lambda h: [file(h + "/.wh.victim")], lambda root, h: None),
    (
        "whiteout-through-symlink-parent",
        BOTH,
        lambda h: [symlink("link", h), file("link/.wh.victim"), file("link/.wh.dir")],
        lambda root, h: None,
    ),
    ("whiteout-of-root", BOTH, lambda h: [file(".wh.")], ERROR),
    ("whiteout-of-dotdot", BOTH, lambda h: [file("pre/.wh..")], ERROR),
    ("whiteout-of-dot", BOTH, lambda h: [file(".wh..")], ERROR),
    (
        "opaque-of-root",
        FULL,
        lambda h: [file("new", P), file(".wh..wh..opq")],
        check_all(missing("pre", "d"), regular("new", P)),
    ),
    (
        "opaque-through-symlink-parent",
        BOTH,
        lambda h: [symlink("link", h + "/dir"), file("link/.wh..wh..opq")],
        lambda root, h: None,
    ),
    ("retype-root-symlink", BOTH, lambda h: [symlink(".", h)], ERROR),
    ("retype-root-file", BOTH, lambda h: [file(".", P)], ERROR),
    ("retype-root-dotdot-symlink", BOTH, lambda h: [symlink("..", h)], ERROR),
    ("retype-root-hardlink", BOTH, lambda h: [file("f"), hardlink("/", "f")], ERROR),
    ("root-dir-metadata", BOTH, lambda h: [directory("/", mode=0o700)], mode_of(".", 0o700)),
    (
        "duplicate-files",
        BOTH,
        lambda h: [file("x", b"one"), file("x", b"two")],
        regular("x", b"two"),
    ),
    (
        "duplicate-dir-then-file",
        BOTH,
        lambda h: [directory("x"), file("x/y", P), file("x", b"three")],
        regular("x", b"three"),
    ),
    (
        "duplicate-file-then-dir",
        BOTH,
        lambda h: [file("x", P), directory("x", mode=0o711)],
        mode_of("x", 0o711),
    ),
    (
        "opaque-after-siblings",
        FULL,
        lambda h: [directory("d"), file("d/a", P), file("d/b", P), file("d/.wh..wh..opq")],
        check_all(missing("d/old"), regular("d/a", P), regular("d/b", P)),
    ),
    (
        "opaque-after-siblings",
        OVERLAY,
        lambda h: [directory("d"), file("d/a", P), file("d/b", P), file("d/.wh..wh..opq")],
        is_opaque_dir("d", "a", "b"),
    ),
    (
        "whiteout-after-own-entry",
        FULL,
        lambda h: [file("mine", P), file(".wh.mine"), file(".wh.pre")],
        check_all(regular("mine", P), missing("pre")),
    ),
    (
        "dir-after-its-whiteout",
        OVERLAY,
        lambda h: [file(".wh.d"), directory("d"), file("d/x", P)],
        is_opaque_dir("d", "x"),
    ),
    ("symlink-loop", BOTH, lambda h: [symlink("a", "b"), symlink("b", "a"), file("a/x", P)], ERROR),
    ("self-symlink-loop", BOTH, lambda h: [symlink("l", "l/x"), file("l/y", P)], ERROR),
    ("parent-is-a-file", BOTH, lambda h: [file("f", P), file("f/x", P)], ERROR),
    (
        "long-path",
        BOTH,
        lambda h: [file("/".join(["d" * 200] * 8) + "/f", P)],
        payload_at(lambda h: "/".join(["d" * 200] * 8) + "/f"),
    ),
    ("long-component", BOTH, lambda h: [file("n" * 300, P)], ERROR),
    (
        "device-dotdot",
        BOTH,
        lambda h: [char("../host/null", 1, 3)],
        lambda root, h: None if stat.S_ISCHR(os.lstat(root / "host/null").st_mode) else pytest.fail(),
    ),
    (
        "overlay-xattr-injection",
        BOTH,
        lambda h: [
            directory(
                "d",
                pax={
                    "SCHILY.xattr.trusted.overlay.redirect": "/etc",
                    "SCHILY.xattr.trusted.overlay.opaque": "y",
                },
            )
        ],
        lambda root, h: (
            None
            if not any(k.startswith("trusted.overlay") for k in os.listxattr(root / "d"))
            else pytest.fail("overlay xattrs were set")
        ),
    ),
    (
        "setuid-survives-chown",
        BOTH,
        lambda h: [file("su", P, mode=0o4755, uid=1000, gid=1000)],
        mode_of("su", 0o4755),
    ),
    ("pax-uid-overflow", BOTH, lambda h: [file("f", P, pax={"uid": "9" * 30})], ERROR),
    ("pax-path-with-nul", BOTH, lambda h: [file("f", P, pax={"path": "a\0/../../host/victim"})], ERROR),
    ("pax-mtime-nan", BOTH, lambda h: [file("f", P, pax={"mtime": "nan"})], ERROR),
    ("garbage", BOTH, lambda h: [], ERROR),
]


def host_state(scratch: Path) -> dict[str, tuple[object, ...]]:
    """Everything that must not change outside the root: the host dir, the scratch dir, /etc."""
    state = {f"host:{k}": v for k, v in tree(scratch / "host", host=True).items()}
    state["scratch"] = tuple(sorted(os.listdir(scratch)))
    for path in ("/etc/passwd", "/etc"):
        st = os.lstat(path)
        state[path] = (st.st_ino, st.st_mode, st.st_nlink, st.st_size, st.st_mtime_ns)
    return state


@pytest.mark.parametrize(
    ("overlay", "build", "expect"),
    [
        pytest.param(o, b, e, id=f"{name}-{'overlay' if o else 'full'}")
        for name, modes, b, e in HOSTILE
        for o in modes
    ],
)
def test_hostile_tar_never_touches_the_host(
    scratch: Path, overlay: bool, build: Build, expect: type[LayerError] | Check
) -> None:
    host = scratch / "host"
    (host / "dir").mkdir(parents=True)
    write(host / "victim", b"precious", mtime=T0)
    write(host / "dir/inside", b"precious too", mtime=T0)
    os.utime(host / "dir", (T0, T0))
    os.utime(host, (T0, T0))
    root = scratch / "root"
    (root / "d").mkdir(parents=True)
    write(root / "pre", b"from a lower layer")
    write(root / "d/old", b"from a lower layer")
    before = host_state(scratch)
    entries = build(str(host))
    data = tartest.build(*entries) if entries else b"garbage!" * 200
    error: LayerError | None = None
    try:
        apply_layer(io.BytesIO(data), root, overlay_whiteouts=overlay)
    except LayerError as e:
        error = e
    after = host_state(scratch)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"HOST PATH WAS CHANGED: {changed}"
    if expect is LayerError:
        assert error is not None, "the hostile tar was applied instead of refused"
        assert str(error).endswith(".")
    else:
        assert error is None, f"a tar that can be contained was refused: {error}"
        expect(root, str(host))  # type: ignore[operator]
