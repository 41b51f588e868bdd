"""The shortcut: a rebuild whose every input is as it was answers with the image it made before.

A fully cached build reads its Dockerfile, the context paths its sources name, the tags of its
base images and the cache records of its steps, and assembles an image from them; with none of
these changed it assembles the same image. Such a build leaves a shortcut in the store's memo,
named by what else its result depends on: the command line (tags and ``-q`` aside), the working
directory, the environment and builder's own code. The shortcut lists what the build looked at:
each context path and the Dockerfile with what lstat said (device, inode, mode, size, mtime,
ctime), each record and tag with the digest of its bytes, each blob it looked for. The next run
of the same command checks them all and, when none moved, tags the image and prints what the
build printed, without loading the rest of builder or planning anything (bench/PROFILE.md).

It is as sound as git's and BuildKit's own stat checks: every write to a file and every entry
added to or taken from a directory moves its ctime, which no program can set back, and a path
whose ctime is less than two seconds older than the build's start is not trusted (a second write
in the same clock tick would leave its lstat as it was): that build leaves no shortcut. Only a
plain build leaves one: its image goes to tags only, it imports and exports no cache, runs with
the cache and without --pull, secrets or a config file, names no URL or Git source and no source
reached through a symbolic link.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from collections.abc import Sequence
from importlib.machinery import PathFinder
from pathlib import Path

from builder.digest import sha256_digest, sha256_hex
from builder.store import Store, default_root

TYPE_CHECKING = False  # typing only for the type checker (see builder.store)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["RACY_NS", "Answer", "Invocation", "Witness", "invocation", "run"]

# Changes of these say nothing about a build: the shell's bookkeeping and the terminal's size.
_SHELL_ENV = frozenset({"_", "OLDPWD", "PWD", "SHLVL", "COLUMNS", "LINES"})
_CONFIG_ENV = "BUILDER_CONFIG"  # builder.config's, checked here without loading it
_DEFAULT_CONFIG = "/etc/builder/config.yaml"
# A path changed this shortly before a build started is not trusted as its lstat shows it: a
# second write within the same clock tick would leave that as it was (git's "racily clean").
RACY_NS = 2_000_000_000
_FORMAT = 2


class Invocation:
    """A ``build`` command line as the shortcut sees it: its key, store, tags and ``-q``."""

    def __init__(self, key: str, root: Path, tags: list[str], quiet: bool) -> None:
        self.key = key
        self.root = root
        self.tags = tags
        self.quiet = quiet


def invocation(argv: Sequence[str]) -> Invocation | None:
    """The key of a ``build`` command, or None for one that never leaves a shortcut: another
    command, one a config file may change, one run by a user who cannot build."""
    if not argv or argv[0] != "build" or os.geteuid() != 0:
        return None
    if os.environ.get(_CONFIG_ENV) or os.path.lexists(_DEFAULT_CONFIG):
        return None
    parser = argparse.ArgumentParser(
        add_help=False, allow_abbrev=False, exit_on_error=False, formatter_class=_Formatter
    )
    parser.add_argument("-t", "--tag", action="append", default=[])
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("--root")
    try:
        known, rest = parser.parse_known_args(argv[1:])
    except argparse.ArgumentError:
        return None  # the command's own parser says what is wrong
    if any(_abbreviates(word) for word in rest):
        return None  # the command's parser reads ``--qu`` as --quiet: its build, not this one
    root = (Path(known.root) if known.root else default_root()).absolute()
    env = {name: value for name, value in os.environ.items() if name not in _SHELL_ENV}
    key = sha256_digest(
        json.dumps(
            [_FORMAT, rest, str(root), os.getcwd(), sorted(env.items()), os.uname().machine, _code()],
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8", "surrogateescape")
    )
    return Invocation(key, root, list(known.tag), bool(known.quiet))


def _abbreviates(word: str) -> bool:
    flag = word.partition("=")[0]
    return len(flag) > 2 and any(name.startswith(flag) for name in ("--quiet", "--root"))


class _Formatter(argparse.HelpFormatter):
    """One that never prints: argparse makes one for each flag, and its own finds the
    terminal's width through shutil, which a shortcut has no other use for."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=80)


def _code() -> list[Any]:
    """What builder's results depend on besides their inputs: the interpreter, builder's own
    modules and the Dockerfile parser's, by their files' names, sizes and times."""
    places = [os.path.dirname(__file__)]
    spec = PathFinder.find_spec("dockerfile_parse")
    places += list(spec.submodule_search_locations or []) if spec is not None else []
    files = []
    for place in places:
        with os.scandir(place) as entries:
            for entry in entries:
                if entry.name.endswith(".py"):
                    info = entry.stat()
                    files.append((entry.path, info.st_size, info.st_mtime_ns))
    return [sys.version, sys.executable, sorted(files)]


