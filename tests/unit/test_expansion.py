"""Word expansion, checked against BuildKit's own expectations.

Cases marked "BuildKit" come from moby/buildkit frontend/dockerfile/shell: the envVarTest and
wordsTest fixtures and TestProcessWithMatches in lex_test.go. The others pin the same rules down
where the fixtures are silent.
"""

from __future__ import annotations

from types import MappingProxyType

import pytest

from builder.errors import ExpansionError
from builder.expansion import Expanded, expand_word, expand_words

# The environment of BuildKit's envVarTest fixture.
FIXTURE_ENV = {"PWD": "/home", "SHELL": "bash", "KOREAN": "한국어", "NULL": ""}

# BuildKit envVarTest: (word, expected text), expanded with FIXTURE_ENV.
ENV_VAR_TEST = [
    ("hello", "hello"),
    ("he'll'o", "hello"),
    (r"he\'llo", "he'llo"),
    (r"abc\tdef", "abctdef"),
    (r'"abc\tdef"', r"abc\tdef"),
    (r'"abc\\tdef"', r"abc\tdef"),
    (r"'abc\tdef'", r"abc\tdef"),
    ("hello\\", "hello"),
    (r"hello\\", "hello\\"),
    (""""hel'lo\"""", "hel'lo"),
    (r"'hello\'", "hello\\"),
    (r"'hello\there'", r"hello\there"),
    (r"'hello\\there'", r"hello\\there"),
    (""""''\"""", "''"),
    ("$.", "$."),
    ("$1", ""),
    ("he$1x", "hex"),
    ("he$.x", "he$.x"),
    ("he$pwd.", "he."),
    ("he$PWD", "he/home"),
    (r"he\$PWD", "he$PWD"),
    (r"he\\$PWD", r"he\/home"),
    (r'"he\$PWD"', "he$PWD"),
    (r'"he\\$PWD"', r"he\/home"),
    (r"\${}", "${}"),
    (r"\${}aaa", "${}aaa"),
    (r"he\${}xx", "he${}xx"),
    ("he${hi}", "he"),
    ("he${hi}xx", "hexx"),
    ("he${PWD}", "he/home"),
    ("he${XXX:-000}xx", "he000xx"),
    ("he${PWD:-000}xx", "he/homexx"),
    ("he${XXX:-$PWD}xx", "he/homexx"),
    ("he${XXX:-${PWD:-yyy}}xx", "he/homexx"),
    ("he${XXX:-${YYY:-yyy}}xx", "heyyyxx"),
    ("he${XXX:+${PWD}}xx", "hexx"),
    ("he${PWD:+${XXX}}xx", "hexx"),
    ("he${PWD:+${SHELL}}xx", "hebashxx"),
    ("he${XXX:+000}xx", "hexx"),
    ("he${PWD:+000}xx", "he000xx"),
    ("'he${XX}'", "he${XX}"),
    ('"he${PWD}"', "he/home"),
    (""""he'$PWD'\"""", "he'/home'"),
    ('"$PWD"', "/home"),
    ("'$PWD'", "$PWD"),
    (r"'\$PWD'", r"\$PWD"),
    ("'\"hello\"'", '"hello"'),
    (r"'he\$PWD'", r"he\$PWD"),
    ("he${PWD:+${PWD}:}xx", "he/home:xx"),
    (r"he${XXX:-\$PWD:}xx", "he$PWD:xx"),
    (r"he${XXX:-\${PWD}z}xx", "he${PWDz}xx"),
    ("안'녕'하세요", "안녕하세요"),
    (r"안녕\t하세요", "안녕t하세요"),
    ("안녕$KOREAN", "안녕한국어"),
    ("${aaa}}", "}"),
    ("${aaa:-bbb}}", "bbb}"),
    ("${aaa:-${bbb:-ccc}}", "ccc"),
    ("${aaa:-bbb {foo}", "bbb {foo"),
]

# BuildKit envVarTest: words that must fail, with FIXTURE_ENV.
ENV_VAR_TEST_ERRORS = [
    "he'llo",
    r"he\\'llo",
    '"hello',
    r'"hello\"',
    "'hello",
    "${}",
    "${}aaa",
    "he${}xx",
    "he${.}",
    "he${XXX:YYY}",
    "he${PWD",
    "he${PWD:=000}xx",
    "안\\\\'녕하세요",
    "${{aaa}",
    "${aaa",
    "${{aaa:-bbb}",
    "${aaa:-bbb",
    "${aaa:-bbb ${foo}",
    "${:}",
    "${:-bbb}",
    "${:+bbb}",
]


