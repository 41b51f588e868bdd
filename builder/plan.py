"""Instructions → a build plan: stages, steps, the stage graph, ARG and ENV scoping.

Pure: the base images' configs, the build args and the platform come in as arguments. The
image config of every stage is fully known here; only the layers are left to the executor.
"""

from __future__ import annotations

import copy
import posixpath
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from builder.dockerfile import Dockerfile, Heredoc, Instruction, parse_exec_form
from builder.errors import DockerfileError, ExpansionError
from builder.expansion import expand_word, expand_words

__all__ = [
    "DEFAULT_PATH",
    "ConfigStep",
    "CopyStep",
    "Plan",
    "RunStep",
    "Stage",
    "Step",
    "WorkdirStep",
    "base_images",
    "make_plan",
]

Json = dict[str, Any]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_SHELL = ("/bin/sh", "-c")
PROXY_ARGS = frozenset(
    name
    for base in ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
    for name in (base, base.lower())
)
_WORD = re.compile(r"\S+")
_HEALTHCHECK_FLAGS = {
    "interval": "Interval",
    "timeout": "Timeout",
    "start-period": "StartPeriod",
    "start-interval": "StartInterval",
    "retries": "Retries",
}
_DURATION_UNITS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}


@dataclass(frozen=True)
class RunStep:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    user: str
    workdir: str
    network: str
    line: int
    created_by: str


@dataclass(frozen=True)
class CopyStep:
    sources: tuple[str, ...]
    dest: str  # absolute; a trailing "/" means "into this directory"
    from_stage: int | None
    from_image: str | None
    chown: str | None
    chmod: str | None
    inline: tuple[tuple[str, str], ...]  # heredoc sources: (name, content)
    line: int
    created_by: str


@dataclass(frozen=True)
class WorkdirStep:
    path: str
    line: int
    created_by: str


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

    @property
    def needs(self) -> tuple[int, ...]:
        """The stages this one reads from: its base and every COPY --from."""
        deps = {self.base_stage} if self.base_stage is not None else set()
        deps.update(s.from_stage for s in self.steps if isinstance(s, CopyStep) and s.from_stage is not None)
        return tuple(sorted(deps))


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]
    target: int
    order: tuple[int, ...]  # the stages the target needs, dependencies first
    unused_args: tuple[str, ...]
    images: tuple[str, ...] = ()  # every image reference the plan reads (FROM and COPY --from)

    def to_json(self) -> Json:
        """The plan as plain data, for ``--print plan`` and golden tests."""
        return {
            "target": self.target,
            "order": list(self.order),
            "unused_args": list(self.unused_args),
            "stages": [
                {
                    **asdict(stage),
                    "steps": [{"kind": type(s).__name__, **asdict(s)} for s in stage.steps],
                }
                for stage in self.stages
            ],
        }


@dataclass(frozen=True)
class _From:
    image: str
    name: str | None
    platform: str | None
    line: int


def platform_args(os_name: str, arch: str) -> dict[str, str]:
    """The automatic platform ARGs; build and target platform are the host's."""
    values = {}
    for prefix in ("BUILD", "TARGET"):
        values |= {
            f"{prefix}PLATFORM": f"{os_name}/{arch}",
            f"{prefix}OS": os_name,
            f"{prefix}ARCH": arch,
            f"{prefix}VARIANT": "",
        }
    return values


