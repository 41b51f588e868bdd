"""The build cache in and out, for CI runners that start empty.

The cache travels as an OCI artifact: a manifest whose config (media type
``application/vnd.builder.cache.config.v1+json``) maps cache keys to step results, and whose
layers are the cached layer blobs, each annotated with its diff_id. It goes to a local OCI
layout (``type=local``) or to any OCI registry (``type=registry``); importing verifies every
blob before it enters the store, then records the results so the next build hits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from msgspec import Struct

from builder.compression import Compression
from builder.credentials import RegistryOptions
from builder.digest import is_digest
from builder.errors import BuilderError, StoreError
from builder.export import layer_as
from builder.oci import INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, canonical_json, descriptor, parse_reference
from builder.registry import RegistryClient
from builder.store import Store

__all__ = ["CACHE_CONFIG_MEDIA_TYPE", "CacheSpec", "export_cache", "import_cache", "parse_cache_spec"]

CACHE_ARTIFACT_TYPE = "application/vnd.builder.cache.v1"
CACHE_CONFIG_MEDIA_TYPE = "application/vnd.builder.cache.config.v1+json"
DIFF_ID_ANNOTATION = "dev.builder.cache.diff_id"
REF_NAME = "org.opencontainers.image.ref.name"
_UPLOADS = 4
_CHUNK = 1 << 20

Json = dict[str, Any]


class CacheSpec(Struct, frozen=True):
    """``type=local,dest=DIR`` / ``type=local,src=DIR`` / ``type=registry,ref=REF`` and options."""

    kind: str  # "local" | "registry"
    location: str  # a directory or an image reference
    mode: str = "min"  # "min": the final image's steps; "max": every stage's
    ignore_error: bool = True  # a failed export warns instead of failing the build


def parse_cache_spec(text: str, *, export: bool) -> CacheSpec:
    """Parse a --cache-to / --cache-from value; raises BuilderError with the expected form."""
    fields = dict(part.partition("=")[::2] for part in text.split(",") if part)
    kind = fields.get("type", "")
    location = fields.get("ref") if kind == "registry" else fields.get("dest" if export else "src")
    mode = fields.get("mode", "min")
    ignore = fields.get("ignore-error", "true")
    if kind not in ("local", "registry") or not location or mode not in ("min", "max"):
        flag = "--cache-to" if export else "--cache-from"
        where = "dest=DIR" if export else "src=DIR"
        raise BuilderError(
            f"{flag} {text!r} is not understood; expected type=local,{where} or type=registry,ref=REF"
            + (" (with mode=min|max, ignore-error=true|false)" if export else "")
            + "."
        )
    return CacheSpec(kind, location, mode, ignore.lower() != "false")


def _artifact(
    store: Store, keys: Iterable[str], compression: Compression, level: int | None
) -> tuple[bytes, bytes, list[Json]]:
    """The config bytes, the manifest bytes and the layer descriptors of the cache artifact,
    every layer in ``compression`` (a stage that shipped nothing stored plain tars)."""
    records: dict[str, Json] = {}
    layers: dict[str, Json] = {}
    for key in keys:
        record = store.get_cache(key)
        if record is None:
            continue
        layer = record.get("layer")
        if layer is not None:
            blob = layer_as(store, dict(layer["blob"]), layer["diff_id"], compression, level)
            record = {**record, "layer": {**layer, "blob": blob}}
            layers[blob["digest"]] = {**blob, "annotations": {DIFF_ID_ANNOTATION: layer["diff_id"]}}
        records[key] = record
    config = canonical_json({"records": records})
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": CACHE_ARTIFACT_TYPE,
        "config": descriptor(CACHE_CONFIG_MEDIA_TYPE, config),
        "layers": [layers[d] for d in sorted(layers)],
    }
    return config, canonical_json(manifest), list(layers.values())


def export_cache(
    store: Store,
    spec: CacheSpec,
    keys: Iterable[str],
    options: RegistryOptions,
    compression: Compression,
    level: int | None,
) -> str:
    """Write the cache records of ``keys`` and their layers; returns the artifact's digest."""
    try:
        config, manifest, layers = _artifact(store, keys, compression, level)
        if spec.kind == "local":
            return _export_local(store, Path(spec.location), config, manifest, layers)
        return _export_registry(store, spec.location, config, manifest, layers, options)
    except OSError as exc:
        raise StoreError(f"cannot export the cache to {spec.location}: {exc.strerror or exc}.") from exc


