"""Named images in the store: references resolved to images, platforms, tags and history.

A tag is stored under the reference's full normalised name (``docker.io/library/busybox:latest``),
so ``busybox``, ``busybox:latest`` and ``docker.io/library/busybox`` all name the same tag. A
reference with a digest names the image itself; when that digest is an image index (pulled by
digest), the manifest for the wanted platform is picked from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from msgspec import Struct

from builder.digest import is_digest
from builder.errors import StoreError
from builder.oci import INDEX_MEDIA_TYPES, Reference, parse_reference
from builder.store import Store

__all__ = [
    "HistoryEntry",
    "ImageRecord",
    "Platform",
    "host_arch",
    "host_platform",
    "image_history",
    "index_platforms",
    "names_registry",
    "parse_platform",
    "reference",
    "resolve_image",
    "select_manifest",
    "tag_key",
    "tagged_images",
]

Json = dict[str, Any]
ImageRecord = tuple[str, Json, Json]  # manifest digest, manifest, config
_ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}
# The variant an index entry without one means, per architecture (containerd's defaults).
_DEFAULT_VARIANTS = {"arm64": "v8", "arm": "v7"}


class Platform(Struct, frozen=True):
    """An OCI platform: ``linux/amd64``, ``linux/arm64/v8``."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)

    def matches(self, entry: Json) -> bool:
        """Whether an index entry's ``platform`` object is this platform."""
        if entry.get("os") != self.os or entry.get("architecture") != self.architecture:
            return False
        if self.variant is None:
            return True
        default = _DEFAULT_VARIANTS.get(self.architecture)
        return (entry.get("variant") or default) == self.variant


def host_arch() -> str:
    """The host's architecture in OCI terms."""
    machine = os.uname().machine  # what platform.machine() reads, without importing it
    return _ARCHES.get(machine, machine)


def host_platform() -> Platform:
    return Platform("linux", host_arch())


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]``; raises ValueError."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"{text!r} is not a platform (expected os/arch[/variant], such as linux/arm64)")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def select_manifest(index: Json, wanted: Platform) -> Json | None:
    """The descriptor for ``wanted`` in an image index or manifest list, or None."""
    for entry in index.get("manifests") or []:
        if isinstance(entry, dict) and wanted.matches(entry.get("platform") or {}):
            return entry
    return None


def index_platforms(index: Json) -> str:
    """The platforms an index offers, for messages."""
    found = []
    for entry in index.get("manifests") or []:
        spec = (entry.get("platform") if isinstance(entry, dict) else None) or {}
        found.append(str(Platform(str(spec.get("os")), str(spec.get("architecture")), spec.get("variant"))))
    return ", ".join(found) or "none"


def reference(text: str) -> Reference:
    """Parse a reference a user wrote, as a :class:`StoreError` when it is not one."""
    try:
        return parse_reference(text)
    except ValueError as exc:
        raise StoreError(f"{exc}.") from exc


def names_registry(text: str) -> bool:
    """Whether a reference as written names its registry (``host[:port]/...``, ``localhost/...``)."""
    first, slash, _ = text.partition("/")
    return bool(slash) and ("." in first or ":" in first or first == "localhost")


def tag_key(ref: Reference) -> str:
    """The name a tag is stored under: the full reference without its digest."""
    return str(Reference(ref.registry, ref.repository, ref.tag, None))


def resolve_image(store: Store, ref: str | Reference, wanted: Platform | None = None) -> ImageRecord:
    """A stored image by reference, or by its bare digest: (manifest digest, manifest, config)."""
    digest: str | None = ref if isinstance(ref, str) and is_digest(ref) else None
    shown = str(ref)
    if digest is None:
        parsed = reference(ref) if isinstance(ref, str) else ref
        shown = parsed.familiar
        digest = parsed.digest or (store.get_tag(tag_key(parsed)) if parsed.tag else None)
    if digest is None or not store.has_blob(digest):
        raise StoreError(
            f"the image {shown} is not in the store {store.root}; pull or load it first "
            f"(builder pull NAME, builder load oci:DIR -t NAME)."
        )
    manifest = store.read_json(digest)
    if manifest.get("mediaType") in INDEX_MEDIA_TYPES:
        platform = wanted or host_platform()
        entry = select_manifest(manifest, platform)
        if entry is None or not store.has_blob(str(entry.get("digest"))):
            raise StoreError(f"the store holds no {platform} image of {shown}.")
        digest = str(entry["digest"])
        manifest = store.read_json(digest)
    config_digest = (manifest.get("config") or {}).get("digest")
    if not isinstance(config_digest, str):
        raise StoreError(f"the manifest {digest} of {shown} has no config.")
    return digest, manifest, store.read_json(config_digest)


def tagged_images(store: Store) -> Iterator[tuple[Reference, str]]:
    """Every tag in the store with the digest it points at."""
    for name, digest in store.tags().items():
        try:
            yield parse_reference(name), digest
        except ValueError:
            continue  # a tag file someone else wrote; not ours to list


class HistoryEntry(Struct, frozen=True):
    created: str
    created_by: str
    size: int | None  # the layer blob's size; None for a step that added no layer
    comment: str


def image_history(manifest: Json, config: Json) -> list[HistoryEntry]:
    """The history of an image, newest first, each entry paired with the layer it added."""
    layers = iter(manifest.get("layers") or [])
    entries = []
    for item in config.get("history") or []:
        empty = bool(item.get("empty_layer"))
        layer = None if empty else next(layers, None)
        entries.append(
            HistoryEntry(
                created=str(item.get("created", "")),
                created_by=str(item.get("created_by", "")),
                size=None if layer is None else int(layer.get("size", 0)),
                comment=str(item.get("comment", "")),
            )
        )
    return entries[::-1]
