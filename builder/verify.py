"""Check that a build is reproducible: build it twice, each time in a clean store, and compare.

``builder build --verify-reproducible`` runs :func:`verify_build`. Each build gets a fresh store
under the store's ``tmp/``, seeded with nothing but the base images it reads (their blobs copied
through the store API and verified on the way), so no cache can hide a step whose bytes change
from run to run. The second build runs later, from another store path and with umask 077, so a
clock, a path or a umask that leaks into the image shows. When the digests match, the image is
copied into the store, tagged and written out as a plain build would; when they differ,
:class:`NotReproducible` names the first differing layer and path, or config field.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from itertools import zip_longest
from pathlib import Path
from typing import Any, BinaryIO

from msgspec import Struct, structs

from builder.build import BuildRequest, BuildResult, build, plan_build, publish, source_date_epoch
from builder.compression import open_layer
from builder.errors import BuilderError, LayerError
from builder.images import reference, resolve_image, tag_key
from builder.layout import image_blobs
from builder.store import Store

__all__ = ["NotReproducible", "copy_image", "image_difference", "verify_build"]

Json = dict[str, Any]
Log = Callable[[str], None]
_CHUNK = 1 << 20
_SECOND_UMASK = 0o077  # the first build runs with the caller's umask
_SHOWN = 120  # characters of a differing value that a message quotes


class NotReproducible(BuilderError):
    """Two builds of the same inputs gave different images; the message names the first difference."""


class _Built(Struct, frozen=True):
    store: Store
    result: BuildResult


def verify_build(request: BuildRequest, store: Store, log: Log) -> BuildResult:
    """Build ``request`` twice in clean stores; on a match, tag and write it out from ``store``."""
    if source_date_epoch(request) is None:
        raise BuilderError(
            "--verify-reproducible needs SOURCE_DATE_EPOCH (--source-date-epoch N, "
            "--build-arg SOURCE_DATE_EPOCH=N or the environment); without it every build "
            "records its own time."
        )
    clean = structs.replace(request, tags=(), outputs=(), no_cache=True, cache_from=(), cache_to=())
    with store.lease(), contextlib.ExitStack() as stack:  # a prune waits until the image is tagged
        _, images = plan_build(request, store, log)
        first = _build_clean(stack, clean, store, sorted(images), "1/2", log)
        with _umask(_SECOND_UMASK):
            second = _build_clean(stack, clean, store, sorted(images), "2/2", log)
        first_digest, digest = first.result.manifest_digest, second.result.manifest_digest
        if first_digest != digest:
            found = image_difference(first.store, first_digest, second.store, digest)
            raise NotReproducible(
                f"the build is not reproducible: two clean builds gave {first_digest} and {digest}; {found}"
            )
        copy_image(second.store, store, digest)
        log(f"reproducible: both clean builds gave {digest}")
        publish(request, store, digest, log)
    return second.result


def _build_clean(
    stack: contextlib.ExitStack, request: BuildRequest, store: Store, refs: list[str], label: str, log: Log
) -> _Built:
    """One build in a new store that holds only the base images ``refs``, removed on exit."""
    tmp = stack.enter_context(store.workdir())  # locked: a killed verify's dir goes with the next build
    clean = Store.open(tmp / "store")
    for ref in refs:
        digest, _, _ = resolve_image(store, ref)
        copy_image(store, clean, digest)
        parsed = reference(ref)
        if parsed.digest is None:
            clean.set_tag(tag_key(parsed), digest)
        elif parsed.digest != digest:  # an index: the build finds the platform's image through it
            clean.write_blob(store.read_blob(parsed.digest))
    result = build(request, clean, lambda line: log(f"[verify {label}] {line}"))
    return _Built(clean, result)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def copy_image(src: Store, dst: Store, manifest_digest: str) -> None:
    """Copy an image's manifest, config and layer blobs, each verified as it is written."""
    manifest, config, digests = image_blobs(src, manifest_digest)
    for digest in digests:
        if dst.has_blob(digest):
            continue
        with dst.blob_writer() as writer, src.blob_path(digest).open("rb") as file:
            while chunk := file.read(_CHUNK):
                writer.write(chunk)
            writer.commit(digest)
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        dst.add_layer_blob(diff_id, layer)


# -- what differs ------------------------------------------------------------------------------


