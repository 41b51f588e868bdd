"""``builder check``: verify a store, and repair what can be repaired.

What is verified, and what ``--repair`` does when it is wrong::

    blobs/sha256/<hex>   the content hashes to the name                      → removed
    layers/<diff>.json   descriptors of stored blobs that unpack to the layer → rewritten
    cache/<key>.json     parses; its layer is a stored blob that unpacks to it → removed
    tags/<name>          the manifest, its config and its layers are stored   → reported
    snapshots/<diff>     a stored blob holds the layer                         → removed
    l/<short>            points at its snapshot                                → removed
    tmp/                 work dirs and temp files of killed processes          → removed

Sizes are checked wherever a descriptor names a blob. A damaged image cannot be repaired here:
its tag stays and is reported, to be loaded or pulled again. A run holds the store's exclusive
lock (as prune does), so no build, load or pull changes the store meanwhile.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from msgspec import Struct

from builder.compression import open_layer
from builder.digest import is_digest
from builder.oci import INDEX_MEDIA_TYPES, LAYER_COMPRESSIONS
from builder.store import Store

__all__ = ["CheckResult", "Problem", "check_store"]

Json = dict[str, Any]
_CHUNK = 1 << 20


class Problem(Struct, frozen=True):
    path: Path
    message: str  # a sentence
    repair: Callable[[], None] | None = None  # None: not repairable


class CheckResult(Struct, frozen=True):
    checked: dict[str, int]  # what was looked at, by kind
    problems: tuple[Problem, ...]
    repaired: tuple[Problem, ...]

    @property
    def remaining(self) -> tuple[Problem, ...]:
        return tuple(problem for problem in self.problems if problem not in self.repaired)


def check_store(store: Store, *, repair: bool) -> CheckResult:
    """Verify everything in ``store``; with ``repair``, fix every problem that has a repair."""
    with store.exclusive():
        checker = _Checker(store)
        checker.run()
        repaired = []
        if repair:
            for problem in checker.problems:
                if problem.repair is not None:
                    try:
                        problem.repair()
                    except OSError as exc:
                        raise store.storage_error(exc) from exc
                    repaired.append(problem)
    return CheckResult(checker.checked, tuple(checker.problems), tuple(repaired))


def _remove(path: Path) -> Callable[[], None]:
    def remove() -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    return remove


def _valid_descriptor(desc: object) -> bool:
    return (
        isinstance(desc, dict)
        and isinstance(desc.get("mediaType"), str)
        and isinstance(desc.get("digest"), str)
        and is_digest(desc["digest"])
        and type(desc.get("size")) is int
        and desc["size"] >= 0
    )


def _is_number(value: object) -> bool:
    return type(value) in (int, float)


def _diff_ids(config: object) -> list[str] | None:
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if isinstance(diff_ids, list) and all(isinstance(d, str) for d in diff_ids):
        return diff_ids
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


class _Checker:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = store.root
        self.problems: list[Problem] = []
        self.checked: dict[str, int] = {}
        self.sizes: dict[str, int] = {}  # sound blobs: digest -> size
        self.unpacked: dict[str, str | None] = {}  # layer blob digest -> its diff_id, None if not a layer

    def problem(self, path: Path, message: str, repair: Callable[[], None] | None = None) -> None:
        self.problems.append(Problem(path, message, repair))

    def run(self) -> None:
        self.blobs()
        self.layer_index()
        self.cache_records()
        self.tags()
        self.snapshots()
        self.links()
        self.temp()

    def entries(self, kind: str, sub: str) -> Iterator[Path]:
        paths = sorted((self.root / sub).iterdir()) if (self.root / sub).is_dir() else []
        self.checked[kind] = len(paths)
        return iter(paths)

    # blobs

    def blobs(self) -> None:
        for path in self.entries("blobs", "blobs/sha256"):
            digest = f"sha256:{path.name}"
            if not is_digest(digest) or path.is_symlink() or not path.is_file():
                self.problem(path, "this is not a blob: the name is not a sha256 digest.", _remove(path))
                continue
            found = _hash_file(path)
            if found != digest:
                self.problem(path, f"the blob is corrupt: its content has digest {found}.", _remove(path))
                continue
            self.sizes[digest] = path.stat().st_size

    def blob_problem(self, desc: Json) -> str | None:
        """Why a descriptor does not name a sound stored blob, or None when it does."""
        size = self.sizes.get(desc["digest"])
        if size is None:
            return f"the blob {desc['digest']} is missing or corrupt"
        if size != desc["size"]:
            return f"the blob {desc['digest']} has {size} bytes, not the {desc['size']} its descriptor says"
        return None

    def layer_problem(self, desc: object, diff_id: str) -> str | None:
        """Why ``desc`` is not a stored layer blob that unpacks to ``diff_id``, or None."""
        if not _valid_descriptor(desc) or not isinstance(desc, dict):
            return f"{json.dumps(desc)[:200]} is not a valid descriptor"
        if desc["mediaType"] not in LAYER_COMPRESSIONS:
            return f"the media type {desc['mediaType']!r} is not a layer's"
        missing = self.blob_problem(desc)
        if missing is not None:
            return missing
        if desc["digest"] not in self.unpacked:
            self.unpacked[desc["digest"]] = _diff_id(self.store.blob_path(desc["digest"]))
        found = self.unpacked[desc["digest"]]
        if found != diff_id:
            return f"the blob {desc['digest']} unpacks to {found or 'no layer'}, not to layer {diff_id}"
        return None

    # records

    def layer_index(self) -> None:
        for path in self.entries("layer index records", "layers"):
            diff_id = f"sha256:{path.stem}"
            record = _read_json(path)
            if path.suffix != ".json" or not is_digest(diff_id) or not isinstance(record, list):
                self.problem(path, "the layer index record does not parse.", _remove(path))
                continue
            checked = [(desc, self.layer_problem(desc, diff_id)) for desc in record]
            reasons = [reason for _, reason in checked if reason is not None]
            if reasons:
                good = [desc for desc, reason in checked if reason is None]
                repair = self._rewrite_index(diff_id, path, good)
                self.problem(path, f"entries of the layer index are wrong: {'; '.join(reasons)}.", repair)

    def _rewrite_index(self, diff_id: str, path: Path, good: list[Json]) -> Callable[[], None]:
        def rewrite() -> None:
            path.unlink(missing_ok=True)
            for desc in good:
                self.store.add_layer_blob(diff_id, desc)

        return rewrite

    def cache_records(self) -> None:
        for path in self.entries("cache records", "cache"):
            record = _read_json(path)
            named = path.suffix == ".json" and is_digest(f"sha256:{path.stem}")
            if not named or not isinstance(record, dict) or not _is_number(record.get("created")):
                self.problem(path, "the cache record does not parse.", _remove(path))
            elif "layer" not in record:
                self.problem(path, "the cache record does not say if the step made a layer.", _remove(path))
            elif record["layer"] is not None:
                self.cache_layer(path, record["layer"])

    def cache_layer(self, path: Path, layer: object) -> None:
        diff_id = layer.get("diff_id") if isinstance(layer, dict) else None
        if not isinstance(layer, dict) or not isinstance(diff_id, str) or not is_digest(diff_id):
            self.problem(path, "the cache record names no layer.", _remove(path))
            return
        desc = layer.get("blob")
        reason = self.layer_problem(desc, diff_id)
        if reason is not None or not isinstance(desc, dict):
            self.problem(path, f"the cached step's layer is lost: {reason}.", _remove(path))
        elif desc["digest"] not in [d.get("digest") for d in self.store.layer_blobs(diff_id)]:
            add = functools.partial(self.store.add_layer_blob, diff_id, desc)
            self.problem(path, f"the layer index does not list the blob of layer {diff_id}.", add)

    # images

    def tags(self) -> None:
        for path in self.entries("tags", "tags"):
            record = _read_json(path)
            digest = record.get("manifest") if isinstance(record, dict) else None
            if not isinstance(digest, str) or not is_digest(digest):
                self.problem(path, "the tag record does not parse.", _remove(path))
                continue
            name = urllib.parse.unquote(path.name)
            for reason in self.image_problems(digest):
                self.problem(path, f"the image {name} is damaged: {reason}; load or pull it again.")

    def image_problems(self, digest: str) -> list[str]:
        """What is wrong with the stored image (or index) ``digest``: each a sentence fragment."""
        if digest not in self.sizes:
            return [f"its manifest {digest} is missing or corrupt"]
        manifest = _read_json(self.store.blob_path(digest))
        if isinstance(manifest, dict) and manifest.get("mediaType") in INDEX_MEDIA_TYPES:
            entries = [e for e in manifest.get("manifests") or [] if _valid_descriptor(e)]
            stored = [str(e["digest"]) for e in entries if e["digest"] in self.sizes]
            if not stored:
                return [f"its index {digest} names no stored manifest"]
            return [reason for entry in stored for reason in self.image_problems(entry)]
        config = manifest.get("config") if isinstance(manifest, dict) else None
        layers = manifest.get("layers") if isinstance(manifest, dict) else None
        if not isinstance(config, dict) or not _valid_descriptor(config) or not isinstance(layers, list):
            return [f"its manifest {digest} is not an image manifest"]
        missing = self.blob_problem(config)
        if missing is not None:
            return [f"its config: {missing}"]
        diff_ids = _diff_ids(_read_json(self.store.blob_path(config["digest"])))
        if diff_ids is None or len(diff_ids) != len(layers):
            return [f"its config {config['digest']} does not list one diff_id per layer"]
        reasons = []
        for number, (desc, diff_id) in enumerate(zip(layers, diff_ids, strict=True), 1):
            reason = self.layer_problem(desc, diff_id)
            if reason is not None:
                reasons.append(f"layer {number}: {reason}")
        return reasons

    # snapshots, links and temp files

    def snapshots(self) -> None:
        for path in self.entries("snapshots", "snapshots"):
            diff_id = f"sha256:{path.name}"
            if path.name != "empty" and not is_digest(diff_id):
                self.problem(path, "this is not a snapshot: the name is not a layer digest.", _remove(path))
            elif path.name != "empty" and not any(
                self.layer_problem(desc, diff_id) is None for desc in self.store.layer_blobs(diff_id)
            ):
                self.problem(
                    path, f"no sound stored blob holds layer {diff_id}.", self._remove_snapshot(path)
                )

    def _remove_snapshot(self, path: Path) -> Callable[[], None]:
        def remove() -> None:
            shutil.rmtree(path)
            for link in (self.root / "l").iterdir():  # its short name, for overlay mounts
                if link.is_symlink() and os.readlink(link) == f"../snapshots/{path.name}":
                    link.unlink()

        return remove

    def links(self) -> None:
        for link in self.entries("short links", "l"):
            target = os.readlink(link) if link.is_symlink() else ""
            name = target.removeprefix("../snapshots/")
            home = name.startswith(link.name) and (name == "empty" or is_digest(f"sha256:{name}"))
            if not target.startswith("../snapshots/") or not home or not link.exists():
                self.problem(link, "the short layer link is dangling or points elsewhere.", _remove(link))

    def temp(self) -> None:
        self.checked["temp entries"] = sum(1 for p in (self.root / "tmp").iterdir() if p.suffix != ".lock")
        stale = self.store.stale_temp(remove=False)
        for path in stale:
            self.problem(path, "a build, load or pull that was killed left this behind.", _remove(path))


def _hash_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def _diff_id(path: Path) -> str | None:
    """The digest of the uncompressed layer, or None when the blob does not decompress."""
    hasher = hashlib.sha256()
    try:
        with path.open("rb") as file:
            stream = open_layer(file)
            while chunk := stream.read(_CHUNK):
                hasher.update(chunk)
    except Exception:  # any decoder's error: zlib, zstandard, lzma, EOFError
        return None
    return "sha256:" + hasher.hexdigest()
