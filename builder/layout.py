"""OCI image layouts and archives, in and out of the store.

Out: a layout directory (``oci-layout``, ``index.json``, ``blobs/``) or the same as a tar.
In: a layout or archive of someone else, treated as hostile: every blob is verified against
its digest before it enters the store, and archives are read without extracting to disk.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

from builder.digest import is_digest
from builder.errors import StoreError
from builder.oci import (
    CONFIG_MEDIA_TYPE,
    DOCKER_CONFIG_MEDIA_TYPE,
    DOCKER_MANIFEST_MEDIA_TYPE,
    INDEX_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    canonical_json,
    descriptor,
)
from builder.store import Store

__all__ = ["ImageRecord", "export_layout", "image_blobs", "import_layout", "write_layout_tar"]

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
_CHUNK = 1 << 20

Json = dict[str, Any]
ImageRecord = tuple[str, Json, Json]  # manifest digest, manifest, config


def image_blobs(store: Store, manifest_digest: str) -> tuple[Json, Json, list[str]]:
    """The manifest, the config and every blob digest of a stored image."""
    manifest = store.read_json(manifest_digest)
    config = store.read_json(manifest["config"]["digest"])
    digests = [manifest_digest, manifest["config"]["digest"]] + [
        layer["digest"] for layer in manifest["layers"]
    ]
    return manifest, config, digests


def export_layout(store: Store, manifest_digest: str, dest: Path, names: list[tuple[str, str]]) -> None:
    """Write (or add to) an OCI layout directory; ``names`` are (full name, tag) pairs."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (dest / "oci-layout").write_bytes(_LAYOUT)
    _, _, digests = image_blobs(store, manifest_digest)
    for digest in digests:
        target = blobs / digest.removeprefix("sha256:")
        if not target.exists():
            _link_or_copy(store.blob_path(digest), target)
    size = store.blob_path(manifest_digest).stat().st_size
    entries = [
        descriptor(MANIFEST_MEDIA_TYPE, manifest_digest, size, **{REF_NAME: tag, CONTAINERD_NAME: name})
        for name, tag in names
    ] or [descriptor(MANIFEST_MEDIA_TYPE, manifest_digest, size)]
    index_path = dest / "index.json"
    kept = []
    if index_path.exists():
        taken = {tag for _, tag in names}
        old = _read_json_file(index_path)
        kept = [m for m in old.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) not in taken]
        kept = [m for m in kept if m.get("annotations") or m.get("digest") != manifest_digest]
    index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": kept + entries}
    tmp = index_path.with_suffix(".tmp")
    tmp.write_bytes(canonical_json(index))
    os.replace(tmp, index_path)


def write_layout_tar(
    store: Store, manifest_digest: str, dest: BinaryIO, names: list[tuple[str, str]]
) -> None:
    """An OCI archive: the layout as a deterministic tar (sorted, times 0, owner root)."""
    _, _, digests = image_blobs(store, manifest_digest)
    size = store.blob_path(manifest_digest).stat().st_size
    entries = [
        descriptor(MANIFEST_MEDIA_TYPE, manifest_digest, size, **{REF_NAME: tag, CONTAINERD_NAME: name})
        for name, tag in names
    ] or [descriptor(MANIFEST_MEDIA_TYPE, manifest_digest, size)]
    index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": entries}
    with tarfile.open(fileobj=dest, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in ("blobs/", "blobs/sha256/"):
            tar.addfile(_tar_info(name, 0, tarfile.DIRTYPE))
        for digest in sorted(set(digests)):
            path = store.blob_path(digest)
            with path.open("rb") as file:
                tar.addfile(_tar_info(f"blobs/sha256/{digest[7:]}", path.stat().st_size), file)
        for name, data in (("index.json", canonical_json(index)), ("oci-layout", _LAYOUT)):
            tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))


