"""Dockerfile text → typed, located instructions.

The line structure follows BuildKit's ``frontend/dockerfile/parser``: parser directives at the
top, comment lines dropped (also inside continuations), empty continuation lines skipped with a
warning, the escape character continuing a line, then the instruction word, its ``--flags`` and
the argument text; RUN, COPY and ADD (also behind ONBUILD) read the heredoc bodies that follow.
``dockerfile_parse`` gives the line structure: where each instruction starts. It ends an
instruction at an empty continuation line and reads heredoc bodies as instructions, so the
scanner below reads each instruction from its start as BuildKit's parser does, past both. Pure.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable

from msgspec import Struct, structs

from builder.errors import DockerfileError

__all__ = [
    "GO_SPACE",
    "INSTRUCTIONS",
    "WORD_SPACE",
    "Dockerfile",
    "Heredoc",
    "Instruction",
    "parse_dockerfile",
    "parse_exec_form",
    "parse_heredoc_word",
    "split_fields",
    "split_words",
    "suggest",
]

INSTRUCTIONS = frozenset(
    {
        "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
        "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME",
        "WORKDIR",
    }
)  # fmt: skip
# Go's unicode.IsSpace; Python's isspace also counts \x1c-\x1f, which Go does not.
GO_SPACE = (
    " \t\n\v\f\r\x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
_EXEC_FORM = frozenset({"RUN", "CMD", "ENTRYPOINT", "SHELL", "COPY", "ADD", "VOLUME"})
_HEREDOC_FORM = frozenset({"RUN", "COPY", "ADD"})
_DIRECTIVES = frozenset({"syntax", "escape", "check"})
# Patterns are compiled on first use (re's own cache), not at import: most builds use few of them.
# Go regexp \s is [\t\n\f\r ]; the value is right-stripped separately (a lazy match would backtrack).
_DIRECTIVE = r"([a-zA-Z][a-zA-Z0-9]*)[\t\n\f\r ]*=[\t\n\f\r ]*(.*)"
WORD_SPACE = r"[\t\v\f\r ]+"  # between an instruction's words
_GO_SPACE_RUN = f"[{re.escape(GO_SPACE)}]+"
_HEREDOC_WORD = r"(\d*)<<(-?)[\t\n\f\r ]*([^<]*)"
_BOM = "\ufeff"


class Heredoc(Struct, frozen=True):
    """A here-document attached to RUN, COPY or ADD, its body as written (tabs not stripped)."""

    name: str
    content: str
    expand: bool  # no part of the delimiter was quoted: COPY/ADD expand variables in the body
    strip_tabs: bool  # the ``<<-`` form

    @property
    def text(self) -> str:
        """The body with leading tabs removed from every line for ``<<-``."""
        return re.sub(r"(?m)^\t+", "", self.content) if self.strip_tabs else self.content


class Instruction(Struct, frozen=True):
    """One instruction with its flags split off, located by its first and last line (1-based)."""

    keyword: str  # upper case
    word: str  # the instruction word as written, for messages
    args: str  # the argument text after the flags, continuations joined, unexpanded
    flags: tuple[tuple[str, str | None], ...]  # ("name", "value") from --name=value; None without "="
    exec_form: tuple[str, ...] | None  # the JSON array form, where the instruction has one
    heredocs: tuple[Heredoc, ...]
    line: int
    end_line: int
    source: str  # the logical line as written, for history entries and messages
    trigger: Instruction | None = None  # what an ONBUILD triggers


class Dockerfile(Struct, frozen=True):
    """A parsed Dockerfile."""

    filename: str
    escape: str
    directives: tuple[tuple[str, str], ...]
    instructions: tuple[Instruction, ...]
    empty_continuations: tuple[int, ...] = ()  # lines of instructions with empty continuation lines

    def directive(self, name: str) -> str | None:
        return dict(self.directives).get(name)

    def checks(self) -> tuple[frozenset[str], bool]:
        """The ``# check=`` directive: the rules to skip and whether warnings are errors."""
        return _checks(self.directive("check") or "error=false")


def suggest(word: str, choices: list[str] | frozenset[str], *, prefix: str = "") -> str:
    """The end of an error sentence about ``word``: ``"; did you mean X?"`` or just ``"."``."""
    import difflib  # only an error needs it (start-up of the cached path)

    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else "."


