"""Go's filepath.Match and moby's patternmatcher, checked against their own test tables."""

from __future__ import annotations

import pytest

from builder.patterns import BadPatternError, PatternMatcher, clean, go_match

# Go's path/filepath match_test.go
GO_MATCH = [
    ("abc", "abc", True),
    ("*", "abc", True),
    ("*c", "abc", True),
    ("a*", "a", True),
    ("a*", "abc", True),
    ("a*", "ab/c", False),
    ("a*/b", "abc/b", True),
    ("a*/b", "a/c/b", False),
    ("a*b*c*d*e*/f", "axbxcxdxe/f", True),
    ("a*b*c*d*e*/f", "axbxcxdxexxx/f", True),
    ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", False),
    ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", False),
    ("a*b?c*x", "abxbbxdbxebxczzx", True),
    ("a*b?c*x", "abxbbxdbxebxczzy", False),
    ("ab[c]", "abc", True),
    ("ab[b-d]", "abc", True),
    ("ab[e-g]", "abc", False),
    ("ab[^c]", "abc", False),
    ("ab[^b-d]", "abc", False),
    ("ab[^e-g]", "abc", True),
    ("a\\*b", "a*b", True),
    ("a\\*b", "ab", False),
    ("a?b", "a☺b", True),
    ("a[^a]b", "a☺b", True),
    ("a???b", "a☺b", False),
    ("a[^a][^a][^a]b", "a☺b", False),
    ("[a-ζ]*", "\u03b1", True),  # alpha
    ("*[a-ζ]", "A", False),
    ("a?b", "a/b", False),
    ("a*b", "a/b", False),
    ("[\\]a]", "]", True),
    ("[\\-]", "-", True),
    ("[x\\-]", "x", True),
    ("[x\\-]", "-", True),
    ("[x\\-]", "z", False),
    ("[\\-x]", "x", True),
    ("[\\-x]", "-", True),
    ("[\\-x]", "a", False),
    ("*x", "xxx", True),
    ("*", ".hidden", True),
]
GO_BAD = ["[]a]", "[-]", "[x-]", "[-x]", "\\", "[a-b-c]", "[", "[^", "[^bc", "a[", "a/b["]


@pytest.mark.parametrize(("pattern", "name", "matched"), GO_MATCH)
def test_go_match_agrees_with_go(pattern: str, name: str, matched: bool) -> None:
    assert go_match(pattern, name) is matched


@pytest.mark.parametrize("pattern", GO_BAD)
def test_go_match_rejects_what_go_rejects(pattern: str) -> None:
    with pytest.raises(BadPatternError):
        go_match(pattern, "a")


# moby/patternmatcher patternmatcher_test.go, TestMatches with MatchesOrParentMatches
MOBY_MATCHES = [
    ("**", "file", True),
    ("**/", "file", True),
    ("**", "dir/file", True),
    ("**/**", "dir/file", True),
    ("dir/**", "dir/file", True),
    ("dir/**", "dir/dir2/file", True),
    ("**/dir", "dir", True),
    ("**/dir", "dir/file", True),
    ("**/dir2/*", "dir/dir2/file", True),
    ("**/dir2/*", "dir/dir2/file/x", True),
    ("**/dir2/**", "dir/dir2/dir3/file", True),
    ("**file", "file", True),
    ("**file", "dir/dir/file", True),
    ("**/file", "dir/dir/file", True),
    ("**/file*.txt", "dir/dir/file.txt", True),
    ("**/**/*.txt", "dir/dir/file.txt", True),
    ("**/**/*.txt2", "dir/dir/file.txt", False),
    ("**/*.txt", "file.txt", True),
    ("a**/*.txt", "a/dir/dir/file.txt", True),
    ("a/*.txt", "a/dir/file.txt", False),
    ("a/*.txt", "a/file.txt", True),
    ("a/*.txt**", "a/file.txt", True),
    ("a[b-d]e", "ae", False),
    ("a[b-d]e", "ace", True),
    ("a[^b-d]e", "aze", True),
    (".*", ".foo", True),
    (".*", "foo", False),
    ("abc.def", "abcdef", False),
    ("abc.def", "abc.def", True),
    ("abc?def", "abcZdef", True),
    ("**/foo/bar", "foo/bar", True),
    ("**/foo/bar", "dir/dir2/foo/bar", True),
    ("abc/**", "abc", False),
    ("abc/**", "abc/def/ghi", True),
    ("**/.foo", ".foo", True),
    ("**/.foo", "bar.foo", False),
    ("a(b)c/def", "a(b)c/def", True),
    ("a(b)c/def", "a(b)c/xyz", False),
    ("a.|)$(}+{bc", "a.|)$(}+{bc", True),
    ("dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", True),
    ("a*", "ab/c", True),  # the parent "ab" matches
    ("a\\\\", "a\\", True),
    ("a\\*b", "a*b", True),
    ("docs", "docs/README.md", True),
]


