"""COPY and ADD: find what a step names and write it through the mounted root.

Sources come from the build context (wildcards, ``.dockerignore``), from another stage's or
image's root file system (mounted read-only by the caller), from heredocs, and for ADD from
URLs and Git repositories; ADD unpacks a local tar archive (plain, gzip, bzip2, xz, zstd) with
the hostile-tar-safe applier. ``--exclude`` leaves out paths (relative to each source),
``--parents`` keeps the path of each source below the ``/./`` pivot. The same source list
gives the content digests the cache key uses. Errors are ContextErrors without a line; the
executor adds the Dockerfile location.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from functools import partial
from pathlib import Path

from msgspec import Struct

from builder.buildcontext import BuildContext, Source, digest_entry, filtered_walk, match_root
from builder.compression import open_layer
from builder.errors import BuilderError, ContextError
from builder.fetch import GitSource, fetch_git, fetch_url, is_url, parse_git_source, url_filename
from builder.fscopy import (
    Chmod,
    CopyEntry,
    CopySource,
    Walker,
    check_unchanged,
    copy_sources,
    describe,
    make_dirs,
    parse_chmod,
)
from builder.patterns import BadPatternError, PatternMatcher, clean, has_wildcards
from builder.plan import CopyStep
from builder.rootpath import is_real_dir, resolve_in_root
from builder.store import remove_tree, unique_name
from builder.users import Identity, resolve_chown

__all__ = ["run_copy", "source_digests"]

_ROOT = Identity(0, 0)


class _Item(Struct, frozen=True):
    """One source to write: copied, or unpacked when it is a local archive ADD opens."""

    source: CopySource
    key: str  # its name in the content digests
    digest: str | None = None  # set for fetched sources, named by their content or commit
    unpack: bool = False


def run_copy(
    step: CopyStep, root: Path, context: BuildContext, origin: Path | None, scratch: Path, users: Path
) -> None:
    """Copy into ``root``; ``origin`` is the mounted root of ``--from``.

    ``scratch`` holds heredocs and downloads (kept for the build); ``users`` is the root whose
    /etc/passwd and /etc/group name the ``--chown`` user.
    """
    owner = resolve_chown(users, step.chown) if step.chown else (_ROOT if origin is None else None)
    chmod = parse_chmod(step.chmod) if step.chmod else None
    items = _items(step, context, origin, scratch, fetch=True)
    if not step.inline:
        _copy_items(step, items, root, owner, chmod)
        return
    staging = scratch / unique_name("heredoc-")  # scratch is this build's own
    staging.mkdir(0o700)
    try:
        _copy_items(step, items + _inline(step, staging), root, owner, chmod)
    finally:
        remove_tree(staging)


def _copy_items(
    step: CopyStep, items: list[_Item], root: Path, owner: Identity | None, chmod: Chmod | None
) -> None:
    if not items:
        return  # wildcards that matched nothing: BuildKit copies nothing and says nothing
    dest = _destination(step, root, len(items))
    for item in items:
        if item.unpack:
            _unpack(item.source, root, dest, owner)
        else:
            copy_sources([item.source], root, dest, owner=owner, chmod=chmod)


def source_digests(
    step: CopyStep, context: BuildContext, origin: Path | None, scratch: Path
) -> dict[str, str]:
    """A digest per copied path (and per fetched source): what the step's result depends on.

    Heredocs are not here: their text is a field of the step. A URL with ``--checksum`` is
    named by it without a download.
    """
    digests: dict[str, str] = {}
    for item in _items(step, context, origin, scratch, fetch=False):
        if item.digest is not None:
            digests[item.key] = item.digest
            continue
        top = item.source.top or describe(str(item.source.path))
        # a stage's files are keyed with their owners; the context's through its remembered sums
        if origin is not None:
            keyed = partial(digest_entry, owners=True)
        else:
            keyed = partial(digest_entry, sums=context.sums)
        digests[item.key] = keyed(item.key, top)
        for entry in item.source.children():
            name = f"{item.key}/{entry.rel}" if item.key else entry.rel
            digests[name] = keyed(name, entry)
    return digests


def _items(
    step: CopyStep, context: BuildContext, origin: Path | None, scratch: Path, *, fetch: bool
) -> list[_Item]:
    try:
        exclude = PatternMatcher.compile(step.exclude) if step.exclude else None
    except BadPatternError as exc:
        raise ContextError(f"--exclude has an {exc}.") from None
    items: list[_Item] = []
    for pattern in step.sources:
        git = parse_git_source(pattern)
        if (git is not None or is_url(pattern)) and not step.add:
            raise ContextError(f"COPY cannot fetch {pattern}; use ADD for URLs and Git repositories.")
        if git is not None:  # always fetched: a Git source is named by the commit of its ref
            items.append(_git_item(step, pattern, git, scratch))
        elif is_url(pattern):
            items.append(_url_item(step, pattern, scratch, fetch=fetch))
        else:
            items += _local_items(step, pattern, context, origin, exclude)
    return items


def _local_items(
    step: CopyStep, pattern: str, context: BuildContext, origin: Path | None, exclude: PatternMatcher | None
) -> list[_Item]:
    """The matches of one source in the context or the --from root, excluded ones left out."""
    pivot = pattern.partition("/./")[0] if step.parents and "/./" in pattern else ""
    matches = context.match(pattern) if origin is None else match_root(origin, pattern, confine=False)
    if not matches and not has_wildcards(pattern):
        where = "that stage or image" if origin else "the build context (or .dockerignore excludes it)"
        raise ContextError(f"{'ADD' if step.add else 'COPY'} source {pattern!r} is not in {where}.")
    items = []
    for match in matches:
        if exclude is not None and (exclude.matches(match.name) or exclude.matches(match.given)):
            continue
        parents: tuple[tuple[str, Path], ...] = ()
        if step.parents:
            parents = _parents(origin or context.root, match, pivot, confine=origin is None)
        top = context.describe(match) if origin is None else None
        source = CopySource(match.path, match.name, _children(match, context, origin, exclude), parents, top)
        unpack = step.add and step.unpack is not False and origin is None and _is_archive(match.path)
        items.append(_Item(source, match.given, unpack=unpack))
    return items


def _children(
    match: Source, context: BuildContext, origin: Path | None, exclude: PatternMatcher | None
) -> Walker:
    if not is_real_dir(match.path):
        return _no_children
    if origin is None:
        return partial(context.entries, match, exclude)
    return partial(filtered_walk, match.path, [(exclude, "")] if exclude else [])


def _parents(root: Path, match: Source, pivot: str, *, confine: bool) -> tuple[tuple[str, Path], ...]:
    """The directories from the --parents pivot down to the source (a directory included)."""
    base = clean("/" + pivot).lstrip("/")
    rel = match.given[len(base) :].lstrip("/") if base and match.given.startswith(base + "/") else match.given
    parts = rel.split("/") if rel else []
    if not is_real_dir(match.path):
        parts = parts[:-1]
    found = []
    for index in range(len(parts)):
        path = "/".join([base, *parts[: index + 1]]) if base else "/".join(parts[: index + 1])
        found.append((parts[index], resolve_in_root(root, path, confine=confine)))
    return tuple(found)


def _url_item(step: CopyStep, url: str, scratch: Path, *, fetch: bool) -> _Item:
    if fetch or not step.checksum:
        fetched = fetch_url(url, scratch, step.checksum)
        path, digest = fetched.path, fetched.digest
    else:
        path, digest = Path(url_filename(url)), step.checksum
    unpack = fetch and step.unpack is True and _is_archive(path)
    return _Item(CopySource(path, url_filename(url), _no_children), url, digest, unpack)


def _git_item(step: CopyStep, source: str, git: GitSource, scratch: Path) -> _Item:
    keep = step.keep_git_dir if git.keep_git_dir is None else git.keep_git_dir
    fetched = fetch_git(git, scratch, keep_git_dir=keep, checksum=step.checksum)
    try:
        top = match_root(fetched.path, git.subdir or ".", confine=True)
    except ContextError:
        raise ContextError(
            f"the directory {git.subdir!r} of {git.remote} leads out of the repository."
        ) from None
    if not top or not is_real_dir(top[0].path):
        raise ContextError(f"the Git repository {git.remote} has no directory {git.subdir!r}.")
    tree = partial(filtered_walk, top[0].path, [])
    return _Item(CopySource(top[0].path, "", tree), source, f"{fetched.digest}:{git.subdir}")


def _inline(step: CopyStep, staging: Path) -> list[_Item]:
    """Heredoc sources, written to files first so that one code path copies everything."""
    items = []
    for name, content in step.inline:
        if "/" in name or name in (".", ".."):
            raise ContextError(f"the heredoc name {name!r} cannot be a file name.")
        path = staging / name
        path.write_text(content)
        path.chmod(0o644)
        items.append(_Item(CopySource(path, name, _no_children), name))
    return items


def _destination(step: CopyStep, root: Path, count: int) -> str:
    """The destination; several sources need a directory, as the Dockerfile reference says."""
    if count == 1 or step.dest.endswith("/") or step.parents:
        return step.dest
    if is_real_dir(resolve_in_root(root, step.dest)):
        return step.dest + "/"
    keyword = "ADD" if step.add else "COPY"
    raise ContextError(
        f"When using {keyword} with more than one source file, the destination must be a directory "
        f"and end with a /, and {step.dest} is neither."
    )


def _is_archive(path: Path) -> bool:
    """Whether a regular file holds a tar stream, plain or compressed (BuildKit's isArchivePath)."""
    import tarfile  # only ADD of a local file needs it (start-up time of the cached path)

    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return False
        with path.open("rb") as file:
            head = open_layer(file).read(tarfile.BLOCKSIZE)
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except (OSError, BuilderError, tarfile.HeaderError):
        return False
    return True


def _unpack(source: CopySource, root: Path, dest: str, owner: Identity | None) -> None:
    """Extract an archive into the directory ``dest``; its entries keep the owners they carry."""
    from builder.tarsafe import apply_layer  # see _is_archive

    make_dirs(root, dest, owner)
    target = resolve_in_root(root, dest)
    try:
        with source.path.open("rb") as file:
            apply_layer(open_layer(file), target, overlay_whiteouts=False)
            if source.top is not None:  # the archive the cache key hashed, not a later one
                check_unchanged(file.fileno(), source.top)
    except BuilderError as exc:
        detail = str(exc)
        raise ContextError(
            f"ADD could not unpack {source.name} into {dest}: {detail[:1].lower()}{detail[1:]}"
        ) from exc
    except OSError as exc:
        raise ContextError(f"ADD could not read {source.name}: {exc.strerror}.") from exc


def _no_children() -> Iterable[CopyEntry]:
    return ()
