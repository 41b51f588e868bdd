"""Instructions → a build plan: stages, steps, the stage graph, ARG and ENV scoping.

BuildKit's ``dockerfile2llb`` is the model. ARGs before the first FROM, over the automatic
platform ARGs, form the global scope that FROM lines expand in; inside a stage an ARG must be
declared to be seen. A stage's variables are its image's ENV plus the ARGs it declared, a later
ENV or ARG of the same name replacing an earlier one: words expand in them and RUN sees them.
Only the stages the target needs are planned. Pure: the base images' configs, the build args and
the platform come in as arguments.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from builder.dockerfile import GO_SPACE, Dockerfile, parse_dockerfile, suggest
from builder.errors import BuilderError, DockerfileError, ExpansionError
from builder.expansion import expand_word, expand_words
from builder.instructions import (
    ArgCommand,
    Command,
    CopyCommand,
    ExecCommand,
    FromCommand,
    HealthcheckCommand,
    InvalidValue,
    ListCommand,
    Mount,
    OnbuildCommand,
    PairsCommand,
    RunCommand,
    ValueCommand,
    check_checksum,
    check_chmod,
    check_platform,
    check_signal,
    parse_command,
    parse_mount,
    parse_ports,
    parse_stages,
)
from builder.oci import parse_reference

__all__ = [
    "DEFAULT_PATH",
    "ConfigStep",
    "CopyStep",
    "Mount",
    "Plan",
    "RunStep",
    "Stage",
    "Step",
    "WorkdirStep",
    "base_images",
    "make_plan",
    "parse_build_args",
    "platform_args",
]

Json = dict[str, Any]
T = TypeVar("T")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_SHELL = ("/bin/sh", "-c")
_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
PROXY_ARGS = frozenset(name for base in _PROXIES for name in (base, base.lower()))


@dataclass(frozen=True)
class RunStep:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    user: str
    workdir: str
    network: str  # default | none | host
    line: int
    created_by: str
    mounts: tuple[Mount, ...] = ()
    security: str = "sandbox"  # sandbox | insecure
    # (path, content): read-only executable files the command needs; a heredoc script that
    # starts with #! is run from /dev/pipes/<NAME>, as BuildKit does.
    files: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CopyStep:
    sources: tuple[str, ...]
    dest: str  # absolute; a trailing "/" means "into this directory"
    from_stage: int | None
    from_image: str | None
    chown: str | None
    chmod: str | None  # octal or symbolic (u=rwX,go=rX)
    inline: tuple[tuple[str, str], ...]  # heredoc sources: (name, content)
    line: int
    created_by: str
    add: bool = False  # ADD: URL and Git sources are fetched, local tar archives unpacked
    link: bool = False
    parents: bool = False
    exclude: tuple[str, ...] = ()
    checksum: str | None = None  # ADD: sha256:<hex> of a URL, or a commit (prefix) of Git
    keep_git_dir: bool = False
    unpack: bool | None = None  # ADD: None leaves the default (local archives only)


@dataclass(frozen=True)
class WorkdirStep:
    path: str
    line: int
    created_by: str
    user: str = ""  # BuildKit creates missing directories as the current USER


@dataclass(frozen=True)
class ConfigStep:
    """A metadata-only instruction: it never touches the file system."""

    line: int
    created_by: str


Step = RunStep | CopyStep | WorkdirStep | ConfigStep


@dataclass(frozen=True)
class Stage:
    index: int
    name: str | None
    base_image: str | None  # an image reference, or None for scratch and stage bases
    base_stage: int | None
    steps: tuple[Step, ...]
    config: Json  # the image config's "config" section after the last step
    author: str | None
    line: int
    platform: str | None = None  # FROM --platform, expanded
    built: bool = True  # False: the target does not need this stage, so it is not planned

    @property
    def needs(self) -> tuple[int, ...]:
        """The stages this one reads from: its base, COPY --from and RUN --mount from=."""
        deps = {self.base_stage} if self.base_stage is not None else set()
        for step in self.steps:
            if isinstance(step, CopyStep) and step.from_stage is not None:
                deps.add(step.from_stage)
            if isinstance(step, RunStep):
                deps.update(m.from_stage for m in step.mounts if m.from_stage is not None)
        return tuple(sorted(deps))


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]
    target: int
    order: tuple[int, ...]  # the stages the target needs, dependencies first
    unused_args: tuple[str, ...]
    images: tuple[str, ...] = ()  # every image reference the plan reads (FROM, --from, from=)
    warnings: tuple[str, ...] = ()

    def to_json(self) -> Json:
        """The plan as plain data, for ``--print plan`` and golden tests; fields that hold their
        default are left out, and RUN environments are written NAME=VALUE."""
        stages = []
        for stage in self.stages:
            steps = [{"kind": type(step).__name__, **_data(step)} for step in stage.steps]
            for step in steps:
                if "env" in step:
                    step["env"] = [f"{name}={value}" for name, value in step["env"]]
            stages.append({**_data(stage, skip="steps"), "steps": steps})
        return {**_data(self, skip="stages"), "stages": stages}


def _data(value: Any, skip: str = "") -> Any:
    """Dataclasses as dicts without the fields at their default (nor ``skip``); tuples as lists."""
    if isinstance(value, str | int | float) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_data(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _data(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.name != skip and (f.default is dataclasses.MISSING or getattr(value, f.name) != f.default)
        }
    return value


def platform_args(os_name: str, arch: str) -> dict[str, str]:
    """The automatic platform ARGs; build and target platform are the host's."""
    values: dict[str, str] = {}
    for prefix in ("BUILD", "TARGET"):
        values |= {
            f"{prefix}PLATFORM": f"{os_name}/{arch}",
            f"{prefix}OS": os_name,
            f"{prefix}ARCH": arch,
            f"{prefix}VARIANT": "",
        }
    return values


