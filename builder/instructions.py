"""Instructions → typed commands: flags checked, arguments split as BuildKit splits them.

The model is BuildKit's ``frontend/dockerfile/instructions`` (``parse.go``, ``bflag.go``). Every
instruction of every stage is checked here before any stage is planned, so a mistake in a stage
the target does not need is still reported. Values stay unexpanded: which words are expanded, in
which scope, is the plan's business. Also here: the value parsers the plan applies after
expansion (``--chmod``, ports, stop signals, durations, platforms; ``--mount`` is mounts.py's).
Pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from msgspec import Struct

from builder.dockerfile import (
    GO_SPACE,
    WORD_SPACE,
    Dockerfile,
    Heredoc,
    Instruction,
    parse_exec_form,
    parse_heredoc_word,
    split_fields,
    split_words,
    suggest,
)
from builder.errors import DockerfileError

__all__ = [
    "ArgCommand",
    "Command",
    "CopyCommand",
    "ExecCommand",
    "FromCommand",
    "HealthcheckCommand",
    "InvalidValue",
    "ListCommand",
    "OnbuildCommand",
    "PairsCommand",
    "RunCommand",
    "ValueCommand",
    "check_checksum",
    "check_chmod",
    "check_platform",
    "check_signal",
    "parse_command",
    "parse_ports",
    "parse_stages",
]

# Patterns are compiled on first use (re's own cache), not at import: most builds use few of them.
_STAGE_NAME = r"[a-z][a-z0-9\-_.]*"
# Flag kinds: "string" once, "strings" repeatable, "bool" as --flag or --flag=true|false.
_FLAGS: dict[str, dict[str, str]] = {
    "FROM": {"platform": "string"},
    "RUN": {"mount": "strings", "network": "string", "security": "string"},
    "COPY": {
        "from": "string", "chown": "string", "chmod": "string", "link": "bool", "parents": "bool",
        "exclude": "strings",
    },
    "ADD": {
        "chown": "string", "chmod": "string", "link": "bool", "keep-git-dir": "bool", "checksum": "string",
        "unpack": "bool", "exclude": "strings",
    },
    "HEALTHCHECK": {
        "interval": "string", "timeout": "string", "start-period": "string", "start-interval": "string",
        "retries": "string",
    },
}  # fmt: skip
_NETWORKS = ("default", "none", "host")
_SECURITY = ("sandbox", "insecure")
Flags = dict[str, Any]


class InvalidValue(ValueError):
    """A value is not valid; the caller adds the file and line."""


class Command(Struct, frozen=True):
    """A checked instruction; subclasses hold its arguments, still unexpanded."""

    ins: Instruction

    @property
    def keyword(self) -> str:
        return self.ins.keyword


class FromCommand(Command, frozen=True):
    image: str
    name: str | None
    platform: str | None


class ArgCommand(Command, frozen=True):
    pairs: tuple[tuple[str, str | None], ...]  # name and default, the default unexpanded


class PairsCommand(Command, frozen=True):
    """ENV and LABEL: key and value words, both expanded later."""

    pairs: tuple[tuple[str, str], ...]
    legacy: bool  # the ``ENV key value`` form


class ExecCommand(Command, frozen=True):
    """CMD, ENTRYPOINT and SHELL: the exec form's words, or the shell form's one string."""

    command: tuple[str, ...]
    shell_form: bool


class RunCommand(ExecCommand, frozen=True):
    mounts: tuple[str, ...]  # --mount values, parsed after expansion
    network: str
    security: str

    def script(self, shell: list[str]) -> tuple[list[str], tuple[tuple[str, str], ...]]:
        """The argv, and the files it needs, as BuildKit's dispatchRun makes them: a command that
        is one heredoc runs its body (from /dev/pipes/<NAME> when it starts with #!); other
        heredocs go to the shell with the command, as one script."""
        docs = self.ins.heredocs
        if not self.shell_form:
            return list(self.command), ()
        if not docs:
            return [*shell, self.command[0]], ()
        if parse_heredoc_word(self.command[0]) is None:
            return [*shell, self.command[0] + "".join(f"\n{doc.content}{doc.name}" for doc in docs)], ()
        if docs[0].text.startswith("#!"):
            path = f"/dev/pipes/{docs[0].name}"
            return [*shell, path], ((path, docs[0].text),)
        return [*shell, docs[0].text], ()


class CopyCommand(Command, frozen=True):
    sources: tuple[str, ...]
    dest: str
    contents: tuple[Heredoc, ...]  # heredoc sources, in order
    flags: Flags


class ValueCommand(Command, frozen=True):
    """WORKDIR, USER, STOPSIGNAL and MAINTAINER: the whole argument text is one value."""

    value: str


class ListCommand(Command, frozen=True):
    """EXPOSE and VOLUME."""

    values: tuple[str, ...]


class HealthcheckCommand(Command, frozen=True):
    test: tuple[str, ...]
    durations: tuple[tuple[str, int], ...]  # config key and nanoseconds, zero ones left out
    retries: int


class OnbuildCommand(Command, frozen=True):
    expression: str  # what the image config records: the instruction after ONBUILD
    trigger: Command


def parse_stages(
    dockerfile: Dockerfile,
) -> tuple[tuple[ArgCommand, ...], tuple[tuple[FromCommand, tuple[Command, ...]], ...]]:
    """Every instruction checked and grouped: the ARGs before the first FROM, then each stage's
    FROM and its instructions (BuildKit's instructions.Parse)."""
    meta: list[ArgCommand] = []
    stages: list[tuple[FromCommand, list[Command]]] = []
    for ins in dockerfile.instructions:
        cmd = parse_command(ins, dockerfile)
        if isinstance(cmd, FromCommand):
            stages.append((cmd, []))
        elif stages:
            stages[-1][1].append(cmd)
        elif isinstance(cmd, ArgCommand):
            meta.append(cmd)
        else:
            message = f"{ins.word} comes before the first FROM; only ARG may."
            raise DockerfileError(message, filename=dockerfile.filename, line=ins.line)
    if not stages:
        message = "the Dockerfile has no FROM: a build needs at least one stage."
        raise DockerfileError(message, filename=dockerfile.filename)
    return tuple(meta), tuple((cmd, tuple(body)) for cmd, body in stages)


def parse_command(ins: Instruction, dockerfile: Dockerfile) -> Command:
    """Check an instruction's flags and arguments; raises DockerfileError at its line."""
    try:
        return _PARSERS[ins.keyword](ins, _flags(ins), dockerfile)
    except InvalidValue as exc:
        raise DockerfileError(str(exc), filename=dockerfile.filename, line=ins.line) from exc


def _flags(ins: Instruction) -> Flags:
    spec = _FLAGS.get(ins.keyword, {})
    values: Flags = {}
    for name, value in ins.flags:
        kind = spec.get(name)
        if kind is None:
            if not spec:
                raise InvalidValue(f"unknown flag --{name}: {ins.keyword} takes no flags.")
            raise InvalidValue(
                f"unknown flag --{name} for {ins.keyword}{suggest(name.lower(), list(spec), prefix='--')}"
            )
        if name in values and kind != "strings":
            raise InvalidValue(f"the flag --{name} is given twice.")
        if kind == "bool":
            values[name] = _bool_flag(ins, name, value)
        elif value is None:
            raise InvalidValue(f"the flag --{name} needs a value: --{name}=<value>.")
        elif kind == "strings":
            values.setdefault(name, []).append(value)
        else:
            values[name] = value
    return values


def _bool_flag(ins: Instruction, name: str, value: str | None) -> bool:
    if value is None:
        return True
    if value.lower() not in ("true", "false"):
        raise InvalidValue(f"the flag --{name} takes true or false, not {value!r}.")
    return value.lower() == "true"


def _parse_from(ins: Instruction, flags: Flags, df: Dockerfile) -> Command:
    words = split_fields(ins.args)
    if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
        raise InvalidValue(
            "FROM takes an image and an optional stage name: FROM [--platform=...] IMAGE [AS NAME]."
        )
    name = words[2].lower() if len(words) == 3 else None
    if name is not None and not re.fullmatch(_STAGE_NAME, name):
        raise InvalidValue(
            f"invalid stage name {words[2]!r}: it must start with a letter and hold only letters, "
            "digits, '-', '_' and '.'.",
        )
    return FromCommand(ins, words[0], name, flags.get("platform"))


def _parse_arg(ins: Instruction, flags: Flags, df: Dockerfile) -> Command:
    pairs: list[tuple[str, str | None]] = []
    for word in split_words(ins.args, df.escape):
        name, eq, default = word.partition("=")
        if not name:
            raise InvalidValue(f"ARG {word!r} has no name: ARG NAME[=DEFAULT].")
        pairs.append((name, default if eq else None))
    if not pairs:
        raise InvalidValue("ARG needs a name: ARG NAME[=DEFAULT].")
    return ArgCommand(ins, tuple(pairs))


def _parse_pairs(ins: Instruction, flags: Flags, df: Dockerfile) -> Command:
    words = split_words(ins.args, df.escape)
    kw = ins.keyword
    if not words:
        raise InvalidValue(f"{kw} needs at least one pair: {kw} NAME=VALUE ...")
    if "=" not in words[0]:
        parts = re.split(WORD_SPACE, ins.args, maxsplit=1)
        if len(parts) < 2:
            raise InvalidValue(f"{kw} {words[0]} has no value: {kw} NAME=VALUE.")
        return PairsCommand(ins, ((parts[0], parts[1]),), legacy=True)
    pairs = []
    for word in words:
        key, eq, value = word.partition("=")
        if not eq:
            raise InvalidValue(f"{kw} takes NAME=VALUE pairs, and {word!r} has no '='.")
        if not key:
            raise InvalidValue(f"{kw} {word!r} has no name: {kw} NAME=VALUE.")
        pairs.append((key, value))
    return PairsCommand(ins, tuple(pairs), legacy=False)


def _parse_exec(ins: Instruction, flags: Flags, df: Dockerfile) -> Command:
    kw = ins.keyword
    if ins.exec_form is not None:
        if kw == "SHELL" and not ins.exec_form:
            raise InvalidValue('SHELL needs at least one word, as in SHELL ["/bin/sh", "-c"].')
        return ExecCommand(ins, ins.exec_form, shell_form=False)
    if kw == "SHELL":
        raise InvalidValue('SHELL must be a JSON array, as in SHELL ["/bin/bash", "-c"].')
    if not ins.args:
        raise InvalidValue(f"{kw} needs a command (or {kw} [] for none).")
    return ExecCommand(ins, (ins.args,), shell_form=True)


def _parse_run(ins: Instruction, flags: Flags, df: Dockerfile) -> Command:
    network = flags.get("network", "default")
    if network not in _NETWORKS:
        raise InvalidValue(f"RUN --network={network} is not supported; use default, none or host.")
    security = flags.get("security", "sandbox")
    if security not in _SECURITY:
        raise InvalidValue(f"RUN --security={security} is not supported; use sandbox or insecure.")
    if ins.exec_form is not None:
        if not ins.exec_form:
            raise InvalidValue("RUN needs a command; [] runs nothing.")
        command, shell_form = ins.exec_form, False
    elif ins.args:
        command, shell_form = (ins.args,), True
    else:
        raise InvalidValue("RUN needs a command.")
    return RunCommand(ins, command, shell_form, tuple(flags.get("mount", [])), network, security)


def _parse_copy(ins: Instruction, flags: Flags, df: Dockerfile) -> Command:
    kw = ins.keyword
    words = list(ins.exec_form) if ins.exec_form is not None else split_fields(ins.args)
    if len(words) < 2:
        raise InvalidValue(f"{kw} needs at least one source and a destination: {kw} SRC... DEST.")
    *sources, dest = words
    if ins.exec_form is None and parse_heredoc_word(dest) is not None:
        raise InvalidValue(f"{kw} cannot take a heredoc as its destination.")
    bodies = {doc.name: doc for doc in ins.heredocs}
    paths: list[str] = []
    contents: list[Heredoc] = []
    for source in sources:
        doc = parse_heredoc_word(source) if ins.exec_form is None and "<<" in source else None
        if doc is None:
            paths.append(source)
        else:
            body = bodies.get(doc.name, doc)
            contents.append(Heredoc(doc.name, body.content, doc.expand, doc.strip_tabs))
    return CopyCommand(ins, tuple(paths), dest, tuple(contents), flags)


def _parse_value(ins: Instruction, flags: Flags, df: Dockerfile) -> Command:
    if not ins.args:
        raise InvalidValue(f"{ins.keyword} needs exactly one argument.")
    return ValueCommand(ins, ins.args)


def _parse_list(ins: Instruction, flags: Flags, df: Dockerfile) -> Command:
    values = ins.exec_form if ins.exec_form is not None else tuple(split_fields(ins.args))
    if not values:
        what = "port" if ins.keyword == "EXPOSE" else "path"
        raise InvalidValue(f"{ins.keyword} needs at least one {what}.")
    if any(not value.strip(GO_SPACE) for value in values):
        raise InvalidValue("VOLUME paths cannot be empty.")
    return ListCommand(ins, tuple(values))


def _parse_healthcheck(ins: Instruction, flags: Flags, df: Dockerfile) -> Command:
    kind, *rest = re.split(WORD_SPACE, ins.args, maxsplit=1) if ins.args else [""]
    command = rest[0].lstrip(GO_SPACE) if rest else ""
    if kind.upper() == "NONE":
        if command or flags:
            raise InvalidValue("HEALTHCHECK NONE takes no arguments and no flags.")
        return HealthcheckCommand(ins, ("NONE",), (), 0)
    if kind.upper() != "CMD":
        raise InvalidValue(f"HEALTHCHECK needs NONE or CMD <command>, not {kind or 'nothing'!r}.")
    try:
        exec_form = parse_exec_form(command)
    except ValueError as exc:
        raise InvalidValue(f"HEALTHCHECK CMD {exc}") from exc
    if exec_form is not None and exec_form:
        test: tuple[str, ...] = ("CMD", *exec_form)
    elif exec_form is None and command:
        test = ("CMD-SHELL", command)
    else:
        raise InvalidValue("HEALTHCHECK CMD needs a command.")
    durations = []
    for name, key in _DURATION_FLAGS.items():
        nanos = _duration(ins, name, flags[name]) if name in flags else 0
        if nanos:
            durations.append((key, nanos))
    return HealthcheckCommand(ins, test, tuple(durations), _retries(ins, flags.get("retries")))


_DURATION_FLAGS = {
    "interval": "Interval",
    "timeout": "Timeout",
    "start-period": "StartPeriod",
    "start-interval": "StartInterval",
}
_DURATION = r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+|[-+]?0"
_UNITS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,
    "μs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}


def _duration(ins: Instruction, name: str, text: str) -> int:
    """A Go duration (``30s``, ``1m30s``, ``1.5h``) in nanoseconds; 0 means the default."""
    if not text:
        return 0
    if not re.fullmatch(_DURATION, text):
        raise InvalidValue(f"--{name}={text} is not a duration; write it as 30s, 1m30s or 500ms.")
    parts = re.findall(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)", text)
    if any(len(number.partition(".")[0]) > 20 for number, _ in parts):  # beyond int64 in any unit
        raise InvalidValue(f"--{name}={text[:40]} is out of range: the most is 2562047h.")
    from fractions import Fraction  # only HEALTHCHECK durations need it (start-up time)

    total = sum((Fraction(number) * _UNITS[unit] for number, unit in parts), Fraction())
    if total >= 2**63:  # Go's time.Duration is an int64 of nanoseconds
        raise InvalidValue(f"--{name}={text[:40]} is out of range: the most is 2562047h.")
    nanos = -int(total) if text.startswith("-") else int(total)
    if nanos and nanos < 10**6:
        raise InvalidValue(f"--{name}={text} is too short: the least is 1ms.")
    return nanos


def _retries(ins: Instruction, text: str | None) -> int:
    if text is None or text == "":
        return 0
    if not re.fullmatch(r"[-+]?\d{1,10}", text) or abs(int(text)) >= 2**31:
        raise InvalidValue(f"--retries={text[:40]} is not a whole number up to 2147483647.")
    if int(text) < 0:
        raise InvalidValue(f"--retries={text} cannot be negative.")
    return int(text)


def _parse_onbuild(ins: Instruction, flags: Flags, df: Dockerfile) -> Command:
    trigger = ins.trigger
    if trigger is None:
        raise InvalidValue("ONBUILD needs an instruction to run in a downstream build.")
    if trigger.keyword in ("ONBUILD", "FROM", "MAINTAINER"):
        raise InvalidValue(f"ONBUILD cannot trigger {trigger.keyword}.")
    expression = re.sub(r"(?i)^\s*ONBUILD\s*", "", ins.source)
    expression += "".join(f"\n{doc.content}{doc.name}" for doc in trigger.heredocs)
    return OnbuildCommand(ins, expression, parse_command(trigger, df))


_PARSERS: dict[str, Callable[[Instruction, Flags, Dockerfile], Command]] = {
    "FROM": _parse_from,
    "ARG": _parse_arg,
    "ENV": _parse_pairs,
    "LABEL": _parse_pairs,
    "RUN": _parse_run,
    "CMD": _parse_exec,
    "ENTRYPOINT": _parse_exec,
    "SHELL": _parse_exec,
    "COPY": _parse_copy,
    "ADD": _parse_copy,
    "WORKDIR": _parse_value,
    "USER": _parse_value,
    "STOPSIGNAL": _parse_value,
    "MAINTAINER": _parse_value,
    "EXPOSE": _parse_list,
    "VOLUME": _parse_list,
    "HEALTHCHECK": _parse_healthcheck,
    "ONBUILD": _parse_onbuild,
}


# Values the plan checks after expansion.


_CHMOD_SYMBOLIC = r"[ugoa]*(?:[-+=](?:[rwxXst]*|[ugo]))+|[-+=][0-7]+"


def check_chmod(text: str) -> None:
    """``--chmod``: octal up to 7777, or chmod(1)'s symbolic clauses (``u=rwX,go=rX``, ``+x``)."""
    if re.fullmatch(r"[0-7]+", text) and int(text, 8) <= 0o7777:
        return
    if text and all(re.fullmatch(_CHMOD_SYMBOLIC, clause) for clause in text.split(",")):
        return
    raise InvalidValue(f"--chmod={text} is not a mode: use octal (0755) or symbolic (u=rwX,go=rX).")


_PORT = r"(\d+)(?:-(\d+))?"


def parse_ports(spec: str) -> list[str]:
    """One EXPOSE word (``80``, ``80/udp``, ``8000-8002``) as ``port/proto`` keys, ranges expanded."""
    if spec.isascii() and spec.isdigit() and len(spec) <= 5 and int(spec) <= 65535:
        return [f"{int(spec)}/tcp"]
    container = spec.rsplit(":", 1)[-1]  # BuildKit tolerates (and ignores) ip:hostport: prefixes
    port, _, proto = container.partition("/")
    proto = proto.lower() or "tcp"
    if proto not in ("tcp", "udp", "sctp"):
        raise InvalidValue(f"EXPOSE {spec}: invalid protocol {proto!r}; use tcp, udp or sctp.")
    match = re.fullmatch(_PORT, port)
    start, end = (int(match[1]), int(match[2] or match[1])) if match and len(port) <= 11 else (0, -1)
    if match is None or end > 65535 or end < start:
        raise InvalidValue(f"EXPOSE {spec[:40]}: {port[:20]!r} is not a port or port range (0-65535).")
    return [f"{number}/{proto}" for number in range(start, end + 1)]


_SIGNALS = frozenset(
    {
        "ABRT", "ALRM", "BUS", "CHLD", "CLD", "CONT", "FPE", "HUP", "ILL", "INT", "IO", "IOT", "KILL",
        "PIPE", "POLL", "PROF", "PWR", "QUIT", "SEGV", "STKFLT", "STOP", "SYS", "TERM", "TRAP", "TSTP",
        "TTIN", "TTOU", "URG", "USR1", "USR2", "VTALRM", "WINCH", "XCPU", "XFSZ", "RTMIN", "RTMAX",
    }
    | {f"RTMIN+{n}" for n in range(1, 16)}
    | {f"RTMAX-{n}" for n in range(1, 15)}
)  # fmt: skip


def check_signal(text: str) -> None:
    """A stop signal: a Linux signal name, with or without SIG, or a non-zero number."""
    if re.fullmatch(r"[-+]?\d+", text) and int(text) != 0:
        return
    if text.upper().removeprefix("SIG") in _SIGNALS:
        return
    raise InvalidValue(f"STOPSIGNAL {text!r} is not a signal; use a name such as SIGTERM or a number.")


def check_platform(text: str) -> None:
    """``os[/arch[/variant]]``, as containerd's platforms.Parse takes it."""
    parts = text.split("/")
    if len(parts) > 3 or not all(re.fullmatch(r"[A-Za-z0-9_.-]+(\([^)]*\))?", part) for part in parts):
        raise InvalidValue(f"invalid platform {text!r}: write os/arch[/variant], for example linux/amd64.")


def check_checksum(checksum: str, sources: tuple[str, ...]) -> None:
    """ADD --checksum: one source, a URL (sha256:<hex>) or a Git repository (a commit hash)."""
    if len(sources) != 1:
        raise InvalidValue("ADD --checksum needs exactly one source, a URL or a Git repository.")
    source = sources[0]
    git = source.startswith(("git@", "git://", "ssh://")) or source.split("#")[0].endswith(".git")
    if git:
        if not re.fullmatch(r"[0-9a-f]{1,64}", checksum):
            raise InvalidValue(
                f"ADD --checksum={checksum}: for Git, give a commit hash (or a prefix of one)."
            )
    elif not source.startswith(("http://", "https://")):
        raise InvalidValue("ADD --checksum only applies to a URL or a Git repository.")
    elif not re.fullmatch(r"sha256:[0-9a-f]{64}|sha384:[0-9a-f]{96}|sha512:[0-9a-f]{128}", checksum):
        raise InvalidValue(f"ADD --checksum={checksum}: for a URL, give sha256:<64 hex digits>.")
