from __future__ import annotations

import os
from pathlib import Path

import pytest

from builder.errors import ContextError
from builder.rootpath import resolve_in_root


@pytest.mark.parametrize(
    ("links", "path", "expected"),
    [
        ({}, "/a/b", "a/b"),
        ({}, "../../../etc/passwd", "etc/passwd"),
        ({"etc": "/"}, "/etc/passwd", "passwd"),
        ({"abs": "/../../../../"}, "/abs/x", "x"),
        ({"rel": "../../.."}, "/rel/x", "x"),
        ({"d/l": "../t"}, "/d/l/f", "t/f"),
    ],
)
def test_symlinks_resolve_inside_the_root(tmp_path: Path, links: dict[str, str], path: str, expected: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for name, target in links.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / name)
    assert resolve_in_root(root, path) == root / expected if expected else root


def test_last_component_is_kept_when_not_following(tmp_path: Path) -> None:
    os.symlink("/etc/shadow", tmp_path / "link")
    assert resolve_in_root(tmp_path, "/link", follow_last=False) == tmp_path / "link"
    assert resolve_in_root(tmp_path, "/link") == tmp_path / "etc" / "shadow"


def test_symlink_loops_are_an_error(tmp_path: Path) -> None:
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(ContextError, match="too many levels"):
        resolve_in_root(tmp_path, "/a/x")
