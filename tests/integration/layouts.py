"""Helpers for the layer tests: build with the CLI, read each layer, model the final tree.

``final_tree`` applies the layers the way the OCI image spec says a consumer must (whiteouts,
opaque markers), independently of the builder's own applier. ``make_layout`` writes an OCI
layout from raw layer tars, so tests can hand the builder base images nobody would build.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

from tests.conftest import read_manifest, run_builder

__all__ = ["Entry", "base_tar", "build", "final_tree", "make_layout", "read_layers"]


@dataclass(frozen=True)
class Entry:
    info: tarfile.TarInfo
    data: bytes

    @property
    def mode(self) -> int:
        return self.info.mode

    @property
    def owner(self) -> tuple[int, int]:
        return self.info.uid, self.info.gid


Layer = dict[str, Entry]  # by name as written (directories end in "/"), in tar order


def build(context: Path, store: Path, out: Path, *args: str, tag: str = "t:1") -> list[Layer]:
    """Build ``context`` with the CLI into an OCI layout at ``out`` and read its layers."""
    run_builder("build", "-t", tag, "--output", f"type=oci,dest={out}", *args, str(context), root=store)
    return read_layers(out, tag.partition(":")[2] or "latest")


def read_layers(layout: Path, tag: str) -> list[Layer]:
    layers = []
    for desc in read_manifest(layout, tag)["layers"]:
        data = (layout / "blobs" / "sha256" / desc["digest"][7:]).read_bytes()
        if desc["mediaType"].endswith("+zstd"):
            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        layer: Layer = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                content = tar.extractfile(member).read() if member.isreg() else b""  # type: ignore[union-attr]
                layer[member.name + ("/" if member.isdir() else "")] = Entry(member, content)
        layers.append(layer)
    return layers


def base_tar(layout: Path, tag: str = "latest") -> bytes:
    """The uncompressed tar of the first layer of an image in a layout (the busybox root)."""
    desc = read_manifest(layout, tag)["layers"][0]
    return gzip.decompress((layout / "blobs" / "sha256" / desc["digest"][7:]).read_bytes())


def final_tree(layers: list[Layer]) -> dict[str, Entry]:
    """The root file system the layers make, by path (no trailing slash), per the OCI spec."""
    tree: dict[str, Entry] = {}
    for layer in layers:
        added: set[str] = set()
        for name, entry in layer.items():
            path = name.rstrip("/")
            parent, _, base = path.rpartition("/")
            if base == ".wh..wh..opq":
                prefix = f"{parent}/" if parent else ""
                for old in [p for p in tree if p.startswith(prefix) and p not in added and p != parent]:
                    del tree[old]
            elif base.startswith(".wh."):
                victim = f"{parent}/{base[4:]}" if parent else base[4:]
                for old in [p for p in tree if p == victim or p.startswith(victim + "/")]:
                    del tree[old]
            else:
                if not entry.info.isdir():
                    for old in [p for p in tree if p.startswith(path + "/")]:
                        del tree[old]
                tree[path] = entry
                added.add(path)
    return tree


def make_layout(out: Path, layers: list[bytes], *, tag: str = "latest", compress: bool = True) -> Path:
    """An OCI layout holding one image made of ``layers`` (uncompressed tars, bottom first)."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
    descs = [{"mediaType": media, **blob(gzip.compress(t, mtime=0) if compress else t)} for t in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in layers]},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    }
    config_desc = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        **blob(json.dumps(config).encode()),
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": descs,
    }
    manifest_desc = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **blob(json.dumps(manifest).encode()),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_desc],
    }
    (out / "index.json").write_text(json.dumps(index))
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return out
