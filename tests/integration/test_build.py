"""End-to-end builds with real overlayfs, namespaces, and real consumers of the output."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import layer_members, read_config, read_manifest, run_builder

pytestmark = pytest.mark.integration

FIVE_STEPS = """\
FROM busybox:latest
RUN echo hello > /hello.txt
COPY app.conf /etc/app.conf
ENV MODE=production
RUN rm /etc/group
RUN true
WORKDIR /srv/data
CMD ["cat", "/hello.txt"]
"""


def _context(tmp_path: Path, dockerfile: str, files: dict[str, str] | None = None) -> Path:
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(dockerfile)
    for name, text in (files or {}).items():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text(text)
    return context


def test_five_steps_give_one_layer_per_changing_step(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path, FIVE_STEPS, {"app.conf": "key=value\n"})
    out = tmp_path / "oci"
    run_builder("build", "-t", "demo:1", "--output", f"type=oci,dest={out}", str(context), root=store)

    layers = layer_members(out, "1")
    assert len(layers) == 5, "busybox plus RUN echo, COPY, RUN rm and WORKDIR; ENV, RUN true, CMD add none"
    assert layers[1] == ["hello.txt"]
    assert layers[2] == ["etc/", "etc/app.conf"]
    assert layers[3] == ["etc/", "etc/.wh.group"]
    assert layers[4] == ["srv/", "srv/data/"]

    config = read_config(out, "1")
    assert config["config"]["Cmd"] == ["cat", "/hello.txt"]
    assert config["config"]["WorkingDir"] == "/srv/data"
    assert "MODE=production" in config["config"]["Env"]
    history = [(h["created_by"], h.get("empty_layer", False)) for h in config["history"][1:]]
    assert history == [
        ("RUN /bin/sh -c echo hello > /hello.txt", False),
        ("COPY app.conf /etc/app.conf", False),
        ("ENV MODE=production", True),
        ("RUN /bin/sh -c rm /etc/group", False),
        ("RUN /bin/sh -c true", True),
        ("WORKDIR /srv/data", False),
        ('CMD ["cat", "/hello.txt"]', True),
    ]
    assert len(config["rootfs"]["diff_ids"]) == len(read_manifest(out, "1")["layers"])


def test_output_is_accepted_by_skopeo_and_umoci(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path, FIVE_STEPS, {"app.conf": "key=value\n"})
    out = tmp_path / "oci"
    run_builder("build", "-t", "demo:1", "--output", f"type=oci,dest={out}", str(context), root=store)

    inspected = json.loads(
        subprocess.run(["skopeo", "inspect", f"oci:{out}:1"], capture_output=True, check=True).stdout
    )
    assert len(inspected["Layers"]) == 5
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{out}:1", str(bundle)], capture_output=True, check=True)
    rootfs = bundle / "rootfs"
    assert (rootfs / "hello.txt").read_text() == "hello\n"
    assert (rootfs / "etc" / "app.conf").read_text() == "key=value\n"
    assert not (rootfs / "etc" / "group").exists(), "the whiteout must delete /etc/group"
    assert (rootfs / "srv" / "data").is_dir()
    assert (rootfs / "bin" / "busybox").is_file()


def test_oci_archive_output_is_accepted_by_skopeo(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path, "FROM busybox:latest\nRUN echo x > /x\n")
    archive = tmp_path / "image.tar"
    run_builder("build", "-t", "demo:2", "--output", f"type=oci,dest={archive}", str(context), root=store)
    inspected = json.loads(
        subprocess.run(
            ["skopeo", "inspect", f"oci-archive:{archive}"], capture_output=True, check=True
        ).stdout
    )
    assert len(inspected["Layers"]) == 2
    with tarfile.open(archive) as tar:
        assert {"index.json", "oci-layout"} <= set(tar.getnames())


def test_built_image_is_a_base_for_the_next_build(tmp_path: Path, store: Path) -> None:
    first = _context(tmp_path, "FROM busybox:latest\nRUN echo one > /one\n")
    run_builder("build", "-t", "base:1", str(first), root=store)
    second = tmp_path / "second"
    second.mkdir()
    (second / "Dockerfile").write_text("FROM base:1\nRUN cat /one > /two\n")
    out = tmp_path / "oci"
    run_builder("build", "-t", "app:1", "-o", f"type=oci,dest={out}", str(second), root=store)
    assert layer_members(out, "1")[-1] == ["two"]


def test_a_store_root_given_relative_to_the_working_dir_builds(tmp_path: Path, store: Path) -> None:
    """Overlay mount options and mount points need absolute paths: ``--root store`` works."""
    context = _context(tmp_path, "FROM busybox:latest\nRUN echo hi > /hi\n")
    argv = [sys.executable, "-m", "builder", "build", "--root", store.name, "-t", "rel:1", str(context)]
    proc = subprocess.run(argv, cwd=store.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert run_builder("images", root=store).stdout.split().count("rel") == 1


def test_unchanged_rebuild_runs_nothing_and_keeps_the_digest(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path, FIVE_STEPS, {"app.conf": "key=value\n"})
    first = run_builder("build", "-t", "demo:1", str(context), root=store)
    again = run_builder("build", "-t", "demo:1", str(context), root=store)
    assert again.stdout == first.stdout
    assert "(0 steps run)" in again.stderr


def test_changed_copy_source_rebuilds_from_that_step(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path, FIVE_STEPS, {"app.conf": "key=value\n"})
    first = run_builder("build", str(context), root=store)
    (context / "app.conf").write_text("key=other\n")
    again = run_builder("build", str(context), root=store)
    assert again.stdout != first.stdout
    assert "RUN /bin/sh -c echo hello > /hello.txt  CACHED" in again.stderr
    assert "(4 steps run)" in again.stderr, "COPY, RUN rm, RUN true and WORKDIR run again"


def test_zstd_layers_have_the_zstd_media_type(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path, "FROM busybox:latest\nRUN echo z > /z\n")
    out = tmp_path / "oci"
    run_builder(
        "build", "-t", "z:1", "--compression", "zstd", "-o", f"type=oci,dest={out}", str(context), root=store
    )
    layers = read_manifest(out, "1")["layers"]
    assert layers[-1]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert layer_members(out, "1")[-1] == ["z"]


def test_scratch_image_with_copied_tree(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path, "FROM scratch\nCOPY tree/ /\n", {"tree/a/b.txt": "b\n", "tree/c.txt": "c\n"})
    out = tmp_path / "oci"
    run_builder("build", "-t", "s:1", "-o", f"type=oci,dest={out}", str(context), root=store)
    assert layer_members(out, "1") == [["a/", "a/b.txt", "c.txt"]]


def test_run_sees_env_workdir_and_user(tmp_path: Path, store: Path) -> None:
    dockerfile = """\
