"""The Dockerfile front end: line structure, heredocs, line parsers and instruction values.

Whole Dockerfiles are covered by the golden folders (test_golden_dockerfiles.py); these tests pin
the pieces whose rules come straight from BuildKit's own parser tests, and the API details the
plan does not show (lines, end lines, ONBUILD triggers).
"""

from __future__ import annotations

import pytest

from builder.dockerfile import parse_dockerfile, parse_exec_form, parse_heredoc_word, split_words
from builder.errors import DockerfileError
from builder.instructions import (
    InvalidValue,
    check_chmod,
    check_signal,
    parse_command,
    parse_ports,
)
from builder.mounts import parse_mount

# BuildKit's TestParseHeredocHelpers and TestParseExtractsHeredoc: (word, name, expand, chomp).
HEREDOC_WORDS = [
    ("<<EOF", "EOF", True, False),
    ("<<'EOF'", "EOF", False, False),
    ('<<"EOF"', "EOF", False, False),
    ("<<-EOF", "EOF", True, True),
    ("<<-'EOF'", "EOF", False, True),
    ('<<EO"F"', "EOF", False, False),
    ("<< EOF", "EOF", True, False),
    ("<<- EOF", "EOF", True, True),
    ("<< -EOF", "-EOF", True, False),
    ("3<<EOF", "EOF", True, False),
    ("<<eo'f'", "eof", False, False),
    ("<<eo\\'f", "eo'f", True, False),
    ("<<'e'o\\'f", "eo'f", False, False),
    ("<<'one two'", "one two", False, False),
    ("<<$EOF", "$EOF", True, False),
    ("<<file.txt", "file.txt", True, False),
]
NOT_HEREDOCS = ["", "EOF", "<<", "<<-", "<EOF", "<<<EOF", "<<EOF sh", "<<'EOF", "<<EOF'", '"<<EOF"']


@pytest.mark.parametrize(("word", "name", "expand", "chomp"), HEREDOC_WORDS)
def test_heredoc_words_as_buildkit_reads_them(word: str, name: str, expand: bool, chomp: bool) -> None:
    doc = parse_heredoc_word(word)
    assert doc is not None
    assert (doc.name, doc.expand, doc.strip_tabs) == (name, expand, chomp)


@pytest.mark.parametrize("word", NOT_HEREDOCS)
def test_words_that_are_not_heredocs(word: str) -> None:
    assert parse_heredoc_word(word) is None


def test_heredocs_from_a_line_are_read_in_order() -> None:
    """BuildKit's `COPY <<X <<Y /dest` case: each body ends at its own delimiter only."""
    text = "FROM a\nCOPY <<X <<Y /dest\nY\nX\nX\nY\nRUN true\n"
    copy, run = parse_dockerfile(text).instructions[1:]
    assert [(doc.name, doc.content) for doc in copy.heredocs] == [("X", "Y\n"), ("Y", "X\n")]
    assert (copy.line, copy.end_line, run.line) == (2, 6, 7)


def test_a_chomped_body_keeps_its_tabs_until_it_is_used() -> None:
    doc = parse_dockerfile("FROM a\nRUN <<-EOF\n\tbaz\n\tquux\n\tEOF\n").instructions[1].heredocs[0]
    assert (doc.content, doc.text) == ("\tbaz\n\tquux\n", "baz\nquux\n")


def test_json_form_reads_no_heredoc() -> None:
    """BuildKit's TestParseJSONHeredoc: the next line is an instruction, not a body."""
    run, cmd = parse_dockerfile('FROM a\nRUN ["<<EOF"]\nCMD ["x"]\n').instructions[1:]
    assert run.exec_form == ("<<EOF",) and run.heredocs == ()
    assert cmd.keyword == "CMD"


def test_lines_of_continued_instructions_and_triggers() -> None:
    text = "FROM a\nRUN one \\\n  # comment\n\n  two\nONBUILD COPY --from=x <<EOF /f\nbody\nEOF\n"
    dockerfile = parse_dockerfile(text)
    run, onbuild = dockerfile.instructions[1:]
    assert (run.line, run.end_line, run.args) == (2, 5, "one   two")
    assert dockerfile.empty_continuations == (2,)
    assert onbuild.trigger is not None
    assert (onbuild.trigger.keyword, onbuild.trigger.flags) == ("COPY", (("from", "x"),))
    assert onbuild.trigger.heredocs[0].content == "body\n"
    assert onbuild.end_line == 8


def test_nul_bytes_are_refused_outside_heredoc_bodies_only() -> None:
    assert (
        parse_dockerfile("FROM a\nCOPY <<EOF /f\n\x00\nEOF\n").instructions[1].heredocs[0].content == "\x00\n"
    )
    with pytest.raises(DockerfileError, match=r"^Dockerfile: the file contains a NUL byte"):
        parse_dockerfile("FROM a\nRUN \x00\n")


def test_directives_and_checks() -> None:
    dockerfile = parse_dockerfile("# Syntax = docker/dockerfile:1\n# check=skip=A,B;error=true\nFROM a\n")
    assert dockerfile.directive("syntax") == "docker/dockerfile:1"
    assert dockerfile.checks() == (frozenset({"A", "B"}), True)
    assert parse_dockerfile("FROM a\n").checks() == (frozenset(), False)