@pytest.mark.parametrize(("word", "expected"), ENV_VAR_TEST)
def test_buildkit_env_var_fixture(word: str, expected: str) -> None:
    assert expand_word(word, FIXTURE_ENV).text == expected


@pytest.mark.parametrize("word", ENV_VAR_TEST_ERRORS)
def test_buildkit_env_var_fixture_errors(word: str) -> None:
    with pytest.raises(ExpansionError):
        expand_word(word, FIXTURE_ENV)


# BuildKit TestProcessWithMatches and TestShellParserMandatoryEnvVars:
# (word, env, expected text, every name looked up).
MATCHES = [
    ("x", {"DUMMY": "dummy"}, "x", set()),
    ("x ${UNUSED}", {"DUMMY": "dummy"}, "x ", {"UNUSED"}),
    ("x ${FOO}", {"FOO": "y"}, "x y", {"FOO"}),
    (
        "${FOO-aaa} ${BAR-bbb} ${BAZ-ccc}",
        {"FOO": "xxx", "BAR": ""},
        "xxx  ccc",
        {"FOO", "BAR", "BAZ"},
    ),
    (
        "${FOO:-aaa} ${BAR:-bbb} ${BAZ:-ccc}",
        {"FOO": "xxx", "BAR": ""},
        "xxx bbb ccc",
        {"FOO", "BAR", "BAZ"},
    ),
    ("${FOO:-}", {"FOO": "xxx"}, "xxx", {"FOO"}),
    ("${FOO:-}", {}, "", {"FOO"}),
    (
        "${FOO+aaa} ${BAR+bbb} ${BAZ+ccc}",
        {"FOO": "xxx", "BAR": ""},
        "aaa bbb ",
        {"FOO", "BAR", "BAZ"},
    ),
    (
        "${FOO:+aaa} ${BAR:+bbb} ${BAZ:+ccc}",
        {"FOO": "xxx", "BAR": ""},
        "aaa  ",
        {"FOO", "BAR", "BAZ"},
    ),
    ("${FOO?aaa}", {"FOO": "xxx"}, "xxx", {"FOO"}),
    ("${BAR?bbb}", {"BAR": ""}, "", {"BAR"}),
    ("${FOO:?aaa}", {"FOO": "xxx"}, "xxx", {"FOO"}),
    ("${VAR:?message here$ARG}", {"VAR": "plain", "ARG": "x"}, "plain", {"VAR", "ARG"}),
    ("${VAR?message here$ARG}", {"VAR": "", "ARG": "x"}, "", {"VAR", "ARG"}),
    (r"${FOO#()[]{\}^$.\*\?|\\}", {"FOO": "()[]{}^$.*?|\\x"}, "x", {"FOO"}),
    (r"${FOO%%\**}", {"FOO": "xx**"}, "xx", {"FOO"}),
    ("${FOO#*x*y}", {"FOO": "xxyy"}, "y", {"FOO"}),
    ("${FOO#*}", {"FOO": "xxyy"}, "xxyy", {"FOO"}),
    ("${FOO#$BAR}", {"FOO": "xxyy", "BAR": "x"}, "xyy", {"FOO", "BAR"}),
    ("${FOO#$BAR}", {"FOO": "xxyy", "BAR": ""}, "xxyy", {"FOO", "BAR"}),
    ("${FOO#}", {"FOO": "xxyy"}, "xxyy", {"FOO"}),
    ("${FOO##*x}", {"FOO": "xxyy"}, "yy", {"FOO"}),
    ("${FOO##}", {"FOO": "xxyy"}, "xxyy", {"FOO"}),
    (r"${FOO#?\?}", {"FOO": "???y"}, "?y", {"FOO"}),
    ("${ABC:-.}${FOO%x}${ABC:-.}", {"FOO": "xxyy"}, ".xxyy.", {"FOO", "ABC"}),
    (r"${FOO%%\**\*}", {"FOO": "a***yy*"}, "a", {"FOO"}),
    ("${FOO%}", {"FOO": "xxyy"}, "xxyy", {"FOO"}),
    ("${FOO%%$BAR}", {"FOO": "xxyy", "BAR": ""}, "xxyy", {"FOO", "BAR"}),
    (
        "${FOO/$NEEDLE/.} - ${FOO//$NEEDLE/.}",
        {"FOO": "/foo*/*/*.txt", "NEEDLE": "\\*/"},
        "/foo.*/*.txt - /foo..*.txt",
        {"FOO", "NEEDLE"},
    ),
    (
        "${FOO/$NEEDLE/} - ${FOO//$NEEDLE/}",
        {"FOO": "/tmp/tmp/bar.txt", "NEEDLE": "/tmp"},
        "/tmp/bar.txt - /bar.txt",
        {"FOO", "NEEDLE"},
    ),
    (
        "${FOO/$NEEDLE/$REPLACEMENT} - ${FOO//$NEEDLE/$REPLACEMENT}",
        {"FOO": "/a/foo/b/c.txt", "NEEDLE": "/?/", "REPLACEMENT": "/"},
        "/foo/b/c.txt - /foo/c.txt",
        {"FOO", "NEEDLE", "REPLACEMENT"},
    ),
    (
        "${FOO/$NEEDLE/$REPLACEMENT}",
        {"FOO": "http://google.de", "NEEDLE": "http://", "REPLACEMENT": "https://"},
        "https://google.de",
        {"FOO", "NEEDLE", "REPLACEMENT"},
    ),
    (r"${FOO//\//\/}", {"FOO": "/tmp/foo.txt"}, r"\/tmp\/foo.txt", {"FOO"}),
    ("${FOO/$BAR/ww}", {"FOO": "xxyy", "BAR": ""}, "wwxxyy", {"FOO", "BAR"}),
    ("${FOO///}", {"FOO": "xxyy"}, "xxyy", {"FOO"}),
    ("${FOO///}", {}, "", {"FOO"}),
    (
        "v-${TARGETARCH}${TARGETVARIANT:+-${TARGETVARIANT}}",
        {"TARGETARCH": "arm", "TARGETVARIANT": "v7"},
        "v-arm-v7",
        {"TARGETARCH", "TARGETVARIANT"},
    ),
    (
        "v-${TARGETARCH}${TARGETVARIANT:+-${TARGETVARIANT}}",
        {"TARGETARCH": "arm64", "TARGETVARIANT": ""},
        "v-arm64",
        {"TARGETARCH", "TARGETVARIANT"},
    ),
]


