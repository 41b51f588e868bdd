from __future__ import annotations

import os
from pathlib import Path

import pytest

from builder.buildcontext import BuildContext, IgnoreRules
from builder.errors import ContextError


@pytest.mark.parametrize(
    ("patterns", "path", "ignored"),
    [
        ("*.log", "a.log", True),
        ("*.log", "dir/a.log", False),
        ("**/*.log", "dir/sub/a.log", True),
        ("**/*.log", "a.log", True),
        ("build", "build/out/x", True),
        ("/build", "build", True),
        ("node_modules\n!node_modules/keep", "node_modules/keep", False),
        ("node_modules\n!node_modules/keep", "node_modules/other", True),
        ("*\n!src", "src", False),
        ("*\n!src", "README", True),
        ("# comment\n\n", "anything", False),
        ("a?c", "abc", True),
        ("a[b-c]d", "acd", True),
        ("docs/**", "docs/a/b.md", True),
        ("./tmp", "tmp", True),
    ],
)
def test_dockerignore_matches_as_docker(patterns: str, path: str, ignored: bool) -> None:
    assert IgnoreRules.parse(patterns).ignored(path) is ignored


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_wildcards_match_one_level_and_skip_ignored(tmp_path: Path) -> None:
    _tree(tmp_path, {"a.txt": "", "b.txt": "", "c.md": "", "sub/d.txt": "", ".dockerignore": "b.txt\n"})
    context = BuildContext.load(tmp_path, None)
    assert [s.relpath for s in context.match("*.txt")] == ["a.txt"]
    assert [s.relpath for s in context.match("sub/*.txt")] == ["sub/d.txt"]
    assert context.match("b.txt") == []


def test_a_source_resolving_outside_the_context_is_refused(tmp_path: Path) -> None:
    context_dir = tmp_path / "ctx"
    context_dir.mkdir()
    os.symlink("/etc/passwd", context_dir / "escape")
    with pytest.raises(ContextError, match="outside the build context"):
        BuildContext.load(context_dir, None).match("escape")
    # ".." is cleaned against the context root, as BuildKit does: it names ctx/etc/passwd
    assert BuildContext.load(context_dir, None).match("../../etc/passwd") == []


def test_digest_depends_on_content_and_mode_not_mtime(tmp_path: Path) -> None:
    _tree(tmp_path, {"src/a": "1", "src/b/c": "2"})
    context = BuildContext.load(tmp_path, None)
    first = context.entry_digests(context.match("src"))
    os.utime(tmp_path / "src" / "a", (1, 1))
    assert context.entry_digests(context.match("src")) == first
    (tmp_path / "src" / "a").write_text("changed")
    second = context.entry_digests(context.match("src"))
    assert second != first
    (tmp_path / "src" / "a").chmod(0o600)
    assert context.entry_digests(context.match("src")) != second


def test_dockerfile_specific_ignore_file_wins(tmp_path: Path) -> None:
    _tree(tmp_path, {"a": "", "b": "", ".dockerignore": "a\n", "app.Dockerfile.dockerignore": "b\n"})
    context = BuildContext.load(tmp_path, tmp_path / "app.Dockerfile")
    assert [s.relpath for s in context.match("*")] == [".dockerignore", "a", "app.Dockerfile.dockerignore"]
