from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from builder.buildcontext import (
    BuildContext,
    FileSums,
    IgnoreRules,
    digest_entry,
    filtered_walk,
    match_root,
    split_wildcards,
)
from builder.errors import ContextError
from builder.fscopy import CopySource, copy_sources, describe
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
    assert [entry.rel for entry in context.entries(root)] == ["mixed", "mixed/x", "mixed/x/z.go", "top.go"]
    assert context.match("drop") == []
    assert [s.relpath for s in context.match("mixed")] == ["mixed"]


def test_walk_applies_exclude_patterns_relative_to_the_source(tmp_path: Path) -> None:
    _tree(tmp_path, {"src/a.txt": "", "src/b.md": "", "src/sub/c.txt": "", "src/sub/d.md": ""})

    context = BuildContext.load(tmp_path, None)
    (source,) = context.match("src")
    walked = [entry.rel for entry in context.entries(source, PatternMatcher.compile(["**/*.txt"]))]
    assert walked == ["b.md", "sub", "sub/d.md"]


def test_dockerfile_specific_ignore_file_wins(tmp_path: Path) -> None:
    _tree(tmp_path, {"a": "", "b": "", ".dockerignore": "a\n", "app.Dockerfile.dockerignore": "b\n"})
    context = BuildContext.load(tmp_path, tmp_path / "app.Dockerfile")
    assert [s.relpath for s in context.match("*")] == [".dockerignore", "a", "app.Dockerfile.dockerignore"]