def parse_dockerfile(text: str, filename: str = "Dockerfile") -> Dockerfile:
    """Parse Dockerfile text; raises DockerfileError naming ``filename`` and the line."""
    lines = text.removeprefix(_BOM).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    directives = _directives(lines, filename)
    escape = dict(directives).get("escape", "\\")
    scanner = _Scanner(lines, escape, filename)
    instructions = []
    starts = _instruction_starts(lines)
    # dockerfile_parse drops an instruction still continued at the end of the file
    starts += [i for i in range(max(starts, default=-1) + 1, len(lines)) if _has_content(lines[i])][:1]
    for start in starts:
        if start >= scanner.pos:  # else it lies in a heredoc body or a continuation read already
            instructions.append(scanner.instruction_at(start))
    if not instructions:
        raise DockerfileError("the Dockerfile has no instructions.", filename=filename)
    return Dockerfile(filename, escape, directives, tuple(instructions), tuple(scanner.empty_continuations))


def _instruction_starts(lines: list[str]) -> list[int]:
    """Where instructions begin (0-based lines), from dockerfile_parse's line structure.

    Its structure knows continuations, comments and the escape directive, but ends an
    instruction at an empty continuation line and reads heredoc bodies as instructions: the
    scanner reads past both and skips the starts that fall inside what it has read.
    """
    # Imported here: a rebuild takes its parse from the store (with logging, 5 ms of start-up).
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(fileobj=io.BytesIO(), env_replace=False)
    parser.content = "".join(f"{line}\n" for line in lines)
    try:
        structure: list[dict[str, object]] = parser.structure
    except Exception as exc:  # foreign code: its failure must not reach the user as a traceback
        raise DockerfileError(f"cannot be split into lines: {exc}") from exc
    return [int(str(entry["startline"])) for entry in structure if entry["instruction"] != "COMMENT"]


def _directives(lines: list[str], filename: str) -> tuple[tuple[str, str], ...]:
    """Parser directives: ``# key=value`` lines before any other line, each key at most once."""
    found: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n").lstrip(GO_SPACE)
        if not line.startswith("#"):
            break
        match = re.fullmatch(_DIRECTIVE, line[1:].lstrip(GO_SPACE))
        value = match[2].rstrip("\t\n\f\r ") if match else ""
        if match is None or not value or match[1].lower() not in _DIRECTIVES:
            break
        key = match[1].lower()
        if key in found:
            raise DockerfileError(
                f"the parser directive {key!r} is given twice; each may appear only once.",
                filename=filename,
                line=number,
            )
        if key == "escape" and value not in ("\\", "`"):
            raise DockerfileError(
                f"invalid escape directive {value!r}: the escape character must be \\ or `.",
                filename=filename,
                line=number,
            )
        if key == "check":
            try:
                _checks(value)
            except ValueError as exc:
                raise DockerfileError(
                    f"invalid check directive option {str(exc)!r}: "
                    "use skip=<rules|all> and error=<true|false>, separated by ';'.",
                    filename=filename,
                    line=number,
                ) from exc
        found[key] = value
    return tuple(found.items())


def _checks(value: str) -> tuple[frozenset[str], bool]:
    """``# check=skip=<rules>;error=<bool>``, as BuildKit's linter reads it: the rules to skip
    and whether warnings fail the build. Raises ValueError naming the bad option."""
    skip: set[str] = set()
    error = False
    for part in value.split(";"):
        key, eq, setting = (text.strip() for text in part.partition("="))
        if not eq or key not in ("skip", "error", "experimental"):
            raise ValueError(part.strip())
        if key == "skip":
            skip |= {rule.strip() for rule in setting.split(",")}
        elif key == "error":
            if setting.lower() not in _GO_BOOLS:
                raise ValueError(part.strip())
            error = setting.lower() in ("1", "t", "true")
    return frozenset(skip), error


_GO_BOOLS = frozenset({"1", "t", "true", "0", "f", "false"})


def _has_content(line: str) -> bool:
    text = line.strip(GO_SPACE)
    return bool(text) and not text.startswith("#")


def _is_comment(line: str) -> bool:
    return line.lstrip(GO_SPACE).startswith("#")


