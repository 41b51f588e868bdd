"""RUN --mount (cache, bind, tmpfs, secret) and heredoc scripts, built for real."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import layer_members, run_builder

pytestmark = pytest.mark.integration


def _build(
    tmp_path: Path, store: Path, dockerfile: str, *args: str, files: dict[str, str] | None = None
) -> Path:
    context = tmp_path / "context"
    context.mkdir(exist_ok=True)
    (context / "Dockerfile").write_text(dockerfile)
    for name, text in (files or {}).items():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text(text)
    out = tmp_path / "oci"
    run_builder("build", "-t", "m:1", "-o", f"type=oci,dest={out}", *args, str(context), root=store)
    return out


def _rootfs(tmp_path: Path, out: Path) -> Path:
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{out}:1", str(bundle)], capture_output=True, check=True)
    return bundle / "rootfs"


def test_cache_mount_persists_across_builds_and_stays_out_of_layers(tmp_path: Path, store: Path) -> None:
    dockerfile = (
        "FROM busybox:latest\n"
        "RUN --mount=type=cache,target=/var/cache/app echo run >> /var/cache/app/log"
        " && wc -l < /var/cache/app/log > /count\n"
    )
    _build(tmp_path, store, dockerfile)
    out = _build(tmp_path, store, dockerfile, "--no-cache")
    assert _rootfs(tmp_path, out).joinpath("count").read_text().strip() == "2"
    assert layer_members(out, "1")[-1] == ["count"], "the cache dir and its mount point are not in the layer"


def test_bind_mount_from_the_context_is_read_only_and_keyed_by_content(tmp_path: Path, store: Path) -> None:
    dockerfile = "FROM busybox:latest\nRUN --mount=type=bind,source=src,target=/src cat /src/a > /copied"
    dockerfile += " && ! touch /src/b\n"
    out = _build(tmp_path, store, dockerfile, files={"src/a": "one\n"})
    assert _rootfs(tmp_path, out).joinpath("copied").read_text() == "one\n"
    assert layer_members(out, "1")[-1] == ["copied"]
    (tmp_path / "context/src/a").write_text("two\n")
    again = run_builder("build", str(tmp_path / "context"), root=store)
    assert "(1 steps run)" in again.stderr, "a changed bound file must miss the cache"


def test_bind_mount_from_a_context_given_as_a_relative_path(tmp_path: Path, store: Path) -> None:
    """``builder build ctx`` with a relative ``ctx``: the bind mount's source is made absolute."""
    (tmp_path / "ctx" / "src").mkdir(parents=True)
    (tmp_path / "ctx" / "src" / "a").write_text("one\n")
    dockerfile = "FROM busybox:latest\nRUN --mount=type=bind,source=src,target=/src cat /src/a > /copied\n"
    (tmp_path / "ctx" / "Dockerfile").write_text(dockerfile)
    argv = [sys.executable, "-m", "builder", "build", "--root", str(store), "-t", "rel:1", "ctx"]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "(1 steps run)" in proc.stderr


def test_secret_is_readable_but_never_stored(tmp_path: Path, store: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cr3t-value")
    dockerfile = "FROM busybox:latest\nRUN --mount=type=secret,id=token wc -c < /run/secrets/token > /size\n"
    out = _build(tmp_path, store, dockerfile, "--secret", f"id=token,src={secret}")
    assert layer_members(out, "1")[-1] == ["size"]
    assert _rootfs(tmp_path, out).joinpath("size").read_text().strip() == "12"
    for blob in (out / "blobs" / "sha256").iterdir():
        assert b"s3cr3t-value" not in blob.read_bytes()
    for record in store.rglob("*.json"):
        assert "s3cr3t-value" not in record.read_text(errors="replace")


def test_missing_required_secret_is_a_clear_error(tmp_path: Path, store: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(
        "FROM busybox:latest\nRUN --mount=type=secret,id=key,required cat /run/secrets/key\n"
    )
    result = run_builder("build", str(context), root=store, check=False)
    assert result.returncode == 1
    assert "Dockerfile:2: the secret 'key' is required" in result.stderr


def test_tmpfs_mount_is_thrown_away(tmp_path: Path, store: Path) -> None:
    dockerfile = "FROM busybox:latest\nRUN --mount=type=tmpfs,target=/scratch echo x > /scratch/x"
    dockerfile += " && ls /scratch > /listed\n"
    out = _build(tmp_path, store, dockerfile)
    assert _rootfs(tmp_path, out).joinpath("listed").read_text() == "x\n"
    assert layer_members(out, "1")[-1] == ["listed"]


def test_heredoc_script_with_a_shebang_runs_as_a_file(tmp_path: Path, store: Path) -> None:
    dockerfile = "FROM busybox:latest\nRUN <<EOF\n#!/bin/sh\necho from-script > /script-out\nEOF\n"
    out = _build(tmp_path, store, dockerfile)
    assert _rootfs(tmp_path, out).joinpath("script-out").read_text() == "from-script\n"
    assert layer_members(out, "1")[-1] == ["script-out"]