FROM busybox:latest
ENV GREETING=hi
WORKDIR /work
USER app
RUN echo "$GREETING $(pwd) $(id -u):$(id -g) $(id -G) $PATH" > /tmp/out
"""
    context = _context(tmp_path, dockerfile)
    out = tmp_path / "oci"
    run_builder("build", "-t", "e:1", "-o", f"type=oci,dest={out}", str(context), root=store)
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{out}:1", str(bundle)], capture_output=True, check=True)
    assert (bundle / "rootfs/tmp/out").read_text() == (
        "hi /work 1000:1000 1000 10 /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    )


def test_source_date_epoch_gives_identical_digests(tmp_path: Path, store: Path, busybox_layout: Path) -> None:
    context = _context(tmp_path, FIVE_STEPS, {"app.conf": "key=value\n"})
    first = run_builder(
        "build", "--no-cache", str(context), root=store, env={"SOURCE_DATE_EPOCH": "1700000000"}
    )
    other_store = tmp_path / "store2"
    run_builder("load", f"oci:{busybox_layout}", "-t", "busybox:latest", root=other_store)
    (context / "app.conf").touch()  # another mtime must not matter
    second = run_builder("build", str(context), root=other_store, env={"SOURCE_DATE_EPOCH": "1700000000"})
    assert first.stdout == second.stdout
    assert "(5 steps run)" in second.stderr


@pytest.mark.parametrize(
    ("dockerfile", "files", "message"),
    [
        ("FROM busybox:latest\nFROBNICATE x\n", {}, "Dockerfile:2: unknown instruction FROBNICATE"),
        (
            "FROM busybox:latest\nRUN exit 3\n",
            {},
            "Dockerfile:2: RUN '/bin/sh -c exit 3' exited with status 3.",
        ),
        (
            "FROM busybox:latest\nCOPY missing.txt /\n",
            {},
            "Dockerfile:2: COPY source 'missing.txt' is not in the build",
        ),
        ("FROM nosuch:1\n", {}, "the image nosuch:1 is not in the store"),
        ("FROM busybox:latest\nUSER ghost\nRUN true\n", {}, "Dockerfile:3: unable to find user 'ghost'"),
    ],
)
def test_errors_name_the_line_and_leave_nothing_behind(
    tmp_path: Path, store: Path, dockerfile: str, files: dict[str, str], message: str
) -> None:
    context = _context(tmp_path, dockerfile, files)
    result = run_builder("build", "-t", "bad:1", str(context), root=store, check=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") <= 3, result.stderr
    tags = run_builder("images", root=store).stdout
    assert "bad" not in tags


def test_missing_dockerfile_is_a_clear_error(tmp_path: Path, store: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_builder("build", str(tmp_path / "empty"), root=store, check=False)
    assert result.returncode == 1
    assert "Dockerfile: cannot read the Dockerfile: No such file or directory" in result.stderr


def test_config_file_sets_defaults_that_flags_override(tmp_path: Path, store: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("compression: zstd\nnetwork: none\n")
    context = _context(tmp_path, "FROM busybox:latest\nRUN ip -o link | cut -d: -f2 > /links\n")
    out = tmp_path / "oci"
    env = {"BUILDER_CONFIG": str(config)}
    run_builder("build", "-t", "c:1", "-o", f"type=oci,dest={out}", str(context), root=store, env=env)
    assert read_manifest(out, "1")["layers"][-1]["mediaType"].endswith("+zstd")
    bundle = tmp_path / "bundle"
    run_builder(
        "build",
        "-t",
        "c:2",
        "--compression",
        "gzip",
        "-o",
        f"type=oci,dest={out}",
        str(context),
        root=store,
        env=env,
    )
    assert read_manifest(out, "2")["layers"][-1]["mediaType"].endswith("+gzip")
    subprocess.run(["umoci", "unpack", "--image", f"{out}:2", str(bundle)], capture_output=True, check=True)
    assert (bundle / "rootfs/links").read_text().split() == ["lo"], "network: none leaves only loopback"
    bad = tmp_path / "bad.yaml"
    bad.write_text("compresion: zstd\n")
    result = run_builder("build", str(context), root=store, env={"BUILDER_CONFIG": str(bad)}, check=False)
    assert result.returncode == 1 and f"{bad}: unknown setting 'compresion'" in result.stderr


def test_a_cache_filled_with_gzip_serves_zstd_layers_to_a_zstd_build(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path, "FROM busybox:latest\nRUN echo z > /z\n")
    run_builder("build", "-t", "g:1", str(context), root=store)
    again = run_builder("build", "-t", "z:1", "--compression", "zstd", str(context), root=store)
    assert "(0 steps run)" in again.stderr
    manifest = json.loads(run_builder("inspect", "z:1", root=store).stdout)["manifest"]
    assert manifest["layers"][-1]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    gzip = json.loads(run_builder("inspect", "g:1", root=store).stdout)["manifest"]
    assert gzip["layers"][-1]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
