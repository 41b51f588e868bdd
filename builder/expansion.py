"""Dockerfile word expansion as BuildKit does it: quotes, escapes and ``$``/``${...}`` substitution.

The model is moby/buildkit ``frontend/dockerfile/shell/lex.go`` (``ProcessWord`` and
``ProcessWords``). Its quirks are kept on purpose, because the same Dockerfile must expand to the
same text here as under BuildKit; the few deliberate differences are marked where they happen.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from msgspec import Struct

from builder.errors import ExpansionError

__all__ = ["Expanded", "expand_word", "expand_words"]

# POSIX special parameters: after ``$`` each is a whole name on its own, as in lex.go.
_SPECIAL_PARAMS = frozenset("@*#?-$!0")
# Operators allowed after ``${NAME``, alone or behind ``:``; lex.go accepts ``:#`` and ``:%`` too.
_OPERATORS = frozenset("-+?#%")
# Patterns are compiled on first use (re's own cache), not at import: most builds use few of them.
# Go's unicode.IsSpace, which separates fields: Python's isspace (and \s) less \x1c-\x1f.
_GO_SPACES = r"[^\S\x1c-\x1f]+"
# Pattern tokens: these two wildcards, or a literal character (always one character long).
_STAR = "<*>"
_ANY = "<?>"
# ${...} inside ${...} deeper than this is refused rather than recursing without bound.
_MAX_DEPTH = 100
_SHOWN = 80  # characters of the source an error message quotes


class Expanded(Struct, frozen=True):
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


class _Fields:
    """Collects fields as lex.go's wordsStruct does: whitespace separates only in unquoted text
    and in the results of ``$`` expansions; empty fields (as from ``""``) are dropped."""

    def __init__(self) -> None:
        self._fields: list[str] = []
        self._current: list[str] = []

    def add(self, text: str) -> None:
        first, *rest = re.split(_GO_SPACES, text)  # by regex: a value may be megabytes long
        self._current.append(first)
        for part in rest:
            self._close()
            self._current.append(part)

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
        self._depth = 0
        self.used: set[str] = set()

    def _peek(self) -> str:
        return self._source[self._pos : self._pos + 1]

    def _next(self) -> str:
        ch = self._peek()
        self._pos += len(ch)
        return ch

    def _error(self, reason: str) -> ExpansionError:
        end = "" if reason.endswith((".", "!", "?")) else "."
        shown = self._source if len(self._source) <= _SHOWN else self._source[:_SHOWN] + "..."
        return ExpansionError(f"Cannot expand {shown!r}: {reason}{end}")

    def _lookup(self, name: str) -> str | None:
        self.used.add(name)
        return self._env.get(name)

    def run(self, stop: str, raw: bool) -> tuple[str, list[str]]:
        """Expand up to the unquoted ``stop`` character (consumed), or to the end when ``stop``
        is empty. ``raw`` keeps escape characters in the output: patterns and replacements
        are read that way so that ``\\*`` and ``\\}`` survive to the pattern compiler."""
        self._depth += 1  # each ${...} level runs once more; an error ends the whole expansion
        if self._depth > _MAX_DEPTH:
            raise self._error(f"substitutions are nested more than {_MAX_DEPTH} levels deep")
        result = self._scan(stop, raw)
        self._depth -= 1
        return result

    def _scan(self, stop: str, raw: bool) -> tuple[str, list[str]]:
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
        tokens = self._pattern(pattern)
        if every:
            return _replace_all(tokens, value, replacement)
        found = _find(tokens, value, 0, anchored=False, longest=True)
        if found is None:
            return value
        return value[: found[0]] + replacement + value[found[1] :]

    def _pattern(self, pattern: str) -> list[str]:
        """Tokens, one per pattern character. Like lex.go, ``*`` and ``?`` are wildcards
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
                tokens.append(_ANY)
            elif ch != "\\":
                tokens.append(ch)
            elif pattern[i : i + 1] in ("}", "/"):
                continue  # escaped only to get past the ${...} parser; the next char is literal
            elif pattern[i : i + 1] in ("*", "?", "\\"):
                tokens.append(pattern[i])
                i += 1
            else:
                raise self._error(f"invalid escape in pattern {pattern!r}")
        return tokens


def _find(
    tokens: Sequence[str], value: str, pos: int, *, anchored: bool, longest: bool
) -> tuple[int, int] | None:
    """The leftmost match of the pattern in ``value`` from ``pos`` (only at ``pos`` when
    anchored), the longest or the shortest one there: ``(start, end)``, or None.

    What Go's regexp (and so lex.go) finds for ``.*`` and ``.`` with greedy or lazy stars, which
    for these patterns is the same match. Walked as an NFA in time linear in the value: Python's
    backtracking re needs exponential time for a pattern such as ``${V#************b}``.
    """
    threads: dict[int, int] = {}  # token index -> the leftmost start that got there
    best: tuple[int, int] | None = None
    for at in range(pos, len(value) + 1):
        if best is None and (at == pos or not anchored):
            threads.setdefault(0, at)
        for index, token in enumerate(tokens):  # a star may also match nothing
            if token == _STAR and index in threads:
                threads[index + 1] = min(threads.get(index + 1, at), threads[index])
        start = threads.get(len(tokens))
        if start is not None and (best is None or start < best[0] or longest):
            best = (start, at)
        if best is not None:
            threads = {i: s for i, s in threads.items() if s < best[0] or (longest and s == best[0])}
        if not threads or at == len(value):
            break
        threads = _step(tokens, threads, value[at])
    return best


def _step(tokens: Sequence[str], threads: dict[int, int], char: str) -> dict[int, int]:
    """The threads after reading ``char``; like ``.`` in Go and Python, no wildcard reads \\n."""
    after: dict[int, int] = {}
    for index, start in threads.items():
        token = tokens[index] if index < len(tokens) else None
        if token in (_STAR, _ANY) and char == "\n":
            continue
        if token == _STAR:
            target = index
        elif token in (_ANY, char):
            target = index + 1
        else:
            continue
        after[target] = min(after.get(target, start), start)
    return after


def _trim(value: str, tokens: list[str], longest: bool, *, suffix: bool) -> str:
    # A match is found leftmost, not as the shortest rightmost one, so a suffix is
    # trimmed as a prefix of the reversed value with the reversed pattern.
    if suffix:
        return _trim(value[::-1], tokens[::-1], longest, suffix=False)[::-1]
    found = _find(tokens, value, 0, anchored=True, longest=longest)
    return value[found[1] :] if found else value


def _replace_all(tokens: Sequence[str], value: str, replacement: str) -> str:
    """Replace as Go's Regexp.ReplaceAllString does, with a literal replacement.

    Python's re.sub also replaces an empty match right after a non-empty one, so ``${V//*/r}``
    would give "rr" where BuildKit gives "r". Go would expand ``$1`` in the replacement; we do
    not, since a ``$`` can only get there from a value or an escape and is meant literally.
    """
    out: list[str] = []
    last_end = 0
    pos = 0
    while pos <= len(value):
        found = _find(tokens, value, pos, anchored=False, longest=True)
        if found is None:
            break
        start, end = found
        out.append(value[last_end:start])
        if end > last_end or start == 0:
            out.append(replacement)
        last_end = end
        pos = max(pos + 1, end)
    out.append(value[last_end:])
    return "".join(out)
