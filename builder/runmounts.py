"""RUN --mount and RUN's helper files, made into the sandbox's bind mounts for one step.

- ``cache``: a directory kept in the store per id, shared by every build (``sharing=locked``
  takes a lock for the step); never part of a layer or a cache key's content.
- ``bind``: a context path or a path of a stage or image, read-only; ``rw`` binds a scratch copy
  whose writes are thrown away, as in BuildKit.
- ``tmpfs``: an empty scratch directory, thrown away after the step.
- ``secret``: the bytes given with ``--secret``, as a read-only file and/or an environment
  variable; never in a layer, a cache key or the history.
- ``ssh``: not supported yet; a required one is an error, an optional one is skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path

from builder.buildcontext import BuildContext
from builder.digest import sha256_hex
from builder.errors import BuilderError, ContextError
from builder.mounts import Mount
from builder.plan import RunStep
from builder.rootpath import resolve_in_root
from builder.sandbox import BindMount

__all__ = ["OriginOpener", "run_mounts"]

# (stage index, image reference) → a context manager mounting that root read-only
OriginOpener = Callable[[int | None, str | None], AbstractContextManager[Path]]


@contextlib.contextmanager
def run_mounts(
    step: RunStep,
    *,
    scratch: Path,
    cache_root: Path,
    context: BuildContext,
    secrets: Mapping[str, bytes],
    open_origin: OriginOpener,
) -> Iterator[tuple[tuple[BindMount, ...], dict[str, str]]]:
    """The bind mounts and extra environment of ``step``; everything is undone on exit."""
    if not step.files and not step.mounts:  # most steps: no scratch dir to make and remove
        yield (), {}
        return
    import shutil  # only a step with mounts or files needs it (start-up of the RUN path)

    binds: list[BindMount] = []
    env: dict[str, str] = {}
    scratch.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)  # secrets and copies go at once
        for number, (path, content) in enumerate(step.files):
            host = scratch / f"file-{number}"
            host.write_text(content)
            host.chmod(0o755)
            binds.append(BindMount(str(host), path, readonly=True))
        for number, mount in enumerate(step.mounts):
            where = scratch / f"mount-{number}"
            if mount.type == "cache":
                binds.append(
                    BindMount(str(_cache_dir(cache_root, mount, stack)), mount.target, readonly=False)
                )
            elif mount.type == "tmpfs":
                where.mkdir()
                binds.append(BindMount(str(where), mount.target, readonly=False))
            elif mount.type == "bind":
                binds.append(_bind(mount, where, context, open_origin, stack))
            elif mount.type == "secret":
                binds.extend(_secret(mount, where, secrets, env))
            elif mount.required:
                raise BuilderError(f"RUN --mount=type={mount.type} is not supported yet.")
        yield tuple(binds), env


def _cache_dir(cache_root: Path, mount: Mount, stack: contextlib.ExitStack) -> Path:
    key = sha256_hex((mount.id or mount.target).encode())
    path = cache_root / key
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mount.mode if mount.mode is not None else 0o755)
        os.chown(path, mount.uid or 0, mount.gid or 0)
    if mount.sharing == "locked":
        lock = stack.enter_context(open(cache_root / f"{key}.lock", "a"))  # noqa: SIM115 - the stack closes it
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    return path


def _bind(
    mount: Mount, where: Path, context: BuildContext, open_origin: OriginOpener, stack: contextlib.ExitStack
) -> BindMount:
    if mount.from_stage is None and mount.from_image is None:
        found = context.match(mount.source or ".")
        if not found:
            raise ContextError(f"the bind source {mount.source!r} is not in the build context.")
        source = found[0].path
    else:
        root = stack.enter_context(open_origin(mount.from_stage, mount.from_image))
        source = resolve_in_root(root, mount.source or "/")
        if not os.path.lexists(source):
            raise ContextError(f"the bind source {mount.source!r} does not exist in that stage or image.")
    if mount.readonly:
        return BindMount(str(source), mount.target, readonly=True)
    import shutil  # see run_mounts

    if source.is_dir():  # writes to a rw bind are thrown away: give the step a copy
        shutil.copytree(source, where, symlinks=True)
    else:
        shutil.copy2(source, where)
    return BindMount(str(where), mount.target, readonly=False)


def _secret(mount: Mount, where: Path, secrets: Mapping[str, bytes], env: dict[str, str]) -> list[BindMount]:
    value = secrets.get(mount.id)
    if value is None:
        if mount.required:
            raise BuilderError(
                f"the secret {mount.id!r} is required; pass it with --secret id={mount.id},src=FILE."
            )
        return []
    if mount.env:
        env[mount.env] = value.decode(errors="replace")
    if not mount.target:
        return []
    where.write_bytes(value)
    where.chmod(mount.mode if mount.mode is not None else 0o400)
    os.chown(where, mount.uid or 0, mount.gid or 0)
    return [BindMount(str(where), mount.target, readonly=True)]
