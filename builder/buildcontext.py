"""The build context: a directory read as hostile input, filtered by ``.dockerignore``.

What a COPY sees is what BuildKit would have been sent: paths ``.dockerignore`` excludes do
not exist, except the directories that hold a path a ``!`` rule brings back. Sources are
matched with Go ``filepath.Match`` wildcards (BuildKit's ResolveWildcards), a symlink named as
a source is followed but never out of the context, and content is keyed by path, type, mode,
link target and bytes: never by mtime or by where the checkout lives.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.errors import ContextError
from builder.fscopy import travelling_xattrs
from builder.patterns import BadPatternError, PatternMatcher, clean, go_match, has_wildcards
from builder.rootpath import RootEscapeError, is_real_dir, resolve_in_root

__all__ = [
    "BuildContext",
    "IgnoreRules",
    "Source",
    "entry_digest",
    "filtered_walk",
    "match_root",
    "split_wildcards",
]

_CHUNK = 1 << 20
_BOM = "\ufeff"


@dataclass(frozen=True)
class IgnoreRules:
    """``.dockerignore`` patterns, read as moby's ``ignorefile.ReadAll`` reads them."""

    matcher: PatternMatcher

    @classmethod
    def parse(cls, text: str, filename: str = ".dockerignore") -> IgnoreRules:
        patterns = []
        for number, raw in enumerate(text.removeprefix(_BOM).splitlines(), 1):
            if raw.startswith("#"):  # a comment only in the first column, as Docker reads it
                continue
            line = raw.strip()
            exception = line.startswith("!")
            line = line[1:].strip() if exception else line
            if line:
                line = clean(line)
                line = line[1:] if len(line) > 1 and line.startswith("/") else line
            elif not exception:
                continue
            pattern = "!" + line if exception else line
            try:
                PatternMatcher.compile([pattern])
            except BadPatternError as exc:
                raise ContextError(f"{filename}:{number}: {exc}.") from None
            patterns.append(pattern)
        return cls(PatternMatcher.compile(patterns))

    def ignored(self, relpath: str) -> bool:
        """Whether a context-relative path is excluded (itself or through a parent)."""
        return bool(relpath) and self.matcher.matches(relpath)


@dataclass(frozen=True)
class Source:
    """One matched COPY source: its place in the root, on the host, and the path it was named by."""

    relpath: str  # relative to the root, symlinks resolved; "" for the root itself
    path: Path
    given: str  # relative to the root as matched, before symlinks were followed

    @property
    def name(self) -> str:
        """The name the source has when it is copied into a directory."""
        return posixpath.basename(self.given)


def split_wildcards(path: str) -> tuple[str, str]:
    """The components before the first one with a wildcard, and the rest (BuildKit's split)."""
    parts = path.split("/")
    for index, part in enumerate(parts):
        if has_wildcards(part):
            return "/".join(parts[:index]), "/".join(parts[index:])
    return path, ""


def match_root(root: Path, pattern: str, *, confine: bool) -> list[Source]:
    """The existing paths of ``root`` a COPY source names, as BuildKit's ResolveWildcards finds them.

    ``..`` is cleaned against the root; the part before the first wildcard and each match are
    resolved following symlinks inside ``root`` (``confine``: a link pointing out is an error);
    wildcards follow Go's filepath.Match and never look through a symlink.
    """
    cleaned = clean("/" + pattern).lstrip("/")
    prefix, rest = split_wildcards(cleaned)
    if not rest:
        candidates = [cleaned]
    else:
        base = _resolve(root, prefix, pattern, confine=confine)
        base_rel = _relative(root, base)
        candidates = [
            f"{base_rel}/{rel}" if base_rel else rel for rel in _wildcard_matches(base, rest, pattern)
        ]
    found = []
    for given in candidates:
        path = _resolve(root, given, pattern, confine=confine)
        if os.path.lexists(path):
            found.append(Source(_relative(root, path), path, given))
    return found


def _wildcard_matches(base: Path, rest: str, pattern: str) -> list[str]:
    """Paths below ``base`` that ``rest`` matches, in walk order; symlinks and matches not entered."""
    depth = rest.count("/")
    found = []
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            names = os.listdir(base / rel)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise ContextError(f"cannot read {base / rel}: {exc.strerror}.") from exc
        for name in names:
            child = f"{rel}/{name}" if rel else name
            try:
                matched = go_match(rest, child)
            except BadPatternError:
                raise ContextError(f"the source pattern {pattern!r} is not a valid wildcard.") from None
            if matched:
                found.append(child)
            elif child.count("/") < depth and is_real_dir(base / child):
                stack.append(child)
    return sorted(found, key=lambda rel: rel.split("/"))


def _resolve(root: Path, relpath: str, pattern: str, *, confine: bool) -> Path:
    try:
        return resolve_in_root(root, relpath, confine=confine)
    except RootEscapeError as exc:
        raise ContextError(
            f"the source {pattern!r} resolves outside the build context: {exc.link.lstrip('/')} "
            f"is a symbolic link to {exc.target}."
        ) from None


