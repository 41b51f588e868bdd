"""COPY and ADD: find the sources a step names and write them through the mounted root.

Sources come from the build context (wildcards, .dockerignore), from another stage's or image's
root file system (mounted read-only by the caller), or from heredocs. Errors are ContextErrors
without a line; the executor adds the Dockerfile location.
"""

from __future__ import annotations

from pathlib import Path

from builder.buildcontext import BuildContext, Source
from builder.errors import ContextError
from builder.fscopy import CopySource, copy_sources, parse_chmod, walk_tree
from builder.plan import CopyStep
from builder.rootpath import resolve_in_root
from builder.users import Identity, resolve_chown

__all__ = ["context_sources", "run_copy"]

_ROOT = Identity(0, 0)


def context_sources(step: CopyStep, context: BuildContext) -> list[Source]:
    """Every context path the step's sources match; a source matching nothing is an error."""
    found = []
    for pattern in step.sources:
        matched = context.match(pattern)
        if not matched:
            raise ContextError(
                f"COPY source {pattern!r} is not in the build context (or .dockerignore excludes it)."
            )
        found.extend(matched)
    return found


def run_copy(step: CopyStep, root: Path, context: BuildContext, origin: Path | None, staging: Path) -> None:
    """Copy into ``root``; ``origin`` is the mounted root of ``--from``, ``staging`` a scratch dir."""
    owner = resolve_chown(root, step.chown) if step.chown else None
    chmod = parse_chmod(step.chmod) if step.chmod else None
    into_dir = step.dest.endswith("/") or len(step.sources) + len(step.inline) > 1
    into_dir = into_dir or any(ch in p for p in step.sources for ch in "*?[")
    items = _inline_sources(step, staging)
    if origin is None:
        items += [_context_item(context, source) for source in context_sources(step, context)]
        owner = owner or _ROOT
    else:
        items += [_origin_item(origin, pattern) for pattern in step.sources]
    try:
        copy_sources(items, root, step.dest, into_dir=into_dir, owner=owner or _ROOT, chmod=chmod)
    except OSError as exc:
        raise ContextError(f"COPY failed: {exc}.") from exc


def _context_item(context: BuildContext, source: Source) -> CopySource:
    return CopySource(source.path, source.path.name, lambda: context.walk(source))


def _origin_item(origin: Path, pattern: str) -> CopySource:
    path = resolve_in_root(origin, pattern)
    if not path.exists() and not path.is_symlink():
        raise ContextError(f"COPY --from source {pattern!r} does not exist in that stage or image.")
    return CopySource(path, path.name, lambda: walk_tree(path))


def _inline_sources(step: CopyStep, staging: Path) -> list[CopySource]:
    """Heredoc sources, written to files first so that one code path copies everything."""
    items = []
    for name, content in step.inline:
        staging.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text(content)
        (staging / name).chmod(0o644)
        items.append(CopySource(staging / name, name, lambda: iter(())))
    return items
