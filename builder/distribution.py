"""Images between the store and registries: pull (verified, platform-resolved) and push.

A pull stores every blob through the store's verifying writer, layers in parallel, and writes
the manifest and the tag only after all of them are in: a failed pull leaves no image that
lies, only verified blobs that a retry reuses. Layers are recorded in the layer index, so the
first build that needs one unpacks it once as a snapshot and every later build reuses it.

A push sends each blob the registry does not have (HEAD first), mounting it from another
repository of the same registry when the store knows one that holds it, then the manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from builder.credentials import RegistryOptions
from builder.errors import RegistryError, StoreError
from builder.images import (
    ImageRecord,
    Platform,
    host_platform,
    index_platforms,
    names_registry,
    resolve_image,
    select_manifest,
    tag_key,
)
from builder.images import reference as parse_ref
from builder.oci import (
    CONFIG_MEDIA_TYPES,
    IMAGE_MANIFEST_MEDIA_TYPES,
    INDEX_MEDIA_TYPES,
    LAYER_COMPRESSIONS,
    Reference,
)
from builder.store import Store

if TYPE_CHECKING:
    from builder.registry import Manifest, RegistryClient

__all__ = ["fetch_image", "pull_image", "push_image"]

Json = dict[str, Any]
Log = Callable[[str], None]
T = TypeVar("T")
PARALLEL = 4  # blobs in flight at once, per image


def fetch_image(
    store: Store,
    text: str,
    options: RegistryOptions,
    log: Log,
    *,
    pull: bool = False,
    platform: Platform | None = None,
) -> ImageRecord:
    """The image ``text`` names, from the store, or pulled when it is not there and the
    reference names a registry; with ``pull``, always from the registry."""
    ref = parse_ref(text)
    if not pull:
        try:
            return resolve_image(store, ref, platform)
        except StoreError:
            if not names_registry(text):
                raise
    return pull_image(store, ref, options, log, platform=platform)


def pull_image(
    store: Store, ref: Reference, options: RegistryOptions, log: Log, *, platform: Platform | None = None
) -> ImageRecord:
    """Pull one image into the store and tag it; an index resolves to ``platform`` (the host's)."""
    with store.lease():  # a prune meanwhile must not take the blobs before the tag names them
        return _pull(store, ref, options, log, platform or host_platform())


def _pull(store: Store, ref: Reference, options: RegistryOptions, log: Log, wanted: Platform) -> ImageRecord:
    log(f"pulling {ref.familiar}")
    from builder.registry import RegistryClient  # a pull or a push only (start-up time)

    with RegistryClient.open(options, ref.registry, ref.repository) as client:
        top = client.get_manifest(ref.digest or ref.tag or "latest")
        manifest = top
        if top.media_type in INDEX_MEDIA_TYPES:
            entry = select_manifest(top.document(), wanted)
            if entry is None:
                raise RegistryError(
                    f"{ref.familiar} has no image for {wanted}; it has {index_platforms(top.document())}."
                )
            manifest = client.get_manifest(str(entry.get("digest")))
        document = _check_image(manifest, ref)
        _fetch_blobs(store, client, document, manifest.digest)
    config = store.read_json(document["config"]["digest"])
    _record_layers(store, document, config, manifest.digest)
    for blob in (document["config"], *document["layers"]):
        store.add_blob_source(blob["digest"], ref.name)
    for stored in {top.data, manifest.data}:
        store.write_blob(stored)
    if ref.tag:
        store.set_tag(tag_key(ref), manifest.digest)
    log(f"pulled {ref.familiar}: {manifest.digest}")
    return manifest.digest, document, config


def _check_image(manifest: Manifest, ref: Reference) -> Json:
    """The manifest as a document, refused unless it is an image this builder can use."""
    if manifest.media_type not in (*IMAGE_MANIFEST_MEDIA_TYPES, *INDEX_MEDIA_TYPES):
        raise RegistryError(
            f"unsupported media type: {ref.familiar} is a {manifest.media_type!r} manifest, not an "
            "OCI or Docker v2 image."
        )
    document = manifest.document()
    config = document.get("config")
    layers = document.get("layers")
    if (
        manifest.media_type in INDEX_MEDIA_TYPES
        or not isinstance(config, dict)
        or not isinstance(layers, list)
    ):
        raise RegistryError(f"the manifest {manifest.digest} of {ref.familiar} is not an image manifest.")
    if config.get("mediaType") not in CONFIG_MEDIA_TYPES:
        raise RegistryError(
            f"unsupported media type: the config of {ref.familiar} is {config.get('mediaType')!r}, "
            "not an image config."
        )
    for layer in layers:
        if not isinstance(layer, dict) or layer.get("mediaType") not in LAYER_COMPRESSIONS:
            kind = layer.get("mediaType") if isinstance(layer, dict) else layer
            raise RegistryError(f"unsupported media type: {ref.familiar} has a layer of type {kind!r}.")
    return document


def _fetch_blobs(store: Store, client: RegistryClient, document: Json, digest: str) -> None:
    config = document["config"]
    client.get_blob_to(store, str(config.get("digest")), config.get("size"))
    config_doc = store.read_json(config["digest"])
    diff_ids = (config_doc.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(document["layers"]):
        raise RegistryError(
            f"the image {digest} has {len(document['layers'])} layers but its config lists "
            f"{len(diff_ids)} diff_ids."
        )
    _parallel(
        lambda layer: client.get_blob_to(store, str(layer["digest"]), layer.get("size")), document["layers"]
    )


def _record_layers(store: Store, document: Json, config: Json, digest: str) -> None:
    for layer, diff_id in zip(document["layers"], config["rootfs"]["diff_ids"], strict=True):
        store.add_layer_blob(str(diff_id), {k: layer[k] for k in ("mediaType", "digest", "size")})


def push_image(store: Store, manifest_digest: str, ref: Reference, options: RegistryOptions, log: Log) -> str:
    """Push a stored image to ``ref`` (its tag, or by digest); returns the manifest digest."""
    if ref.digest and ref.digest != manifest_digest:
        raise RegistryError(
            f"{ref.familiar} names the digest {ref.digest}, but the image is {manifest_digest}."
        )
    data = store.read_blob(manifest_digest)
    manifest = store.read_json(manifest_digest)
    blobs = [manifest["config"], *manifest["layers"]]
    log(f"pushing {ref.familiar}")
    from builder.registry import RegistryClient

    with RegistryClient.open(options, ref.registry, ref.repository, push=True) as client:
        for line in _parallel(lambda blob: _push_blob(store, client, blob), blobs):
            log(line)
        media_type = str(manifest.get("mediaType") or IMAGE_MANIFEST_MEDIA_TYPES[0])
        client.put_manifest(ref.tag or manifest_digest, media_type, data)
    for blob in blobs:
        store.add_blob_source(blob["digest"], ref.name)
    log(f"pushed {ref.familiar}: {manifest_digest}")
    return manifest_digest


def _push_blob(store: Store, client: RegistryClient, blob: Json) -> str:
    """Get one blob into the repository; says how (for the log)."""
    digest, size = str(blob["digest"]), int(blob["size"])
    if client.has_blob(digest):
        return f"  {digest[:19]} exists"
    prefix = f"{client.registry}/"
    sources = [s.removeprefix(prefix) for s in store.blob_sources(digest) if s.startswith(prefix)]
    for repository in sources:
        if repository != client.repository and client.mount_blob(digest, repository):
            return f"  {digest[:19]} mounted from {repository}"
    client.put_blob(store.blob_path(digest), digest, size)
    return f"  {digest[:19]} uploaded ({size} bytes)"


def _parallel(action: Callable[[Json], T], items: Iterable[Json]) -> list[T]:
    """``action`` of each item, ``PARALLEL`` at a time, results in order; the first error is raised."""
    # Imported here: only a pull or push needs threads (start-up of the cached path).
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(PARALLEL) as pool:
        return list(pool.map(action, items))
