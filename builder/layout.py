"""OCI image layouts and archives, and Docker archives, in and out of the store.

Out: a layout directory (``oci-layout``, ``index.json``, ``blobs/``) or the same as a tar; a
Docker archive is that tar plus the ``manifest.json`` that ``docker load`` reads (as Docker 25
and containerd write them: one body, two readers).
In: a layout or archive of someone else, treated as hostile: every blob is verified against its
digest before it enters the store, Docker archive layers against the config's diff_ids, and
archives are read without extracting to disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO

from builder.compression import COMPRESSIONS, open_layer
from builder.digest import is_digest
from builder.errors import StoreError
from builder.images import ImageRecord, reference
from builder.oci import (
    CONFIG_MEDIA_TYPE,
    CONFIG_MEDIA_TYPES,
    IMAGE_MANIFEST_MEDIA_TYPES,
    INDEX_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    Reference,
    canonical_json,
    descriptor,
    image_manifest,
)
from builder.store import Store

__all__ = [
    "ImageRecord",
    "export_layout",
    "image_blobs",
    "import_docker_archive",
    "import_layout",
    "write_layout_tar",
]

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
_CHUNK = 1 << 20
_MAX_JSON = 16 << 20

Json = dict[str, Any]


def image_blobs(store: Store, manifest_digest: str) -> tuple[Json, Json, list[str]]:
    """The manifest, the config and every blob digest of a stored image."""
    manifest = store.read_json(manifest_digest)
    config = store.read_json(manifest["config"]["digest"])
    digests = [manifest_digest, manifest["config"]["digest"]] + [
        layer["digest"] for layer in manifest["layers"]
    ]
    return manifest, config, digests


def _index_entries(store: Store, manifest_digest: str, names: Sequence[Reference]) -> list[Json]:
    """index.json entries for the image: one per name (tag annotation), or one unnamed."""
    media_type = str(store.read_json(manifest_digest).get("mediaType") or MANIFEST_MEDIA_TYPE)
    size = store.blob_path(manifest_digest).stat().st_size
    return [
        descriptor(
            media_type, manifest_digest, size, **{REF_NAME: ref.tag or "latest", CONTAINERD_NAME: str(ref)}
        )
        for ref in names
    ] or [descriptor(media_type, manifest_digest, size)]


def export_layout(store: Store, manifest_digest: str, dest: Path, names: Sequence[Reference]) -> None:
    """Write (or add to) an OCI layout directory; a name's tag replaces an entry with that tag."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (dest / "oci-layout").write_bytes(_LAYOUT)
    _, _, digests = image_blobs(store, manifest_digest)
    for digest in digests:
        target = blobs / digest.removeprefix("sha256:")
        if not target.exists():
            _link_or_copy(store.blob_path(digest), target)
    entries = _index_entries(store, manifest_digest, names)
    index_path = dest / "index.json"
    kept = []
    if index_path.exists():
        taken = {entry["annotations"][REF_NAME] for entry in entries if "annotations" in entry}
        old = _read_json_file(index_path)
        kept = [m for m in old.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) not in taken]
        kept = [m for m in kept if m.get("annotations") or m.get("digest") != manifest_digest]
    index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": kept + entries}
    tmp = index_path.with_suffix(".tmp")
    tmp.write_bytes(canonical_json(index))
    os.replace(tmp, index_path)


def write_layout_tar(
    store: Store, manifest_digest: str, dest: BinaryIO, names: Sequence[Reference], *, docker: bool = False
) -> None:
    """An OCI archive: the layout as a deterministic tar (sorted, times 0, owner root).

    With ``docker``, also the ``manifest.json`` of a Docker archive, naming the same blobs.
    """
    manifest, _, digests = image_blobs(store, manifest_digest)
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": _index_entries(store, manifest_digest, names),
    }
    files = [("index.json", canonical_json(index)), ("oci-layout", _LAYOUT)]
    if docker:
        files.append(("manifest.json", _docker_manifest(manifest, names)))
    with tarfile.open(fileobj=dest, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in ("blobs/", "blobs/sha256/"):
            tar.addfile(_tar_info(name, 0, tarfile.DIRTYPE))
        for digest in sorted(set(digests)):
            path = store.blob_path(digest)
            with path.open("rb") as file:
                tar.addfile(_tar_info(f"blobs/sha256/{digest[7:]}", path.stat().st_size), file)
        for name, data in sorted(files):
            tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))


def _docker_manifest(manifest: Json, names: Sequence[Reference]) -> bytes:
    """``docker load``'s manifest.json: the config, the layers in order, the tags to create."""
    entry = {
        "Config": f"blobs/sha256/{manifest['config']['digest'][7:]}",
        "RepoTags": [ref.familiar for ref in names if ref.tag and not ref.digest],
        "Layers": [f"blobs/sha256/{layer['digest'][7:]}" for layer in manifest["layers"]],
    }
    return json.dumps([entry], separators=(",", ":")).encode()


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

    def open(self, name: str) -> IO[bytes]:
        path = self.root / name
        if path.is_symlink() or not path.is_file():
            raise StoreError(f"{path} is missing from the OCI layout (or is not a regular file).")
        return path.open("rb")


