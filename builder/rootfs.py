"""An image's root file system, as a directory (``type=local``) or as one tar (``type=tar``).

The layers are applied in order to a staging directory with the same hostile-tar applier that
unpacks base images (whiteouts delete, nothing escapes the root), each checked against its
diff_id; the directory is renamed into place only when complete. The tar is written by the
layer differ over that directory with no lowers: sorted, numeric owners, integer times.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from builder.errors import StoreError
from builder.layer import apply_blob, diff_upperdir
from builder.layout import image_blobs
from builder.store import Store

__all__ = ["export_rootfs", "write_rootfs_tar"]

_CHUNK = 1 << 20


def _unpack(store: Store, manifest_digest: str, root: Path) -> None:
    manifest, config, _ = image_blobs(store, manifest_digest)
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    for layer, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        with store.blob_path(layer["digest"]).open("rb") as blob:
            apply_blob(blob, root, diff_id=diff_id, overlay_whiteouts=False, name=layer["digest"])


def export_rootfs(store: Store, manifest_digest: str, dest: Path) -> None:
    """Write the image's files to ``dest``, a directory that must not exist or be empty."""
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise StoreError(
            f"cannot write the root file system to {dest}: it exists and is not an empty directory."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    try:
        os.chmod(staging, 0o755)
        _unpack(store, manifest_digest, staging)
        if dest.exists():
            dest.rmdir()
        os.rename(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def write_rootfs_tar(store: Store, manifest_digest: str, out: BinaryIO) -> None:
    """Write the image's files as one tar to ``out`` (staged in the store's temp space)."""
    with store.workdir() as scratch:
        root = scratch / "rootfs"
        root.mkdir()
        _unpack(store, manifest_digest, root)
        diff_upperdir(root, [], out)