def _lstat(path: str) -> list[int] | None:
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return [info.st_dev, info.st_ino, info.st_mode, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


class Witness:
    """What a build looked at, gathered while it runs, for the shortcut it may leave."""

    def __init__(self) -> None:
        self.started_ns = time.time_ns()
        self.paths: set[str] = set()  # lstat'ed when the build ends
        self.real: dict[str, str] = {}  # a path and where it led, symlinks followed
        self.required: set[str] = set()  # paths the build read, which must exist
        self.records: dict[str, str | None] = {}  # store records read: the digest of their bytes
        self.used_keys: list[str] = []  # cache records hit, marked used again by the shortcut
        self.blobs: dict[str, int | None] = {}  # blobs looked for: their size (None: not there)
        self.lines: list[str] = []  # what the build logged
        self.sound = True  # False: the build reached something the shortcut cannot check

    def path(self, path: str | os.PathLike[str]) -> None:
        self.paths.add(os.path.abspath(path))

    def chain(self, root: Path, relpath: str) -> None:
        """The root and each path down to ``relpath`` below it (each one's listing or lstat)."""
        self.path(root)
        parts = relpath.split("/") if relpath and relpath != "." else []
        for index in range(len(parts)):
            self.path(root.joinpath(*parts[: index + 1]))

    def resolved(self, path: Path, *, required: bool = False) -> None:
        """A path reached through whatever symlinks lead to it, and what it leads to;
        ``required``: one the build read (the context, the Dockerfile), not one it looked for."""
        if required:
            self.required.add(os.path.abspath(path))
        real = os.path.realpath(path)
        self.real[os.path.abspath(path)] = real
        self.path(path)
        self.path(real)

    def record(self, path: Path, data: bytes | None) -> None:
        self.records.setdefault(str(path), None if data is None else sha256_hex(data))

    def used(self, key: str) -> None:
        self.used_keys.append(key)

    def blob(self, path: Path, size: int | None) -> None:
        self.blobs.setdefault(str(path), size)

    def entry(self, image: str, unused_args: Sequence[str]) -> dict[str, Any] | None:
        """The shortcut, or None when a path moved too recently to be trusted."""
        if not self.sound:
            return None
        files = {path: _lstat(path) for path in sorted(self.paths)}
        if any(files.get(path) is None for path in self.required):
            return None  # gone since the build read it: the next build must say so
        since = self.started_ns - RACY_NS
        if any(sig is not None and max(sig[4], sig[5]) >= since for sig in files.values()):
            return None
        return {
            "image": image,
            "files": files,
            "real": self.real,
            "records": self.records,
            "used": self.used_keys,
            "blobs": self.blobs,
            "lines": self.lines,
            "unused_args": list(unused_args),
        }


def _blob_size(path: str) -> int | None:
    """A stored blob's size, or None when there is none (as Store.has_blob sees it)."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _holds(entry: Any) -> bool:
    """Whether everything the shortcut's build looked at is as it was."""
    try:
        if any(os.path.realpath(path) != real for path, real in entry["real"].items()):
            return False
        if any(_lstat(path) != sig for path, sig in entry["files"].items()):
            return False
        for path, digest in entry["records"].items():
            try:
                data: bytes | None = Path(path).read_bytes()
            except FileNotFoundError:
                data = None
            if (None if data is None else sha256_hex(data)) != digest:
                return False
        if any(_blob_size(path) != size for path, size in entry["blobs"].items()):
            return False
        texts = [entry["image"], *entry["lines"], *entry["unused_args"], *entry["used"]]
        return all(isinstance(text, str) for text in texts)
    except (OSError, KeyError, TypeError, AttributeError):
        return False


def run(argv: Sequence[str]) -> Answer | None:
    """Answer a ``build`` from its shortcut, or None when the build must run (no shortcut,
    something changed, anything unexpected: the build then says what)."""
    found = invocation(argv)
    if found is None:
        return None
    from builder.errors import BuilderError
    from builder.reference import reference_text, split_reference

    store = Store(found.root)
    try:
        entry = store.get_memo(found.key)
        if not isinstance(entry, dict):
            return None
        names = [reference_text(*split_reference(tag)) for tag in found.tags]
        with store.lease():  # prune waits: the image stays whole until it is tagged
            if not _holds(entry):
                return None
            for name in names:
                store.set_tag(name, entry["image"], image_durable=True)
            for key in entry["used"]:  # as the build would have: prune keeps the recent ones
                store.touch_cache(key)
            store.remove_stale_workdirs()  # as every build does: what killed ones left behind
    except (BuilderError, OSError, ValueError):
        return None
    return Answer(entry, quiet=found.quiet)


class Answer:
    """What the build printed (see builder.cli): its log, its warnings, then the image."""

    def __init__(self, entry: dict[str, Any], *, quiet: bool) -> None:
        self.image: str = entry["image"]
        warnings = [f"warning: build arg {name} is not consumed by any ARG" for name in entry["unused_args"]]
        if quiet:
            self.log = warnings
        else:
            self.log = [*entry["lines"], *warnings, f"image {self.image} (0 steps run)"]