def _export_local(store: Store, dest: Path, config: bytes, manifest: bytes, layers: list[Json]) -> str:
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for data in (config, manifest):
        _write_new(blobs / descriptor("", data)["digest"][7:], data)
    for layer in layers:
        target = blobs / layer["digest"][7:]
        if not target.exists():
            _write_new(target, store.blob_path(layer["digest"]).read_bytes())
    manifest_desc = descriptor(MANIFEST_MEDIA_TYPE, manifest)
    manifest_desc["annotations"] = {REF_NAME: "cache"}
    index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [manifest_desc]}
    _write_new(dest / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    _write_new(dest / "index.json", canonical_json(index))
    return str(manifest_desc["digest"])


def _write_new(path: Path, data: bytes) -> None:
    """Write through a temp file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _export_registry(
    store: Store, ref: str, config: bytes, manifest: bytes, layers: list[Json], options: RegistryOptions
) -> str:
    reference = _reference(ref)
    with RegistryClient.open(options, reference.registry, reference.repository, push=True) as client:
        config_digest = store.write_blob(config)

        def upload(desc: Json) -> None:
            if not client.has_blob(desc["digest"]):  # HEAD first: never upload a blob twice
                client.put_blob(store.blob_path(desc["digest"]), desc["digest"], desc["size"])

        with ThreadPoolExecutor(_UPLOADS) as pool:
            list(pool.map(upload, [*layers, {"digest": config_digest, "size": len(config)}]))
        return client.put_manifest(reference.tag or "cache", MANIFEST_MEDIA_TYPE, manifest)


def _reference(ref: str) -> Any:
    try:
        return parse_reference(ref)
    except ValueError as exc:
        raise BuilderError(f"cache reference: {exc}.") from exc


def import_cache(store: Store, spec: CacheSpec, options: RegistryOptions) -> int:
    """Bring a cache artifact's blobs and records into the store; returns the records taken."""
    if spec.kind == "local":
        config, layers = _import_local(store, Path(spec.location))
    else:
        config, layers = _import_registry(store, spec.location, options)
    for layer in layers:
        diff_id = (layer.get("annotations") or {}).get(DIFF_ID_ANNOTATION)
        if isinstance(diff_id, str) and is_digest(diff_id):
            store.add_layer_blob(diff_id, {k: layer[k] for k in ("mediaType", "digest", "size")})
    records = config.get("records")
    if not isinstance(records, dict):
        raise StoreError(f"the cache at {spec.location} has no records.")
    taken = 0
    for key, record in records.items():
        if is_digest(key) and isinstance(record, dict) and "created" in record and "layer" in record:
            store.put_cache(key, record)
            taken += 1
    return taken


def _import_local(store: Store, src: Path) -> tuple[Json, list[Json]]:
    try:
        index = json.loads((src / "index.json").read_bytes())
        manifest_desc = index["manifests"][0]
        manifest = json.loads(_read_blob(store, src, manifest_desc))
        config = json.loads(_read_blob(store, src, manifest["config"]))
    except FileNotFoundError as exc:
        raise StoreError(f"no build cache at {src} (it has no {Path(exc.filename).name}).") from exc
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise StoreError(f"the build cache at {src} is not a builder cache artifact.") from exc
    layers = [layer for layer in manifest.get("layers", []) if isinstance(layer, dict)]
    for layer in layers:
        _read_blob(store, src, layer, keep=True)
    return config, layers


def _read_blob(store: Store, src: Path, desc: Json, *, keep: bool = False) -> bytes:
    """A blob of the cache layout, verified into the store; its bytes unless ``keep``."""
    digest = str(desc.get("digest"))
    if not is_digest(digest):
        raise StoreError(f"the build cache at {src} names a blob {digest!r} that is not a digest.")
    if not store.has_blob(digest):
        with store.blob_writer() as writer, (src / "blobs" / "sha256" / digest[7:]).open("rb") as file:
            while chunk := file.read(_CHUNK):
                writer.write(chunk)
            writer.commit(digest)
    return b"" if keep else store.read_blob(digest)


def _import_registry(store: Store, ref: str, options: RegistryOptions) -> tuple[Json, list[Json]]:
    reference = _reference(ref)
    with RegistryClient.open(options, reference.registry, reference.repository) as client:
        manifest = client.get_manifest(reference.digest or reference.tag or "cache").document()
        client.get_blob_to(store, manifest["config"]["digest"], manifest["config"].get("size"))
        config = store.read_json(manifest["config"]["digest"])
        layers = [layer for layer in manifest.get("layers", []) if isinstance(layer, dict)]
        for layer in layers:
            client.get_blob_to(store, layer["digest"], layer.get("size"))
    return config, layers
