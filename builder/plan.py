"""Instructions → a build plan: each needed stage's instructions dispatched into steps.

BuildKit's ``dockerfile2llb`` is the model. The global ARG scope, the FROM lines and the stage
graph are stages.py's; here, inside a stage, an ARG must be declared to be seen. A stage's
variables are its image's ENV plus the ARGs it declared, a later ENV or ARG of the same name
replacing an earlier one: words expand in them and RUN sees them. Only the stages the target
needs are planned. Pure: the base images' configs, the build args and the platform come in as
arguments.
"""

from __future__ import annotations

import copy
import posixpath
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from msgspec import NODEFAULT, Struct, field, structs

from builder.dockerfile import GO_SPACE, Dockerfile, parse_dockerfile
from builder.errors import BuilderError, DockerfileError, ExpansionError
from builder.expansion import expand_word, expand_words
from builder.instructions import (
    ArgCommand,
    Command,
    CopyCommand,
    ExecCommand,
    HealthcheckCommand,
    InvalidValue,
    ListCommand,
    OnbuildCommand,
    PairsCommand,
    RunCommand,
    ValueCommand,
    check_checksum,
    check_chmod,
    check_signal,
    parse_command,
    parse_ports,
)
from builder.mounts import Mount, parse_mount
from builder.stages import (
    ParsedStages,
    StageHeader,
    build_order,
    check_at,
    closure,
    copy_ref,
    expand_at,
    find_target,
    is_plain,
    resolve_stages,
    stage_ref,
    static_deps,
)

__all__ = [
    "DEFAULT_PATH",
    "ConfigStep",
    "CopyStep",
    "Plan",
    "RunStep",
    "Stage",
    "Step",
    "WorkdirStep",
    "make_plan",
]

Json = dict[str, Any]
T = TypeVar("T")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_SHELL = ("/bin/sh", "-c")
_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
PROXY_ARGS = frozenset(name for base in _PROXIES for name in (base, base.lower()))


class RunStep(Struct, frozen=True):
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


class CopyStep(Struct, frozen=True):
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


class WorkdirStep(Struct, frozen=True):
    path: str
    line: int
    created_by: str
    user: str = ""  # BuildKit creates missing directories as the current USER


class ConfigStep(Struct, frozen=True):
    """A metadata-only instruction: it never touches the file system."""

    line: int
    created_by: str


Step = RunStep | CopyStep | WorkdirStep | ConfigStep


class Stage(Struct, frozen=True):
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


class Plan(Struct, frozen=True):
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
    """Structs as dicts without the fields at their default (nor ``skip``); tuples as lists."""
    if isinstance(value, str | int | float) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_data(item) for item in value]
    if isinstance(value, Struct):
        return {
            f.name: _data(getattr(value, f.name))
            for f in structs.fields(value)
            if f.name != skip and (f.default is NODEFAULT or getattr(value, f.name) != f.default)
        }
    return value


# Patterns are compiled on first use (re's own cache), not at import: most builds use few of them.
_GO_SPACE_CHAR = f"[{re.escape(GO_SPACE)}]"


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
    parsed = resolve_stages(dockerfile, build_args, auto_args)
    target_index = find_target(parsed, target)
    static = static_deps(parsed)
    planner = _Planner(parsed, base_configs, build_args)
    todo = closure([target_index], static)
    while todo:  # ONBUILD triggers of base images can make more stages needed
        for index in sorted(todo):
            planner.plan(index)
        wanted = {dep for stage in planner.stages.values() for dep in stage.needs}
        todo = closure(wanted, static) - planner.stages.keys()
    stages = tuple(planner.stages.get(i) or _unbuilt(i, h) for i, h in enumerate(parsed.headers))
    order = build_order([stage.needs for stage in stages], target_index)
    exempt = PROXY_ARGS | auto_args.keys() | {"SOURCE_DATE_EPOCH"}
    unused = sorted(set(build_args) - planner.declared - parsed.declared - exempt)
    images = [s.base_image for s in stages if s.index in order and s.base_image]
    for stage in (stages[i] for i in order):
        for step in stage.steps:
            images += [step.from_image] if isinstance(step, CopyStep) and step.from_image else []
            images += [m.from_image for m in step.mounts if m.from_image] if isinstance(step, RunStep) else []
    warnings = _warnings(dockerfile, planner.warnings)
    return Plan(stages, target_index, order, tuple(unused), tuple(dict.fromkeys(images)), warnings)


def _unbuilt(index: int, header: StageHeader) -> Stage:
    base = None if header.image == "scratch" or header.base_stage is not None else header.image
    cmd = header.cmd
    return Stage(
        index, cmd.name, base, header.base_stage, (), {}, None, cmd.ins.line, header.platform, built=False
    )


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
        self, parsed: ParsedStages, base_configs: Mapping[str, Json], build_args: Mapping[str, str]
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
        stage = structs.replace(_unbuilt(index, header), steps=tuple(state.steps), built=True)
        self.stages[index] = structs.replace(stage, config=state.config, author=state.author)
        self.variables[index] = state.vars

    def trigger(self, text: str, header: StageHeader) -> Command:
        """An ONBUILD trigger of the base, parsed as if it were written on the FROM line."""
        df = self.parsed.dockerfile
        line = header.cmd.ins.line
        try:
            triggered = parse_dockerfile(text, df.filename)
            if len(triggered.instructions) != 1:
                raise DockerfileError("a trigger is a single instruction.")
            ins = structs.replace(triggered.instructions[0], line=line, end_line=line)
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


class _StageState(Struct):
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

    def start(self, header: StageHeader) -> list[str]:
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
        return expand_at(self.df, cmd.ins.line, word, self.vars)[0]

    def checked(self, cmd: Command, check: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return check_at(self.df, cmd.ins.line, check, *args, **kwargs)

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
                plain = is_plain(value, escape) and re.search(_GO_SPACE_CHAR, value) is None
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
        # Config only: BuildKit writes no history entry for ONBUILD (the classic builder did).
        self.config["OnBuild"] = [*(self.config.get("OnBuild") or []), cmd.expression]

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
        self.steps.append(structs.replace(step, mounts=tuple(mounts), security=cmd.security, files=files))

    def mount_context(self, cmd: RunCommand, ssh: int) -> dict[str, Any]:
        def resolve(ref: str) -> tuple[int | None, str | None]:
            return stage_ref(self.planner.parsed, self.index, cmd.ins.line, ref, by_number=False)

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
            copy_ref(self.planner.parsed, self.index, cmd) if cmd.keyword == "COPY" else (None, None)
        )
        sources = tuple(self.expand(cmd, source) for source in cmd.sources)
        inline = tuple(
            (doc.name, self.expand_heredoc(cmd, doc.text) if doc.expand else doc.text) for doc in cmd.contents
        )
        chown = self.expand(cmd, flags.get("chown", "")) or None
        step = CopyStep(
            sources, dest, from_stage, from_image, chown, chmod, inline, cmd.ins.line, cmd.ins.source
        )
        self.steps.append(structs.replace(step, **self.copy_options(cmd, sources)))

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
