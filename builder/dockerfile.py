"""Dockerfile text → typed, located instructions.

``dockerfile_parse`` supplies the line structure (continuations, comments, the escape
directive); everything it lacks is owned here: parser directives, flags, the JSON (exec) form
and heredocs. Pure: no I/O.
"""

from __future__ import annotations

import difflib
import io
import json
import re
from dataclasses import dataclass
from typing import Any

from dockerfile_parse import DockerfileParser

from builder.errors import DockerfileError

__all__ = [
    "INSTRUCTIONS",
    "Dockerfile",
    "Heredoc",
    "Instruction",
    "parse_dockerfile",
    "parse_exec_form",
]

INSTRUCTIONS = frozenset(
    {
        "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
        "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME",
        "WORKDIR",
    }
)  # fmt: skip
_JSON_FORM = frozenset({"RUN", "CMD", "ENTRYPOINT", "SHELL", "COPY", "ADD", "VOLUME"})
_HEREDOC_FORM = frozenset({"RUN", "COPY", "ADD"})
_DIRECTIVE = re.compile(r"#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.*?)\s*")
_HEREDOC = re.compile(r"<<(-?)(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\2")
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)(?:=(\S*))?")


@dataclass(frozen=True)
class Heredoc:
    """A here-document attached to RUN, COPY or ADD."""

    name: str
    content: str
    expand: bool  # an unquoted delimiter: variables in the content are expanded
    strip_tabs: bool  # the ``<<-`` form


@dataclass(frozen=True)
class Instruction:
    """One instruction, its flags split off, with the line it starts on (1-based)."""

    keyword: str
    args: str  # the argument text after the flags, continuations joined, unexpanded
    flags: tuple[tuple[str, str | None], ...]
    exec_form: tuple[str, ...] | None  # the JSON array form, when the arguments are one
    heredocs: tuple[Heredoc, ...]
    line: int
    source: str  # the instruction as written, for history entries and messages

    def flag(self, name: str) -> str | None:
        """The value of the last ``--name`` flag, or None when absent."""
        value = None
        for key, given in self.flags:
            if key == name:
                value = given if given is not None else ""
        return value


@dataclass(frozen=True)
class Dockerfile:
    """A parsed Dockerfile."""

    filename: str
    escape: str
    directives: tuple[tuple[str, str], ...]
    instructions: tuple[Instruction, ...]


def parse_dockerfile(text: str, filename: str = "Dockerfile") -> Dockerfile:
    """Parse Dockerfile text; raises DockerfileError naming ``filename`` and the line."""
    if "\x00" in text:
        raise DockerfileError("the file contains a NUL byte; is it a Dockerfile?", filename=filename)
    lines = text.splitlines()
    directives = _directives(lines)
    escape = dict(directives).get("escape", "\\")
    if escape not in ("\\", "`"):
        raise DockerfileError(
            f"invalid escape directive {escape!r}: it must be \\ or `", filename=filename, line=1
        )
    parser = DockerfileParser(fileobj=io.BytesIO(), env_replace=False)
    parser.content = text
    try:
        structure: list[dict[str, Any]] = parser.structure
    except Exception as exc:  # the parser is foreign code: never show its traceback
        raise DockerfileError(f"cannot be parsed: {exc}", filename=filename) from exc
    instructions = []
    skip_until = -1
    for entry in structure:
        start, end = int(entry["startline"]), int(entry["endline"])
        if entry["instruction"] == "COMMENT" or start <= skip_until:
            continue
        instruction, body_end = _instruction(entry, lines, filename)
        skip_until = max(end, body_end)
        instructions.append(instruction)
    return Dockerfile(filename, escape, directives, tuple(instructions))


def _directives(lines: list[str]) -> tuple[tuple[str, str], ...]:
    """Parser directives: ``# key=value`` comment lines at the very top, each at most once."""
    found: dict[str, str] = {}
    for line in lines:
        match = _DIRECTIVE.fullmatch(line.strip())
        if match is None:
            break
        key = match[1].lower()
        if key in found:
            break
        found[key] = match[2]
    return tuple(found.items())


def _instruction(entry: dict[str, Any], lines: list[str], filename: str) -> tuple[Instruction, int]:
    keyword = str(entry["instruction"]).upper()
    line = int(entry["startline"]) + 1
    source = str(entry["content"]).strip()
    if keyword not in INSTRUCTIONS:
        raise DockerfileError(_unknown_instruction(keyword), filename=filename, line=line)
    flags, args = _split_flags(str(entry["value"]))
    heredocs: tuple[Heredoc, ...] = ()
    body_end = -1
    if keyword in _HEREDOC_FORM and _HEREDOC.search(args):
        heredocs, body_end = _heredocs(args, lines, int(entry["endline"]), filename, line)
    exec_form = parse_exec_form(args) if keyword in _JSON_FORM and not heredocs else None
    return Instruction(keyword, args, flags, exec_form, heredocs, line, source), body_end


def _unknown_instruction(keyword: str) -> str:
    close = difflib.get_close_matches(keyword, sorted(INSTRUCTIONS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown instruction {keyword}{hint}"


def _split_flags(value: str) -> tuple[tuple[tuple[str, str | None], ...], str]:
    """Leading ``--name[=value]`` words are flags; the rest is the argument text."""
    flags = []
    rest = value.strip()
    while rest.startswith("--"):
        word, _, tail = rest.partition(" ")
        match = _FLAG.fullmatch(word)
        if match is None:
            break
        flags.append((match[1], match[2]))
        rest = tail.lstrip()
    return tuple(flags), rest


def parse_exec_form(args: str) -> tuple[str, ...] | None:
    """The JSON array form; anything that is not a JSON array of strings is shell form."""
    if not args.startswith("["):
        return None
    try:
        parsed = json.loads(args)
    except ValueError:
        return None
    if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
        return tuple(parsed)
    return None


def _heredocs(
    args: str, lines: list[str], end: int, filename: str, line: int
) -> tuple[tuple[Heredoc, ...], int]:
    """Collect the bodies of the heredocs named in ``args``, which follow the instruction."""
    docs = []
    cursor = end + 1
    for match in _HEREDOC.finditer(args):
        strip_tabs, quote, name = match[1] == "-", match[2], match[3]
        body = []
        while True:
            if cursor >= len(lines):
                raise DockerfileError(
                    f"unterminated heredoc <<{name}: no line {name} closes it",
                    filename=filename,
                    line=line,
                )
            text = lines[cursor]
            cursor += 1
            if (text.lstrip("\t") if strip_tabs else text) == name:
                break
            body.append(text.lstrip("\t") if strip_tabs else text)
        content = "".join(f"{text}\n" for text in body)
        docs.append(Heredoc(name, content, expand=not quote, strip_tabs=strip_tabs))
    return tuple(docs), cursor - 1