class _ArchiveReader:
    def __init__(self, tar: tarfile.TarFile, source: Path) -> None:
        self.tar = tar
        self.source = source
        self.members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}

    def open(self, name: str) -> IO[bytes]:
        member = self.members.get(name.removeprefix("./"))
        file = self.tar.extractfile(member) if member else None
        if file is None:
            raise StoreError(f"{name} is missing from the archive {self.source}.")
        return file


def _import(store: Store, reader: _DirReader | _ArchiveReader, select: str | None) -> ImageRecord:
    with reader.open("index.json") as file:
        index = _parse_json(file.read(_MAX_JSON), "index.json")
    manifests = [m for m in index.get("manifests", []) if isinstance(m, dict)]
    if select is not None:
        manifests = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) == select]
    if len(manifests) != 1:
        found = "no image" if not manifests else f"{len(manifests)} images"
        hint = f" named {select!r}" if select else "; name one with DIR:TAG"
        raise StoreError(f"the OCI index holds {found}{hint}.")
    manifest_digest = _copy_blob(store, reader, manifests[0])
    manifest = store.read_json(manifest_digest)
    if manifest.get("mediaType", MANIFEST_MEDIA_TYPE) not in IMAGE_MANIFEST_MEDIA_TYPES:
        raise StoreError(
            f"manifest {manifest_digest} has media type {manifest.get('mediaType')!r}, not an image."
        )
    config_digest = _copy_blob(store, reader, manifest["config"])
    config = store.read_json(config_digest)
    if manifest["config"].get("mediaType") not in CONFIG_MEDIA_TYPES:
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


# -- Docker archives in -----------------------------------------------------------------------


def import_docker_archive(store: Store, source: Path, select: str | None = None) -> ImageRecord:
    """Copy one image of a ``docker save`` archive into the store, as an OCI image.

    Layers are kept as they are in the archive (``docker save`` writes them uncompressed) after
    each is checked against its diff_id; ``select`` picks an image by one of its RepoTags.
    """
    try:
        with tarfile.open(source, "r:*") as tar:
            reader = _ArchiveReader(tar, source)
            with reader.open("manifest.json") as file:
                entry = _docker_entry(file.read(_MAX_JSON), source, select)
            with reader.open(str(entry.get("Config"))) as file:
                config_bytes = file.read(_MAX_JSON)
            config = _parse_json(config_bytes, f"the config of {source}")
            diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
            paths = entry.get("Layers") or []
            if len(diff_ids) != len(paths):
                raise StoreError(
                    f"the image in {source} has {len(paths)} layers but {len(diff_ids)} diff_ids."
                )
            layers = [
                _copy_layer(store, reader, str(p), str(d)) for p, d in zip(paths, diff_ids, strict=True)
            ]
    except (OSError, tarfile.TarError) as exc:
        raise StoreError(f"cannot read the Docker archive {source}: {exc}.") from exc
    config_desc = descriptor(CONFIG_MEDIA_TYPE, store.write_blob(config_bytes), len(config_bytes))
    manifest = image_manifest(config_desc, layers)
    return store.write_blob(canonical_json(manifest)), manifest, config


def _docker_entry(data: bytes, source: Path, select: str | None) -> Json:
    try:
        entries = json.loads(data)
    except ValueError as exc:
        raise StoreError(f"the manifest.json of {source} is not valid JSON.") from exc
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise StoreError(f"the manifest.json of {source} is not a list of images.")
    if select is not None:
        wanted = str(reference(select))
        entries = [e for e in entries if wanted in {str(reference(t)) for t in e.get("RepoTags") or []}]
    if len(entries) != 1:
        found = "no image" if not entries else f"{len(entries)} images"
        hint = f" tagged {select!r}" if select else "; name one with FILE:NAME:TAG"
        raise StoreError(f"the Docker archive {source} holds {found}{hint}.")
    return dict(entries[0])


def _copy_layer(store: Store, reader: _ArchiveReader, path: str, diff_id: str) -> Json:
    """Store a layer file as a blob once it is known to unpack to ``diff_id``."""
    with store.blob_writer() as writer, reader.open(path) as file:
        head = file.read(4)
        writer.write(head)
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            writer.write(chunk)
        writer.flush()
        with writer.path.open("rb") as blob:
            found = _uncompressed_digest(open_layer(blob))
        if found != diff_id:
            raise StoreError(f"the layer {path} of {reader.source} unpacks to {found}, not to {diff_id}.")
        kind = (
            "gzip" if head[:2] == b"\x1f\x8b" else "zstd" if head == b"\x28\xb5\x2f\xfd" else "uncompressed"
        )
        if kind == "uncompressed" and writer.digest != diff_id:
            raise StoreError(
                f"the layer {path} of {reader.source} is compressed in a format (bzip2 or xz) "
                "that OCI images have no media type for."
            )
        desc = {"mediaType": COMPRESSIONS[kind].media_type, "digest": writer.digest, "size": writer.size}
        if not store.has_blob(writer.digest):
            writer.commit()
    store.add_layer_blob(diff_id, desc)
    return desc


def _uncompressed_digest(stream: BinaryIO) -> str:
    hasher = hashlib.sha256()
    while chunk := stream.read(_CHUNK):
        hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


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
