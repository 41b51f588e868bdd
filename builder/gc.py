"""Reclaiming space: ``builder prune`` and ``builder du``.

The roots are the tagged images and the cache records that survive the filters; every blob,
layer-index entry and snapshot that no root reaches is removed. Prune holds the store's
exclusive lock, which every build holds shared for its whole run, so nothing a running build
has written but not yet recorded can be lost.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

from msgspec import Struct

from builder.digest import is_digest
from builder.errors import BuilderError, StoreError
from builder.layout import image_blobs
from builder.store import Store

__all__ = ["DiskUsage", "PruneResult", "disk_usage", "parse_duration", "parse_size", "prune"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
}
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(text: str) -> int:
    """``500MB``, ``2g``, ``1048576`` → bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", text.strip())
    if match is None or match[2].lower() not in _UNITS:
        raise BuilderError(f"{text!r} is not a size (examples: 500MB, 2GB, 1048576).")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def parse_duration(text: str) -> float:
    """``24h``, ``90m``, ``7d``, ``1h30m`` → seconds."""
    parts = re.findall(r"(\d+)([smhd])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise BuilderError(f"{text!r} is not a duration (examples: 24h, 90m, 7d).")
    return float(sum(int(n) * _SECONDS[u] for n, u in parts))


class PruneResult(Struct, frozen=True):
    records: int
    blobs: int
    snapshots: int
    reclaimed: int  # bytes


class DiskUsage(Struct, frozen=True):
    blobs: int
    blob_bytes: int
    snapshots: int
    snapshot_bytes: int
    records: int
    images: int


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def disk_usage(store: Store) -> DiskUsage:
    blobs = list((store.root / "blobs" / "sha256").iterdir())
    snapshots = [p for p in (store.root / "snapshots").iterdir() if is_digest(f"sha256:{p.name}")]
    return DiskUsage(
        blobs=len(blobs),
        blob_bytes=sum(p.stat().st_size for p in blobs),
        snapshots=len(snapshots),
        snapshot_bytes=sum(_tree_size(p) for p in snapshots),
        records=sum(1 for _ in (store.root / "cache").glob("*.json")),
        images=len(store.tags()),
    )


def prune(store: Store, *, keep_storage: int | None = None, until: float | None = None) -> PruneResult:
    """Drop cache records (all; or unused for ``until`` seconds; or least recently used first
    until the store fits in ``keep_storage`` bytes), then everything no root reaches."""
    with store.exclusive():
        removed = _drop_records(store, keep_storage, until)
        return _sweep(store, removed)


def _records_by_age(store: Store) -> list[tuple[float, Path]]:
    return sorted((p.stat().st_mtime, p) for p in (store.root / "cache").glob("*.json"))


def _drop_records(store: Store, keep_storage: int | None, until: float | None) -> int:
    records = [path for _, path in _records_by_age(store)]  # least recently used first
    if keep_storage is None and until is None:
        doomed = records
    elif until is not None:
        cutoff = time.time() - until
        doomed = [path for path in records if path.stat().st_mtime < cutoff]
    else:
        doomed = []
    if keep_storage is not None:
        kept = [path for path in records if path not in doomed]
        doomed += _over_budget(store, kept, keep_storage)
    for path in doomed:
        path.unlink(missing_ok=True)
    return len(doomed)


def _record_blob(store: Store, path: Path) -> str | None:
    record = store.get_cache("sha256:" + path.stem) if is_digest("sha256:" + path.stem) else None
    layer = (record or {}).get("layer")
    return str(layer.get("blob", {}).get("digest")) if isinstance(layer, dict) else None


def _over_budget(store: Store, records: list[Path], budget: int) -> list[Path]:
    """The oldest records to drop so that the blobs still reachable fit in ``budget`` bytes."""
    refs: Counter[str] = Counter()
    for digest in store.tags().values():
        refs.update(image_blobs(store, digest)[2])
    blobs = {path: _record_blob(store, path) for path in records}
    refs.update(blob for blob in blobs.values() if blob)
    size = {d: store.blob_path(d).stat().st_size for d in refs if store.has_blob(d)}
    total = sum(size.values())
    dropped = []
    for path in records:
        if total <= budget:
            break
        dropped.append(path)
        blob = blobs[path]
        if blob:
            refs[blob] -= 1
            if refs[blob] == 0:
                total -= size.get(blob, 0)
    return dropped


def _live(store: Store) -> tuple[set[str], set[str]]:
    """Blob digests and diff_ids reachable from tags and cache records."""
    blobs: set[str] = set()
    diff_ids: set[str] = set()
    for name, digest in store.tags().items():
        try:
            _, config, digests = image_blobs(store, digest)
        except (StoreError, KeyError, TypeError) as exc:
            raise StoreError(
                f"the image {name} is damaged ({exc}); run builder check --repair first."
            ) from exc
        blobs.update(digests)
        diff_ids.update(config.get("rootfs", {}).get("diff_ids", []))
    for path in (store.root / "cache").glob("*.json"):
        record = store.get_cache("sha256:" + path.stem) if is_digest("sha256:" + path.stem) else None
        layer = (record or {}).get("layer")
        if isinstance(layer, dict):
            blobs.add(str(layer.get("blob", {}).get("digest")))
            diff_ids.add(str(layer.get("diff_id")))
    for diff_id in list(diff_ids):  # a layer's other compressed forms stay with it
        blobs.update(
            str(desc.get("digest")) for desc in store.layer_blobs(diff_id) if desc.get("digest") in blobs
        )
    return blobs, diff_ids


def _sweep(store: Store, records: int) -> PruneResult:
    live_blobs, live_layers = _live(store)
    reclaimed = blob_count = snapshot_count = 0
    for path in (store.root / "blobs" / "sha256").iterdir():
        if f"sha256:{path.name}" not in live_blobs:
            reclaimed += path.stat().st_size
            path.unlink(missing_ok=True)
            blob_count += 1
    for path in (store.root / "layers").glob("*.json"):
        if f"sha256:{path.stem}" not in live_layers:
            path.unlink(missing_ok=True)
    for path in (store.root / "snapshots").iterdir():
        if is_digest(f"sha256:{path.name}") and f"sha256:{path.name}" not in live_layers:
            reclaimed += _tree_size(path)
            shutil.rmtree(path, ignore_errors=True)
            snapshot_count += 1
    for link in (store.root / "l").iterdir():
        if not link.exists():  # its snapshot is gone
            link.unlink(missing_ok=True)
    for path in (store.root / "memo").glob("*.json"):
        path.unlink(missing_ok=True)  # derived from content, recomputed on demand
    return PruneResult(records, blob_count, snapshot_count, reclaimed)