def image_difference(store_a: Store, digest_a: str, store_b: Store, digest_b: str) -> str:
    """The first layer entry, config field or manifest field in which two images differ, as the
    end of a sentence (the first image is "the first build", the other "the second")."""
    manifest_a, config_a, _ = image_blobs(store_a, digest_a)
    manifest_b, config_b, _ = image_blobs(store_b, digest_b)
    layers_a, layers_b = manifest_a["layers"], manifest_b["layers"]
    steps = [str(h.get("created_by", "")) for h in config_a.get("history", []) if not h.get("empty_layer")]
    for index, (layer_a, layer_b) in enumerate(zip(layers_a, layers_b, strict=False)):
        if layer_a != layer_b:
            name = f"layer {index + 1} of {len(layers_a)}"
            if index < len(steps):
                name += f" ({steps[index]})"
            if config_a["rootfs"]["diff_ids"][index] == config_b["rootfs"]["diff_ids"][index]:
                return (
                    f"{name} has the same content in both builds but other compressed bytes: "
                    "the compressor's output is not a function of its input."
                )
            blobs = (store_a.blob_path(layer_a["digest"]), store_b.blob_path(layer_b["digest"]))
            return f"{name} differs first at {_tar_difference(*blobs)}."
    if len(layers_a) != len(layers_b):
        return f"the first build made {len(layers_a)} layers and the second {len(layers_b)}."
    where = _json_difference(config_a, config_b, "")
    if where is not None:
        return f"the layers are the same but the image configs differ at {where}."
    where = _json_difference(manifest_a, manifest_b, "")
    return f"the layers and configs are the same but the manifests differ at {where}."


_Fields = tuple[tuple[str, str], ...]
_MISSING: tuple[str, _Fields] = ("", ())  # what zip_longest puts where one tar has ended


def _tar_difference(blob_a: Path, blob_b: Path) -> str:
    """The first entry in which two layer blobs differ, and how."""
    with blob_a.open("rb") as file_a, blob_b.open("rb") as file_b:
        entries = zip_longest(_entries(file_a, blob_a), _entries(file_b, blob_b), fillvalue=_MISSING)
        for (name_a, fields_a), (name_b, fields_b) in entries:
            if name_a != name_b:
                if not name_b:
                    return f"/{name_a}, which only the first build has"
                if not name_a:
                    return f"/{name_b}, which only the second build has"
                return f"/{name_a} in the first build and /{name_b} in the second"
            for (field, value_a), (_, value_b) in zip(fields_a, fields_b, strict=True):
                if value_a != value_b:
                    return f"/{name_a}: its {field} is {value_a} against {value_b}"
    return "no entry: the tars differ only in their framing"


def _entries(file: BinaryIO, path: Path) -> Iterator[tuple[str, _Fields]]:
    """Each entry of a layer blob: its name and what a reproducibility check compares, in order."""
    try:
        with tarfile.open(fileobj=open_layer(file), mode="r|") as tar:
            for member in tar:
                yield member.name, _fields(member, tar)
    except tarfile.TarError as exc:
        raise LayerError(f"The layer {path} cannot be read as a tar: {exc}.") from exc


def _fields(member: tarfile.TarInfo, tar: tarfile.TarFile) -> _Fields:
    content = ""
    if member.isreg():
        hasher = hashlib.sha256()
        reader = tar.extractfile(member)
        assert reader is not None  # a regular file always has a reader
        while chunk := reader.read(_CHUNK):
            hasher.update(chunk)
        content = "sha256:" + hasher.hexdigest()
    return (
        ("type", repr(member.type)),
        ("mode", f"{member.mode:04o}"),
        ("owner", f"{member.uid}:{member.gid}"),
        ("size", str(member.size)),
        ("content", content),
        ("link target", repr(member.linkname)),
        ("mtime", str(member.mtime)),
        ("device", f"{member.devmajor}:{member.devminor}"),
        ("PAX records", json.dumps(member.pax_headers, sort_keys=True)),
    )


def _json_difference(a: Any, b: Any, path: str) -> str | None:
    """The first place (``history[2].created``) where two JSON documents differ, or None."""
    if a == b:
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return (
                    f"{path}.{key}".lstrip(".")
                    + f", which only the {'second' if key not in a else 'first'} has"
                )
            found = _json_difference(a[key], b[key], f"{path}.{key}")
            if found is not None:
                return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (item_a, item_b) in enumerate(zip(a, b, strict=True)):
            found = _json_difference(item_a, item_b, f"{path}[{index}]")
            if found is not None:
                return found
    return f"{path.lstrip('.') or 'the top'}: {_shown(a)} against {_shown(b)}"


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…"
