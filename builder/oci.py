"""OCI image documents as data: media types, descriptors, configs, manifests, references.

Pure: no I/O, no clock. Every document is serialised by :func:`canonical_json`, so the same
content always has the same digest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from msgspec import Struct

from builder.digest import sha256_digest
from builder.reference import DEFAULT_REGISTRY, reference_text, split_reference

__all__ = [
    "CONFIG_MEDIA_TYPE",
    "CONFIG_MEDIA_TYPES",
    "DOCKER_CONFIG_MEDIA_TYPE",
    "DOCKER_MANIFEST_LIST_MEDIA_TYPE",
    "DOCKER_MANIFEST_MEDIA_TYPE",
    "IMAGE_MANIFEST_MEDIA_TYPES",
    "INDEX_MEDIA_TYPE",
    "INDEX_MEDIA_TYPES",
    "LAYER_COMPRESSIONS",
    "MANIFEST_MEDIA_TYPE",
    "OPAQUE_XATTR",
    "WHITEOUT_OPAQUE",
    "WHITEOUT_PREFIX",
    "Reference",
    "canonical_json",
    "descriptor",
    "format_time",
    "image_manifest",
    "new_image_config",
    "parse_reference",
]

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
# A deletion in a layer tar (the image spec's whiteouts): ".wh.NAME" deletes NAME, the opaque
# marker hides everything below its directory. In a snapshot, overlayfs's own forms stand for
# them: a 0/0 character device, and this extended attribute on an opaque directory.
WHITEOUT_PREFIX = ".wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
DOCKER_MANIFEST_LIST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_MANIFEST_MEDIA_TYPES = (MANIFEST_MEDIA_TYPE, DOCKER_MANIFEST_MEDIA_TYPE)
INDEX_MEDIA_TYPES = (INDEX_MEDIA_TYPE, DOCKER_MANIFEST_LIST_MEDIA_TYPE)
CONFIG_MEDIA_TYPES = (CONFIG_MEDIA_TYPE, DOCKER_CONFIG_MEDIA_TYPE)
# How each layer media type is compressed (names as in compression.COMPRESSIONS); Docker's types
# carry the same formats, and containerd's Docker zstd type is in use in the wild.
LAYER_COMPRESSIONS: Mapping[str, str] = MappingProxyType(
    {
        "application/vnd.oci.image.layer.v1.tar": "uncompressed",
        "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
        "application/vnd.docker.image.rootfs.diff.tar": "uncompressed",
        "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
        "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    }
)

Json = dict[str, Any]


def canonical_json(document: Any) -> bytes:
    """Sorted keys, no insignificant white space, UTF-8: one byte string per document."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def descriptor(
    media_type: str, data_or_digest: bytes | str, size: int | None = None, **annotations: str
) -> Json:
    """An OCI content descriptor, for raw bytes or for a digest and size already known."""
    if isinstance(data_or_digest, bytes):
        digest, size = sha256_digest(data_or_digest), len(data_or_digest)
    else:
        digest = data_or_digest
    desc: Json = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        desc["annotations"] = dict(sorted(annotations.items()))
    return desc


def format_time(epoch: float) -> str:
    """RFC 3339 in UTC, as Docker writes it (seconds precision when the time is whole)."""
    moment = datetime.fromtimestamp(epoch, UTC)
    if moment.microsecond:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def new_image_config(architecture: str, os_name: str = "linux") -> Json:
    """The config of an empty (scratch) image."""
    return {
        "architecture": architecture,
        "os": os_name,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
        "history": [],
    }


def image_manifest(config: Json, layers: list[Json], annotations: dict[str, str] | None = None) -> Json:
    """An OCI image manifest; ``config`` is the config's descriptor."""
    manifest: Json = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config,
        "layers": layers,
    }
    if annotations:
        manifest["annotations"] = dict(sorted(annotations.items()))
    return manifest


class Reference(Struct, frozen=True):
    """An image reference, normalised as Docker normalises it."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """registry/repository, the key tags live under."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        return reference_text(self.registry, self.repository, self.tag, self.digest)

    @property
    def familiar(self) -> str:
        """The short form a user writes (``busybox:latest``, ``example.com/app:1``)."""
        name = self.repository if self.registry == DEFAULT_REGISTRY else self.name
        name = name.removeprefix("library/") if self.registry == DEFAULT_REGISTRY else name
        return name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def parse_reference(text: str) -> Reference:
    """Parse ``name[:tag][@digest]``; a bare name gets ``:latest``. Raises ValueError."""
    return Reference(*split_reference(text))