def parse_build_args(items: Iterable[str], environ: Mapping[str, str]) -> dict[str, str]:
    """``--build-arg`` values: NAME=VALUE, or NAME alone for the value in ``environ`` (an arg
    the environment lacks is left out, as ``docker buildx build`` does)."""
    args: dict[str, str] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not name or any(ch in GO_SPACE for ch in name):
            raise BuilderError(
                f"invalid --build-arg {item!r}: write NAME=VALUE, or NAME to pass on the environment's value."
            )
        if eq:
            args[name] = value
        elif name in environ:
            args[name] = environ[name]
    return args


@dataclass(frozen=True)
class _Header:
    """A FROM line resolved in the global scope."""

    cmd: FromCommand
    image: str
    platform: str | None
    base_stage: int | None


@dataclass(frozen=True)
class _Parsed:
    dockerfile: Dockerfile
    headers: tuple[_Header, ...]
    bodies: tuple[tuple[Command, ...], ...]
    scope: Mapping[str, str]  # the global scope
    declared: frozenset[str]  # the global ARGs

    def error(self, line: int, message: str) -> DockerfileError:
        return DockerfileError(message, filename=self.dockerfile.filename, line=line)


_SPECIAL = {escape: re.compile(f"[$'\"{re.escape(escape)}]") for escape in ("\\", "`")}
_GO_SPACE_CHAR = re.compile(f"[{re.escape(GO_SPACE)}]")


def _plain(word: str, escape: str) -> bool:
    """A word with nothing to expand: no variable, quote or escape."""
    return _SPECIAL[escape].search(word) is None


def _expand(df: Dockerfile, line: int, word: str, scope: Mapping[str, str]) -> tuple[str, frozenset[str]]:
    if _plain(word, df.escape):
        return word, frozenset()
    try:
        result = expand_word(word, scope, escape=df.escape)
    except ExpansionError as exc:
        raise DockerfileError(str(exc), filename=df.filename, line=line) from exc
    return result.text, result.used


