"""Path patterns as Docker matches them: Go's ``filepath.Match`` and moby's ``patternmatcher``.

``go_match`` is a port of Go's ``path/filepath.Match`` (COPY and ADD source wildcards); its
``*`` and ``?`` never cross a ``/``. :class:`PatternMatcher` is a port of
``github.com/moby/patternmatcher`` (``.dockerignore`` and ``COPY --exclude``): ``**`` spans
directories, ``!`` re-includes, the last matching pattern wins, and a pattern that matches a
parent directory matches everything below it. Pure.
"""

from __future__ import annotations

import posixpath
import re
import warnings
from collections.abc import Iterable
from enum import Enum

from msgspec import Struct

__all__ = ["BadPatternError", "PatternMatcher", "clean", "go_match", "has_wildcards"]


class BadPatternError(ValueError):
    """A pattern Go's filepath.Match rejects (ErrBadPattern)."""


def has_wildcards(text: str) -> bool:
    """Whether ``text`` holds an unescaped ``*``, ``?`` or ``[`` (BuildKit's containsWildcards)."""
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 1
        elif text[i] in "*?[":
            return True
        i += 1
    return False


def go_match(pattern: str, name: str) -> bool:
    """Whether ``name`` matches the shell ``pattern`` exactly as Go's filepath.Match says.

    Raises :class:`BadPatternError` for a malformed pattern, as Go returns ErrBadPattern.
    """
    while pattern:
        star, chunk, pattern = _scan_chunk(pattern)
        if star and not chunk:
            return "/" not in name  # a trailing * matches the rest, unless it has a /
        rest = _match_chunk(chunk, name)
        if rest is not None and (not rest or pattern):
            name = rest
            continue
        if star:
            found = _match_after_star(chunk, name, last=not pattern)
            if found is not None:
                name = found
                continue
        while pattern:  # no match: the rest of the pattern must still be well formed
            _, chunk, pattern = _scan_chunk(pattern)
            _match_chunk(chunk, "")
        return False
    return not name


def _match_after_star(chunk: str, name: str, *, last: bool) -> str | None:
    """The rest of ``name`` after the star skips 1..n characters (never a /) and ``chunk`` matches."""
    for i in range(len(name)):
        if name[i] == "/":
            break
        rest = _match_chunk(chunk, name[i + 1 :])
        if rest is not None and not (last and rest):
            return rest
    return None


def _scan_chunk(pattern: str) -> tuple[bool, str, str]:
    star = False
    while pattern.startswith("*"):
        pattern, star = pattern[1:], True
    in_range = False
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            i += 1
        elif char == "[":
            in_range = True
        elif char == "]":
            in_range = False
        elif char == "*" and not in_range:
            break
        i += 1
    return star, pattern[:i], pattern[i:]


def _match_chunk(chunk: str, text: str) -> str | None:
    """The rest of ``text`` after ``chunk`` matched its start, or None; checks the syntax fully."""
    failed = False
    while chunk:
        if not failed and not text:
            failed = True
        head = chunk[0]
        if head == "[":
            char = ""
            if not failed:
                char, text = text[0], text[1:]
            matched, chunk = _match_class(chunk[1:], char)
            failed = failed or not matched
        elif head == "?":
            if not failed:
                failed = text[0] == "/"
                text = text[1:]
            chunk = chunk[1:]
        else:
            if head == "\\":
                chunk = chunk[1:]
                if not chunk:
                    raise BadPatternError("a trailing backslash escapes nothing")
            if not failed:
                failed = chunk[0] != text[0]
                text = text[1:]
            chunk = chunk[1:]
    return None if failed else text


def _match_class(chunk: str, char: str) -> tuple[bool, str]:
    """Match ``char`` against a ``[...]`` class whose body starts ``chunk``; returns the rest."""
    negated = chunk.startswith("^")
    if negated:
        chunk = chunk[1:]
    matched = False
    ranges = 0
    while True:
        if chunk.startswith("]") and ranges:
            chunk = chunk[1:]
            break
        low, chunk = _class_char(chunk)
        high = low
        if chunk[0] == "-":
            high, chunk = _class_char(chunk[1:])
        matched = matched or (char != "" and low <= char <= high)
        ranges += 1
    return matched != negated, chunk


def _class_char(chunk: str) -> tuple[str, str]:
    if not chunk or chunk[0] in "-]":
        raise BadPatternError("a character class has an empty or misplaced range")
    if chunk[0] == "\\":
        chunk = chunk[1:]
        if not chunk:
            raise BadPatternError("a character class ends in a backslash")
    rest = chunk[1:]
    if not rest:
        raise BadPatternError("a character class is not closed with ]")
    return chunk[0], rest


class _Kind(Enum):
    EXACT = 1
    PREFIX = 2
    SUFFIX = 3
    REGEX = 4


_REGEX_ESCAPE = frozenset(".+()|{}$")