def _relative(root: Path, path: Path) -> str:
    return "" if path == root else str(path.relative_to(root))


Filter = tuple[PatternMatcher, str]  # patterns, and the prefix the walked paths are matched under


def filtered_walk(top: Path, filters: Sequence[Filter] = ()) -> Iterator[tuple[str, Path]]:
    """Every path below ``top`` (relative to it), sorted, a directory before its contents.

    Symlinks are yielded, never followed. A path a filter matches is left out; a directory left
    out is still entered when each filter that matched it has a ``!`` rule that may bring back
    something below, and is yielded only if something is.
    """
    pending: list[tuple[str, Path]] = []  # left-out dirs entered, not yet yielded
    stack = [("", iter(_entries(top)))]
    while stack:
        rel, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            if pending and pending[-1][0] == rel:
                pending.pop()
            continue
        child = f"{rel}/{entry.name}" if rel else entry.name
        is_dir = entry.is_dir(follow_symlinks=False)
        path = top / child
        hits = [(m, f"{prefix}/{child}" if prefix else child) for m, prefix in filters]
        hits = [(m, name) for m, name in hits if m.matches(name)]
        if hits:
            if is_dir and all(m.may_include_below(name) for m, name in hits):
                pending.append((child, path))
                stack.append((child, iter(_entries(path))))
            continue
        yield from pending
        pending.clear()
        yield child, path
        if is_dir:
            stack.append((child, iter(_entries(path))))


class BuildContext:
    """A context directory with its ignore rules."""

    def __init__(self, root: Path, ignore: IgnoreRules) -> None:
        self.root = root
        self.ignore = ignore

    @classmethod
    def load(cls, root: Path, dockerfile: Path | None) -> BuildContext:
        """Read ``<Dockerfile>.dockerignore`` next to the Dockerfile, else ``.dockerignore``."""
        if not root.is_dir():
            raise ContextError(f"the build context {root} is not a directory.")
        candidates = [dockerfile.with_name(dockerfile.name + ".dockerignore")] if dockerfile else []
        candidates.append(root / ".dockerignore")
        for candidate in candidates:
            if candidate.is_file():
                try:
                    text = candidate.read_text(errors="surrogateescape")
                except OSError as exc:
                    raise ContextError(f"cannot read {candidate}: {exc.strerror}.") from exc
                return cls(root, IgnoreRules.parse(text, str(candidate)))
        return cls(root, IgnoreRules.parse(""))

    def match(self, pattern: str) -> list[Source]:
        """The context paths a COPY source names, leaving out what ``.dockerignore`` excludes.

        A symlink pointing out of the context is an error; a name that does not exist, or a
        wildcard that matches nothing, gives an empty list.
        """
        return [s for s in match_root(self.root, pattern, confine=True) if self._present(s)]

    def _present(self, source: Source) -> bool:
        """Whether BuildKit would have been sent the path: not ignored, or a dir with kept content."""
        if not self.ignore.ignored(source.relpath):
            return True
        if not is_real_dir(source.path) or not self.ignore.matcher.may_include_below(source.relpath):
            return False
        return next(iter(self.walk(source)), None) is not None

    def walk(self, source: Source, exclude: PatternMatcher | None = None) -> Iterator[tuple[str, Path]]:
        """Every path below a source directory (relative to it), ignored and excluded ones left out."""
        filters = [(self.ignore.matcher, source.relpath)]
        if exclude is not None:
            filters.append((exclude, ""))
        return filtered_walk(source.path, filters)


def _entries(directory: Path) -> list[os.DirEntry[str]]:
    try:
        return sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise ContextError(f"cannot read {directory}: {exc.strerror}.") from exc


def entry_digest(relpath: str, path: Path, *, owners: bool = False) -> str:
    """What a copy of the entry depends on: name, type, mode, link target or bytes, device, the
    xattrs that travel, and with ``owners`` its uid and gid (a context's owners do not count)."""
    info = path.lstat()
    fields = [relpath.encode("utf-8", "surrogateescape"), b"%o" % info.st_mode]
    if stat.S_ISLNK(info.st_mode):
        fields.append(os.fsencode(os.readlink(path)))
    elif stat.S_ISREG(info.st_mode):
        fields.append(_file_sha256(path).encode())
    elif stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
        fields.append(b"%d" % info.st_rdev)
    if owners:
        fields.append(b"%d:%d" % (info.st_uid, info.st_gid))
    for name, value in travelling_xattrs(path):
        fields += [name.encode(), value]
    hasher = hashlib.sha256()
    for field in fields:
        hasher.update(len(field).to_bytes(8, "big") + field)
    return hasher.hexdigest()


def _file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    try:
        with path.open("rb") as file:
            while chunk := file.read(_CHUNK):
                hasher.update(chunk)
    except OSError as exc:
        raise ContextError(f"cannot read {path}: {exc.strerror}.") from exc
    return hasher.hexdigest()
