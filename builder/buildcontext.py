"""The build context: a directory read as hostile input, filtered by ``.dockerignore``.

What a COPY sees is what BuildKit would have been sent: paths ``.dockerignore`` excludes do
not exist, except the directories that hold a path a ``!`` rule brings back. Sources are
matched with Go ``filepath.Match`` wildcards (BuildKit's ResolveWildcards), a symlink named as
a source is followed but never out of the context, and content is keyed by path, type, mode,
link target and bytes: never by mtime or by where the checkout lives.

A build walks each source once: the entries its cache key describes are kept on the
:class:`BuildContext` and are the ones the copy writes (a file's bytes are checked against them).
A file's digest is remembered between builds by what its lstat says (:class:`FileSums`), so an
unchanged context is not read again.
"""

from __future__ import annotations

import os
import posixpath
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from msgspec import Struct

from builder.digest import StreamSha256, sha256_hex
from builder.errors import ContextError
from builder.fscopy import CopyEntry, check_unchanged, describe, open_source
from builder.patterns import BadPatternError, PatternMatcher, clean, go_match, has_wildcards
from builder.rootpath import RootEscapeError, is_real_dir, resolve_in_root
from builder.shortcut import RACY_NS, Witness

__all__ = [
    "BuildContext",
    "FileSums",
    "IgnoreRules",
    "Source",
    "digest_entry",
    "filtered_walk",
    "match_root",
    "split_wildcards",
]

_CHUNK = 1 << 20
_BOM = "\ufeff"


class IgnoreRules(Struct, frozen=True):
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


class Source(Struct, frozen=True):
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


def match_root(root: Path, pattern: str, *, confine: bool, listed: set[str] | None = None) -> list[Source]:
    """The existing paths of ``root`` a COPY source names, as BuildKit's ResolveWildcards finds them.

    ``..`` is cleaned against the root; the part before the first wildcard and each match are
    resolved following symlinks inside ``root`` (``confine``: a link pointing out is an error);
    wildcards follow Go's filepath.Match and never look through a symlink. ``listed`` gets the
    directories whose entries were matched.
    """
    cleaned = clean("/" + pattern).lstrip("/")
    prefix, rest = split_wildcards(cleaned)
    if not rest:
        candidates = [cleaned]
    else:
        base = _resolve(root, prefix, pattern, confine=confine)
        base_rel = _relative(root, base)
        candidates = [
            f"{base_rel}/{rel}" if base_rel else rel for rel in _wildcard_matches(base, rest, pattern, listed)
        ]
    found = []
    for given in candidates:
        path = _resolve(root, given, pattern, confine=confine)
        if os.path.lexists(path):
            found.append(Source(_relative(root, path), path, given))
    return found


def _wildcard_matches(base: Path, rest: str, pattern: str, listed: set[str] | None) -> list[str]:
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
        if listed is not None:
            listed.add(str(base / rel))
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


def filtered_walk(
    top: Path, filters: Sequence[Filter] = (), seen: set[str] | None = None
) -> Iterator[CopyEntry]:
    """Every path below ``top`` (relative to it), sorted, a directory before its contents.

    Symlinks are yielded, never followed. A path a filter matches is left out; a directory left
    out is still entered when each filter that matched it has a ``!`` rule that may bring back
    something below, and is yielded only if something is. Each directory on the way carries its
    filters' :meth:`~PatternMatcher.hits`, so a path is matched alone, not with all its parents.
    ``seen`` gets the path of every entry looked at, each directory entered among them.
    """
    pending: list[CopyEntry] = []  # left-out dirs entered, not yet yielded
    hits = tuple(m.hits(prefix, m.parent_hits(prefix)) if prefix else 0 for m, prefix in filters)
    base = str(top)
    stack = [("", iter(_entries(base)), hits)]
    while stack:
        rel, entries, parents = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            if pending and pending[-1].rel == rel:
                pending.pop()
            continue
        child = f"{rel}/{entry.name}" if rel else entry.name
        is_dir = entry.is_dir(follow_symlinks=False)
        named = [
            (m, f"{prefix}/{child}" if prefix else child, bits)
            for (m, prefix), bits in zip(filters, parents, strict=True)
        ]
        hit = [(m, name) for m, name, bits in named if m.matches(name, bits)]
        if hit and not (is_dir and all(m.may_include_below(name) for m, name in hit)):
            continue
        found = describe(base, child, entry.stat(follow_symlinks=False))
        if seen is not None:
            seen.add(found.path)
        if is_dir:
            below = tuple(m.hits(name, bits) for m, name, bits in named)
            stack.append((child, iter(_entries(entry.path)), below))
        if hit:
            pending.append(found)
            continue
        yield from pending
        pending.clear()
        yield found


