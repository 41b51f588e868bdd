"""Dockerfile word expansion as BuildKit does it: quotes, escapes and ``$``/``${...}`` substitution.

The model is moby/buildkit ``frontend/dockerfile/shell/lex.go`` (``ProcessWord`` and
``ProcessWords``). Its quirks are kept on purpose, because the same Dockerfile must expand to the
same text here as under BuildKit; the few deliberate differences are marked where they happen.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from builder.errors import ExpansionError

__all__ = ["Expanded", "expand_word", "expand_words"]

# POSIX special parameters: after ``$`` each is a whole name on its own, as in lex.go.
_SPECIAL_PARAMS = frozenset("@*#?-$!0")
# Operators allowed after ``${NAME``, alone or behind ``:``; lex.go accepts ``:#`` and ``:%`` too.
_OPERATORS = frozenset("-+?#%")
# Go's unicode.IsSpace, which separates fields, does not count these; Python's isspace does.
_NOT_GO_SPACE = frozenset("\x1c\x1d\x1e\x1f")
# A wildcard ``*`` among pattern tokens; every other token is an escaped literal or ``.``.
_STAR = "*"


@dataclass(frozen=True)
class Expanded:
    """The result of expanding one word."""

    text: str
    used: frozenset[str]  # every variable name looked up, whether it was set or not


def expand_word(word: str, env: Mapping[str, str], *, escape: str = "\\") -> Expanded:
    """BuildKit ProcessWord: quotes removed, escapes processed, $V ${V} and all operators
    substituted; one string out."""
    expander = _Expander(word, env, escape)
    text, _ = expander.run(stop="", raw=False)
    return Expanded(text, frozenset(expander.used))


def expand_words(
    text: str, env: Mapping[str, str], *, escape: str = "\\"
) -> tuple[list[str], frozenset[str]]:
    """BuildKit ProcessWords: like expand_word but the result is split into fields on unquoted
    whitespace (used for e.g. COPY/ADD source lists, EXPOSE)."""
    expander = _Expander(text, env, escape)
    _, fields = expander.run(stop="", raw=False)
    return fields, frozenset(expander.used)


def _is_space(ch: str) -> bool:
    return ch.isspace() and ch not in _NOT_GO_SPACE


class _Fields:
    """Collects fields as lex.go's wordsStruct does: whitespace separates only in unquoted text
    and in the results of ``$`` expansions; empty fields (as from ``""``) are dropped."""

    def __init__(self) -> None:
        self._fields: list[str] = []
        self._current: list[str] = []

    def add(self, text: str) -> None:
        for ch in text:
            if _is_space(ch):
                self._close()
            else:
                self._current.append(ch)

    def add_raw(self, text: str) -> None:
        self._current.append(text)

    def finish(self) -> list[str]:
        self._close()
        return self._fields

    def _close(self) -> None:
        field = "".join(self._current)
        if field:
            self._fields.append(field)
        self._current = []


class _Expander:
    """One pass over one source string; ``used`` gathers the names looked up on the way."""

    def __init__(self, source: str, env: Mapping[str, str], escape: str) -> None:
        if escape not in ("\\", "`"):
            raise ValueError(f"the escape character must be '\\' or '`', not {escape!r}")
        self._source = source
        self._env = env
        self._escape = escape
        self._pos = 0
        self.used: set[str] = set()

    def _peek(self) -> str:
        return self._source[self._pos : self._pos + 1]

    def _next(self) -> str:
        ch = self._peek()
        self._pos += len(ch)
        return ch

    def _error(self, reason: str) -> ExpansionError:
        end = "" if reason.endswith((".", "!", "?")) else "."
        return ExpansionError(f"Cannot expand {self._source!r}: {reason}{end}")

    def _lookup(self, name: str) -> str | None:
        self.used.add(name)
        return self._env.get(name)

    def run(self, stop: str, raw: bool) -> tuple[str, list[str]]:
        """Expand up to the unquoted ``stop`` character (consumed), or to the end when ``stop``
        is empty. ``raw`` keeps escape characters in the output: patterns and replacements
        are read that way so that ``\\*`` and ``\\}`` survive to the pattern compiler."""
        out: list[str] = []
        fields = _Fields()
        while ch := self._peek():
            if stop and ch == stop:
                self._next()
                return "".join(out), fields.finish()
            if ch == "$":
                text = self._dollar()
                fields.add(text)
            elif ch in ("'", '"'):
                text = self._single_quoted() if ch == "'" else self._double_quoted(raw)
                fields.add_raw(text)
            elif ch == self._escape:
                self._next()
                # A trailing escape character escapes nothing and vanishes (unless raw).
                text = (ch if raw else "") + self._next()
                fields.add_raw(text)
            else:
                text = self._next()
                fields.add(text)
            out.append(text)
        if stop:
            raise self._error(f"missing '{stop}'")
        return "".join(out), fields.finish()

    def _single_quoted(self) -> str:
        self._next()
        end = self._source.find("'", self._pos)
        if end < 0:
            raise self._error("unterminated single quote")
        text = self._source[self._pos : end]
        self._pos = end + 1
        return text

    def _double_quoted(self, raw: bool) -> str:
        # lex.go lets the escape character escape only '"', '$' and itself here; before anything
        # else, newline included, it stays literal. In raw mode it is kept *and* still applied,
        # which doubles it before an ordinary character: a BuildKit quirk kept as is.
        self._next()
        out: list[str] = []
        while True:
            ch = self._peek()
            if not ch:
                raise self._error("unterminated double quote")
            if ch == '"':
                self._next()
                return "".join(out)
            if ch == "$":
                out.append(self._dollar())
                continue
            self._next()
            if ch == self._escape:
                if raw:
                    out.append(ch)
                if self._peek() in ('"', "$", self._escape):
                    ch = self._next()
            out.append(ch)

    def _name(self) -> str:
        # isalpha and isdecimal are Go's unicode.IsLetter and IsDigit, which lex.go uses.
        start = self._pos
        ch = self._peek()
        if ch.isdecimal():  # positional parameters: all the digits, as in lex.go
            while self._peek().isdecimal():
                self._pos += 1
        elif ch in _SPECIAL_PARAMS:
            self._pos += 1
        else:
            while (ch := self._peek()) and (ch.isalpha() or ch.isdecimal() or ch == "_"):
                self._pos += 1
        return self._source[start : self._pos]

    def _dollar(self) -> str:
        self._next()
        if self._peek() != "{":
            name = self._name()
            # "$" before anything that cannot start a name stays a literal dollar.
            return (self._lookup(name) or "") if name else "$"
        self._next()
        if not self._peek():
            raise self._error("missing '}'")
        name = self._name()
        if not name:
            # Deliberately stricter than lex.go, which expands ${+x} or ${/a/b} against a
            # variable named "" instead of rejecting them as bash does.
            raise self._error("bad substitution")
        op = self._next()
        if op == "}":
            return self._lookup(name) or ""
        if op == "/":
            return self._replace(name)
        null_is_unset = op == ":"
        if null_is_unset:
            op = self._next()
        if not op:
            raise self._error("missing '}'")
        if op not in _OPERATORS:
            modifier = ":" + op if null_is_unset else op
            raise self._error(f"unsupported modifier '{modifier}' in ${{{name}...}}")
        # The word is expanded even when its value goes unused, as in lex.go: its errors
        # surface and its variables count as used.
        word, _ = self.run("}", raw=op in ("#", "%"))
        value = self._lookup(name)
        missing = value is None or (null_is_unset and not value)
        if op == "-":
            return word if missing else value or ""
        if op == "+":
            return "" if missing else word
        if op == "?":
            if missing and word:
                raise self._error(f"{name}: {word}")
            if missing:
                state = "unset" if value is None else "empty"
                raise self._error(f"variable {name} is not allowed to be {state}")
            return value or ""
        # The doubled operator is recognised after expansion, as lex.go does.
        longest = word[:1] == op
        pattern = self._pattern(word[1:] if longest else word)
        return _trim(value or "", pattern, longest, suffix=op == "%")

    def _replace(self, name: str) -> str:
        every = self._peek() == "/"
        if every:
            self._next()
        pattern, _ = self.run("/", raw=True)
        replacement, _ = self.run("}", raw=True)
        value = self._lookup(name) or ""
        regex = _compile(self._pattern(pattern), longest=True)
        if every:
            return _replace_all(regex, value, replacement)
        match = regex.search(value)
        if match is None:
            return value
        return value[: match.start()] + replacement + value[match.end() :]

    def _pattern(self, pattern: str) -> list[str]:
        """Regex pieces, one per pattern character. Like lex.go, ``*`` and ``?`` are wildcards
        and ``[`` is literal (no bracket expressions); the pattern's own escape is always
        ``\\``, whatever the Dockerfile's escape character."""
        tokens: list[str] = []
        i = 0
        while i < len(pattern):
            ch = pattern[i]
            i += 1
            if ch == "*":
                tokens.append(_STAR)
            elif ch == "?":
                tokens.append(".")
            elif ch != "\\":
                tokens.append(re.escape(ch))
            elif pattern[i : i + 1] in ("}", "/"):
                continue  # escaped only to get past the ${...} parser; the next char is literal
            elif pattern[i : i + 1] in ("*", "?", "\\"):
                tokens.append(re.escape(pattern[i]))
                i += 1
            else:
                raise self._error(f"invalid escape in pattern {pattern!r}")
        return tokens


def _compile(tokens: list[str], *, longest: bool) -> re.Pattern[str]:
    star = ".*" if longest else ".*?"
    return re.compile("".join(star if token == _STAR else token for token in tokens))


def _trim(value: str, tokens: list[str], longest: bool, *, suffix: bool) -> str:
    # A regex finds the leftmost match, not the shortest rightmost one, so a suffix is
    # trimmed as a prefix of the reversed value with the reversed pattern.
    if suffix:
        return _trim(value[::-1], tokens[::-1], longest, suffix=False)[::-1]
    match = _compile(tokens, longest=longest).match(value)
    return value[match.end() :] if match else value


def _replace_all(regex: re.Pattern[str], value: str, replacement: str) -> str:
    """Replace as Go's Regexp.ReplaceAllString does, with a literal replacement.

    Python's re.sub also replaces an empty match right after a non-empty one, so ``${V//*/r}``
    would give "rr" where BuildKit gives "r". Go would expand ``$1`` in the replacement; we do
    not, since a ``$`` can only get there from a value or an escape and is meant literally.
    """
    out: list[str] = []
    last_end = 0
    pos = 0
    while pos <= len(value):
        match = regex.search(value, pos)
        if match is None:
            break
        out.append(value[last_end : match.start()])
        if match.end() > last_end or match.start() == 0:
            out.append(replacement)
        last_end = match.end()
        pos = max(pos + 1, match.end())
    out.append(value[last_end:])
    return "".join(out)
