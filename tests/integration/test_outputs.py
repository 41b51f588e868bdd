"""Outputs and the local image store: OCI layouts and archives, Docker archives, root file systems,
compression per output, save/load, tag/rmi/images/history; each checked by a real consumer."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from builder.export import Output, parse_output
from builder.images import Platform, parse_platform
from tests.conftest import read_config, read_manifest, run_builder

pytestmark = pytest.mark.integration

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKERFILE = "FROM busybox:latest\nRUN echo hello > /hello && rm /etc/group\n"


@pytest.fixture
def context(tmp_path: Path) -> Path:
    path = tmp_path / "context"
    path.mkdir()
    (path / "Dockerfile").write_text(DOCKERFILE)
    return path


def run(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def umoci_unpack(layout: Path, tag: str, bundle: Path) -> Path:
    run("umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle))
    return bundle / "rootfs"


def test_oci_layout_and_archive_pass_umoci_and_skopeo(tmp_path: Path, store: Path, context: Path) -> None:
    layout, archive = tmp_path / "layout", tmp_path / "image.tar"
    run_builder("build", "-t", "demo:1", "-o", f"type=oci,dest={layout}", "-o", f"type=oci,dest={archive}",
                str(context), root=store)  # fmt: skip
    rootfs = umoci_unpack(layout, "1", tmp_path / "bundle")
    assert (rootfs / "hello").read_text() == "hello\n"
    assert not (rootfs / "etc" / "group").exists()
    inspected = json.loads(run("skopeo", "inspect", f"oci-archive:{archive}"))
    assert inspected["Digest"] == json.loads(run("skopeo", "inspect", f"oci:{layout}:1"))["Digest"]
    copied = tmp_path / "copied"
    run("skopeo", "copy", f"oci-archive:{archive}", f"oci:{copied}:again")
    assert (umoci_unpack(copied, "again", tmp_path / "bundle2") / "hello").is_file()


def test_docker_archive_is_read_by_skopeo_and_loads_back(tmp_path: Path, store: Path, context: Path) -> None:
    archive = tmp_path / "docker.tar"
    built = run_builder(
        "build", "-t", "demo:1", "-o", f"type=docker,dest={archive}", str(context), root=store
    )
    with tarfile.open(archive) as tar:
        entries = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert entries[0]["RepoTags"] == ["demo:1"]
    assert len(entries[0]["Layers"]) == 2
    inspected = json.loads(run("skopeo", "inspect", f"docker-archive:{archive}"))
    assert len(inspected["Layers"]) == 2
    copied = tmp_path / "copied"
    run("skopeo", "copy", f"docker-archive:{archive}", f"oci:{copied}:x")
    assert (umoci_unpack(copied, "x", tmp_path / "bundle") / "hello").read_text() == "hello\n"

    fresh = tmp_path / "fresh"
    run_builder("load", f"docker-archive:{archive}", "-t", "demo:1", root=fresh)
    loaded = json.loads(run_builder("inspect", "demo:1", root=fresh).stdout)["manifest"]
    original = json.loads(run_builder("inspect", built.stdout.strip(), root=store).stdout)["manifest"]
    assert loaded["config"] == original["config"]
    digests = [[layer["digest"] for layer in m["layers"]] for m in (loaded, original)]
    assert digests[0] == digests[1]


def _docker_save_tar(path: Path, busybox_layout: Path) -> str:
    """A Docker archive as ``docker save`` writes it: uncompressed <id>/layer.tar, <hex>.json."""
    manifest = read_manifest(busybox_layout)
    config = (busybox_layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes()
    raw = gzip.decompress(
        (busybox_layout / "blobs/sha256" / manifest["layers"][0]["digest"][7:]).read_bytes()
    )
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    files = {
        config_name: config,
        "abc/layer.tar": raw,
        "manifest.json": json.dumps(
            [{"Config": config_name, "RepoTags": ["old/busybox:1"], "Layers": ["abc/layer.tar"]}]
        ).encode(),
    }
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def test_a_docker_save_archive_loads_and_builds(tmp_path: Path, busybox_layout: Path, context: Path) -> None:
    archive = tmp_path / "saved.tar"
    diff_id = _docker_save_tar(archive, busybox_layout)
    fresh = tmp_path / "fresh"
    run_builder("load", f"docker-archive:{archive}:old/busybox:1", "-t", "busybox:latest", root=fresh)
    stored = json.loads(run_builder("inspect", "busybox", root=fresh).stdout)["manifest"]
    assert stored["layers"][0] == {"mediaType": TAR, "digest": diff_id, "size": stored["layers"][0]["size"]}
    out = tmp_path / "out"
    run_builder("build", "-t", "demo:1", "-o", f"type=oci,dest={out}", str(context), root=fresh)
    assert [layer["mediaType"] for layer in read_manifest(out, "1")["layers"]] == [GZIP, GZIP]
    assert (umoci_unpack(out, "1", tmp_path / "bundle") / "hello").is_file()


def test_compression_per_output_converts_once(tmp_path: Path, store: Path, context: Path) -> None:
    outs = {name: tmp_path / name for name in ("gzip", "zstd", "uncompressed")}
    args = [a for name, dest in outs.items() for a in ("-o", f"type=oci,dest={dest},compression={name}")]
    run_builder("build", "-t", "demo:1", *args, str(context), root=store)
    types = {
        name: [layer["mediaType"] for layer in read_manifest(dest, "1")["layers"]]
        for name, dest in outs.items()
    }
    assert types == {"gzip": [GZIP, GZIP], "zstd": [ZSTD, ZSTD], "uncompressed": [TAR, TAR]}
    diff_ids = {name: read_config(dest, "1")["rootfs"]["diff_ids"] for name, dest in outs.items()}
    assert diff_ids["gzip"] == diff_ids["zstd"] == diff_ids["uncompressed"]
    plain = read_manifest(outs["uncompressed"], "1")["layers"]
    assert [layer["digest"] for layer in plain] == diff_ids["gzip"], "an uncompressed blob is its diff_id"
    first = outs["zstd"] / "blobs/sha256" / read_manifest(outs["zstd"], "1")["layers"][0]["digest"][7:]
    assert first.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"

    blobs = sorted(p.name for p in (store / "blobs/sha256").iterdir())
    again = tmp_path / "again"
    run_builder("save", "demo:1", "-o", f"type=oci,dest={again}", "--compression", "zstd", root=store)
    assert sorted(p.name for p in (store / "blobs/sha256").iterdir()) == blobs, "conversions are cached"
    assert read_manifest(again, "1") == read_manifest(outs["zstd"], "1")


def test_local_and_tar_outputs_are_the_root_file_system(tmp_path: Path, store: Path, context: Path) -> None:
    local, rootfs_tar = tmp_path / "rootfs", tmp_path / "rootfs.tar"
    run_builder("build", "-o", f"type=local,dest={local}", "-o", f"type=tar,dest={rootfs_tar}", str(context),
                root=store)  # fmt: skip
    assert (local / "hello").read_text() == "hello\n"
    assert (local / "bin" / "busybox").is_file()
    assert not (local / "etc" / "group").exists(), "the whiteout deleted it"
    with tarfile.open(rootfs_tar) as tar:
        names = tar.getnames()
        assert tar.extractfile("hello").read() == b"hello\n"  # type: ignore[union-attr]
    assert "etc/group" not in names and "etc/passwd" in names
    assert not any(".wh." in name for name in names)

    result = run_builder("build", "-o", f"type=local,dest={local}", str(context), root=store, check=False)
    assert result.returncode == 1
    assert (
        f"cannot write the root file system to {local}: it exists and is not an empty directory."
        in result.stderr
    )


def test_save_and_load_round_trip(tmp_path: Path, store: Path) -> None:
    image = json.loads(run_builder("inspect", "busybox", root=store).stdout)
    docker, oci = tmp_path / "busybox.tar", tmp_path / "busybox-oci.tar"
    run_builder("save", "busybox", "-o", str(docker), "-o", f"type=oci-archive,dest={oci}", root=store)
    fresh = tmp_path / "fresh"
    assert run_builder("load", f"oci-archive:{oci}", root=fresh).stdout.strip() == image["digest"]
    run_builder("load", f"docker-archive:{docker}", "-t", "again:1", root=fresh)
    again = json.loads(run_builder("inspect", "again:1", root=fresh).stdout)
    assert again["manifest"]["config"]["digest"] == image["manifest"]["config"]["digest"]
    assert again["manifest"]["layers"] == image["manifest"]["layers"]
    assert json.loads(run("skopeo", "inspect", f"docker-archive:{docker}"))["Architecture"]


def test_names_tags_and_history(tmp_path: Path, store: Path) -> None:
    digest = json.loads(run_builder("inspect", "busybox:latest", root=store).stdout)["digest"]
    run_builder("tag", "busybox", "app", "registry.example:5000/team/app:v1", root=store)
    images = run_builder("images", root=store).stdout.splitlines()
    assert images[0].split() == ["REPOSITORY", "TAG", "DIGEST", "SIZE"]
    rows = {tuple(line.split()[:3]) for line in images[1:]}
    assert rows == {("busybox", "latest", digest), ("app", "latest", digest),
                    ("registry.example:5000/team/app", "v1", digest)}  # fmt: skip
    for name in ("app", "app:latest", "docker.io/library/app", f"app@{digest}", f"busybox:latest@{digest}"):
        assert json.loads(run_builder("inspect", name, root=store).stdout)["digest"] == digest, name

    removed = run_builder("rmi", "docker.io/library/app:latest", root=store)
    assert removed.stdout.strip() == "untagged docker.io/library/app:latest"
    missing = run_builder("rmi", "app", root=store, check=False)
    assert missing.returncode == 1
    assert "the image app:latest is not in the store" in missing.stderr
    run_builder("rmi", f"registry.example:5000/team/app@{digest}", root=store)
    assert run_builder("images", "-q", root=store).stdout.split() == [digest]

    history = run_builder("history", "busybox", root=store).stdout.splitlines()
    assert history[0].split()[:2] == ["CREATED", "CREATED"]
    assert "fixtures/make_busybox_image.py" in history[1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("type=oci,dest=out", Output("oci", Path("out"))),
        ("type=oci,dest=out.tar", Output("oci-archive", Path("out.tar"))),
        (
            "type=docker-archive,dest=d.tar,compression=zstd",
            Output("docker", Path("d.tar"), compression="zstd"),
        ),
        ("type=registry,name=127.0.0.1:5000/app:1", Output("registry", name="127.0.0.1:5000/app:1")),
        ("type=tar,dest=r.tar,compression-level=2", Output("tar", Path("r.tar"), level=2)),
    ],
)
def test_output_specs_parse(text: str, expected: Output) -> None:
    assert parse_output(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("type=bogus,dest=x", "unknown type 'bogus'"),
        ("type=local", "type=local needs dest=PATH"),
        ("type=oci,dest=x,colour=red", "unknown keys colour"),
        ("type=oci,dest=x,compression=lz4", "unknown compression 'lz4'"),
        ("type=oci,dest=x,compression-level=high", "compression-level 'high' is not a number"),
    ],
)
def test_bad_output_specs_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_output(text)


def test_platforms_parse() -> None:
    assert parse_platform("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert Platform("linux", "arm64", "v8").matches({"os": "linux", "architecture": "arm64"})
    assert not Platform("linux", "arm", "v6").matches({"os": "linux", "architecture": "arm"})
    with pytest.raises(ValueError, match="not a platform"):
        parse_platform("linux")