class FileSums:
    """The sha256 of context files, remembered between builds by device, inode, size, mtime and
    ctime, as BuildKit's content-hash cache does: a file whose lstat says the same is not read
    again. Every write moves the ctime, which no program can set back."""

    def __init__(self, known: Mapping[str, Any] | None = None, *, started_ns: int | None = None) -> None:
        """``known``: what the last build kept; ``started_ns``: when this build started (now)."""
        self._known = known or {}
        # a file changed since then is hashed, not remembered (see builder.shortcut's RACY_NS)
        self._since = (time.time_ns() if started_ns is None else started_ns) - RACY_NS
        self.kept: dict[str, list[Any]] = {}  # what this build hashed, for the next one

    def sha256(self, entry: CopyEntry) -> str:
        signature = [entry.dev, entry.ino, entry.size, entry.mtime_ns, entry.ctime_ns]
        known = self._known.get(entry.path)
        if isinstance(known, list) and known[:-1] == signature and isinstance(known[-1], str):
            digest = known[-1]
        else:
            digest = _file_sha256(entry)
        if max(entry.mtime_ns, entry.ctime_ns) < self._since:
            self.kept[entry.path] = [*signature, digest]
        return digest

    @property
    def changed(self) -> bool:
        """Whether the next build should get :attr:`kept` (it differs from what this one got)."""
        return self.kept != self._known


class BuildContext:
    """A context directory with its ignore rules."""

    def __init__(
        self, root: Path, ignore: IgnoreRules, sums: FileSums | None = None, witness: Witness | None = None
    ) -> None:
        self.root = Path(os.path.abspath(root))  # bind mounts of it need an absolute path
        self.ignore = ignore
        self.sums = sums or FileSums()
        self.witness = witness  # told every path looked at (builder.shortcut)
        self._tops: dict[Path, CopyEntry] = {}
        self._walks: dict[tuple[Path, str, PatternMatcher | None], tuple[CopyEntry, ...]] = {}

    @classmethod
    def load(
        cls, root: Path, dockerfile: Path | None, sums: FileSums | None = None, witness: Witness | None = None
    ) -> BuildContext:
        """Read ``<Dockerfile>.dockerignore`` next to the Dockerfile, else ``.dockerignore``."""
        if not root.is_dir():
            raise ContextError(f"the build context {root} is not a directory.")
        candidates = [dockerfile.with_name(dockerfile.name + ".dockerignore")] if dockerfile else []
        candidates.append(root / ".dockerignore")
        if witness is not None:
            witness.resolved(root, required=True)
            for path in candidates:
                witness.resolved(path)
        for candidate in candidates:
            if candidate.is_file():
                try:
                    text = candidate.read_text(errors="surrogateescape")
                except OSError as exc:
                    raise ContextError(f"cannot read {candidate}: {exc.strerror}.") from exc
                return cls(root, IgnoreRules.parse(text, str(candidate)), sums, witness)
        return cls(root, IgnoreRules.parse(""), sums, witness)

    def match(self, pattern: str) -> list[Source]:
        """The context paths a COPY source names, leaving out what ``.dockerignore`` excludes.

        A symlink pointing out of the context is an error; a name that does not exist, or a
        wildcard that matches nothing, gives an empty list.
        """
        if self.witness is None:
            return [s for s in match_root(self.root, pattern, confine=True) if self._present(s)]
        listed: set[str] = set()
        found = [s for s in match_root(self.root, pattern, confine=True, listed=listed) if self._present(s)]
        _witness_match(self.witness, self.root, pattern, found, listed)
        return found

    def _present(self, source: Source) -> bool:
        """Whether BuildKit would have been sent the path: not ignored, or a dir with kept content."""
        if not self.ignore.ignored(source.relpath):
            return True
        if not is_real_dir(source.path) or not self.ignore.matcher.may_include_below(source.relpath):
            return False
        return bool(self.entries(source))

    def describe(self, source: Source) -> CopyEntry:
        """The source itself, looked at once per build (its key and its copy see the same)."""
        found = self._tops.get(source.path)
        if found is None:
            found = self._tops[source.path] = describe(str(source.path))
        return found

    def entries(self, source: Source, exclude: PatternMatcher | None = None) -> tuple[CopyEntry, ...]:
        """Every path below a source directory, ignored and excluded ones left out.

        Walked once per build: the cache key's walk is the copy's, so both describe one state of
        the context, and a file changed in between fails the copy (see fscopy.check_unchanged).
        """
        memo = (source.path, source.relpath, exclude)
        found = self._walks.get(memo)
        if found is None:
            filters = [(self.ignore.matcher, source.relpath)]
            if exclude is not None:
                filters.append((exclude, ""))
            seen = self.witness.paths if self.witness is not None else None
            found = self._walks[memo] = tuple(filtered_walk(source.path, filters, seen))
        return found