@pytest.mark.parametrize(("word", "env", "expected", "used"), MATCHES)
def test_buildkit_process_with_matches(word: str, env: dict[str, str], expected: str, used: set[str]) -> None:
    assert expand_word(word, env) == Expanded(expected, frozenset(used))


# Operators and rules the fixtures leave implicit: (word, env, expected text).
ENV = {"A": "alpha", "E": "", "P": "/usr/local/lib/libfoo.so.1", "S": "a b"}
RULES = [
    # -, +, ? with and without the colon, against set, empty and unset
    ("${E-def}", ENV, ""),
    ("${U-def}", ENV, "def"),
    ("${E:-def}", ENV, "def"),
    ("${A+alt}", ENV, "alt"),
    ("${E+alt}", ENV, "alt"),
    ("${U+alt}", ENV, ""),
    ("${E:+alt}", ENV, ""),
    ("${A:?gone}", ENV, "alpha"),
    # prefix and suffix trimming, shortest and longest
    ("${P#*/}", ENV, "usr/local/lib/libfoo.so.1"),
    ("${P##*/}", ENV, "libfoo.so.1"),
    ("${P%.*}", ENV, "/usr/local/lib/libfoo.so"),
    ("${P%%.*}", ENV, "/usr/local/lib/libfoo"),
    ("${P%/lib?oo*}", ENV, "/usr/local/lib"),
    ("${U#x}", ENV, ""),
    # lex.go accepts a colon before # and % and ignores it
    ("${P:##*/}", ENV, "libfoo.so.1"),
    # BuildKit has no bracket expressions: [ and ] match themselves
    ("${V#[ab]}", {"V": "[ab]c"}, "c"),
    ("${V#[ab]}", {"V": "abc"}, "abc"),
    # quotes inside a pattern are removed but do not make wildcards literal
    ("${A#'al'}", ENV, "pha"),
    ('${A#"*"}', ENV, "alpha"),
    # replacement: first, all, no match, anchoring absent, unset variable
    ("${A/a/A}", ENV, "Alpha"),
    ("${A//a/A}", ENV, "AlphA"),
    ("${A/z/Z}", ENV, "alpha"),
    ("${A//?/.}", ENV, "....."),
    ("${U/a/b}", ENV, ""),
    # Go's ReplaceAll: an empty match right after a match is not replaced again
    ("${A//*/X}", ENV, "X"),
    ("${V//x*/-}", {"V": "abxdxe"}, "ab-"),
    ("${V//$E/-}", {"V": "ab"}, "-a-b-"),
    # a $ in the replacement is literal
    ("${A/a/$R}", {"A": "alpha", "R": "$1"}, "$1lpha"),
    # nesting in every operator's word
    ("${U:-${E:-${A}}}", ENV, "alpha"),
    ("${A:+<${A}>}", ENV, "<alpha>"),
    ("${P##*${X:-/}}", ENV, "libfoo.so.1"),
    ('${U:-"a}b"}', ENV, "a}b"),
    ("${U:-'${A}'}", ENV, "${A}"),
    ('"${U:-"x y"}"', ENV, "x y"),
    # names: underscores and digits, positional and special parameters, non-names
    ("$A_1-$A", {"A_1": "one", "A": "a"}, "one-a"),
    ("$12x", {"12": "twelve"}, "twelvex"),
    ("$$-$?", ENV, "-"),
    ("${#}", {"#": "3"}, "3"),
    ("a$ b", ENV, "a$ b"),
    ("a$", ENV, "a$"),
    ('"a$"', ENV, "a$"),
    ("$-x", ENV, "x"),
    # double quotes: the escape is literal before anything but " $ and itself
    (r'"a\b"', ENV, r"a\b"),
    ('"a\\\nb"', ENV, "a\\\nb"),
    (r'"\"$A\""', ENV, '"alpha"'),
    ('"it\'s"', ENV, "it's"),
    # unquoted escapes take any character, including whitespace and quotes
    (r"a\ b\"c", ENV, 'a b"c'),
    # adjacent quoting concatenates; empty quotes are empty
    ("'a'\"b\"c", ENV, "abc"),
    ("''", ENV, ""),
    ("", ENV, ""),
]