def _parse(df: Dockerfile, build_args: Mapping[str, str], auto_args: Mapping[str, str]) -> _Parsed:
    """Check every instruction, then resolve the global scope and the FROM lines."""
    meta, stages = parse_stages(df)
    scope = {name: build_args.get(name, value) for name, value in auto_args.items()}
    declared: set[str] = set()
    for arg in meta:
        for name, default in arg.pairs:
            declared.add(name)
            if name in build_args:
                scope[name] = build_args[name]
            elif default is not None:
                scope[name] = _expand(df, arg.ins.line, default, scope)[0]
    headers = _headers(df, [cmd for cmd, _ in stages], scope)
    return _Parsed(df, headers, tuple(body for _, body in stages), scope, frozenset(declared))


def _headers(df: Dockerfile, froms: list[FromCommand], scope: Mapping[str, str]) -> tuple[_Header, ...]:
    headers: list[_Header] = []
    names: dict[str, int] = {}
    for index, cmd in enumerate(froms):
        line = cmd.ins.line
        image, used = _expand(df, line, cmd.image, scope)
        if not image:
            unset = sorted(name for name in used if not scope.get(name)) or ["?"]
            raise DockerfileError(
                f"FROM {cmd.image} expands to an empty image name: give ARG {unset[0]} a default "
                f"before the first FROM, or pass --build-arg {unset[0]}=<image>.",
                filename=df.filename,
                line=line,
            )
        platform = _from_platform(df, cmd, scope)
        base_stage = names.get(image)
        if base_stage is None and image != "scratch":
            try:
                _check_reference(image)
            except InvalidValue as exc:
                unset = sorted(name for name in used if not scope.get(name))
                hint = f" ({', '.join(unset)} has no value before the first FROM)" if unset else ""
                where = f"FROM {cmd.image} expands to {image!r}{hint}: " if image != cmd.image else ""
                raise DockerfileError(f"{where}{exc}", filename=df.filename, line=line) from exc
        if cmd.name in names:
            first = headers[names[cmd.name]].cmd.ins.line
            raise DockerfileError(
                f"the stage name {cmd.name!r} is taken by the stage on line {first}; names must be unique.",
                filename=df.filename,
                line=line,
            )
        if cmd.name:
            names[cmd.name] = index
        headers.append(_Header(cmd, image, platform, base_stage))
    return tuple(headers)


def _from_platform(df: Dockerfile, cmd: FromCommand, scope: Mapping[str, str]) -> str | None:
    if cmd.platform is None:
        return None
    platform = _expand(df, cmd.ins.line, cmd.platform, scope)[0]
    if not platform:
        raise DockerfileError(
            f"FROM --platform={cmd.platform} expands to nothing.", filename=df.filename, line=cmd.ins.line
        )
    _checked(df, cmd.ins.line, check_platform, platform)
    return platform


def _check_reference(ref: str) -> None:
    try:
        parse_reference(ref)
    except ValueError as exc:
        raise InvalidValue(f"{exc}.") from exc