def _stage_headers(
    dockerfile: Dockerfile, build_args: Mapping[str, str], auto_args: Mapping[str, str]
) -> tuple[list[_From], dict[str, str], set[str]]:
    """Resolve the FROM lines with the global ARGs; return them, the global scope and used names."""
    scope: dict[str, str] = {}
    used: set[str] = set()
    headers: list[_From] = []
    for ins in dockerfile.instructions:
        if ins.keyword == "ARG" and not headers:
            for name, default in _arg_pairs(ins, dockerfile, scope):
                value = build_args.get(name, default if default is not None else auto_args.get(name))
                if value is not None:
                    scope[name] = value
                used.add(name)
        elif ins.keyword == "FROM":
            headers.append(_from_header(ins, dockerfile, {**auto_args, **scope}, used))
        elif not headers:
            raise DockerfileError(
                f"{ins.keyword} before the first FROM: only ARG may come before FROM",
                filename=dockerfile.filename,
                line=ins.line,
            )
    if not headers:
        raise DockerfileError(
            "no FROM instruction: a Dockerfile needs at least one stage",
            filename=dockerfile.filename,
        )
    return headers, scope, used


def _from_header(ins: Instruction, dockerfile: Dockerfile, scope: Mapping[str, str], used: set[str]) -> _From:
    words = ins.args.split()
    if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
        raise DockerfileError(
            "FROM takes an image and an optional 'AS name' (FROM image [AS name])",
            filename=dockerfile.filename,
            line=ins.line,
        )
    image = _expand(words[0], scope, ins, dockerfile, used)
    if not image:
        raise DockerfileError(
            f"FROM {words[0]} expands to an empty image name; give the ARG a value",
            filename=dockerfile.filename,
            line=ins.line,
        )
    name = words[2].lower() if len(words) == 3 else None
    if name is not None and not re.fullmatch(r"[a-z][a-z0-9._-]*", name):
        raise DockerfileError(f"invalid stage name {words[2]!r}", filename=dockerfile.filename, line=ins.line)
    return _From(image, name, ins.flag("platform"), ins.line)


def _stage_index(headers: Sequence[_From], ref: str, before: int) -> int | None:
    """The stage a FROM or --from names (by name, or by index for --from), if any."""
    for index, header in enumerate(headers[:before]):
        if header.name == ref.lower():
            return index
    if ref.isdigit() and int(ref) < before:
        return int(ref)
    return None


def base_images(
    dockerfile: Dockerfile, build_args: Mapping[str, str], auto_args: Mapping[str, str]
) -> tuple[str, ...]:
    """The image references used as FROM bases (not scratch, not stages), in order."""
    headers, _, _ = _stage_headers(dockerfile, build_args, auto_args)
    refs: list[str] = []
    for index, header in enumerate(headers):
        if header.image != "scratch" and _stage_index(headers, header.image, index) is None:
            refs.append(header.image)
    return tuple(dict.fromkeys(refs))


def make_plan(
    dockerfile: Dockerfile,
    *,
    base_configs: Mapping[str, Json],
    build_args: Mapping[str, str],
    auto_args: Mapping[str, str],
    target: str | None = None,
) -> Plan:
    """Plan every stage; ``base_configs`` maps each of :func:`base_images` to its image config."""
    headers, global_scope, used = _stage_headers(dockerfile, build_args, auto_args)
    names = [h.name for h in headers]
    for index, name in enumerate(names):
        if name is not None and name in names[:index]:
            raise DockerfileError(
                f"the stage name {name!r} is used twice",
                filename=dockerfile.filename,
                line=headers[index].line,
            )
    bodies = _stage_bodies(dockerfile)
    stages: list[Stage] = []
    for index, header in enumerate(headers):
        base_stage = None if header.image == "scratch" else _stage_index(headers, header.image, index)
        if base_stage is not None:
            base_config = stages[base_stage].config
        elif header.image == "scratch":
            base_config = {}
        else:
            base_config = base_configs[header.image].get("config") or {}
        state = _StageState(
            dockerfile,
            headers,
            index,
            copy.deepcopy(base_config),
            global_scope,
            build_args,
            auto_args,
            used,
        )
        for ins in bodies[index]:
            state.dispatch(ins)
        stages.append(
            Stage(
                index,
                header.name,
                None if header.image == "scratch" or base_stage is not None else header.image,
                base_stage,
                tuple(state.steps),
                state.config,
                state.author,
                header.line,
            )
        )
    target_index = _target(headers, target, dockerfile)
    order = _order(stages, target_index)
    unused = tuple(sorted(name for name in build_args if name not in used and name not in PROXY_ARGS))
    images = [s.base_image for s in stages if s.index in order and s.base_image]
    images += [
        step.from_image
        for s in stages
        if s.index in order
        for step in s.steps
        if isinstance(step, CopyStep) and step.from_image
    ]
    return Plan(tuple(stages), target_index, order, unused, tuple(dict.fromkeys(images)))


def _stage_bodies(dockerfile: Dockerfile) -> list[list[Instruction]]:
    bodies: list[list[Instruction]] = []
    for ins in dockerfile.instructions:
        if ins.keyword == "FROM":
            bodies.append([])
        elif bodies:
            bodies[-1].append(ins)
    return bodies


def _target(headers: Sequence[_From], target: str | None, dockerfile: Dockerfile) -> int:
    if target is None:
        return len(headers) - 1
    for index, header in enumerate(headers):
        if header.name == target.lower():
            return index
    known = ", ".join(h.name for h in headers if h.name) or "none are named"
    raise DockerfileError(
        f"--target {target!r} names no stage (stages: {known})", filename=dockerfile.filename
    )


def _order(stages: Sequence[Stage], target: int) -> tuple[int, ...]:
    seen: list[int] = []

    def visit(index: int) -> None:
        if index in seen:
            return
        for dep in stages[index].needs:
            visit(dep)
        seen.append(index)

    visit(target)
    return tuple(seen)


def _expand(
    word: str, scope: Mapping[str, str], ins: Instruction, dockerfile: Dockerfile, used: set[str]
) -> str:
    try:
        result = expand_word(word, scope, escape=dockerfile.escape)
    except ExpansionError as exc:
        raise DockerfileError(str(exc), filename=dockerfile.filename, line=ins.line) from exc
    used.update(result.used)
    return result.text


def _split_words(text: str, escape: str) -> list[str]:
    """Split on unquoted white space, keeping quotes and escapes for the later expansion."""
    words: list[str] = []
    word: list[str] = []
    quote = ""
    chars = iter(text)
    for char in chars:
        if char == escape and quote != "'":
            word.append(char)
            word.append(next(chars, ""))
        elif quote:
            word.append(char)
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
            word.append(char)
        elif char.isspace():
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(char)
    if word:
        words.append("".join(word))
    return words


def _arg_pairs(
    ins: Instruction, dockerfile: Dockerfile, scope: Mapping[str, str]
) -> list[tuple[str, str | None]]:
    """ARG name[=default] ...; defaults are expanded in the scope so far."""
    pairs: list[tuple[str, str | None]] = []
    words = _split_words(ins.args, dockerfile.escape)
    if not words:
        raise DockerfileError(
            "ARG requires a name (ARG name[=default])", filename=dockerfile.filename, line=ins.line
        )
    for word in words:
        name, eq, default = word.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise DockerfileError(f"invalid ARG name {name!r}", filename=dockerfile.filename, line=ins.line)
        pairs.append((name, _expand(default, scope, ins, dockerfile, set()) if eq else None))
    return pairs


def _key_values(ins: Instruction, dockerfile: Dockerfile) -> list[tuple[str, str]]:
    """ENV and LABEL arguments: ``k=v ...`` or the legacy ``k v`` form, unexpanded."""
    words = _split_words(ins.args, dockerfile.escape)
    if not words:
        raise DockerfileError(
            f"{ins.keyword} requires at least one argument",
            filename=dockerfile.filename,
            line=ins.line,
        )
    if "=" not in words[0]:
        if len(words) < 2:
            raise DockerfileError(
                f"{ins.keyword} {words[0]} needs a value ({ins.keyword} key=value)",
                filename=dockerfile.filename,
                line=ins.line,
            )
        return [(words[0], ins.args.split(None, 1)[1])]
    pairs = []
    for word in words:
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise DockerfileError(
                f"{ins.keyword} arguments must be key=value pairs, got {word!r}",
                filename=dockerfile.filename,
                line=ins.line,
            )
        pairs.append((key, value))
    return pairs


@dataclass
class _StageState:
    """The running state of one stage while its instructions are dispatched."""

    dockerfile: Dockerfile
    headers: Sequence[_From]
    index: int
    config: Json
    global_scope: Mapping[str, str]
    build_args: Mapping[str, str]
    auto_args: Mapping[str, str]
    used: set[str]
    args: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    author: str | None = None
    cmd_set: bool = False

    def error(self, ins: Instruction, message: str) -> DockerfileError:
        return DockerfileError(message, filename=self.dockerfile.filename, line=ins.line)

    @property
    def env(self) -> dict[str, str]:
        pairs = (item.partition("=") for item in self.config.get("Env") or [])
        return {key: value for key, _, value in pairs}

    @property
    def scope(self) -> dict[str, str]:
        """What expansion sees: ARGs in scope, overridden by ENV of the same name."""
        return {**self.args, **self.env}

    def expand(self, ins: Instruction, word: str) -> str:
        return _expand(word, self.scope, ins, self.dockerfile, self.used)

    def expand_list(self, ins: Instruction, text: str) -> list[str]:
        try:
            words, names = expand_words(text, self.scope, escape=self.dockerfile.escape)
        except ExpansionError as exc:
            raise self.error(ins, str(exc)) from exc
        self.used.update(names)
        return words

    @property
    def shell(self) -> tuple[str, ...]:
        return tuple(self.config.get("Shell") or DEFAULT_SHELL)

    @property
    def workdir(self) -> str:
        return str(self.config.get("WorkingDir") or "/")

    def meta(self, ins: Instruction, created_by: str | None = None) -> None:
        self.steps.append(ConfigStep(ins.line, created_by or ins.source))

    def dispatch(self, ins: Instruction) -> None:
        handler: Callable[[Instruction], None] = getattr(self, f"do_{ins.keyword.lower()}")
        handler(ins)

    def do_arg(self, ins: Instruction) -> None:
        for name, default in _arg_pairs(ins, self.dockerfile, self.scope):
            self.used.add(name)
            if name in self.build_args:
                self.args[name] = self.build_args[name]
            elif default is not None:
                self.args[name] = default
            elif name in self.global_scope:
                self.args[name] = self.global_scope[name]
            elif name in self.auto_args:
                self.args[name] = self.auto_args[name]
        self.meta(ins)

    def do_env(self, ins: Instruction) -> None:
        env = self.env
        for key, value in _key_values(ins, self.dockerfile):
            env[self.expand(ins, key)] = self.expand(ins, value)
            self.config["Env"] = [f"{k}={v}" for k, v in env.items()]
        self.meta(ins)

    def do_label(self, ins: Instruction) -> None:
        labels = dict(self.config.get("Labels") or {})
        for key, value in _key_values(ins, self.dockerfile):
            labels[self.expand(ins, key)] = self.expand(ins, value)
        self.config["Labels"] = labels
        self.meta(ins)

    def do_maintainer(self, ins: Instruction) -> None:
        self.author = ins.args
        self.meta(ins)

    def do_user(self, ins: Instruction) -> None:
        user = self.expand(ins, ins.args.strip())
        if not user:
            raise self.error(ins, "USER requires a user name or uid (USER name[:group])")
        self.config["User"] = user
        self.meta(ins)

    def do_workdir(self, ins: Instruction) -> None:
        path = self.expand(ins, ins.args.strip())
        if not path:
            raise self.error(ins, "WORKDIR requires a path")
        path = _join(self.workdir, path)
        self.config["WorkingDir"] = path
        self.steps.append(WorkdirStep(path, ins.line, f"WORKDIR {path}"))

    def command(self, ins: Instruction) -> list[str]:
        """The exec form as given, or the shell form wrapped in the stage's SHELL."""
        if ins.exec_form is not None:
            return list(ins.exec_form)
        if not ins.args:
            raise self.error(ins, f"{ins.keyword} requires a command")
        return [*self.shell, ins.args]

    def do_cmd(self, ins: Instruction) -> None:
        self.config["Cmd"] = self.command(ins)
        self.cmd_set = True
        self.meta(ins)

    def do_entrypoint(self, ins: Instruction) -> None:
        self.config["Entrypoint"] = self.command(ins) if ins.args else None
        if not self.cmd_set:
            self.config["Cmd"] = None
        self.meta(ins)

    def do_shell(self, ins: Instruction) -> None:
        if ins.exec_form is None or not ins.exec_form:
            raise self.error(ins, 'SHELL requires a JSON array, for example SHELL ["/bin/bash", "-c"]')
        self.config["Shell"] = list(ins.exec_form)
        self.meta(ins)

    def do_expose(self, ins: Instruction) -> None:
        ports = dict(self.config.get("ExposedPorts") or {})
        for word in self.expand_list(ins, ins.args):
            port, _, proto = word.partition("/")
            if not re.fullmatch(r"\d+(-\d+)?", port) or proto not in ("", "tcp", "udp", "sctp"):
                raise self.error(ins, f"invalid port {word!r} (expected PORT[/tcp|udp|sctp])")
            ports[f"{port}/{proto or 'tcp'}"] = {}
        self.config["ExposedPorts"] = ports
        self.meta(ins)

    def do_volume(self, ins: Instruction) -> None:
        volumes = dict(self.config.get("Volumes") or {})
        paths = list(ins.exec_form) if ins.exec_form is not None else self.expand_list(ins, ins.args)
        if not paths:
            raise self.error(ins, "VOLUME requires at least one path")
        for path in paths:
            volumes[self.expand(ins, path) if ins.exec_form is not None else path] = {}
        self.config["Volumes"] = volumes
        self.meta(ins)

    def do_stopsignal(self, ins: Instruction) -> None:
        signal = self.expand(ins, ins.args.strip())
        if not re.fullmatch(r"(SIG)?[A-Z0-9+-]+|\d+", signal):
            raise self.error(ins, f"invalid STOPSIGNAL {signal!r}")
        self.config["StopSignal"] = signal
        self.meta(ins)

    def do_onbuild(self, ins: Instruction) -> None:
        trigger = ins.source.split(None, 1)[1] if " " in ins.source else ""
        keyword = trigger.split(None, 1)[0].upper() if trigger else ""
        if keyword in ("", "ONBUILD", "FROM", "MAINTAINER"):
            raise self.error(ins, f"ONBUILD cannot trigger {keyword or 'nothing'}")
        self.config["OnBuild"] = [*(self.config.get("OnBuild") or []), trigger]
        self.meta(ins)

    def do_healthcheck(self, ins: Instruction) -> None:
        if ins.args.strip().upper() == "NONE" and not ins.flags:
            self.config["Healthcheck"] = {"Test": ["NONE"]}
            self.meta(ins)
            return
        keyword, _, rest = ins.args.partition(" ")
        if keyword.upper() != "CMD" or not rest.strip():
            raise self.error(ins, "HEALTHCHECK requires NONE or CMD followed by a command")
        exec_form = parse_exec_form(rest.strip())
        check: Json = {"Test": ["CMD", *exec_form] if exec_form else ["CMD-SHELL", rest.strip()]}
        for name, value in ins.flags:
            key = _HEALTHCHECK_FLAGS.get(name)
            if key is None:
                raise self.error(ins, f"unknown HEALTHCHECK flag --{name}")
            if name == "retries":
                if not (value or "").isdigit():
                    raise self.error(ins, f"--retries must be a whole number, got {value!r}")
                check[key] = int(value or "0")
            else:
                check[key] = _duration_ns(value or "", lambda m: self.error(ins, m))
        self.config["Healthcheck"] = check
        self.meta(ins)

    def run_env(self) -> tuple[tuple[str, str], ...]:
        """The environment of a RUN: the image ENV, ARGs in scope, proxies, a default PATH."""
        env = {name: value for name, value in self.build_args.items() if name in PROXY_ARGS}
        env |= self.args
        env |= self.env
        env.setdefault("PATH", DEFAULT_PATH)
        return tuple(sorted(env.items()))

    def do_run(self, ins: Instruction) -> None:
        network = ins.flag("network") or "default"
        if network not in ("default", "none", "host"):
            raise self.error(ins, f"RUN --network={network} is not supported (default, none or host)")
        if ins.heredocs:
            argv = [*self.shell, _heredoc_script(ins.args, ins.heredocs)]
        else:
            argv = self.command(ins)
        user = str(self.config.get("User") or "")
        created_by = f"RUN {' '.join(argv) if ins.exec_form is None else ins.args}"
        self.steps.append(
            RunStep(tuple(argv), self.run_env(), user, self.workdir, network, ins.line, created_by)
        )

    def do_copy(self, ins: Instruction) -> None:
        self.copy(ins)

    def do_add(self, ins: Instruction) -> None:
        self.copy(ins)

    def copy(self, ins: Instruction) -> None:
        if ins.exec_form is not None:
            words = [self.expand(ins, word) for word in ins.exec_form]
        else:
            words = self.expand_list(ins, ins.args)
        names = {doc.name for doc in ins.heredocs}
        inline = tuple(
            (
                doc.name,
                self.expand(ins, doc.content) if doc.expand and ins.keyword == "COPY" else doc.content,
            )
            for doc in ins.heredocs
        )
        words = [w for w in words if not (w.startswith("<<") and w.lstrip("<-").strip("'\"") in names)]
        if len(words) + len(inline) < 2:
            raise self.error(ins, f"{ins.keyword} requires at least one source and a destination")
        *sources, dest = words
        from_stage, from_image = self.copy_from(ins)
        dest = _join(self.workdir, dest) + ("/" if dest.endswith("/") and dest != "/" else "")
        chown = ins.flag("chown")
        step = CopyStep(
            tuple(sources),
            dest,
            from_stage,
            from_image,
            self.expand(ins, chown) if chown else None,
            ins.flag("chmod"),
            inline,
            ins.line,
            f"{ins.keyword} {ins.args}",
        )
        self.steps.append(step)

    def copy_from(self, ins: Instruction) -> tuple[int | None, str | None]:
        ref = ins.flag("from")
        if ref is None:
            return None, None
        ref = self.expand(ins, ref)
        stage = _stage_index(self.headers, ref, self.index)
        if stage is not None:
            return stage, None
        if ref.isdigit():
            raise self.error(ins, f"--from={ref} names stage {ref}, which does not come before this one")
        return None, ref


def _heredoc_script(args: str, heredocs: Sequence[Heredoc]) -> str:
    """A RUN with heredocs as one shell script: a lone heredoc is the script itself."""
    if len(heredocs) == 1 and _WORD.fullmatch(args.strip()) and args.strip().startswith("<<"):
        return heredocs[0].content
    return args + "\n" + "".join(f"{doc.content}{doc.name}\n" for doc in heredocs)


def _join(workdir: str, path: str) -> str:
    """Resolve ``path`` against the working directory, lexically, as BuildKit does."""
    joined = posixpath.normpath(posixpath.join(workdir, path))
    return "/" + joined.lstrip("/")


def _duration_ns(text: str, error: Callable[[str], DockerfileError]) -> int:
    """A Go duration (``30s``, ``1m30s``, ``500ms``) in nanoseconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise error(f"invalid duration {text!r} (expected a Go duration such as 30s or 1m30s)")
    return int(sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts))