@pytest.mark.parametrize(("word", "env", "expected"), RULES)
def test_expansion_rules(word: str, env: dict[str, str], expected: str) -> None:
    assert expand_word(word, env).text == expected


# The backtick escape of `# escape=``: (word, expected text) with ENV.
BACKTICK = [
    (r"C:\Program Files\$A", r"C:\Program Files\alpha"),
    ("`$A", "$A"),
    ("a``b", "a`b"),
    ("a`", "a"),
    ('"`"$A`""', '"alpha"'),
    ('"a``b"', "a`b"),
    ('"a`b"', "a`b"),
    (r'"C:\dir"', r"C:\dir"),
    ("'`$A'", "`$A"),
    ("${U:-`}}", "}"),
    (r"${P#\*}", "/usr/local/lib/libfoo.so.1"),
]


@pytest.mark.parametrize(("word", "expected"), BACKTICK)
def test_backtick_escape(word: str, expected: str) -> None:
    assert expand_word(word, ENV, escape="`").text == expected


# The used set: (word, env, every name looked up).
USED = [
    ("$A ${B}", {}, {"A", "B"}),
    ("${A:-$B}", {"A": "set"}, {"A", "B"}),
    ("${A:+${B:-$C}}", {}, {"A", "B", "C"}),
    ("${A#$P}${A%%$Q}", {"A": "x"}, {"A", "P", "Q"}),
    ("${A/$P/$R}", {}, {"A", "P", "R"}),
    ("'$A' \\$B \"\\$C\"", {}, set()),
    ('"$A"', {}, {"A"}),
    ("$1$@", {}, {"1", "@"}),
]


@pytest.mark.parametrize(("word", "env", "used"), USED)
def test_used_names(word: str, env: dict[str, str], used: set[str]) -> None:
    assert expand_word(word, env).used == frozenset(used)


# BuildKit wordsTest, then more splitting rules: (text, env, expected fields).
WORDS_ENV = {"hi": "hi", "space": "abc  def", "leading": "  ab c", "trailing": "ab c   "}
WORDS = [
    ("hello", WORDS_ENV, ["hello"]),
    ("hello${hi}bye", {}, ["hellobye"]),
    ("hello${hi}bye", WORDS_ENV, ["hellohibye"]),
    ("hello${space}bye", WORDS_ENV, ["helloabc", "defbye"]),
    ('hello"${space}"bye', WORDS_ENV, ["helloabc  defbye"]),
    ('hello "${space}"bye', WORDS_ENV, ["hello", "abc  defbye"]),
    ("hello${leading}def", WORDS_ENV, ["hello", "ab", "cdef"]),
    ('hello"${leading}" def', WORDS_ENV, ["hello  ab c", "def"]),
    ('hello"${leading}"', WORDS_ENV, ["hello  ab c"]),
    ("hello${leading}", WORDS_ENV, ["hello", "ab", "c"]),
    ("hello${trailing}", WORDS_ENV, ["helloab", "c"]),
    ("hello${trailing}d", WORDS_ENV, ["helloab", "c", "d"]),
    ('hello"${trailing}"d', WORDS_ENV, ["helloab c   d"]),
    ('hel"lo${trailing}"', WORDS_ENV, ["helloab c   "]),
    ("hello there     ", WORDS_ENV, ["hello", "there"]),
    (r"hello\ there", WORDS_ENV, ["hello there"]),
    (r"hello\" there", WORDS_ENV, ['hello"', "there"]),
    # beyond the fixture
    ("  a\t\tb\n c  ", {}, ["a", "b", "c"]),
    ("a '' \"\" b", {}, ["a", "b"]),
    ("'a  b' c", {}, ["a  b", "c"]),
    ("${U:-x y}", {}, ["x", "y"]),
    ("${U:-'x y'}", {}, ["x", "y"]),
    ("8080/tcp ${PORTS}", {"PORTS": "53/udp 80"}, ["8080/tcp", "53/udp", "80"]),
    ("", {}, []),
    ("$E", {"E": ""}, []),
    ("a\x1cb", {}, ["a\x1cb"]),
    ("a\u00a0b", {}, ["a", "b"]),
]