def _checked(df: Dockerfile, line: int, check: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a value check; an invalid value is a DockerfileError at ``line``."""
    try:
        return check(*args, **kwargs)
    except InvalidValue as exc:
        raise DockerfileError(str(exc), filename=df.filename, line=line) from exc


def _stage_ref(
    parsed: _Parsed, index: int, line: int, ref: str, *, by_number: bool
) -> tuple[int | None, str | None]:
    """What ``--from=ref`` (or ``from=ref``) in stage ``index`` names: an earlier stage or an image."""
    headers = parsed.headers
    stage: int | None
    if by_number and re.fullmatch(r"[-+]?\d+", ref):
        stage = int(ref)
        if not 0 <= stage < len(headers):
            raise parsed.error(line, f"--from={ref}: there is no stage {stage}; stages are numbered from 0.")
    else:
        stage = next((i for i, h in enumerate(headers) if h.cmd.name == ref.lower()), None)
    if stage is None:
        _checked(parsed.dockerfile, line, _check_reference, ref)
        return None, ref
    if stage >= index:
        where = "this very stage" if stage == index else f"the stage on line {headers[stage].cmd.ins.line}"
        raise parsed.error(line, f"--from={ref} names {where}; a stage can only read from stages before it.")
    return stage, None


def _copy_ref(parsed: _Parsed, index: int, cmd: CopyCommand) -> tuple[int | None, str | None]:
    ref = cmd.flags.get("from")
    if ref is None:
        return None, None
    if expand_word(ref, {}, escape=parsed.dockerfile.escape).text != ref:
        raise parsed.error(
            cmd.ins.line,
            f"--from={ref}: variables are not expanded in --from; "
            "define a stage with FROM and a global ARG, and copy from it.",
        )
    return _stage_ref(parsed, index, cmd.ins.line, ref, by_number=True)


def _static_deps(parsed: _Parsed) -> list[set[int]]:
    """Each stage's dependencies as written: its base, COPY --from, RUN --mount from=."""
    deps: list[set[int]] = []
    for index, (header, body) in enumerate(zip(parsed.headers, parsed.bodies, strict=True)):
        refs: list[tuple[int | None, str | None]] = [(header.base_stage, None)]
        for cmd in body:
            if isinstance(cmd, CopyCommand) and cmd.keyword == "COPY":
                refs.append(_copy_ref(parsed, index, cmd))
            elif isinstance(cmd, RunCommand):
                froms = [ref for ref in map(_mount_from, cmd.mounts) if ref]
                refs += [_stage_ref(parsed, index, cmd.ins.line, ref, by_number=False) for ref in froms]
        deps.append({stage for stage, _ in refs if stage is not None})
    return deps


def _mount_from(spec: str) -> str | None:
    """The from= of a --mount, as written (it cannot hold variables)."""
    for field_ in next(csv.reader([spec]), []):
        key, eq, value = field_.partition("=")
        if eq and key.lower() == "from" and "$" not in value:
            return value
    return None


def _closure(roots: Iterable[int], deps: list[set[int]]) -> set[int]:
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        index = todo.pop()
        if index not in seen:
            seen.add(index)
            todo.extend(deps[index])
    return seen


def _target(parsed: _Parsed, target: str | None) -> int:
    if target is None:
        return len(parsed.headers) - 1
    names = [h.cmd.name for h in parsed.headers if h.cmd.name]
    for index, header in enumerate(parsed.headers):
        if header.cmd.name == target.lower():
            return index
    hint = suggest(target.lower(), names)
    if hint == ".":
        hint = (
            f"; the named stages are {', '.join(names)}."
            if names
            else "; no stage has a name (FROM image AS name)."
        )
    raise DockerfileError(f"--target {target!r} names no stage{hint}", filename=parsed.dockerfile.filename)


def base_images(
    dockerfile: Dockerfile,
    build_args: Mapping[str, str],
    auto_args: Mapping[str, str],
    target: str | None = None,
) -> tuple[str, ...]:
    """The image references used as FROM bases (not scratch, not stages), in order: of every
    stage, or only of those ``target`` needs when it is given."""
    parsed = _parse(dockerfile, build_args, auto_args)
    indexes: Iterable[int] = range(len(parsed.headers))
    if target is not None:
        indexes = sorted(_closure([_target(parsed, target)], _static_deps(parsed)))
    headers = [parsed.headers[index] for index in indexes]
    return tuple(dict.fromkeys(h.image for h in headers if h.image != "scratch" and h.base_stage is None))


def make_plan(
    dockerfile: Dockerfile,
    *,
    base_configs: Mapping[str, Json],
    build_args: Mapping[str, str],
    auto_args: Mapping[str, str],
    target: str | None = None,
) -> Plan:
    """Plan the stages ``target`` needs; ``base_configs`` maps each of their FROM images (see
    :func:`base_images`) to its image config."""
    parsed = _parse(dockerfile, build_args, auto_args)
    target_index = _target(parsed, target)
    static = _static_deps(parsed)
    planner = _Planner(parsed, base_configs, build_args)
    todo = _closure([target_index], static)
    while todo:  # ONBUILD triggers of base images can make more stages needed
        for index in sorted(todo):
            planner.plan(index)
        wanted = {dep for stage in planner.stages.values() for dep in stage.needs}
        todo = _closure(wanted, static) - planner.stages.keys()
    stages = tuple(planner.stages.get(i) or _unbuilt(i, h) for i, h in enumerate(parsed.headers))
    order = _order(stages, target_index)
    exempt = PROXY_ARGS | auto_args.keys() | {"SOURCE_DATE_EPOCH"}
    unused = sorted(set(build_args) - planner.declared - parsed.declared - exempt)
    images = [s.base_image for s in stages if s.index in order and s.base_image]
    for stage in (stages[i] for i in order):
        for step in stage.steps:
            images += [step.from_image] if isinstance(step, CopyStep) and step.from_image else []
            images += [m.from_image for m in step.mounts if m.from_image] if isinstance(step, RunStep) else []
    warnings = _warnings(dockerfile, planner.warnings)
    return Plan(stages, target_index, order, tuple(unused), tuple(dict.fromkeys(images)), warnings)


def _unbuilt(index: int, header: _Header) -> Stage:
    base = None if header.image == "scratch" or header.base_stage is not None else header.image
    cmd = header.cmd
    return Stage(
        index, cmd.name, base, header.base_stage, (), {}, None, cmd.ins.line, header.platform, built=False
    )


def _order(stages: tuple[Stage, ...], target: int) -> tuple[int, ...]:
    seen: list[int] = []

    def visit(index: int) -> None:
        if index not in seen:
            for dep in stages[index].needs:
                visit(dep)
            seen.append(index)

    visit(target)
    return tuple(seen)


def _warnings(df: Dockerfile, found: list[tuple[int, str, str]]) -> tuple[str, ...]:
    """Warnings as "file:line: message (Rule)", filtered and enforced by ``# check=``."""
    empty = "empty continuation line; a future BuildKit rejects these"
    found = [(line, "NoEmptyContinuation", empty) for line in df.empty_continuations] + found
    skip, error = df.checks()
    kept = [item for item in found if "all" not in skip and item[1] not in skip]
    if error and kept:
        line, rule, message = kept[0]
        raise DockerfileError(
            f"{message} ({rule}; the check directive makes warnings errors).", filename=df.filename, line=line
        )
    return tuple(f"{df.filename}:{line}: {message} ({rule})" for line, rule, message in sorted(kept))


class _Planner:
    """Plans stages one by one; remembers each planned stage's result and variables."""

    def __init__(
        self, parsed: _Parsed, base_configs: Mapping[str, Json], build_args: Mapping[str, str]
    ) -> None:
        self.parsed = parsed
        self.base_configs = base_configs
        self.build_args = build_args
        self.stages: dict[int, Stage] = {}
        self.variables: dict[int, dict[str, str]] = {}
        self.declared: set[str] = set()
        self.warnings: list[tuple[int, str, str]] = []

    def plan(self, index: int) -> None:
        header = self.parsed.headers[index]
        state = _StageState(self, index)
        triggers = state.start(header)
        for text in triggers:
            state.dispatch(self.trigger(text, header))
        for cmd in self.parsed.bodies[index]:
            state.dispatch(cmd)
        stage = dataclasses.replace(_unbuilt(index, header), steps=tuple(state.steps), built=True)
        self.stages[index] = dataclasses.replace(stage, config=state.config, author=state.author)
        self.variables[index] = state.vars

    def trigger(self, text: str, header: _Header) -> Command:
        """An ONBUILD trigger of the base, parsed as if it were written on the FROM line."""
        df = self.parsed.dockerfile
        line = header.cmd.ins.line
        try:
            triggered = parse_dockerfile(text, df.filename)
            if len(triggered.instructions) != 1:
                raise DockerfileError("a trigger is a single instruction.")
            ins = dataclasses.replace(triggered.instructions[0], line=line, end_line=line)
            cmd = parse_command(ins, triggered)
            if ins.keyword in ("FROM", "ONBUILD", "MAINTAINER"):
                raise DockerfileError(f"ONBUILD cannot trigger {ins.keyword}.")
        except DockerfileError as exc:
            raise DockerfileError(
                f"the base image's ONBUILD trigger {text!r} is invalid: {exc.reason}",
                filename=df.filename,
                line=line,
            ) from exc
        return cmd


@dataclass
class _StageState:
    """The running state of one stage while its instructions are dispatched."""

    planner: _Planner
    index: int
    config: Json = field(default_factory=dict)
    vars: dict[str, str] = field(default_factory=dict)  # ENV and ARGs: what words expand in
    steps: list[Step] = field(default_factory=list)
    author: str | None = None
    cmd_set: bool = False

    @property
    def df(self) -> Dockerfile:
        return self.planner.parsed.dockerfile

    def error(self, cmd: Command, message: str) -> DockerfileError:
        return DockerfileError(message, filename=self.df.filename, line=cmd.ins.line)

    def start(self, header: _Header) -> list[str]:
        """Take the base's config and variables; return the base's ONBUILD triggers."""
        if header.base_stage is not None:
            base = self.planner.stages[header.base_stage]
            self.config = copy.deepcopy(base.config)
            self.vars = dict(self.planner.variables[header.base_stage])
            self.author = base.author
        elif header.image != "scratch":
            if header.image not in self.planner.base_configs:
                raise BuilderError(f"the plan was given no config for the base image {header.image}.")
            self.config = copy.deepcopy(self.planner.base_configs[header.image].get("config") or {})
        triggers: list[str] = self.config.pop("OnBuild", None) or []
        env: list[str] = self.config.get("Env") or []
        if not any(item.partition("=")[0] == "PATH" for item in env):
            self.config["Env"] = [*env, f"PATH={DEFAULT_PATH}"]
        if header.base_stage is None:
            self.vars = dict(item.partition("=")[::2] for item in self.config["Env"])
        return triggers

    def expand(self, cmd: Command, word: str) -> str:
        return _expand(self.df, cmd.ins.line, word, self.vars)[0]

    def checked(self, cmd: Command, check: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return _checked(self.df, cmd.ins.line, check, *args, **kwargs)

    @property
    def shell(self) -> list[str]:
        return list(self.config.get("Shell") or DEFAULT_SHELL)

    @property
    def workdir(self) -> str:
        return str(self.config.get("WorkingDir") or "/")

    def meta(self, cmd: Command, created_by: str | None = None) -> None:
        self.steps.append(ConfigStep(cmd.ins.line, created_by or cmd.ins.source))

    def dispatch(self, cmd: Command) -> None:
        handler: Callable[[Any], None] = getattr(self, f"do_{cmd.keyword.lower()}")
        handler(cmd)

    def do_arg(self, cmd: ArgCommand) -> None:
        build_args = self.planner.build_args
        for name, default in cmd.pairs:
            self.planner.declared.add(name)
            if name in build_args:
                value: str | None = build_args[name]
            elif default is not None:
                value = self.expand(cmd, default)
            else:
                value = self.planner.parsed.scope.get(name)
            if value is not None:
                self.vars[name] = value
        self.meta(cmd)

    def pairs(self, cmd: PairsCommand) -> list[tuple[str, str]]:
        """Every key and value expanded in the variables from before the instruction."""
        if cmd.legacy:
            message = f'"{cmd.keyword} key=value" should replace the legacy "{cmd.keyword} key value" form'
            self.planner.warnings.append((cmd.ins.line, "LegacyKeyValueFormat", message))
        return [(self.expand(cmd, key), self.expand(cmd, value)) for key, value in cmd.pairs]

    def do_env(self, cmd: PairsCommand) -> None:
        env = {item.partition("=")[0]: item for item in reversed(self.config.get("Env") or [])}
        env = dict(reversed(env.items()))  # the first entry of a name is the one that is replaced
        for key, value in self.pairs(cmd):
            self.vars[key] = value
            env[key] = f"{key}={value}"
        self.config["Env"] = list(env.values())
        self.meta(cmd)

    def do_label(self, cmd: PairsCommand) -> None:
        self.config["Labels"] = {**(self.config.get("Labels") or {}), **dict(self.pairs(cmd))}
        self.meta(cmd)

    def do_maintainer(self, cmd: ValueCommand) -> None:
        self.author = cmd.value
        self.planner.warnings.append(
            (cmd.ins.line, "MaintainerDeprecated", "MAINTAINER is deprecated; use a LABEL")
        )
        self.meta(cmd)

    def do_user(self, cmd: ValueCommand) -> None:
        user = self.expand(cmd, cmd.value)
        if user:
            self.config["User"] = user
        else:
            self.config.pop("User", None)
        self.meta(cmd)

    def do_workdir(self, cmd: ValueCommand) -> None:
        value = self.expand(cmd, cmd.value)
        if not value:
            raise self.error(cmd, f"WORKDIR {cmd.value} expands to an empty path.")
        path = _clean(posixpath.join(self.workdir, value))
        self.config["WorkingDir"] = path
        if path == "/":
            self.meta(cmd, "WORKDIR /")
        else:
            self.steps.append(
                WorkdirStep(path, cmd.ins.line, f"WORKDIR {path}", str(self.config.get("User") or ""))
            )

    def command(self, cmd: ExecCommand) -> list[str]:
        return [*self.shell, cmd.command[0]] if cmd.shell_form else list(cmd.command)

    def do_cmd(self, cmd: ExecCommand) -> None:
        _set(self.config, "Cmd", self.command(cmd) or None)
        self.cmd_set = True
        self.meta(cmd)

    def do_entrypoint(self, cmd: ExecCommand) -> None:
        argv = self.command(cmd)
        _set(self.config, "Entrypoint", argv or None)
        if not self.cmd_set:
            self.config.pop("Cmd", None)
        self.meta(cmd)

    def do_shell(self, cmd: ExecCommand) -> None:
        self.config["Shell"] = list(cmd.command)
        self.meta(cmd)

    def do_expose(self, cmd: ListCommand) -> None:
        ports = dict(self.config.get("ExposedPorts") or {})
        escape = self.df.escape
        try:
            for value in cmd.values:
                plain = _plain(value, escape) and _GO_SPACE_CHAR.search(value) is None
                for word in [value] if plain else expand_words(value, self.vars, escape=escape)[0]:
                    ports.update((key, {}) for key in parse_ports(word))
        except (ExpansionError, InvalidValue) as exc:
            raise self.error(cmd, str(exc)) from exc
        self.config["ExposedPorts"] = ports
        self.meta(cmd)

    def do_volume(self, cmd: ListCommand) -> None:
        volumes = dict(self.config.get("Volumes") or {})
        for value in cmd.values:
            path = self.expand(cmd, value)
            if not path:
                raise self.error(cmd, f"VOLUME {value} expands to an empty path.")
            volumes[path] = {}
        self.config["Volumes"] = volumes
        self.meta(cmd)

    def do_stopsignal(self, cmd: ValueCommand) -> None:
        signal = self.expand(cmd, cmd.value)
        self.checked(cmd, check_signal, signal)
        self.config["StopSignal"] = signal
        self.meta(cmd)

    def do_healthcheck(self, cmd: HealthcheckCommand) -> None:
        check: Json = {"Test": list(cmd.test), **dict(cmd.durations)}
        if cmd.retries:
            check["Retries"] = cmd.retries
        self.config["Healthcheck"] = check
        self.meta(cmd)

    def do_onbuild(self, cmd: OnbuildCommand) -> None:
        self.config["OnBuild"] = [*(self.config.get("OnBuild") or []), cmd.expression]
        self.meta(cmd)

    def run_env(self) -> tuple[tuple[str, str], ...]:
        """What RUN sees: the stage's variables, and the proxies passed as build args."""
        env = dict(self.vars)
        for name, value in self.planner.build_args.items():
            if name.upper() in _PROXIES:
                env.setdefault(name.upper(), value)
                env.setdefault(name.lower(), value)
        return tuple(sorted(env.items()))

    def do_run(self, cmd: RunCommand) -> None:
        argv, files = cmd.script(self.shell)
        mounts: list[Mount] = []
        for spec in cmd.mounts:
            ssh = sum(m.type == "ssh" for m in mounts)
            mounts.append(
                self.checked(
                    cmd, parse_mount, spec, lambda w: self.expand(cmd, w), **self.mount_context(cmd, ssh)
                )
            )
        created_by = f"RUN {' '.join(argv) if cmd.shell_form else cmd.ins.args}"
        user = str(self.config.get("User") or "")
        step = RunStep(tuple(argv), self.run_env(), user, self.workdir, cmd.network, cmd.ins.line, created_by)
        self.steps.append(dataclasses.replace(step, mounts=tuple(mounts), security=cmd.security, files=files))

    def mount_context(self, cmd: RunCommand, ssh: int) -> dict[str, Any]:
        def resolve(ref: str) -> tuple[int | None, str | None]:
            return _stage_ref(self.planner.parsed, self.index, cmd.ins.line, ref, by_number=False)

        return {"workdir": self.workdir, "ssh_index": ssh, "resolve_from": resolve}

    def do_copy(self, cmd: CopyCommand) -> None:
        flags = cmd.flags
        raw_dest = self.expand(cmd, cmd.dest)
        dest = _clean(posixpath.join(self.workdir, raw_dest))
        if (raw_dest.endswith("/") or raw_dest in ("", ".")) and dest != "/":
            dest += "/"
        chmod = self.expand(cmd, flags["chmod"]) if flags.get("chmod") else None
        if chmod:
            self.checked(cmd, check_chmod, chmod)
        from_stage, from_image = (
            _copy_ref(self.planner.parsed, self.index, cmd) if cmd.keyword == "COPY" else (None, None)
        )
        sources = tuple(self.expand(cmd, source) for source in cmd.sources)
        inline = tuple(
            (doc.name, self.expand_heredoc(cmd, doc.text) if doc.expand else doc.text) for doc in cmd.contents
        )
        chown = self.expand(cmd, flags.get("chown", "")) or None
        step = CopyStep(
            sources, dest, from_stage, from_image, chown, chmod, inline, cmd.ins.line, cmd.ins.source
        )
        self.steps.append(dataclasses.replace(step, **self.copy_options(cmd, sources)))

    def do_add(self, cmd: CopyCommand) -> None:
        self.do_copy(cmd)

    def copy_options(self, cmd: CopyCommand, sources: tuple[str, ...]) -> dict[str, Any]:
        flags = cmd.flags
        options: dict[str, Any] = {
            "add": cmd.keyword == "ADD",
            "link": flags.get("link", False),
            "parents": flags.get("parents", False),
            "exclude": tuple(self.expand(cmd, pattern) for pattern in flags.get("exclude", [])),
            "keep_git_dir": flags.get("keep-git-dir", False),
            "unpack": flags.get("unpack"),
        }
        if flags.get("checksum"):
            options["checksum"] = self.expand(cmd, flags["checksum"])
            self.checked(cmd, check_checksum, options["checksum"], sources)
        return options

    def expand_heredoc(self, cmd: CopyCommand, text: str) -> str:
        """BuildKit expands a COPY/ADD heredoc body with quotes kept as they are and backslash
        escapes applied, whatever the escape directive says."""
        protected = re.sub(r"\\.|['\"]", lambda m: m[0] if len(m[0]) == 2 else "\\" + m[0], text, flags=re.S)
        try:
            return expand_word(protected, self.vars, escape="\\").text
        except ExpansionError as exc:
            raise self.error(cmd, str(exc)) from exc


def _set(config: Json, key: str, value: Any) -> None:
    """Set a config key; None removes it, as Go's omitempty leaves it out."""
    if value is None:
        config.pop(key, None)
    else:
        config[key] = value


def _clean(path: str) -> str:
    """An absolute path, cleaned lexically as Go's path.Clean does."""
    return "/" + posixpath.normpath(path).lstrip("/")
