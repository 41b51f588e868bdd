"""The build cache: content keys, explained misses, export and import, concurrent builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_builder
from tests.registry import Registry

pytestmark = pytest.mark.integration

DOCKERFILE = """\
FROM busybox:latest
ARG EARLY=1
RUN echo early > /early
COPY first.txt /first.txt
ARG LATE=1
RUN echo "$LATE" > /late
COPY second.txt /second.txt
RUN cat /first.txt /second.txt > /both
"""


def _context(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "Dockerfile").write_text(DOCKERFILE)
    (root / "first.txt").write_text("first\n")
    (root / "second.txt").write_text("second\n")
    return root


def _ran(stderr: str) -> list[str]:
    return [
        line.split("]", 1)[1].split("  (not cached")[0].strip()
        for line in stderr.splitlines()
        if "(not cached" in line
    ]


def test_another_checkout_with_other_mtimes_hits(tmp_path: Path, store: Path) -> None:
    first = _context(tmp_path / "a")
    digest = run_builder("build", str(first), root=store).stdout
    second = tmp_path / "elsewhere" / "b"
    shutil.copytree(first, second)
    for path in second.iterdir():
        os.utime(path, (12345, 12345))
    again = run_builder("build", str(second), root=store)
    assert again.stdout == digest
    assert "(0 steps run)" in again.stderr


def test_a_changed_file_rebuilds_from_its_copy_and_says_why(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path / "c")
    run_builder("build", str(context), root=store)
    (context / "second.txt").write_text("changed\n")
    again = run_builder("build", str(context), root=store)
    assert _ran(again.stderr) == [
        "COPY second.txt /second.txt",
        "RUN /bin/sh -c cat /first.txt /second.txt > /both",
    ]
    assert "COPY second.txt /second.txt  (not cached: source second.txt changed)" in again.stderr
    assert "(not cached: an earlier step changed)" in again.stderr


def test_a_rewrite_keeping_size_and_mtime_misses_though_digests_are_remembered(
    tmp_path: Path, store: Path
) -> None:
    """Context digests are remembered by lstat between builds: a rewrite that keeps the size and
    puts the mtime back still moves the ctime, and the copy runs again with the new bytes."""
    context = _context(tmp_path / "r")
    second = context / "second.txt"
    time.sleep(2.1)  # the files are old enough to be remembered (not racily clean)
    run_builder("build", str(context), root=store)
    remembered = [path.read_text() for path in (store / "memo").glob("*.json")]
    assert any(str(second) in text for text in remembered), "the digest was not remembered"
    before = second.stat()
    second.write_text("SECOND\n")
    os.utime(second, ns=(before.st_atime_ns, before.st_mtime_ns))
    again = run_builder("build", str(context), root=store)
    assert "COPY second.txt /second.txt  (not cached: source second.txt changed)" in again.stderr
    shown = run_builder(
        "build", "-q", "--output", f"type=local,dest={tmp_path / 'out'}", str(context), root=store
    )
    assert shown.returncode == 0 and (tmp_path / "out" / "both").read_text() == "first\nSECOND\n"


def test_a_changed_build_arg_misses_only_where_it_is_used(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path / "c")
    run_builder("build", str(context), root=store)
    again = run_builder("build", "--build-arg", "LATE=2", str(context), root=store)
    assert "RUN /bin/sh -c echo early > /early  CACHED" in again.stderr
    assert "COPY first.txt /first.txt  CACHED" in again.stderr
    assert 'RUN /bin/sh -c echo "$LATE" > /late  (not cached: ENV/ARG LATE changed)' in again.stderr
    assert "(3 steps run)" in again.stderr


def test_no_cache_filter_rebuilds_only_that_stage(tmp_path: Path, store: Path) -> None:
    context = tmp_path / "m"
    context.mkdir()
    (context / "Dockerfile").write_text(
        "FROM busybox:latest AS deps\nRUN echo deps > /deps\n"
        "FROM busybox:latest AS app\nCOPY --from=deps /deps /deps\nRUN echo app > /app\n"
    )
    run_builder("build", str(context), root=store)
    again = run_builder("build", "--no-cache-filter", "app", str(context), root=store)
    assert "RUN /bin/sh -c echo deps > /deps  CACHED" in again.stderr
    assert "(2 steps run)" in again.stderr


@pytest.mark.parametrize("mode", ["min", "max"])
def test_exported_cache_makes_a_fresh_store_run_nothing(
    tmp_path: Path, store: Path, busybox_layout: Path, mode: str
) -> None:
    context = tmp_path / "m"
    context.mkdir()
    (context / "Dockerfile").write_text(
        "FROM busybox:latest AS deps\nRUN echo deps > /deps\n"
        "FROM busybox:latest\nCOPY --from=deps /deps /deps\nRUN echo app > /app\n"
    )
    cache = tmp_path / "cache"
    first = run_builder(
        "build", "--cache-to", f"type=local,dest={cache},mode={mode}", str(context), root=store
    )
    fresh = tmp_path / "fresh-store"
    run_builder("load", f"oci:{busybox_layout}", "-t", "busybox:latest", root=fresh)
    again = run_builder("build", "--cache-from", f"type=local,src={cache}", str(context), root=fresh)
    assert again.stdout == first.stdout
    # mode=min keeps only the final image's steps; the deps stage must run again to feed COPY --from
    assert f"({0 if mode == 'max' else 1} steps run)" in again.stderr


TWO_STAGES = (
    "FROM busybox:latest AS deps\nRUN echo deps > /deps\n"
    "FROM busybox:latest\nCOPY --from=deps /deps /deps\nRUN echo app > /app\n"
)


def _records(store: Path) -> list[dict]:
    return [json.loads(path.read_bytes()) for path in (store / "cache").glob("*.json")]


def _record_media_types(store: Path) -> list[str]:
    return sorted(record["layer"]["blob"]["mediaType"] for record in _records(store) if record.get("layer"))


def test_a_stage_no_image_holds_is_stored_uncompressed_and_compressed_once_shipped(
    tmp_path: Path, store: Path, busybox_layout: Path
) -> None:
    """As BuildKit compresses nothing before an export: the deps stage's layer is a plain tar
    until a build ships it, and then the image is the one a store that built it first makes."""
    context = tmp_path / "m"
    context.mkdir()
    (context / "Dockerfile").write_text(TWO_STAGES)
    epoch = ("--source-date-epoch", "1700000000")
    run_builder("build", *epoch, str(context), root=store)
    assert _record_media_types(store) == [
        "application/vnd.oci.image.layer.v1.tar",  # deps: RUN
        "application/vnd.oci.image.layer.v1.tar+gzip",  # the final stage: COPY, RUN
        "application/vnd.oci.image.layer.v1.tar+gzip",
    ]
    shipped = run_builder("build", *epoch, "--target", "deps", str(context), root=store)
    assert "(0 steps run)" in shipped.stderr
    fresh = tmp_path / "fresh-store"
    run_builder("load", f"oci:{busybox_layout}", "-t", "busybox:latest", root=fresh)
    direct = run_builder("build", *epoch, "--target", "deps", str(context), root=fresh)
    assert "(1 steps run)" in direct.stderr
    assert shipped.stdout == direct.stdout
    assert _record_media_types(fresh) == ["application/vnd.oci.image.layer.v1.tar+gzip"]


def test_a_cache_export_compresses_what_a_build_stored_uncompressed(
    tmp_path: Path, store: Path, busybox_layout: Path
) -> None:
    context = tmp_path / "m"
    context.mkdir()
    (context / "Dockerfile").write_text(TWO_STAGES)
    run_builder("build", str(context), root=store)  # deps stored as a plain tar
    assert "application/vnd.oci.image.layer.v1.tar" in _record_media_types(store)
    cache = tmp_path / "cache"
    first = run_builder("build", "--cache-to", f"type=local,dest={cache},mode=max", str(context), root=store)
    assert "(0 steps run)" in first.stderr
    index = json.loads((cache / "index.json").read_bytes())
    manifest = json.loads((cache / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    diff_ids = {record["layer"]["diff_id"] for record in _records(store) if record.get("layer")}
    assert {layer["annotations"]["dev.builder.cache.diff_id"] for layer in manifest["layers"]} == diff_ids
    assert {layer["mediaType"] for layer in manifest["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    }
    fresh = tmp_path / "fresh-store"
    run_builder("load", f"oci:{busybox_layout}", "-t", "busybox:latest", root=fresh)
    again = run_builder("build", "--cache-from", f"type=local,src={cache}", str(context), root=fresh)
    assert again.stdout == first.stdout
    assert "(0 steps run)" in again.stderr


def test_a_missing_cache_source_is_a_warning(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path / "c")
    result = run_builder(
        "build", "--cache-from", f"type=local,src={tmp_path / 'none'}", str(context), root=store
    )
    assert "warning: the cache from" in result.stderr


def test_four_concurrent_builds_share_one_store(tmp_path: Path, store: Path) -> None:
    contexts = []
    for number in range(4):
        context = _context(tmp_path / f"c{number}")
        (context / "second.txt").write_text(f"variant {number % 2}\n")
        contexts.append(context)
    env = {**os.environ, "BUILDER_ROOT": str(store), "SOURCE_DATE_EPOCH": "1000"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "builder", "build", "-q", str(c)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for c in contexts
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err.decode() for _, err in outputs]
    digests = [out.decode().strip() for out, _ in outputs]
    assert digests[0] == digests[2] and digests[1] == digests[3] and digests[0] != digests[1]
    for context, digest in zip(contexts, digests, strict=True):
        again = run_builder("build", str(context), root=store, env={"SOURCE_DATE_EPOCH": "1000"})
        assert again.stdout.strip() == digest
        assert "(0 steps run)" in again.stderr


def test_prune_keeps_tagged_images_and_drops_the_rest(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path / "c")
    digest = run_builder("build", "-t", "kept:1", str(context), root=store).stdout
    (context / "second.txt").write_text("other\n")
    run_builder("build", str(context), root=store)  # an untagged image: only its cache holds it
    before = run_builder("du", root=store).stdout
    result = run_builder("prune", root=store).stdout
    assert "removed 7 cache records" in result
    after = run_builder("du", root=store).stdout
    assert "cache records\t0" in after and before != after
    again = run_builder(
        "build", "-t", "kept:1", "-o", f"type=oci,dest={tmp_path / 'out'}", str(context), root=store
    )
    assert "(5 steps run)" in again.stderr
    assert run_builder("inspect", "kept:1", root=store).returncode == 0
    rebuilt = run_builder("build", "-t", "kept:1", str(context), root=store)
    assert "(0 steps run)" in rebuilt.stderr
    assert digest  # the first image's blobs survive the prune: inspect above reads them


def test_prune_until_keeps_recently_used_records(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path / "c")
    run_builder("build", str(context), root=store)
    result = run_builder("prune", "--filter", "until=1h", root=store).stdout
    assert "removed 0 cache records" in result
    again = run_builder("build", str(context), root=store)
    assert "(0 steps run)" in again.stderr


def test_prune_keep_storage_drops_least_recently_used_first(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path / "c")
    run_builder("build", str(context), root=store)
    result = run_builder("prune", "--keep-storage", "0", root=store).stdout
    assert "removed 5 cache records" in result
    assert "blobs\t3\t" in run_builder("du", root=store).stdout, (
        "only busybox's manifest, config and layer remain"
    )


def test_cache_through_a_registry_makes_a_fresh_store_run_nothing(
    tmp_path: Path, store: Path, busybox_layout: Path, registry: Registry
) -> None:
    context = _context(tmp_path / "c")
    ref = f"{registry.host}/app/cache:main"
    first = run_builder("build", "--cache-to", f"type=registry,ref={ref},mode=max", str(context), root=store)
    assert "exported 5 cache keys" in first.stderr
    again = run_builder("build", "--cache-to", f"type=registry,ref={ref}", str(context), root=store)
    assert "exported" in again.stderr
    fresh = tmp_path / "fresh-store"
    run_builder("load", f"oci:{busybox_layout}", "-t", "busybox:latest", root=fresh)
    rebuilt = run_builder("build", "--cache-from", f"type=registry,ref={ref}", str(context), root=fresh)
    assert rebuilt.stdout == first.stdout
    assert "(0 steps run)" in rebuilt.stderr


def test_a_failed_cache_export_warns_unless_asked_to_fail(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path / "c")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    ok = run_builder("build", "--cache-to", f"type=local,dest={blocked}", str(context), root=store)
    assert "warning: the cache export to" in ok.stderr
    failed = run_builder(
        "build",
        "--cache-to",
        f"type=local,dest={blocked},ignore-error=false",
        str(context),
        root=store,
        check=False,
    )
    assert failed.returncode == 1 and "cannot export the cache" in failed.stderr