@pytest.mark.parametrize(("text", "env", "expected"), WORDS)
def test_buildkit_words(text: str, env: dict[str, str], expected: list[str]) -> None:
    assert expand_words(text, env)[0] == expected


def test_words_report_used_names() -> None:
    assert expand_words("$A '$B' ${C:-$D}", {"A": "x y"}) == (["x", "y", "$B"], frozenset("ACD"))


def test_words_with_backtick_escape() -> None:
    assert expand_words(r"C:\a` b c", {}, escape="`") == ([r"C:\a b", "c"], frozenset())


def test_any_mapping_is_accepted() -> None:
    assert expand_word("$A", MappingProxyType({"A": "x"})).text == "x"


# Failures: (word, env, text the message must contain).
ERRORS = [
    ("'abc", {}, "unterminated single quote"),
    ('"abc', {}, "unterminated double quote"),
    ('${U:-"abc}', {}, "unterminated double quote"),
    ("${", {}, "missing '}'"),
    ("${A", {}, "missing '}'"),
    ("${A:", {}, "missing '}'"),
    ("${A:-x", {}, "missing '}'"),
    ("${A#x", {}, "missing '}'"),
    ("${A/x", {}, "missing '/'"),
    ("${A//ww}", {}, "missing '/'"),
    ("${A/x/y", {}, "missing '}'"),
    ("${}", {}, "bad substitution"),
    ("${:-x}", {}, "bad substitution"),
    ("${{A}}", {}, "bad substitution"),
    ("${+x}", {}, "bad substitution"),
    ("${.}", {}, "bad substitution"),
    ("${A:x}", {}, "unsupported modifier ':x'"),
    ("${A:}", {}, "unsupported modifier ':}'"),
    ("${A=x}", {}, "unsupported modifier '='"),
    ("${A:=x}", {}, "unsupported modifier ':='"),
    ("${#A}", {"A": "x"}, "unsupported modifier 'A'"),
    ("${A^^}", {"A": "x"}, "unsupported modifier '^'"),
    ("${A?}", {}, "variable A is not allowed to be unset"),
    ("${A:?}", {"A": ""}, "variable A is not allowed to be empty"),
    ("${A:?}", {}, "variable A is not allowed to be unset"),
    ("${A?set it}", {}, "A: set it"),
    ("${VAR:?message here$ARG}", {"VAR": "", "ARG": "x"}, "VAR: message herex"),
    ("${VAR?message here$ARG}", {"ARG": "x"}, "VAR: message herex"),
    ("${A:-${B:?no B}}", {"A": "set"}, "B: no B"),
    (r"${A#\x}", {"A": "x"}, "invalid escape in pattern"),
    ("${A%$P}", {"A": "x", "P": "a\\"}, "invalid escape in pattern"),
    (r"${A/\a/b}", {"A": "x"}, "invalid escape in pattern"),
]


@pytest.mark.parametrize(("word", "env", "message"), ERRORS)
def test_errors(word: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ExpansionError, match=r"^Cannot expand ") as caught:
        expand_word(word, env)
    assert message in str(caught.value)
    assert str(caught.value).endswith(".")


def test_error_message_is_a_sentence_naming_the_word() -> None:
    with pytest.raises(ExpansionError) as caught:
        expand_word("he${PWD", {})
    assert str(caught.value) == "Cannot expand 'he${PWD': missing '}'."


def test_words_errors_like_word() -> None:
    with pytest.raises(ExpansionError, match="unterminated single quote"):
        expand_words("a 'b", {})


def test_unknown_escape_character_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="escape character"):
        expand_word("a", {}, escape="^")