@pytest.mark.parametrize(("pattern", "path", "matched"), MOBY_MATCHES)
def test_pattern_matcher_agrees_with_moby(pattern: str, path: str, matched: bool) -> None:
    assert PatternMatcher.compile([pattern]).matches(path) is matched


@pytest.mark.parametrize(
    ("patterns", "path", "matched"),
    [
        (["**", "!util/docker/web"], "util/docker/web/foo", False),
        (["**", "!util/docker/web", "util/docker/web/foo"], "util/docker/web/foo", True),
        (["**", "!dist/*.whl"], "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", False),
        (["!fileutils.go", "*.go"], "fileutils.go", True),
        (["*.go", "!fileutils.go"], "fileutils.go", False),
        (["docs", "!docs/README.md"], "docs/README.md", False),
        (["docs/", "!docs/README.md"], "docs/README.md", False),
        (["docs/*", "  !docs/README.md  "], "docs/README.md", False),
    ],
)
def test_the_last_matching_pattern_wins(patterns: list[str], path: str, matched: bool) -> None:
    assert PatternMatcher.compile(patterns).matches(path) is matched


@pytest.mark.parametrize("patterns", [["!"], ["["], ["a[b"], ["x/[]a]"]])
def test_malformed_patterns_are_errors(patterns: list[str]) -> None:
    with pytest.raises(BadPatternError):
        PatternMatcher.compile(patterns)


@pytest.mark.parametrize(
    ("patterns", "directory", "looks_below"),
    [
        (["node_modules"], "node_modules", False),
        (["node_modules", "!node_modules/keep"], "node_modules", True),
        (["node_modules", "!other/keep"], "node_modules", False),
        (["*", "!src/*.py"], "src", True),
        (["*", "!**/keep"], "deep", True),
        (["a", "!a"], "a", False),
    ],
)
def test_an_excluded_directory_is_entered_only_when_an_exception_may_reach_below(
    patterns: list[str], directory: str, looks_below: bool
) -> None:
    assert PatternMatcher.compile(patterns).may_include_below(directory) is looks_below


@pytest.mark.parametrize(
    ("path", "cleaned"), [("", "."), ("a//b/", "a/b"), ("//a", "/a"), ("a/../../b", "../b"), ("/..", "/")]
)
def test_clean_is_go_filepath_clean(path: str, cleaned: str) -> None:
    assert clean(path) == cleaned


WITH_PARENTS = [
    *[([pattern], path, matched) for pattern, path, matched in MOBY_MATCHES if "/" in path],
    (["**", "!util/docker/web"], "util/docker/web/foo", False),
    (["**", "!util/docker/web", "util/docker/web/foo"], "util/docker/web/foo/x", True),
    (["docs", "!docs/README.md"], "docs/README.md/x", False),
    (["a", "!a/b", "a/b/c"], "a/b/c/d", True),
    (["a", "!a/b", "a/b/c"], "a/b/d", False),
]


@pytest.mark.parametrize(("patterns", "path", "matched"), WITH_PARENTS)
def test_a_walk_matching_each_path_alone_agrees_with_matching_every_parent(
    patterns: list[str], path: str, matched: bool
) -> None:
    matcher = PatternMatcher.compile(patterns)
    parts = path.split("/")
    parents = 0
    for end in range(1, len(parts)):  # what a top-down walk carries from directory to directory
        parents = matcher.hits("/".join(parts[:end]), parents)
    assert matcher.matches(path, parents) is matched
    assert matcher.matches(path) is matched