def test_digest_entry_depends_on_content_mode_and_xattrs_not_mtime(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("1")
    first = digest_entry("f", describe(str(path)))
    os.utime(path, (1, 1))
    assert digest_entry("f", describe(str(path))) == first
    assert digest_entry("g", describe(str(path))) != first
    path.chmod(0o600)
    second = digest_entry("f", describe(str(path)))
    assert second != first
    os.setxattr(path, "user.flavour", b"salty")
    assert digest_entry("f", describe(str(path))) != second
    assert digest_entry("f", describe(str(path)), owners=True) != digest_entry("f", describe(str(path)))


@pytest.mark.parametrize(
    ("path", "split"),
    [("a/b/c", ("a/b/c", "")), ("a/*/c", ("a", "*/c")), ("*", ("", "*")), ("a/b\\*c", ("a/b\\*c", ""))],
)
def test_split_wildcards_cuts_before_the_first_wildcard_component(path: str, split: tuple[str, str]) -> None:
    assert split_wildcards(path) == split


TREE = ["a.log", "keep/x.go", "keep/y.txt", "node_modules/m/i.js", "node_modules/keep/k.js", "src/a/b/c.go"]


@pytest.mark.parametrize(
    "rules",
    [
        "*.log\nnode_modules",
        "**/*.go\n!src/a",
        "*\n!**/*.go\nsrc/a/b",
        "node_modules\n!node_modules/keep\nnode_modules/keep/k.js",
        "src\n!src/a\nsrc/a/b\n!src/a/b/c.go",
    ],
)
def test_the_walk_keeps_what_matching_every_path_alone_keeps(tmp_path: Path, rules: str) -> None:
    _tree(tmp_path, dict.fromkeys(TREE, ""))
    ignore = IgnoreRules.parse(rules)
    paths = {"/".join(p.split("/")[:end]) for p in TREE for end in range(1, p.count("/") + 2)}
    kept = {p for p in paths if not ignore.ignored(p)}
    below_kept = {"/".join(p.split("/")[:end]) for p in kept for end in range(1, p.count("/") + 1)}
    walked = [entry.rel for entry in filtered_walk(tmp_path, [(ignore.matcher, "")])]
    assert set(walked) == kept | below_kept
    assert walked == sorted(walked, key=lambda rel: rel.split("/")), "a directory comes before its contents"


def test_the_context_is_walked_once_per_build(tmp_path: Path) -> None:
    _tree(tmp_path, {"src/a": "1", "src/b": "2"})
    context = BuildContext.load(tmp_path, None)
    (source,) = context.match("src")
    first = context.entries(source)
    (tmp_path / "src" / "late").write_text("3")  # the copy writes what the key described
    assert context.entries(source) is first
    assert [entry.rel for entry in first] == ["a", "b"]
    assert context.describe(source) is context.describe(source)


def test_a_file_edited_after_the_key_fails_the_copy(tmp_path: Path) -> None:
    _tree(tmp_path, {"ctx/src/a": "keyed", "root/.keep": ""})
    context = BuildContext.load(tmp_path / "ctx", None)
    (source,) = context.match("src")
    keyed = [digest_entry(entry.rel, entry) for entry in context.entries(source)]
    (tmp_path / "ctx" / "src" / "a").write_text("edited")  # a different size: caught on any kernel
    copy = CopySource(source.path, "src", lambda: context.entries(source), top=context.describe(source))
    with pytest.raises(ContextError, match=r"src/a changed during the build"):
        copy_sources([copy], tmp_path / "root", "/app/", owner=None, chmod=None)
    assert keyed != [digest_entry("a", describe(str(tmp_path / "ctx" / "src" / "a")))], (
        "the key had seen other bytes"
    )


def test_the_cache_key_recipe_does_not_move(tmp_path: Path) -> None:
    """Pinned digests: a changed recipe would cost every user their cache (version it instead)."""
    path = tmp_path / "f"
    path.write_bytes(b"hello\n")
    path.chmod(0o644)
    os.setxattr(path, "user.k", b"v")
    os.symlink("../target", tmp_path / "l")
    (tmp_path / "sub").mkdir(mode=0o755)
    (tmp_path / "sub").chmod(0o755)
    assert (
        digest_entry("a/f", describe(str(path)))
        == "5ba0b60a9dbba0dce10501f412914005964c84837a94ecd947f6761f00030c6d"
    )
    assert digest_entry("a/l", describe(str(tmp_path / "l"))) == (
        "4f858bf5b5d1ade156fac11193c4148dca8562fefa487b9e95a3ac212d9a237c"
    )
    assert digest_entry("sub", describe(str(tmp_path / "sub"))) == (
        "8700299040f81595fb0d4f9d2a13b7434164daaf6b12719bf289100d48cb3216"
    )


def _later() -> int:
    """The start of a build a minute from now: every file made so far is old for it."""
    return time.time_ns() + 60 * 10**9


def test_file_sums_remember_a_digest_by_the_files_lstat(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"content")
    entry = describe(str(path))
    sums = FileSums(started_ns=_later())
    assert digest_entry("f", entry, sums=sums) == digest_entry("f", entry)
    signature = [entry.dev, entry.ino, entry.size, entry.mtime_ns, entry.ctime_ns]
    assert sums.kept == {str(path): [*signature, hashlib.sha256(b"content").hexdigest()]}
    assert sums.changed
    # The next build takes a remembered digest without reading the file: a planted one shows it.
    planted = FileSums({str(path): [*signature, "ab" * 32]}, started_ns=_later())
    assert planted.sha256(entry) == "ab" * 32
    assert not planted.changed


def test_file_sums_see_a_rewrite_that_keeps_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"before")
    os.utime(path, ns=(10**18, 10**18))
    old = describe(str(path))
    sums = FileSums(started_ns=_later())
    sums.sha256(old)
    time.sleep(0.01)  # past the file system's clock tick
    path.write_bytes(b"after!")  # the same size, and the same mtime put back: only the ctime moves
    os.utime(path, ns=(10**18, 10**18))
    new = describe(str(path))
    assert (new.size, new.mtime_ns) == (old.size, old.mtime_ns)
    assert FileSums(sums.kept, started_ns=_later()).sha256(new) == hashlib.sha256(b"after!").hexdigest()


def test_file_sums_do_not_keep_a_file_changed_just_before_the_build(tmp_path: Path) -> None:
    """A second write in the same clock tick would leave its lstat unchanged: such a file is read
    by every build until it has been left alone for a while."""
    path = tmp_path / "f"
    path.write_bytes(b"fresh")
    sums = FileSums()
    assert sums.sha256(describe(str(path))) == hashlib.sha256(b"fresh").hexdigest()
    assert sums.kept == {}
    assert not sums.changed
