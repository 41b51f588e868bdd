"""Where an image goes: the outputs of ``build --output``, ``save`` and ``push``.

Every layer of an output is in the output's compression (gzip unless asked otherwise: Debian
12's umoci 0.4.7 and Docker 20.10 cannot read zstd). A stored blob in another compression is
converted once, checked against its diff_id, and recorded in the layer index, so the next
output that needs it finds it. OCI outputs always carry OCI media types; Docker archives and
pushes keep a Docker image's own types unless a layer had to be converted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from msgspec import Struct

from builder.compression import COMPRESSION_ANNOTATION, COMPRESSIONS, Compression, open_layer
from builder.errors import BuilderError, LayerError
from builder.images import reference
from builder.oci import (
    CONFIG_MEDIA_TYPE,
    LAYER_COMPRESSIONS,
    MANIFEST_MEDIA_TYPE,
    Reference,
    canonical_json,
    image_manifest,
)

if TYPE_CHECKING:
    from builder.credentials import RegistryOptions
    from builder.store import Store

__all__ = ["OUTPUT_KINDS", "Output", "convert_image", "layer_as", "parse_output", "write_output"]

Json = dict[str, Any]
Log = Callable[[str], None]
OUTPUT_KINDS = {
    "oci": "an OCI image layout directory (or an OCI archive when dest ends in .tar)",
    "oci-archive": "an OCI image layout as a tar",
    "docker": "a Docker archive (docker load, podman load, skopeo docker-archive:)",
    "registry": "a push to the registry that name= (or each -t tag) names",
    "local": "the root file system as a directory",
    "tar": "the root file system as a tar",
}
_ALIASES = {"docker-archive": "docker"}
_OUTPUT_KEYS = frozenset({"type", "dest", "name", "compression", "compression-level"})


class Output(Struct, frozen=True):
    """One output: ``kind`` (a key of :data:`OUTPUT_KINDS`) and where and how to write it."""

    kind: str
    dest: Path | None = None
    name: str | None = None  # registry: where to push (default: the image's tags)
    compression: str | None = None  # default: the build's, or gzip
    level: int | None = None


def parse_output(text: str) -> Output:
    """Parse ``type=KIND,dest=PATH[,name=REF][,compression=C][,compression-level=N]``.

    Raises ValueError with the expected form.
    """
    fields = dict(part.partition("=")[::2] for part in text.split(",") if part)
    kind = _ALIASES.get(fields.get("type", ""), fields.get("type", ""))
    dest = fields.get("dest") or None
    if kind == "oci" and dest and dest.endswith(".tar"):
        kind = "oci-archive"
    problem = _output_problem(fields, kind, dest)
    if problem:
        kinds = ", ".join(OUTPUT_KINDS)
        raise ValueError(
            f"{text!r}: {problem} (expected type={{{kinds}}},dest=PATH or type=registry,name=REF)"
        )
    level = fields.get("compression-level")
    return Output(
        kind,
        Path(dest) if dest else None,
        fields.get("name") or None,
        fields.get("compression") or None,
        int(level) if level is not None else None,
    )


def _output_problem(fields: dict[str, str], kind: str, dest: str | None) -> str | None:
    unknown = sorted(set(fields) - _OUTPUT_KEYS)
    level = fields.get("compression-level")
    if kind not in OUTPUT_KINDS:
        return f"unknown type {fields.get('type', '')!r}"
    if unknown:
        return f"unknown keys {', '.join(unknown)}"
    if kind != "registry" and not dest:
        return f"type={kind} needs dest=PATH"
    if fields.get("compression", "gzip") not in COMPRESSIONS:
        return f"unknown compression {fields['compression']!r}"
    if level is not None and not level.isdigit():
        return f"compression-level {level!r} is not a number"
    return None


def write_output(
    store: Store,
    manifest_digest: str,
    output: Output,
    names: Sequence[Reference],
    registry: RegistryOptions,
    log: Log,
) -> str:
    """Write one output of a stored image; returns the manifest digest written (after any
    conversion of its layers)."""
    with store.lease():  # blobs converted for this output are not pruned before they are written
        try:
            return _write(store, manifest_digest, output, names, registry, log)
        except OSError as exc:
            where = output.dest or output.name
            raise BuilderError(f"cannot write the output {where}: {exc.strerror or exc}.") from exc


def _write(
    store: Store,
    digest: str,
    output: Output,
    names: Sequence[Reference],
    registry: RegistryOptions,
    log: Log,
) -> str:
    # Imported here: a build without --output never needs them (start-up of the cached path).
    from builder.distribution import push_image
    from builder.layout import export_layout, write_layout_tar
    from builder.rootfs import export_rootfs, write_rootfs_tar

    if output.kind == "local":
        export_rootfs(store, digest, _dest(output))
        return digest
    if output.kind == "tar":
        _atomic_write(_dest(output), lambda file: write_rootfs_tar(store, digest, file))
        return digest
    compression = COMPRESSIONS[output.compression or "gzip"]
    digest = convert_image(store, digest, compression, output.level, oci_types=output.kind.startswith("oci"))
    if output.kind == "oci":
        export_layout(store, digest, _dest(output), names)
    elif output.kind in ("oci-archive", "docker"):
        docker = output.kind == "docker"
        _atomic_write(_dest(output), lambda file: write_layout_tar(store, digest, file, names, docker=docker))
    else:
        targets = [reference(output.name)] if output.name else list(names)
        if not targets:
            raise BuilderError("type=registry needs name=REF, or a -t tag to push to.")
        for target in targets:
            push_image(store, digest, target, registry, log)
    return digest


def _dest(output: Output) -> Path:
    if output.dest is None:
        raise BuilderError(f"type={output.kind} needs dest=PATH.")
    return output.dest


def _atomic_write(dest: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file through a temp file beside it, renamed into place only when complete."""
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        with tmp.open("wb") as file:
            write(file)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def convert_image(
    store: Store, manifest_digest: str, compression: Compression, level: int | None, *, oci_types: bool
) -> str:
    """The image with every layer in ``compression`` (and OCI media types when ``oci_types``):
    the same manifest when nothing changes, else a new one written to the store."""
    from builder.layout import image_blobs  # only outputs need it (start-up of the cached path)

    manifest, config, _ = image_blobs(store, manifest_digest)
    diff_ids = config["rootfs"]["diff_ids"]
    layers = [
        layer_as(store, dict(desc), str(diff_id), compression, level)
        for desc, diff_id in zip(manifest["layers"], diff_ids, strict=True)
    ]
    same_blobs = [d["digest"] for d in layers] == [d["digest"] for d in manifest["layers"]]
    if same_blobs and (
        not oci_types or manifest.get("mediaType", MANIFEST_MEDIA_TYPE) == MANIFEST_MEDIA_TYPE
    ):
        return manifest_digest
    config_desc = {**manifest["config"], "mediaType": CONFIG_MEDIA_TYPE}
    return store.write_blob(canonical_json(image_manifest(config_desc, layers, manifest.get("annotations"))))


def layer_as(store: Store, desc: Json, diff_id: str, compression: Compression, level: int | None) -> Json:
    """A blob of layer ``diff_id`` in ``compression``: the given one, a stored one, or a new one."""
    for found in (desc, *store.layer_blobs(diff_id)):
        if LAYER_COMPRESSIONS.get(found.get("mediaType", "")) == compression.name:
            return {**found, "mediaType": compression.media_type}
    from builder.layer import compress_stream  # only a conversion needs the tar machinery

    with store.blob_path(desc["digest"]).open("rb") as source, store.blob_writer() as writer:
        blob = compress_stream(open_layer(source), writer.file, compression=compression, level=level)
        if blob.diff_id != diff_id:
            raise LayerError(f"blob {desc['digest']} unpacks to {blob.diff_id}, not to layer {diff_id}.")
        writer.commit_hashed(blob.digest)
    converted = {
        "mediaType": blob.media_type,
        "digest": blob.digest,
        "size": blob.size,
        "annotations": {COMPRESSION_ANNOTATION: compression.settings(level)},
    }
    store.add_layer_blob(diff_id, converted)
    return converted