class _Pattern(Struct, frozen=True):
    text: str  # cleaned, without the leading "!"
    exclusion: bool
    kind: _Kind
    regex: re.Pattern[str] | None

    def match(self, path: str) -> bool:
        if self.kind is _Kind.EXACT:
            return path == self.text
        if self.kind is _Kind.PREFIX:
            return path.startswith(self.text[:-2])
        if self.kind is _Kind.SUFFIX:
            suffix = self.text[2:]
            return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None


def _compile(text: str) -> tuple[_Kind, re.Pattern[str] | None]:
    """patternmatcher's ``compile``: a kind, and a regex when the kind needs one."""
    out: list[str] = []
    kind = _Kind.EXACT
    i = 0
    first = True
    while i < len(text):
        char = text[i]
        i += 1
        if char == "*" and text.startswith("*", i):
            i += 1
            if text.startswith("/", i):
                i += 1
            if i >= len(text):
                if kind is _Kind.EXACT:
                    kind = _Kind.PREFIX
                else:
                    out.append(".*")
                    kind = _Kind.REGEX
            else:
                out.append("(?:.*/)?")
                kind = _Kind.REGEX
            if first:
                kind = _Kind.SUFFIX
        elif char in "*?":
            out.append("[^/]*" if char == "*" else "[^/]")
            kind = _Kind.REGEX
        elif char in _REGEX_ESCAPE:
            out.append("\\" + char)
        elif char == "\\":
            if i < len(text):
                out.append(re.escape(text[i]))
                i += 1
                kind = _Kind.REGEX
            else:
                out.append("\\\\")
        elif char in "[]":
            out.append(char)
            kind = _Kind.REGEX
        else:
            out.append(char)  # "^" too: an anchor outside a class, a negation inside, as in Go
        first = False
    if kind is not _Kind.REGEX:
        return kind, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Python's FutureWarning about "[[" in a class
            return kind, re.compile("".join(out))
    except re.error as exc:
        raise BadPatternError(str(exc)) from exc


class PatternMatcher(Struct, frozen=True):
    """A list of ``.dockerignore``-style patterns; :meth:`matches` is MatchesOrParentMatches."""

    patterns: tuple[_Pattern, ...]

    @classmethod
    def compile(cls, lines: Iterable[str]) -> PatternMatcher:
        """Patterns as ``patternmatcher.New`` takes them; raises BadPatternError naming the bad one."""
        patterns = []
        for line in lines:
            text = line.strip()
            if not text:
                continue
            text = clean(text)
            exclusion = text.startswith("!")
            if exclusion:
                text = text[1:]
                if not text:
                    raise BadPatternError(f"invalid pattern {line.strip()!r}: a ! needs a pattern after it")
            try:
                go_match(text, ".")  # Go's syntax check, kept for its error
                kind, regex = _compile(text)
            except BadPatternError as exc:
                raise BadPatternError(f"invalid pattern {line.strip()!r}: {exc}") from None
            patterns.append(_Pattern(text, exclusion, kind, regex))
        return cls(tuple(patterns))

    def matches(self, path: str, parents: int | None = None) -> bool:
        """Whether ``path`` (slash-separated, relative) is matched: the last matching pattern wins.

        A pattern matches when it matches the path or one of its parent directories. A top-down
        walk passes ``parents``, the :meth:`hits` of the parent directory, so that no parent is
        matched again for each path below it.
        """
        if parents is None:
            parents = self.parent_hits(path)
        matched = False
        for index, pattern in enumerate(self.patterns):
            if pattern.exclusion != matched:
                continue  # cannot change the outcome
            if parents >> index & 1 or pattern.match(path):
                matched = not pattern.exclusion
        return matched

    def hits(self, path: str, parents: int = 0) -> int:
        """The patterns matching ``path`` or, as ``parents`` says, a parent of it: bit i for the i-th."""
        for index, pattern in enumerate(self.patterns):
            if pattern.match(path):
                parents |= 1 << index
        return parents

    def parent_hits(self, path: str) -> int:
        """:meth:`hits` of the parent directory of ``path``, found from the top (0 for a top path)."""
        parts = path.split("/")
        found = 0
        for end in range(1, len(parts)):
            found = self.hits("/".join(parts[:end]), found)
        return found

    def may_include_below(self, directory: str) -> bool:
        """Whether some ``!`` pattern could re-include a path below the excluded ``directory``."""
        parts = directory.split("/")
        return any(p.exclusion and _may_match_below(p.text.split("/"), parts) for p in self.patterns)


def _may_match_below(dirs: list[str], parts: list[str]) -> bool:
    for i, have in enumerate(parts):
        if i >= len(dirs):
            return False
        if "**" in dirs[i]:
            return True
        try:
            if not go_match(dirs[i], have):
                return False
        except BadPatternError:
            return True  # a class split by "/": be safe and look below
    return len(dirs) > len(parts)


def clean(path: str) -> str:
    """Go's ``filepath.Clean`` for slash paths (POSIX keeps a leading ``//``; Go does not)."""
    cleaned = posixpath.normpath(path) if path else "."
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned
