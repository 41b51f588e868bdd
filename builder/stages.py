"""The stage graph: the global ARG scope, FROM lines resolved in it, and which stages a target needs.

BuildKit's ``dockerfile2llb`` is the model. ARGs before the first FROM, over the automatic
platform ARGs, form the global scope that FROM lines expand in. A stage depends on its base and on
the stages its ``COPY --from`` and ``RUN --mount from=`` name; those references are resolved here,
both before planning (to know which base images a target needs) and while planning. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from msgspec import Struct

from builder.dockerfile import GO_SPACE, Dockerfile, suggest
from builder.errors import BuilderError, DockerfileError, ExpansionError
from builder.expansion import expand_word
from builder.instructions import (
    Command,
    CopyCommand,
    FromCommand,
    InvalidValue,
    RunCommand,
    check_platform,
    parse_stages,
)
from builder.mounts import mount_from
from builder.oci import parse_reference

__all__ = [
    "ParsedStages",
    "StageHeader",
    "base_images",
    "build_order",
    "check_at",
    "closure",
    "copy_ref",
    "expand_at",
    "find_target",
    "is_plain",
    "parse_build_args",
    "platform_args",
    "resolve_stages",
    "stage_ref",
    "static_deps",
]

T = TypeVar("T")


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


class StageHeader(Struct, frozen=True):
    """A FROM line resolved in the global scope."""

    cmd: FromCommand
    image: str
    platform: str | None
    base_stage: int | None


class ParsedStages(Struct, frozen=True):
    """A Dockerfile's instructions checked and grouped by stage, its FROM lines resolved."""

    dockerfile: Dockerfile
    headers: tuple[StageHeader, ...]
    bodies: tuple[tuple[Command, ...], ...]
    scope: Mapping[str, str]  # the global scope
    declared: frozenset[str]  # the global ARGs

    def error(self, line: int, message: str) -> DockerfileError:
        return DockerfileError(message, filename=self.dockerfile.filename, line=line)


# Compiled on first use (re's own cache), not at import.
_SPECIAL = {escape: f"[$'\"{re.escape(escape)}]" for escape in ("\\", "`")}


def is_plain(word: str, escape: str) -> bool:
    """A word with nothing to expand: no variable, quote or escape."""
    return re.search(_SPECIAL[escape], word) is None


def expand_at(df: Dockerfile, line: int, word: str, scope: Mapping[str, str]) -> tuple[str, frozenset[str]]:
    """``word`` expanded in ``scope``, and the names it used; an error is located at ``line``."""
    if is_plain(word, df.escape):
        return word, frozenset()
    try:
        result = expand_word(word, scope, escape=df.escape)
    except ExpansionError as exc:
        raise DockerfileError(str(exc), filename=df.filename, line=line) from exc
    return result.text, result.used


def resolve_stages(
    df: Dockerfile, build_args: Mapping[str, str], auto_args: Mapping[str, str]
) -> ParsedStages:
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
                scope[name] = expand_at(df, arg.ins.line, default, scope)[0]
    headers = _headers(df, [cmd for cmd, _ in stages], scope)
    return ParsedStages(df, headers, tuple(body for _, body in stages), scope, frozenset(declared))


def _headers(df: Dockerfile, froms: list[FromCommand], scope: Mapping[str, str]) -> tuple[StageHeader, ...]:
    headers: list[StageHeader] = []
    names: dict[str, int] = {}
    for index, cmd in enumerate(froms):
        line = cmd.ins.line
        image, used = expand_at(df, line, cmd.image, scope)
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
        headers.append(StageHeader(cmd, image, platform, base_stage))
    return tuple(headers)


def _from_platform(df: Dockerfile, cmd: FromCommand, scope: Mapping[str, str]) -> str | None:
    if cmd.platform is None:
        return None
    platform = expand_at(df, cmd.ins.line, cmd.platform, scope)[0]
    if not platform:
        raise DockerfileError(
            f"FROM --platform={cmd.platform} expands to nothing.", filename=df.filename, line=cmd.ins.line
        )
    check_at(df, cmd.ins.line, check_platform, platform)
    return platform


def _check_reference(ref: str) -> None:
    try:
        parse_reference(ref)
    except ValueError as exc:
        raise InvalidValue(f"{exc}.") from exc


def check_at(df: Dockerfile, line: int, check: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a value check; an invalid value is a DockerfileError at ``line``."""
    try:
        return check(*args, **kwargs)
    except InvalidValue as exc:
        raise DockerfileError(str(exc), filename=df.filename, line=line) from exc


def stage_ref(
    parsed: ParsedStages, index: int, line: int, ref: str, *, by_number: bool
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
        check_at(parsed.dockerfile, line, _check_reference, ref)
        return None, ref
    if stage >= index:
        where = "this very stage" if stage == index else f"the stage on line {headers[stage].cmd.ins.line}"
        raise parsed.error(line, f"--from={ref} names {where}; a stage can only read from stages before it.")
    return stage, None


def copy_ref(parsed: ParsedStages, index: int, cmd: CopyCommand) -> tuple[int | None, str | None]:
    ref = cmd.flags.get("from")
    if ref is None:
        return None, None
    if expand_word(ref, {}, escape=parsed.dockerfile.escape).text != ref:
        raise parsed.error(
            cmd.ins.line,
            f"--from={ref}: variables are not expanded in --from; "
            "define a stage with FROM and a global ARG, and copy from it.",
        )
    return stage_ref(parsed, index, cmd.ins.line, ref, by_number=True)


def static_deps(parsed: ParsedStages) -> list[set[int]]:
    """Each stage's dependencies as written: its base, COPY --from, RUN --mount from=."""
    deps: list[set[int]] = []
    for index, (header, body) in enumerate(zip(parsed.headers, parsed.bodies, strict=True)):
        refs: list[tuple[int | None, str | None]] = [(header.base_stage, None)]
        for cmd in body:
            if isinstance(cmd, CopyCommand) and cmd.keyword == "COPY":
                refs.append(copy_ref(parsed, index, cmd))
            elif isinstance(cmd, RunCommand):
                froms = [ref for ref in map(mount_from, cmd.mounts) if ref]
                refs += [stage_ref(parsed, index, cmd.ins.line, ref, by_number=False) for ref in froms]
        deps.append({stage for stage, _ in refs if stage is not None})
    return deps


def closure(roots: Iterable[int], deps: list[set[int]]) -> set[int]:
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        index = todo.pop()
        if index not in seen:
            seen.add(index)
            todo.extend(deps[index])
    return seen


def find_target(parsed: ParsedStages, target: str | None) -> int:
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
    parsed = resolve_stages(dockerfile, build_args, auto_args)
    indexes: Iterable[int] = range(len(parsed.headers))
    if target is not None:
        indexes = sorted(closure([find_target(parsed, target)], static_deps(parsed)))
    headers = [parsed.headers[index] for index in indexes]
    return tuple(dict.fromkeys(h.image for h in headers if h.image != "scratch" and h.base_stage is None))


def build_order(needs: Sequence[Iterable[int]], target: int) -> tuple[int, ...]:
    """The stages ``target`` needs, dependencies first; ``needs[i]`` is what stage ``i`` reads."""
    seen: list[int] = []

    def visit(index: int) -> None:
        if index not in seen:
            for dep in needs[index]:
                visit(dep)
            seen.append(index)

    visit(target)
    return tuple(seen)
