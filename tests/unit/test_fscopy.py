"""The copier on plain directories: Docker's destination rules, metadata, and staying inside."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.buildcontext import filtered_walk
from builder.errors import ContextError
from builder.fscopy import CopySource, copy_sources, make_dirs, parse_chmod
from builder.users import Identity


def _source(path: Path, parents: tuple[tuple[str, Path], ...] = ()) -> CopySource:
    def children() -> Iterator[tuple[str, Path]]:
        return filtered_walk(path) if path.is_dir() and not path.is_symlink() else iter(())

    return CopySource(path, path.name, children, parents)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    top = tmp_path / "src"
    (top / "dir" / "sub").mkdir(parents=True)
    (top / "file.txt").write_text("file")
    (top / "dir" / "a").write_text("a")
    (top / "dir" / "sub" / "b").write_text("b")
    os.symlink("/etc/passwd", top / "dir" / "abs-link")
    for path in (top / "dir" / "sub" / "b", top / "dir" / "sub", top / "dir"):
        os.utime(path, (1_500_000_000, 1_500_000_000))
    return top


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    (path / "existing").mkdir(parents=True)
    return path


def _tree(top: Path) -> list[str]:
    return sorted(
        str(p.relative_to(top)) + ("/" if p.is_dir() and not p.is_symlink() else "") for p in top.rglob("*")
    )


def test_a_directory_source_copies_its_contents(src: Path, root: Path) -> None:
    copy_sources([_source(src / "dir")], root, "/new/place", owner=None, chmod=None)
    assert _tree(root / "new") == ["place/", "place/a", "place/abs-link", "place/sub/", "place/sub/b"]
    assert stat.S_IMODE((root / "new" / "place").stat().st_mode) == 0o755
    assert os.readlink(root / "new" / "place" / "abs-link") == "/etc/passwd", "a symlink is copied as one"
    assert (root / "new" / "place" / "sub").stat().st_mtime == 1_500_000_000, "directory times are kept"


@pytest.mark.parametrize(
    ("dest", "expected"),
    [
        ("/existing", "existing/file.txt"),
        ("/renamed.txt", "renamed.txt"),
        ("/made/", "made/file.txt"),
        ("/deep/er/name", "deep/er/name"),
    ],
)
def test_a_file_goes_into_a_directory_or_becomes_the_destination(
    src: Path, root: Path, dest: str, expected: str
) -> None:
    copy_sources([_source(src / "file.txt")], root, dest, owner=None, chmod=None)
    assert (root / expected).read_text() == "file"


def test_the_destination_is_resolved_inside_the_root(src: Path, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), root / "abs")
    os.symlink("../../../../../..", root / "up")
    copy_sources([_source(src / "file.txt")], root, "/abs/", owner=None, chmod=None)
    copy_sources([_source(src / "dir")], root, "/up/x", owner=None, chmod=None)
    assert list(outside.iterdir()) == [], "HOST PATH WAS CHANGED"
    assert (root / str(outside).lstrip("/") / "file.txt").read_text() == "file"
    assert (root / "x" / "sub" / "b").read_text() == "b"


def test_nothing_below_the_destination_is_followed(src: Path, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "dest").mkdir()
    os.symlink(str(outside), root / "dest" / "sub")
    with pytest.raises(ContextError, match="cannot copy the directory sub over /dest/sub"):
        copy_sources([_source(src / "dir")], root, "/dest", owner=None, chmod=None)
    (root / "other").mkdir()
    os.symlink(str(outside / "a"), root / "other" / "a")
    copy_sources([_source(src / "dir")], root, "/other", owner=None, chmod=None)
    assert list(outside.iterdir()) == [], "HOST PATH WAS CHANGED"
    assert (root / "other" / "a").read_text() == "a" and not (root / "other" / "a").is_symlink()


def test_a_file_does_not_replace_a_directory(src: Path, root: Path) -> None:
    (root / "existing" / "file.txt").mkdir()
    with pytest.raises(ContextError, match=r"cannot replace the directory /existing/file\.txt"):
        copy_sources([_source(src / "file.txt")], root, "/existing/", owner=None, chmod=None)


def test_owner_and_octal_mode_apply_to_every_entry(src: Path, root: Path) -> None:
    copy_sources([_source(src / "dir")], root, "/d", owner=Identity(7, 8), chmod=parse_chmod("0640"))
    for path in [root / "d", *(root / "d").rglob("*")]:
        info = path.lstat()
        assert (info.st_uid, info.st_gid) == (7, 8), path
    assert stat.S_IMODE((root / "d" / "sub").stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "d" / "a").stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "d").stat().st_mode) == 0o755, "the destination made for it stays 0755"


@pytest.mark.parametrize(
    ("text", "mode", "is_dir", "expected"),
    [
        ("u+x", 0o644, False, 0o744),
        ("g-w", 0o664, False, 0o644),
        ("u+x,g-w", 0o664, False, 0o744),
        ("a=rX", 0o700, True, 0o555),
        ("a=rX", 0o640, False, 0o444),
        ("a=rX", 0o740, False, 0o555),
        ("go=u", 0o750, False, 0o777),
        ("+x", 0o644, False, 0o755),
        ("u+s,g+s", 0o755, False, 0o6755),
        ("o+t", 0o755, True, 0o1755),
        ("=644", 0o755, False, 0o644),
        ("755", 0o600, False, 0o755),
        ("4755", 0o600, False, 0o4755),
    ],
)
def test_chmod_octal_and_symbolic(text: str, mode: int, is_dir: bool, expected: int) -> None:
    assert parse_chmod(text).apply(mode, is_dir=is_dir) == expected


@pytest.mark.parametrize("text", ["8", "17777", "u+q", "x+u", "", "u+x,", "rwx"])
def test_chmod_rejects_what_is_not_a_mode(text: str) -> None:
    with pytest.raises(ContextError, match=f"--chmod={re.escape(text)} is"):
        parse_chmod(text)


def test_hard_links_fifos_xattrs_and_times_travel(tmp_path: Path, root: Path) -> None:
    top = tmp_path / "special"
    top.mkdir()
    (top / "one").write_text("shared")
    os.link(top / "one", top / "two")
    os.mkfifo(top / "pipe")
    os.setxattr(top / "one", "user.note", b"kept")
    os.utime(top / "one", (1_400_000_000, 1_400_000_000))
    copy_sources([_source(top)], root, "/s", owner=None, chmod=None)
    assert (root / "s" / "one").stat().st_ino == (root / "s" / "two").stat().st_ino
    assert stat.S_ISFIFO((root / "s" / "pipe").lstat().st_mode)
    assert os.getxattr(root / "s" / "one", "user.note") == b"kept"
    assert (root / "s" / "one").stat().st_mtime == 1_400_000_000


def test_parents_are_recreated_with_their_metadata(src: Path, root: Path) -> None:
    (src / "dir").chmod(0o750)
    parents = (("dir", src / "dir"), ("sub", src / "dir" / "sub"))
    copy_sources([_source(src / "dir" / "sub" / "b", parents)], root, "/p", owner=None, chmod=None)
    assert (root / "p" / "dir" / "sub" / "b").read_text() == "b"
    assert stat.S_IMODE((root / "p" / "dir").stat().st_mode) == 0o750


def test_make_dirs_refuses_to_go_through_a_file(root: Path) -> None:
    (root / "file").write_text("")
    with pytest.raises(ContextError, match="cannot create /file/x: /file exists and is not a directory"):
        make_dirs(root, "/file/x", None)
    make_dirs(root, "/a/b/c", Identity(5, 6))
    assert (root / "a" / "b").stat().st_uid == 5
    assert stat.S_IMODE((root / "a" / "b" / "c").stat().st_mode) == 0o755


def test_a_file_replaces_a_symlink_in_its_way_but_enters_a_linked_directory(src: Path, root: Path) -> None:
    (root / "bin").mkdir()
    (root / "bin" / "busybox").write_text("the real binary")
    os.symlink("busybox", root / "bin" / "ping")
    os.symlink("/bin", root / "bin-link")
    copy_sources([_source(src / "file.txt")], root, "/bin/ping", owner=None, chmod=None)
    copy_sources([_source(src / "file.txt")], root, "/bin-link", owner=None, chmod=None)
    assert (root / "bin" / "busybox").read_text() == "the real binary"
    assert not (root / "bin" / "ping").is_symlink() and (root / "bin" / "ping").read_text() == "file"
    assert (root / "bin" / "file.txt").read_text() == "file"


def test_setuid_survives_the_owner_change_and_a_file_in_the_way_is_replaced(src: Path, root: Path) -> None:
    (src / "dir" / "a").chmod(0o4755)
    (root / "d").mkdir()
    (root / "d" / "a").write_text("old content, longer than the new")
    (root / "d" / "a").chmod(0o600)
    copy_sources([_source(src / "dir")], root, "/d", owner=Identity(7, 8), chmod=None)
    info = (root / "d" / "a").lstat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (7, 8, 0o4755)
    assert (root / "d" / "a").read_text() == "a"


def _descriptors() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def test_a_copy_leaves_no_descriptor_open_even_when_it_fails(src: Path, root: Path) -> None:
    before = _descriptors()
    copy_sources([_source(src / "dir")], root, "/ok", owner=None, chmod=None)
    (root / "bad" / "sub" / "b").mkdir(parents=True)
    with pytest.raises(ContextError, match="cannot replace the directory /bad/sub/b"):
        copy_sources([_source(src / "dir")], root, "/bad", owner=None, chmod=None)
    assert _descriptors() == before