# BuildKit's parseWords: quotes and escapes stay in the words, for the expansion to remove.
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a b  c", ["a", "b", "c"]),
        ('A="b c" D=e', ['A="b c"', "D=e"]),
        ("A='x y' B=", ["A='x y'", "B="]),
        ("A=b\\ c", ["A=b\\ c"]),
        ('A="a\\"b"', ['A="a\\"b"']),
        ('""', ['""']),
        ("trailing\\", ["trailing"]),
    ],
)
def test_split_words(text: str, words: list[str]) -> None:
    assert split_words(text, "\\") == words


@pytest.mark.parametrize(
    ("args", "result"),
    [
        ('["a", "b"]', ("a", "b")),
        ("[]", ()),
        ('  ["a"]', ("a",)),
        ("['a']", None),
        ('["a"] trailing', None),
        ("echo [a]", None),
        ('["c:\\windows"]', None),
    ],
)
def test_exec_form(args: str, result: tuple[str, ...] | None) -> None:
    assert parse_exec_form(args) == result


def test_exec_form_with_other_values_is_an_error() -> None:
    with pytest.raises(ValueError, match="array of strings"):
        parse_exec_form('["sleep", 10]')


def test_flags_are_checked_per_instruction() -> None:
    dockerfile = parse_dockerfile("FROM a\nCOPY --link --exclude=a --exclude=b --chmod=755 s /d/\n")
    copy = parse_command(dockerfile.instructions[1], dockerfile)
    assert copy.flags == {"link": True, "exclude": ["a", "b"], "chmod": "755"}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("80", ["80/tcp"]),
        ("080", ["80/tcp"]),
        ("53/UDP", ["53/udp"]),
        ("7-9/sctp", ["7/sctp", "8/sctp", "9/sctp"]),
        ("127.0.0.1:8080:80", ["80/tcp"]),
    ],
)
def test_ports(spec: str, expected: list[str]) -> None:
    assert parse_ports(spec) == expected


@pytest.mark.parametrize("spec", ["", "http", "80/http", "9-7", "65536", "1-99999999999999999999"])
def test_invalid_ports(spec: str) -> None:
    with pytest.raises(InvalidValue):
        parse_ports(spec)


@pytest.mark.parametrize(
    "mode", ["755", "0644", "7777", "+x", "u=rwX,go=rX", "g=u", "a-w", "=644", "ug+s,o-rwx"]
)
def test_chmod_octal_and_symbolic(mode: str) -> None:
    check_chmod(mode)


@pytest.mark.parametrize("mode", ["", "10000", "9", "u=q", "x+", "u+r,", "rwx"])
def test_invalid_chmod(mode: str) -> None:
    with pytest.raises(InvalidValue):
        check_chmod(mode)


@pytest.mark.parametrize("signal", ["SIGKILL", "kill", "9", "SIGRTMIN+15", "RTMAX-14", "sigwinch"])
def test_signals(signal: str) -> None:
    check_signal(signal)


@pytest.mark.parametrize("signal", ["0", "SIGNOPE", "RTMIN+16", ""])
def test_invalid_signals(signal: str) -> None:
    with pytest.raises(InvalidValue):
        check_signal(signal)


def _mount(spec: str, workdir: str = "/w", ssh: int = 0) -> object:
    def resolve(ref: str) -> tuple[int | None, str | None]:
        return (0, None) if ref == "build" else (None, ref)

    return parse_mount(
        spec, lambda word: word.replace("$T", "/t"), workdir=workdir, ssh_index=ssh, resolve_from=resolve
    )


@pytest.mark.parametrize(
    ("spec", "fields"),
    [
        ("target=.", {"type": "bind", "target": "/w", "readonly": True}),
        ("type=bind,from=build,source=/out,target=/o,rw", {"from_stage": 0, "readonly": False}),
        ("type=cache,target=$T", {"id": "/t", "sharing": "shared", "readonly": False}),
        ("type=cache,target=c,id=x,sharing=LOCKED,mode=0700,uid=1", {"target": "/w/c", "mode": 0o700}),
        ("type=tmpfs,dst=/tmp,size=1g", {"size": 2**30, "readonly": False}),
        ("type=secret,id=npm", {"target": "/run/secrets/npm", "readonly": True}),
        ("type=secret,id=KEY,env=KEY", {"target": "", "env": "KEY"}),
        ("type=secret,source=gh,target=/s", {"id": "gh", "source": ""}),
        ("type=ssh,required", {"id": "default", "target": "/run/buildkit/ssh_agent.0", "required": True}),
    ],
)
def test_mounts(spec: str, fields: dict[str, object]) -> None:
    mount = _mount(spec)
    assert {name: getattr(mount, name) for name in fields} == fields


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("type=cache", "needs a target"),
        ("type=cache,traget=/c", "did you mean target"),
        ("type=volume,target=/v", "unsupported --mount type"),
        ("type=bind,target=/", "cannot be mounted on /"),
        ("type=bind,target=/b,sharing=locked", "only cache mounts"),
        ("type=secret,id=a,source=b", "not both"),
        ("type=secret", "needs an id"),
        ("type=cache,target=/c,mode=999", "octal"),
        ("type=bind,target=/b,ro=maybe", "not a boolean"),
        ("type=bind,target=/b,from=$X", "variables are not expanded"),
        ("type=cache,target=/c,sharing=all", "shared, private or locked"),
        ("type=cache,target", "needs a value"),
    ],
)
def test_invalid_mounts(spec: str, message: str) -> None:
    with pytest.raises(InvalidValue, match=message):
        _mount(spec)
