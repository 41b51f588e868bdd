"""Fuzzing the front end: no Dockerfile, however broken or hostile, gets a traceback.

Parse, word expansion and plan are driven with generated Dockerfiles (a grammar of the
instructions, flags, quotes, escapes and substitutions), with byte-level mutations of valid ones
read through ``plan_build`` (so invalid UTF-8 and NUL bytes take the real path), and with a table
of pathological inputs (2 MB lines, 2,000-deep ``${a:-${a:-...}}``, patterns that make a
backtracking matcher explode). The only acceptable outcomes are a plan or a ``BuilderError``
whose message starts with the file name and, when it names one, a line of that file; each input
is also bounded in time, so a quadratic or exponential path shows up as a failure here.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from builder.build import BuildRequest, plan_build
from builder.dockerfile import INSTRUCTIONS, parse_dockerfile
from builder.errors import BuilderError, ExpansionError
from builder.expansion import expand_word, expand_words
from builder.oci import CONFIG_MEDIA_TYPE, canonical_json, descriptor, image_manifest, new_image_config
from builder.plan import Plan, make_plan
from builder.stages import base_images, platform_args
from builder.store import Store

# On a failure, hypothesis' pytest plugin imports libcst, whose import warns; with warnings as
# errors that would hide the failure behind an INTERNALERROR. Import it quietly now instead.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401

AUTO_ARGS = platform_args("linux", "amd64")
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SLOW_LIMIT = 10.0  # seconds for one pathological input; the bugs this catches took minutes

# Pieces that exercise every branch of the lexer, the flag splitter and the expander; those that
# break a line (or are NUL) come rarely, so that most files get past the parser to the plan.
FRAGMENTS = (
    "$", "${", "}", ":-", ":+", ":?", "-", "+", "?", "#", "##", "%", "%%", "/", "//", "*", "'", '"',
    "\\", "`", " ", "\t", "=", "[", "]", ",", '["a", "b"]', "<<", "<<-", "<<EOF", "<<'EOF'", "EOF",
    "--from=", "--chown=", "--chmod=", "--network=", "--platform=", "--interval=", "--retries=",
    "AS", "as", "0", "1", "a", "A", "_", "é", "한", "\x0b", "\x0c", "\x1c", "\x85", "\u2028",
    "\ud7ff", "\ufeff", "scratch", "base:1", "none", "host", "1s", "NONE", "CMD", "$a", "${a}",
)  # fmt: skip
BREAKS = ("\n", "\\\n", "`\n", "\r\n", "\nEOF\n", "\r", "\n# c\n", "\n\n")  # NUL: in the mutations
in_line = st.characters(blacklist_characters="\n\r\x00", blacklist_categories=("Cs",))

fragment = st.sampled_from(FRAGMENTS) | st.text(in_line, max_size=3)
word = st.lists(fragment, max_size=8).map("".join)
line_end = st.sampled_from(("",) * 24 + BREAKS)  # about one instruction in four breaks its line
keyword = st.sampled_from([*sorted(INSTRUCTIONS), *sorted(INSTRUCTIONS), "from", "Run", "FROBNICATE", ""])
flag = st.builds(
    lambda name, value: f"--{name}={value}", st.sampled_from(["from", "chown", "network", "x"]), word
)
instruction = st.builds(
    lambda kw, flags, args, end: " ".join([kw, *flags, args]) + end,
    keyword,
    st.lists(flag, max_size=2),
    word,
    line_end,
)
# The usual forms of every instruction, with fuzzed words where expansion happens: these get
# past the parser, so that the plan (scoping, expansion, flags, stages) is exercised too.
TEMPLATES = (
    "ENV {n}={w}", "ENV {n} {w}", "ARG {n}={w}", "ARG {n}", "LABEL {n}={w}", "RUN {w}", 'RUN ["{n}", "{w}"]',
    "COPY {w} /dst/", "COPY --from={s} {w} /d", "ADD {w} {w}", "WORKDIR {w}", "USER {w}", "EXPOSE {w}",
    "VOLUME {w}", 'VOLUME ["{w}"]', "CMD {w}", 'ENTRYPOINT ["{w}"]', "STOPSIGNAL {w}", 'SHELL ["{w}"]',
    "HEALTHCHECK --interval={w} --retries={w} CMD {w}", "ONBUILD RUN {w}", "RUN --network={w} true",
    "RUN <<EOF\n{w}\nEOF", "COPY <<EOF /x\n{w}\nEOF", "COPY --chown={w} --chmod={w} a /b",
)  # fmt: skip
usual = st.builds(
    lambda template, n, w, s: template.replace("{n}", n).replace("{w}", w).replace("{s}", s),
    st.sampled_from(TEMPLATES),
    st.sampled_from(["a", "A", "B", "PATH", "HOME", "SOURCE_DATE_EPOCH"]),
    st.lists(st.sampled_from(FRAGMENTS), max_size=6).map("".join),
    st.sampled_from(["stage", "0", "1", "base:1", "${a}", "nope"]),
)
names = st.sampled_from(["a", "A", "B", "PATH", "HOME", "SOURCE_DATE_EPOCH", "http_proxy", "x y", ""])
directives = st.sampled_from(
    [[], [], [], ["# escape=`"], ["# syntax=docker/dockerfile:1"], ["# check=skip=all"]]
)
images = st.sampled_from(["base:1", "base:1", "scratch", "$a", "${a:-base:1}", "0", "stage", "${b"])


@st.composite
def dockerfiles(draw: st.DrawFn) -> str:
    """A Dockerfile with the shape of a real one (directives, global ARGs, stages) and fuzzed
    insides; joined with \\n or \\r\\n, with or without a final newline. One FROM in ten is fuzzed
    too: a broken FROM stops the plan before anything else is looked at."""
    lines = draw(directives) + draw(st.lists(st.builds(lambda w: f"ARG a={w}", word), max_size=2))
    for _ in range(draw(st.integers(1, 3))):
        fuzzed = draw(st.sampled_from((False,) * 9 + (True,)))
        image = draw(word if fuzzed else images)
        name = draw(
            word.map(lambda w: f" AS {w}") if fuzzed else st.sampled_from(["", "", " AS stage", " as S2"])
        )
        lines.append(f"FROM {image}{name}")
        lines += draw(st.lists(usual | usual | usual | instruction, max_size=6))
    separator = draw(st.sampled_from(["\n", "\r\n"]))
    return separator.join(lines) + draw(st.sampled_from(["", "\n", "\\", "\\\n"]))


base_config = st.fixed_dictionaries(
    {},
    optional={
        "Env": st.lists(st.builds(lambda k, v: f"{k}={v}", names, word), max_size=3),
        "WorkingDir": word,
        "User": word,
        "Shell": st.lists(word, min_size=1, max_size=2),
        "Entrypoint": st.none() | st.lists(word, max_size=2),
    },
).map(lambda config: {"config": config})


def assert_located(message: str, filename: str, text: str) -> None:
    """The message starts with ``filename:line: `` (a line of the file) or ``filename: ``."""
    match = re.match(rf"{re.escape(filename)}(?::(\d+))?: \S", message)
    assert match is not None, f"the error has no location: {message[:300]!r}"
    if match[1] is not None:
        assert 1 <= int(match[1]) <= text.count("\n") + 1, f"the line is outside the file: {message[:300]!r}"


def plan_text(
    text: str, *, build_args: Mapping[str, str], config: dict[str, Any], target: str | None = None
) -> Plan:
    dockerfile = parse_dockerfile(text, "Dockerfile")
    refs = base_images(dockerfile, build_args, AUTO_ARGS)
    return make_plan(
        dockerfile,
        base_configs=dict.fromkeys(refs, config),
        build_args=build_args,
        auto_args=AUTO_ARGS,
        target=target,
    )


def check_text(
    text: str,
    build_args: Mapping[str, str] | None = None,
    config: dict[str, Any] | None = None,
    target: str | None = None,
) -> None:
    """Plan ``text``: a plan of plain data whose steps are lines of the file, or an error
    located in the file."""
    try:
        plan = plan_text(text, build_args=build_args or {}, config=config or {"config": {}}, target=target)
    except BuilderError as exc:
        assert_located(str(exc), "Dockerfile", text)
        return
    canonical_json(plan.to_json())  # what --print plan and the cache keys are made from
    steps = [step for stage in plan.stages for step in stage.steps]
    assert all(1 <= step.line <= text.count("\n") + 1 for step in steps)
    copies = [step for step in steps if hasattr(step, "from_image")]
    assert all(step.from_image != "" for step in copies), "COPY --from= must not name an empty image"


@FUZZ
@given(
    text=dockerfiles(),
    build_args=st.dictionaries(names, word, max_size=3),
    config=base_config,
    target=st.none() | st.sampled_from(["stage", "stage2", "nope", ""]),
)
@example(
    text="FROM a\nHEALTHCHECK --interval=" + "9" * 400 + "h CMD x", build_args={}, config={}, target=None
)
@example(text="FROM a\nCOPY --from= a b", build_args={}, config={}, target=None)
def test_generated_dockerfiles_plan_or_fail_with_a_location(
    text: str, build_args: dict[str, str], config: dict[str, Any], target: str | None
) -> None:
    check_text(text, build_args, config, target)


@FUZZ
@given(text=st.lists(fragment, max_size=40).map("".join))
def test_generated_words_expand_or_fail_with_an_expansion_error(text: str) -> None:
    env = {"a": "x*y", "A": "", "PATH": "/bin:/usr/bin"}
    for escape in ("\\", "`"):
        try:
            expand_word(text, env, escape=escape)
            expand_words(text, env, escape=escape)
        except ExpansionError as exc:
            assert str(exc).startswith("Cannot expand ")


# -- mutations of valid Dockerfiles, read as bytes through plan_build ------------------------

SEEDS = (
    b"FROM busybox:latest\nRUN echo hello > /hello.txt\nCOPY app.conf /etc/app.conf\nENV MODE=production\n"
    b'WORKDIR /srv/data\nCMD ["cat", "/hello.txt"]\n',
    b"# escape=`\nARG BASE=busybox:latest\nFROM ${BASE} AS build\nARG V=1\nRUN echo $V `\n  > /v\n"
    b'FROM scratch\nCOPY --from=build /v /v\nLABEL a=b c="d e"\nEXPOSE 80/tcp 53/udp\n',
    b"FROM busybox:latest\nRUN <<EOF\necho one\necho two\nEOF\nCOPY <<-EOT /x\n\tbody ${HOME}\n\tEOT\n"
    b'HEALTHCHECK --interval=30s --retries=3 CMD ["true"]\nUSER 1000:1000\nSHELL ["/bin/sh", "-ec"]\n',
    "FROM busybox:latest\nENV A=é B=한국어 C=${A:-x}${B#한}\nONBUILD RUN true\nSTOPSIGNAL SIGTERM\n".encode(),
)

mutation = st.tuples(
    st.sampled_from(["insert", "delete", "replace", "duplicate", "truncate"]),
    st.floats(0, 1),
    st.binary(max_size=8) | st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"${", b"\\\n"]),
)


def mutate(data: bytes, mutations: list[tuple[str, float, bytes]]) -> bytes:
    for kind, where, chunk in mutations:
        at = int(where * len(data))
        if kind == "insert":
            data = data[:at] + chunk + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + len(chunk) + 1 :]
        elif kind == "replace":
            data = data[:at] + chunk + data[at + len(chunk) :]
        elif kind == "duplicate":
            data = data[:at] + data[at : at + 40] + data[at:]
        else:
            data = data[:at]
    return data


@pytest.fixture(scope="module")
def planning_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, Path]]:
    """A store holding an image busybox:latest without layers, and a context directory."""
    root = tmp_path_factory.mktemp("fuzz-store")
    store = Store.open(root / "store")
    config = canonical_json(new_image_config("amd64") | {"rootfs": {"type": "layers", "diff_ids": []}})
    store.write_blob(config)
    manifest = store.write_blob(canonical_json(image_manifest(descriptor(CONFIG_MEDIA_TYPE, config), [])))
    store.set_tag("docker.io/library/busybox:latest", manifest)
    context = root / "context"
    context.mkdir()
    yield store, context


@FUZZ
@given(seed=st.sampled_from(SEEDS), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_dockerfiles_through_plan_build(
    planning_store: tuple[Store, Path], seed: bytes, mutations: list[tuple[str, float, bytes]]
) -> None:
    store, context = planning_store
    data = mutate(seed, mutations)
    path = context / "Dockerfile"
    path.write_bytes(data)
    try:
        plan_build(BuildRequest(context=context), store)
    except BuilderError as exc:
        assert_located(str(exc), str(path), data.decode("utf-8", "replace"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"FROM busybox:latest\nRUN echo \xff\n", r"Dockerfile:2: is not UTF-8 text \(byte 29\)"),
        (b"\xef\xbb\xbfFROM busybox:latest\n\xc3", r"Dockerfile:2: is not UTF-8 text"),
        (b"FROM busybox:latest\nRUN \x00\n", r"Dockerfile: the file contains a NUL byte"),
        (b"FROM nosuch:1\n", r"Dockerfile: the image nosuch:1 is not in the store"),
    ],
)
def test_bytes_errors_name_the_file_and_line(
    planning_store: tuple[Store, Path], data: bytes, message: str
) -> None:
    store, context = planning_store
    path = context / "Dockerfile"
    path.write_bytes(data)
    with pytest.raises(BuilderError, match=f"^{re.escape(str(context))}/{message}"):
        plan_build(BuildRequest(context=context), store)


# -- pathological inputs: each planned or refused, quickly -----------------------------------

MB2 = 2 * 1024 * 1024  # the longest lines; a quadratic path shows at a tenth of that, too
KB200 = 200 * 1024
NEST = 2000


def nested(depth: int, inner: str = "x", template: str = "${a:-%s}") -> str:
    return (template.split("%s")[0] * depth) + inner + (template.split("%s")[1] * depth)


PATHOLOGICAL = {
    "run-2mb": "FROM a\nRUN " + "x" * MB2 + "\n",
    "env-2mb-value": "FROM a\nENV A " + "y" * MB2,
    "env-pairs": "FROM a\nENV " + "a=b " * (KB200 // 4),
    "label-quotes": 'FROM a\nLABEL a="' + "\\x" * (KB200 // 2) + '"\n',
    "flags-2mb": "FROM a\nRUN " + "--a " * (MB2 // 4) + "true\n",
    "expose-ports": "FROM a\nEXPOSE " + "1 " * (KB200 // 2) + "\n",
    "copy-sources": "FROM a\nCOPY " + "s " * (KB200 // 2) + "/d/\n",
    "dollars": "FROM a\nENV A=" + "$" * KB200 + "\n",
    "braces": "FROM a\nENV A=" + "${a}" * (KB200 // 4) + "\n",
    "directive-2mb-spaces": "# a=x" + " " * MB2 + "y\nFROM a\n",
    "comment-2mb": "#" + " " * MB2 + "\nFROM a\n",
    "continuations": "FROM a\nRUN " + "a \\\n" * 50_000 + "b\n",
    "trailing-continuation": "FROM a\nRUN " + "a \\\n" * 1000,
    "heredoc-lines": "FROM a\nRUN <<EOF\n" + "x\n" * (KB200 // 2) + "EOF\n",
    "many-heredocs": "FROM a\nRUN " + "<<A " * 20_000 + "\n" + "A\n" * 20_000,
    "many-instructions": "FROM a\n" + "ENV A=${A}x\n" * 5_000,
    "many-stages": "".join(f"FROM a AS s{i}\n" for i in range(1000)),
    "nested-env": "FROM a\nENV A=" + nested(NEST) + "\n",
    "nested-from": "FROM " + nested(NEST) + "\n",
    "nested-arg": "ARG A=" + nested(NEST) + "\nFROM a\n",
    "nested-copy": "FROM a\nCOPY " + nested(NEST) + " /d\n",
    "nested-json": 'FROM a\nCOPY ["' + nested(NEST) + '", "/d"]\n',
    "nested-quoted": "FROM a\nENV A=" + nested(NEST, template='"${a:-%s}"') + "\n",
    "nested-pattern": "FROM a\nENV A=" + nested(NEST, template="${a#%s}") + "\n",
    "nested-unclosed": "FROM a\nENV A=" + "${a:-" * NEST + "\n",
    "nested-brackets": "FROM a\nCMD " + "[" * NEST + "]" * NEST + "\n",
    "stars-pattern": "FROM a\nARG V=" + "a" * 5000 + "\nENV A=${V#" + "*" * 40 + "b}\n",
    "stars-suffix": "FROM a\nARG V=" + "a" * 5000 + "\nENV A=${V%%" + "*a" * 40 + "b}\n",
    "stars-replace": "FROM a\nARG V=" + "a" * 5000 + "\nENV A=${V//" + "*a" * 40 + "b/c}\n",
    "question-marks": "FROM a\nARG V=" + "a" * 5000 + "\nENV A=${V/" + "?*" * 40 + "b/c}\n",
    "duration-huge": "FROM a\nHEALTHCHECK --interval=" + "9" * 5000 + "h CMD x\n",
    "retries-huge": "FROM a\nHEALTHCHECK --retries=" + "9" * 5000 + " CMD x\n",
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_input_is_planned_or_refused_quickly(name: str) -> None:
    text = PATHOLOGICAL[name]
    started = time.monotonic()
    check_text(text, config={"config": {}})
    elapsed = time.monotonic() - started
    assert elapsed < SLOW_LIMIT, f"{name} took {elapsed:.1f}s"


# -- properties the grammar above cannot see --------------------------------------------------

line_char = st.characters(blacklist_characters="\n\r\x00", blacklist_categories=("Cs",))


@FUZZ
@given(body=st.lists(st.text(line_char, max_size=6).filter(lambda t: t.strip() != "EOF"), max_size=5))
def test_heredoc_bodies_are_split_on_newlines_only(body: list[str]) -> None:
    """BuildKit splits lines on \\n alone: \\x85, \\u2028 or \\x0b inside a body are content."""
    text = "FROM a\nCOPY <<EOF /x\n" + "".join(f"{line}\n" for line in body) + "EOF\nRUN true\n"
    instructions = parse_dockerfile(text).instructions
    assert [ins.keyword for ins in instructions] == ["FROM", "COPY", "RUN"]
    assert instructions[1].heredocs[0].content == "".join(f"{line}\n" for line in body)
    assert instructions[2].line == len(body) + 4


@FUZZ
@given(
    keywords=st.lists(st.sampled_from(sorted(INSTRUCTIONS - {"FROM"})), min_size=1, max_size=5),
    ending=st.sampled_from(["", "\n", " \\", " \\\n", "\r\n"]),
)
def test_no_instruction_is_dropped(keywords: list[str], ending: str) -> None:
    """Every instruction is parsed, the last one too: with no argument, no final newline or a
    continuation at the end of the file (BuildKit keeps it and reports its errors)."""
    text = "FROM a\n" + "\n".join(keywords) + ending
    parsed = [ins.keyword for ins in parse_dockerfile(text).instructions]
    assert parsed == ["FROM", *keywords]


def _reference_trim(value: str, pattern: str, longest: bool) -> str:
    """A prefix trim by Python's backtracking regex: fine for the few characters used here."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    regex = regex.replace(".*", ".*" if longest else ".*?")
    match = re.match(regex, value)
    return value[match.end() :] if match else value


