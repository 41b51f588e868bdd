"""The build context: a directory read as hostile input, filtered by ``.dockerignore``.

Sources are matched with Go ``filepath.Match`` wildcards, never resolve outside the context,
and are keyed by content (path, type, mode, link target, bytes), never by mtime or by where
the checkout lives.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.errors import ContextError
from builder.fscopy import walk_tree

__all__ = ["BuildContext", "IgnoreRules", "Source", "tree_digests"]

_CHUNK = 1 << 20


def _go_glob(pattern: str, *, double_star: bool) -> str:
    """A regex for a Go filepath.Match pattern; ``**`` spans directories in .dockerignore."""
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if double_star and pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                raise ValueError(f"bad pattern {pattern!r}: unterminated [")
            body = pattern[i + 1 : end]
            body = "^" + body[1:] if body.startswith("^") else body
            out.append(f"[{body}]")
            i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class IgnoreRules:
    """``.dockerignore`` patterns, matched as Docker's patternmatcher matches them."""

    rules: tuple[tuple[re.Pattern[str], bool], ...]  # (pattern, is_exception)

    @classmethod
    def parse(cls, text: str, filename: str = ".dockerignore") -> IgnoreRules:
        rules = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exception = line.startswith("!")
            line = line[1:].strip() if exception else line
            cleaned = posixpath.normpath(line).lstrip("/") if line else ""
            if cleaned in ("", "."):
                continue
            try:
                regex = re.compile(_go_glob(cleaned, double_star=True) + "(?:/.*)?")
            except (ValueError, re.error) as exc:
                raise ContextError(f"{filename}:{number}: invalid pattern {raw.strip()!r}: {exc}.") from exc
            rules.append((regex, exception))
        return cls(tuple(rules))

    def ignored(self, relpath: str) -> bool:
        """Whether a context-relative path is excluded (the last matching rule wins)."""
        excluded = False
        for regex, exception in self.rules:
            if regex.fullmatch(relpath):
                excluded = not exception
        return excluded

    @property
    def has_exceptions(self) -> bool:
        return any(exception for _, exception in self.rules)


@dataclass(frozen=True)
class Source:
    """One matched COPY source: its path relative to the context and on the host."""

    relpath: str
    path: Path


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
                return cls(root, IgnoreRules.parse(candidate.read_text(), str(candidate)))
        return cls(root, IgnoreRules(()))

    def match(self, pattern: str) -> list[Source]:
        """The context paths a COPY source names; wildcards follow Go filepath.Match."""
        cleaned = posixpath.normpath("/" + pattern).lstrip("/")
        if not any(ch in cleaned for ch in "*?["):
            source = self._resolve(cleaned)
            return [] if source is None else [source]
        try:
            regex = re.compile(_go_glob(cleaned, double_star=False))
        except (ValueError, re.error) as exc:
            raise ContextError(f"invalid source pattern {pattern!r}: {exc}.") from exc
        depth = cleaned.count("/")
        found = []
        for relpath in self._paths_at_depth(depth):
            if regex.fullmatch(relpath) and not self.ignore.ignored(relpath):
                source = self._resolve(relpath)
                if source is not None:
                    found.append(source)
        return found

    def _paths_at_depth(self, depth: int, prefix: str = "") -> Iterator[str]:
        try:
            names = sorted(os.listdir(self.root / prefix))
        except (NotADirectoryError, FileNotFoundError):
            return
        for name in names:
            relpath = f"{prefix}{name}"
            if depth == 0:
                yield relpath
            elif (self.root / relpath).is_dir() and not (self.root / relpath).is_symlink():
                yield from self._paths_at_depth(depth - 1, relpath + "/")

    def _resolve(self, relpath: str) -> Source | None:
        """The host path of a source, following symlinks only while they stay inside."""
        if relpath in ("", "."):
            return Source("", self.root)
        if self.ignore.ignored(relpath):
            return None
        path = self.root / relpath
        real = Path(os.path.realpath(path))
        root = Path(os.path.realpath(self.root))
        if real != root and root not in real.parents:
            raise ContextError(
                f"the source {relpath!r} resolves to {real}, outside the build context {root}."
            )
        if not os.path.lexists(path):
            return None
        return Source(relpath, real)

    def walk(self, source: Source) -> Iterator[tuple[str, Path]]:
        """Every path below a source directory (relative to it), sorted, ignored ones left out.

        Symlinks are yielded, never followed. A directory is yielded before its contents.
        """
        top = source.path
        stack = [""]
        while stack:
            rel = stack.pop()
            try:
                entries = sorted(os.scandir(top / rel) if rel else os.scandir(top), key=lambda e: e.name)
            except OSError as exc:
                raise ContextError(f"cannot read {top / rel}: {exc.strerror}.") from exc
            subdirs = []
            for entry in entries:
                child = f"{rel}/{entry.name}" if rel else entry.name
                context_rel = f"{source.relpath}/{child}" if source.relpath else child
                # an ignored directory is still entered when a "!" rule may re-include below it
                descend = self.ignore.has_exceptions and entry.is_dir(follow_symlinks=False)
                if self.ignore.ignored(context_rel) and not descend:
                    continue
                yield child, top / child
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(child)
            stack.extend(reversed(subdirs))

    def entry_digests(self, sources: Sequence[Source]) -> dict[str, str]:
        """A digest per source path (name, type, mode, link target, bytes), in walk order."""
        digests = {}
        for source in sources:
            digests[source.relpath] = _entry_digest(source.relpath, source.path)
            if source.path.is_dir():
                for rel, path in self.walk(source):
                    name = f"{source.relpath}/{rel}" if source.relpath else rel
                    digests[name] = _entry_digest(name, path)
        return digests


def tree_digests(top: Path, name: str) -> dict[str, str]:
    """Digests of ``top`` and, for a directory, all below it, as ``entry_digests`` gives them."""
    digests = {name: _entry_digest(name, top)}
    if top.is_dir() and not top.is_symlink():
        for rel, path in walk_tree(top):
            digests[f"{name}/{rel}"] = _entry_digest(f"{name}/{rel}", path)
    return digests


def _entry_digest(relpath: str, path: Path) -> str:
    """Frame each field with its length, so no two entries hash alike by concatenation."""
    info = path.lstat()
    fields = [relpath.encode("utf-8", "surrogateescape"), b"%o" % info.st_mode]
    if stat.S_ISLNK(info.st_mode):
        fields.append(os.fsencode(os.readlink(path)))
    elif stat.S_ISREG(info.st_mode):
        fields.append(_file_sha256(path).encode())
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