class _Scanner:
    """Reads logical lines: continuations joined, comments dropped, heredoc bodies attached."""

    def __init__(self, lines: list[str], escape: str, filename: str) -> None:
        self.lines = lines
        self.pos = 0
        self.filename = filename
        esc = re.escape(escape)
        self.continuation = re.compile(rf"([^{esc}]){esc}[ \t]*$|^{esc}[ \t]*$")
        self.empty_continuations: list[int] = []

    def trim_continuation(self, line: str) -> tuple[str, bool]:
        """The line without its continuation character, and whether the instruction ends here."""
        if self.continuation.search(line):
            return self.continuation.sub(r"\1", line), False
        return line, True

    def next_line(self) -> str:
        """The next line outside heredoc bodies, which alone may hold NUL bytes."""
        line = self.lines[self.pos]
        self.pos += 1
        if "\x00" in line:
            raise DockerfileError("the file contains a NUL byte; is it a Dockerfile?", filename=self.filename)
        return line.rstrip("\r\n")

    def instruction_at(self, index: int) -> Instruction:
        """The instruction whose first line is ``lines[index]``, with its heredoc bodies."""
        self.pos = index
        start = index + 1
        line, done = self.trim_continuation(self.next_line().lstrip(GO_SPACE))
        parts = [line]
        empty = False
        while not done and self.pos < len(self.lines):
            raw = self.next_line()
            if _is_comment(raw):
                continue
            if not raw.lstrip(GO_SPACE):
                empty = True
                continue
            raw, done = self.trim_continuation(raw)
            parts.append(raw)
        if empty:
            self.empty_continuations.append(start)
        return self.instruction("".join(parts), start)

    def error(self, message: str, line: int) -> DockerfileError:
        return DockerfileError(message, filename=self.filename, line=line)

    def instruction(self, logical: str, start: int) -> Instruction:
        node = _node(logical.strip(GO_SPACE), start, self.error)
        target = node.trigger or node
        heredocs: tuple[Heredoc, ...] = ()
        if target.keyword in _HEREDOC_FORM and target.exec_form is None and "<<" in logical:
            heredocs = tuple(self.read_heredoc(doc, start) for doc in _heredoc_words(logical))
        if node.trigger is not None:
            trigger = structs.replace(node.trigger, heredocs=heredocs, end_line=self.pos)
            return structs.replace(node, trigger=trigger, end_line=self.pos)
        return structs.replace(node, heredocs=heredocs, end_line=self.pos)

    def read_heredoc(self, doc: Heredoc, start: int) -> Heredoc:
        body: list[str] = []
        while self.pos < len(self.lines):
            raw = self.lines[self.pos]
            self.pos += 1
            candidate = raw.rstrip("\r\n")
            if (candidate.lstrip("\t") if doc.strip_tabs else candidate) == doc.name:
                return Heredoc(doc.name, "".join(body), doc.expand, doc.strip_tabs)
            # BuildKit keeps the \r of CRLF lines in the body, an open bug (moby/buildkit#4282)
            # that breaks every script written on Windows; the line ending becomes \n here.
            body.append(raw.removesuffix("\r") + "\n")
        raise self.error(
            f"unterminated heredoc <<{doc.name}: no line {doc.name!r} ends it before the end of the file.",
            start,
        )


def _node(logical: str, line: int, error: _ErrorAt) -> Instruction:
    """Split a logical line into instruction word, flags and arguments (BuildKit's splitCommand)."""
    word, *rest = re.split(WORD_SPACE, logical, maxsplit=1)
    keyword = word.upper()
    if keyword not in INSTRUCTIONS:
        raise error(f"unknown instruction {word}{suggest(keyword, INSTRUCTIONS)}", line)
    args, flag_words = _split_flags(rest[0] if rest else "")
    args = args.strip(GO_SPACE)
    flags = tuple(
        (name, value if eq else None) for name, eq, value in (w[2:].partition("=") for w in flag_words)
    )
    exec_form = None
    if keyword in _EXEC_FORM:
        try:
            exec_form = parse_exec_form(args)
        except ValueError as exc:
            raise error(f"{keyword} {exc}", line) from exc
    trigger = _node(args, line, error) if keyword == "ONBUILD" and args else None
    return Instruction(keyword, word, args, flags, exec_form, (), line, line, logical, trigger)


_ErrorAt = Callable[[str, int], DockerfileError]


def _split_flags(rest: str) -> tuple[str, list[str]]:
    """Leading ``--flag`` words, quotes and backslash escapes processed, and the text after them.

    BuildKit's extractBuilderFlags: the escape is always a backslash here, even inside single
    quotes, and a lone ``--`` ends the flags.
    """
    words: list[str] = []
    pos, end = 0, len(rest)
    while pos < end:
        while pos < end and rest[pos] in GO_SPACE:
            pos += 1
        if not rest.startswith("--", pos):
            return rest[pos:], words
        word, pos, quoted = _flag_word(rest, pos)
        if word == "--" and not quoted:
            return rest[pos:], words
        if word or quoted:
            words.append(word)
    return "", words


def _flag_word(rest: str, pos: int) -> tuple[str, int, bool]:
    """One flag word from ``pos``: its text, where it ends and whether it had quotes."""
    chars: list[str] = []
    quote = ""
    quoted = False
    while pos < len(rest):
        ch = rest[pos]
        pos += 1
        if not quote and ch in GO_SPACE:
            break
        if not quote and ch in "'\"":
            quote, quoted = ch, True
        elif quote and ch == quote:
            quote = ""
        elif ch == "\\":
            if pos < len(rest):
                chars.append(rest[pos])
                pos += 1
        else:
            chars.append(ch)
    return "".join(chars), pos, quoted


