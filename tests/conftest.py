"""Shared fixtures: a busybox base image made locally, temporary stores, running the CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_builder(*args: str, root: Path, check: bool = True, env: dict[str, str] | None = None) -> Result:
    """Run the CLI in a subprocess, as a user would, with the store at ``root``."""
    proc = subprocess.run(
        [sys.executable, "-m", "builder", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "BUILDER_ROOT": str(root), **(env or {})},
        check=False,
        timeout=300,
    )
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"builder {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return result


@pytest.fixture(scope="session")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout of the busybox base image, made by the project's fixture script."""
    out = tmp_path_factory.mktemp("busybox") / "layout"
    subprocess.run([sys.executable, str(REPO / "fixtures" / "make_busybox_image.py"), str(out)], check=True)
    return out


@pytest.fixture
def store(tmp_path: Path, busybox_layout: Path) -> Iterator[Path]:
    """A fresh store root holding busybox:latest; checked for leftovers afterwards."""
    root = tmp_path / "store"
    run_builder("load", f"oci:{busybox_layout}", "-t", "busybox:latest", root=root)
    yield root
    mounts = Path("/proc/mounts").read_text()
    assert str(root) not in mounts, "a build left a mount behind"
    leftovers = [p.name for p in (root / "tmp").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == [], f"a build left temp files behind: {leftovers}"


def layer_members(layout: Path, tag: str = "latest") -> list[list[str]]:
    """The entry names of each layer of the image ``tag`` in an OCI layout (dirs end in /)."""
    manifest = read_manifest(layout, tag)
    names = []
    for layer in manifest["layers"]:
        data = (layout / "blobs" / "sha256" / layer["digest"][7:]).read_bytes()
        if layer["mediaType"].endswith("+zstd"):
            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            names.append([m.name + ("/" if m.isdir() else "") for m in tar.getmembers()])
    return names


def read_manifest(layout: Path, tag: str = "latest") -> dict:
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return json.loads((layout / "blobs" / "sha256" / entry["digest"][7:]).read_bytes())
    raise AssertionError(f"no manifest tagged {tag} in {layout}")


def read_config(layout: Path, tag: str = "latest") -> dict:
    manifest = read_manifest(layout, tag)
    return json.loads((layout / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_bytes())
