from __future__ import annotations

import os
from pathlib import Path

import pytest

from builder.buildcontext import BuildContext, IgnoreRules, entry_digest, match_root, split_wildcards
from builder.errors import ContextError
from builder.patterns import PatternMatcher


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
        ("node_modules\n!node_modules/keep", "node_modules/keep/deep", False),
        ("node_modules\n!node_modules/keep", "node_modules/other", True),
        ("*\n!src", "src", False),
        ("*\n!src", "README", True),
        ("# comment\n\n", "anything", False),
        ("  # not a comment: only column one starts one", "  # not a comment", False),
        ("a?c", "abc", True),
        ("a[b-c]d", "acd", True),
        ("a[^b]d", "acd", True),
        ("docs/**", "docs/a/b.md", True),
        ("docs/**", "docs", False),
        ("./tmp", "tmp", True),
        ("tmp/../cache", "cache", True),
        ("\ufeffbom", "bom", True),
        ("*.txt\n!important.txt\nimportant.txt", "important.txt", True),
        ("  spaced.txt  ", "spaced.txt", True),
        ("a\\*b", "a*b", True),
        ("a\\*b", "axb", False),
    ],
)
def test_dockerignore_matches_as_docker(patterns: str, path: str, ignored: bool) -> None:
    assert IgnoreRules.parse(patterns).ignored(path) is ignored


@pytest.mark.parametrize("text", ["[", "!", "a[b-", "ok\nx[]y"])
def test_a_bad_dockerignore_pattern_names_the_file_and_line(text: str) -> None:
    line = text.count("\n") + 1
    with pytest.raises(ContextError, match=rf"^\.dockerignore:{line}: invalid pattern"):
        IgnoreRules.parse(text)


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_wildcards_match_one_level_and_skip_ignored(tmp_path: Path) -> None:
    _tree(tmp_path, {"a.txt": "", "b.txt": "", "c.md": "", "sub/d.txt": "", ".dockerignore": "b.txt\n"})
    context = BuildContext.load(tmp_path, None)
    assert [s.relpath for s in context.match("*.txt")] == ["a.txt"]
    assert [s.relpath for s in context.match("sub/*.txt")] == ["sub/d.txt"]
    assert [s.relpath for s in context.match("*/d.txt")] == ["sub/d.txt"]
    assert context.match("b.txt") == []
    assert context.match("*.none") == []


def test_wildcard_matches_come_in_walk_order_and_are_not_entered(tmp_path: Path) -> None:
    _tree(tmp_path, {"b/x": "", "a/y": "", "a.z/w": "", "c": ""})
    matches = match_root(tmp_path, "[abc]*", confine=True)
    assert [s.given for s in matches] == ["a", "a.z", "b", "c"]


def test_a_wildcard_does_not_look_through_a_symlink(tmp_path: Path) -> None:
    _tree(tmp_path, {"real/f.txt": ""})
    os.symlink("real", tmp_path / "link")
    assert [s.given for s in match_root(tmp_path, "*/f.txt", confine=True)] == ["real/f.txt"]
    # a literal prefix is resolved, and so is each match itself
    assert [s.relpath for s in match_root(tmp_path, "link/*.txt", confine=True)] == ["real/f.txt"]
    assert [(s.relpath, s.name) for s in match_root(tmp_path, "lin?", confine=True)] == [("real", "link")]


@pytest.mark.parametrize(
    ("target", "pattern"),
    [("/etc/passwd", "escape"), ("../../etc", "escape/passwd"), ("/", "escape/*")],
)
def test_a_source_resolving_outside_the_context_is_refused(tmp_path: Path, target: str, pattern: str) -> None:
    context_dir = tmp_path / "ctx"
    context_dir.mkdir()
    os.symlink(target, context_dir / "escape")
    with pytest.raises(ContextError, match="resolves outside the build context: escape is a symbolic link"):
        BuildContext.load(context_dir, None).match(pattern)


def test_dotdot_in_a_source_is_cleaned_against_the_context_root(tmp_path: Path) -> None:
    _tree(tmp_path, {"etc/passwd": "in the context"})
    sources = BuildContext.load(tmp_path, None).match("../../etc/passwd")
    assert [s.path for s in sources] == [tmp_path / "etc" / "passwd"]


def test_an_ignored_directory_is_walked_only_for_what_an_exception_brings_back(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {"keep/a": "", "drop/b": "", "mixed/x/y": "", "mixed/x/z.go": "", "mixed/w": "", "top.go": ""},
    )
    (tmp_path / "emptied").mkdir()
    (tmp_path / ".dockerignore").write_text("*\n!**/*.go\n")
    context = BuildContext.load(tmp_path, None)
    (root,) = context.match(".")
    assert [rel for rel, _ in context.walk(root)] == ["mixed", "mixed/x", "mixed/x/z.go", "top.go"]
    assert context.match("drop") == []
    assert [s.relpath for s in context.match("mixed")] == ["mixed"]


def test_walk_applies_exclude_patterns_relative_to_the_source(tmp_path: Path) -> None:
    _tree(tmp_path, {"src/a.txt": "", "src/b.md": "", "src/sub/c.txt": "", "src/sub/d.md": ""})

    context = BuildContext.load(tmp_path, None)
    (source,) = context.match("src")
    walked = [rel for rel, _ in context.walk(source, PatternMatcher.compile(["**/*.txt"]))]
    assert walked == ["b.md", "sub", "sub/d.md"]


def test_dockerfile_specific_ignore_file_wins(tmp_path: Path) -> None:
    _tree(tmp_path, {"a": "", "b": "", ".dockerignore": "a\n", "app.Dockerfile.dockerignore": "b\n"})
    context = BuildContext.load(tmp_path, tmp_path / "app.Dockerfile")
    assert [s.relpath for s in context.match("*")] == [".dockerignore", "a", "app.Dockerfile.dockerignore"]


def test_entry_digest_depends_on_content_mode_and_xattrs_not_mtime(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("1")
    first = entry_digest("f", path)
    os.utime(path, (1, 1))
    assert entry_digest("f", path) == first
    assert entry_digest("g", path) != first
    path.chmod(0o600)
    second = entry_digest("f", path)
    assert second != first
    os.setxattr(path, "user.flavour", b"salty")
    assert entry_digest("f", path) != second
    assert entry_digest("f", path, owners=True) != entry_digest("f", path)


@pytest.mark.parametrize(
    ("path", "split"),
    [("a/b/c", ("a/b/c", "")), ("a/*/c", ("a", "*/c")), ("*", ("", "*")), ("a/b\\*c", ("a/b\\*c", ""))],
)
def test_split_wildcards_cuts_before_the_first_wildcard_component(path: str, split: tuple[str, str]) -> None:
    assert split_wildcards(path) == split