def parse_exec_form(args: str) -> tuple[str, ...] | None:
    """The JSON array (exec) form; None when ``args`` is not valid JSON (then it is shell form).

    A valid JSON array that holds anything but strings is an error (ValueError), as in BuildKit.
    """
    text = args.lstrip(GO_SPACE)
    if not text.startswith("["):
        return None
    try:
        parsed = json.loads(text)
    except RecursionError:  # deeply nested arrays: valid JSON to Go, and not strings
        parsed = [None]
    except ValueError:
        return None
    if not isinstance(parsed, list):
        return None
    if not all(isinstance(item, str) for item in parsed):
        raise ValueError("in JSON (exec) form must be an array of strings only.")
    return tuple(parsed)


def _heredoc_words(line: str) -> list[Heredoc]:
    """The heredocs a line opens, in order: every word of the form ``[n]<<[-]NAME``."""
    docs = []
    for word in _raw_words(line):
        doc = parse_heredoc_word(word)
        if doc is not None:
            docs.append(doc)
    return docs


def parse_heredoc_word(word: str) -> Heredoc | None:
    """``<<EOF``, ``<<-EOF``, ``<<'EOF'`` … as an (empty) Heredoc; None for any other word."""
    match = re.fullmatch(_HEREDOC_WORD, word)
    if match is None or not match[3]:
        return None
    words, quoted = _unquote(match[3])
    if len(words) != 1 or not words[0]:
        return None
    return Heredoc(words[0], "", expand=not quoted, strip_tabs=match[2] == "-")


def _raw_words(line: str) -> list[str]:
    """Split on white space outside quotes, keeping quotes and backslash escapes as written.

    As in BuildKit's lexer, white space right after ``<<`` or ``<<-`` stays in the word: ``<< EOF``
    is one word.
    """
    words: list[str] = []
    word: list[str] = []
    quote = ""
    pos = 0
    while pos < len(line):
        ch = line[pos]
        pos += 1
        if ch == "\\" and quote != "'":
            word.append(line[pos - 1 : pos + 1])
            pos += 1
        elif quote:
            word.append(ch)
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
            word.append(ch)
        elif ch == "<" and line.startswith("<", pos):
            end = pos + 2 if line.startswith("-", pos + 1) else pos + 1
            while end < len(line) and line[end] in GO_SPACE:
                end += 1
            word.append(line[pos - 1 : end])
            pos = end
        elif ch in GO_SPACE:
            if word:
                words.append("".join(word))
            word = []
        else:
            word.append(ch)
    if word:
        words.append("".join(word))
    return words


def _unquote(text: str) -> tuple[list[str], bool]:
    """Shell words with quotes removed and escapes applied, and whether any quotes were used."""
    words: list[str] = []
    word: list[str] = []
    quote = ""
    quoted = False
    pos = 0
    while pos < len(text):
        ch = text[pos]
        pos += 1
        if quote and ch == quote:
            quote = ""
        elif quote == '"' and ch == "\\" and text[pos : pos + 1] in ('"', "\\", "$"):
            word.append(text[pos])
            pos += 1
        elif quote:
            word.append(ch)
        elif ch in "'\"":
            quote, quoted = ch, True
        elif ch == "\\":
            word.append(text[pos : pos + 1])
            pos += 1
        elif ch in GO_SPACE:
            if word:
                words.append("".join(word))
            word = []
        else:
            word.append(ch)
    if word or quoted:
        words.append("".join(word))
    return ([] if quote else words), quoted


# BuildKit's line parsers: how the argument text of an instruction splits into words.


def split_fields(text: str) -> list[str]:
    """Split on runs of spaces and tabs, as BuildKit splits FROM, EXPOSE, COPY and VOLUME."""
    return [word for word in re.split(WORD_SPACE, text) if word] if text else []


def split_words(text: str, escape: str) -> list[str]:
    """BuildKit's parseWords for ENV, LABEL and ARG: words with quotes and escapes kept."""
    if not any(ch in text for ch in ("'", '"', escape)):
        return [word for word in re.split(_GO_SPACE_RUN, text) if word]
    words: list[str] = []
    word: list[str] = []
    quote = ""
    started = blank_ok = False
    pos = 0
    while pos < len(text):
        ch = text[pos]
        pos += 1
        if not quote and ch in GO_SPACE:
            if started and (blank_ok or word):
                words.append("".join(word))
            word, started, blank_ok = [], False, False
            continue
        started = True
        if not quote and ch in "'\"":
            quote, blank_ok = ch, True
        elif quote and ch == quote:
            quote = ""
        if ch == escape and quote != "'":
            if pos == len(text):
                quote = ""
                continue
            word.append(ch)
            ch = text[pos]
            pos += 1
        word.append(ch)
    if started and (blank_ok or word):
        words.append("".join(word))
    return words