def _tar_info(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime = size, kind, 0
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.uname = info.gname = ""
    return info


def import_layout(store: Store, source: Path, *, archive: bool, select: str | None = None) -> ImageRecord:
    """Copy one image from a layout dir or archive into the store, verifying every blob.

    ``select`` picks a manifest by its ref-name annotation when the index has several.
    """
    if archive:
        try:
            with tarfile.open(source, "r:*") as tar:
                return _import(store, _ArchiveReader(tar, source), select)
        except (OSError, tarfile.TarError) as exc:
            raise StoreError(f"cannot read the OCI archive {source}: {exc}.") from exc
    if not (source / "index.json").is_file():
        raise StoreError(f"{source} is not an OCI image layout: it has no index.json.")
    return _import(store, _DirReader(source), select)


class _DirReader:
    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, name: str) -> BinaryIO:
        path = self.root / name
        if path.is_symlink() or not path.is_file():
            raise StoreError(f"{path} is missing from the OCI layout (or is not a regular file).")
        return path.open("rb")


class _ArchiveReader:
    def __init__(self, tar: tarfile.TarFile, source: Path) -> None:
        self.tar = tar
        self.source = source
        self.members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}

    def open(self, name: str) -> BinaryIO:
        member = self.members.get(name)
        file = self.tar.extractfile(member) if member else None
        if file is None:
            raise StoreError(f"{name} is missing from the OCI archive {self.source}.")
        return file


def _import(store: Store, reader: _DirReader | _ArchiveReader, select: str | None) -> ImageRecord:
    with reader.open("index.json") as file:
        index = _parse_json(file.read(), "index.json")
    manifests = [m for m in index.get("manifests", []) if isinstance(m, dict)]
    if select is not None:
        manifests = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) == select]
    if len(manifests) != 1:
        found = "no image" if not manifests else f"{len(manifests)} images"
        hint = f" named {select!r}" if select else "; name one with DIR:TAG"
        raise StoreError(f"the OCI index holds {found}{hint}.")
    manifest_digest = _copy_blob(store, reader, manifests[0])
    manifest = store.read_json(manifest_digest)
    if manifest.get("mediaType", MANIFEST_MEDIA_TYPE) not in (
        MANIFEST_MEDIA_TYPE,
        DOCKER_MANIFEST_MEDIA_TYPE,
    ):
        raise StoreError(
            f"manifest {manifest_digest} has media type {manifest.get('mediaType')!r}, not an image."
        )
    config_digest = _copy_blob(store, reader, manifest["config"])
    config = store.read_json(config_digest)
    if manifest["config"].get("mediaType") not in (CONFIG_MEDIA_TYPE, DOCKER_CONFIG_MEDIA_TYPE):
        raise StoreError(f"manifest {manifest_digest} has no image config.")
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    if len(diff_ids) != len(manifest["layers"]):
        raise StoreError(
            f"image {manifest_digest} lists {len(manifest['layers'])} layers but {len(diff_ids)} diff_ids."
        )
    for layer, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        _copy_blob(store, reader, layer)
        store.add_layer_blob(diff_id, {k: layer[k] for k in ("mediaType", "digest", "size")})
    return manifest_digest, manifest, config


def _copy_blob(store: Store, reader: _DirReader | _ArchiveReader, desc: Json) -> str:
    digest = str(desc.get("digest"))
    if not is_digest(digest):
        raise StoreError(f"descriptor digest {digest!r} is not a sha256 digest.")
    if store.has_blob(digest):
        return digest
    with store.blob_writer() as writer, reader.open(f"blobs/sha256/{digest[7:]}") as file:
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            writer.write(chunk)
        if writer.size != desc.get("size"):
            raise StoreError(
                f"blob {digest} has {writer.size} bytes, not the {desc.get('size')} its descriptor says."
            )
        writer.commit(digest)
    return digest


def _parse_json(data: bytes, what: str) -> Json:
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise StoreError(f"{what} is not valid JSON: {exc}.") from exc
    if not isinstance(document, dict):
        raise StoreError(f"{what} is not a JSON object.")
    return document


def _read_json_file(path: Path) -> Json:
    return _parse_json(path.read_bytes(), str(path))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