def _witness_match(witness: Witness, root: Path, pattern: str, found: list[Source], listed: set[str]) -> None:
    """Tell the witness the paths a match looked at: each one on the way to the pattern's fixed
    part and to every match, and the directories a wildcard listed. A match reached through a
    symbolic link, or a listing under one, is more than it can check."""
    witness.chain(root, split_wildcards(clean("/" + pattern).lstrip("/"))[0])
    for source in found:
        witness.chain(root, source.relpath)
        if source.given != source.relpath:
            witness.sound = False
    for path in listed:
        if os.path.realpath(path) != path:
            witness.sound = False
        witness.path(path)


def _entries(directory: str) -> list[os.DirEntry[str]]:
    try:
        return sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise ContextError(f"cannot read {directory}: {exc.strerror}.") from exc


def digest_entry(name: str, entry: CopyEntry, *, owners: bool = False, sums: FileSums | None = None) -> str:
    """What a copy of the entry depends on: name, type, mode, link target or bytes, device, the
    xattrs that travel, and with ``owners`` its uid and gid (a context's owners do not count).
    A context file's bytes are looked up in its ``sums``."""
    fields = [name.encode("utf-8", "surrogateescape"), b"%o" % entry.mode]
    if stat.S_ISLNK(entry.mode):
        fields.append(os.fsencode(entry.link))
    elif stat.S_ISREG(entry.mode):
        fields.append((sums.sha256(entry) if sums is not None else _file_sha256(entry)).encode())
    elif stat.S_ISCHR(entry.mode) or stat.S_ISBLK(entry.mode):
        fields.append(b"%d" % entry.rdev)
    if owners:
        fields.append(b"%d:%d" % (entry.uid, entry.gid))
    for attribute, value in entry.xattrs:
        fields += [attribute.encode(), value]
    return sha256_hex(b"".join(len(field).to_bytes(8, "big") + field for field in fields))


def _file_sha256(entry: CopyEntry) -> str:
    """The bytes of the file ``entry`` describes, read in the size it had (checked after)."""
    hasher = StreamSha256()
    fd = open_source(entry)
    try:
        left = entry.size
        while left > 0 and (chunk := os.read(fd, min(left, _CHUNK))):
            hasher.update(chunk)
            left -= len(chunk)
        check_unchanged(fd, entry)
    except OSError as exc:
        raise ContextError(f"cannot read {entry.path}: {exc.strerror}.") from exc
    finally:
        os.close(fd)
    return hasher.hexdigest()
