from __future__ import annotations

import os
from pathlib import Path

import pytest

from builder.errors import ContextError
from builder.rootpath import RootEscapeError, normalize, resolve_in_root


@pytest.mark.parametrize(
    ("links", "path", "expected"),
    [
        ({}, "/a/b", "a/b"),
        ({}, "../../../etc/passwd", "etc/passwd"),
        ({"etc": "/"}, "/etc/passwd", "passwd"),
        ({"abs": "/../../../../"}, "/abs/x", "x"),
        ({"rel": "../../.."}, "/rel/x", "x"),
        ({"d/l": "../t"}, "/d/l/f", "t/f"),
        ({"d/l": "."}, "/d/l/l/l/f", "d/f"),
        ({"a": "b/c", "b/c": "/final"}, "/a/x", "final/x"),
    ],
)
def test_symlinks_resolve_inside_the_root(
    tmp_path: Path, links: dict[str, str], path: str, expected: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for name, target in links.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / name)
    assert resolve_in_root(root, path) == root / expected


def test_last_component_is_kept_when_not_following(tmp_path: Path) -> None:
    os.symlink("/etc/shadow", tmp_path / "link")
    assert resolve_in_root(tmp_path, "/link", follow_last=False) == tmp_path / "link"
    assert resolve_in_root(tmp_path, "/link") == tmp_path / "etc" / "shadow"


def test_symlink_loops_are_an_error(tmp_path: Path) -> None:
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(ContextError, match="more than 255 symbolic links"):
        resolve_in_root(tmp_path, "/a/x")


@pytest.mark.parametrize(
    ("links", "path", "link"),
    [
        ({"abs": "/etc"}, "abs/passwd", "/abs"),
        ({"up": "../outside"}, "up", "/up"),
        ({"d/up": "../../x"}, "d/up/f", "/d/up"),
        ({"d/a": "b", "d/b": "../../.."}, "d/a", "/d/b"),
    ],
)
def test_a_confined_root_refuses_links_that_point_out(
    tmp_path: Path, links: dict[str, str], path: str, link: str
) -> None:
    for name, target in links.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, tmp_path / name)
    with pytest.raises(RootEscapeError) as caught:
        resolve_in_root(tmp_path, path, confine=True)
    assert caught.value.link == link


def test_a_confined_root_follows_links_that_stay_inside(tmp_path: Path) -> None:
    (tmp_path / "d" / "real").mkdir(parents=True)
    os.symlink("real/../real", tmp_path / "d" / "in")
    assert resolve_in_root(tmp_path, "/../d/in/f", confine=True) == tmp_path / "d" / "real" / "f"


@pytest.mark.parametrize(("path", "expected"), [("", "/"), ("a/../..", "/"), ("//x//y/", "/x/y")])
def test_normalize_gives_a_clean_absolute_path(path: str, expected: str) -> None:
    assert normalize(path) == expected