@FUZZ
@given(
    value=st.text("ab\n", max_size=8),
    pattern=st.text("ab*?", max_size=6),
    longest=st.booleans(),
)
def test_prefix_trim_matches_a_regex_reference(value: str, pattern: str, longest: bool) -> None:
    op = "##" if longest else "#"
    result = expand_word("${V" + op + pattern + "}", {"V": value}).text
    assert result == _reference_trim(value, pattern, longest)


@FUZZ
@given(
    value=st.text("ab\n", max_size=8),
    pattern=st.text("ab*?", min_size=1, max_size=6),
    every=st.booleans(),
)
def test_replace_matches_a_regex_reference(value: str, pattern: str, every: bool) -> None:
    regex = re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern))
    expected = value
    if every:
        expected = _go_replace_all(regex, value, "R")
    elif (match := regex.search(value)) is not None:
        expected = value[: match.start()] + "R" + value[match.end() :]
    op = "//" if every else "/"
    assert expand_word("${V" + op + pattern + "/R}", {"V": value}).text == expected


def _go_replace_all(regex: re.Pattern[str], value: str, replacement: str) -> str:
    """Go's ReplaceAllString: an empty match right after a previous match is not replaced."""
    out, last_end, pos = [], 0, 0
    while pos <= len(value) and (match := regex.search(value, pos)) is not None:
        out.append(value[last_end : match.start()])
        if match.end() > last_end or match.start() == 0:
            out.append(replacement)
        last_end = match.end()
        pos = max(pos + 1, match.end())
    out.append(value[last_end:])
    return "".join(out)
