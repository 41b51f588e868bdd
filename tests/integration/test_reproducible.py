"""Reproducible builds: with SOURCE_DATE_EPOCH the same inputs give the same digest, anywhere.

Every example and every layer case is built twice, as two machines would build it: other store
roots, other checkout paths with other file times, umask 022 against 077, the host name of the
runner against another (``unshare --uts``), another time zone, and later on the clock. The
manifest digests must be equal. The repeated-diff test (one upper dir diffed thirty times) is
``test_same_upper_thirty_times_gives_one_digest`` in tests/unit/test_layer.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from builder.store import Store
from builder.verify import image_difference
from tests.conftest import REPO, read_config, read_manifest, run_builder

pytestmark = pytest.mark.integration

EPOCH = 1700000000
EPOCH_TEXT = "2023-11-14T22:13:20Z"
EXAMPLES = REPO / "Dockerfile.examples"
MAKE_ROOTFS = EXAMPLES / "debian" / "make-rootfs"
# The Debian rootfs takes about 30 s to make; it is kept across runs, keyed by its inputs.
ROOTFS_CACHE = Path("/var/cache/builder-tests/debian-rootfs")
COMPRESSION_ANNOTATION = "dev.builder.layer.compression"


@dataclass(frozen=True)
class Place:
    """One machine's view of a build: a store, a checkout, and the process the builder runs in."""

    name: str
    store: Path
    checkout: Path
    file_time: float  # the mtime the checkout's files get (after the epoch: clamped)
    wrapper: tuple[str, ...]  # argv prefix: umask, host name
    epoch: tuple[str, ...]  # build flags that set the epoch, or none when the environment does
    env: dict[str, str] = field(default_factory=dict)


def _places(base: Path) -> tuple[Place, Place]:
    first = Place(
        "first",
        base / "a" / "store",
        base / "a" / "src",
        EPOCH + 1000,
        ("sh", "-c", 'umask 022 && exec "$@"', "sh"),
        (),
        {"TZ": "UTC", "SOURCE_DATE_EPOCH": str(EPOCH)},
    )
    second = Place(
        "second",
        base / "elsewhere" / "deeper" / "store-two",
        base / "b" / "checkout" / "of" / "project",
        time.time() + 30 * 86400,
        ("unshare", "--uts", "sh", "-c", 'hostname reproducible-two && umask 077 && exec "$@"', "sh"),
        ("--source-date-epoch", str(EPOCH)),
        {"TZ": "Pacific/Kiritimati", "SOURCE_DATE_EPOCH": ""},
    )
    return first, second


def _builder(place: Place, *args: str) -> str:
    """Run the CLI the way ``place`` runs it; the last line of its stdout."""
    proc = subprocess.run(
        [*place.wrapper, sys.executable, "-m", "builder", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "BUILDER_ROOT": str(place.store), **place.env},
        cwd=place.checkout.parent,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, f"builder {' '.join(args)} failed in the {place.name} place:\n{proc.stderr}"
    return proc.stdout.strip().splitlines()[-1]


def _checkout(src: Path, place: Place, big_files: tuple[str, ...] = ()) -> Path:
    """Copy a build context into ``place`` (modes kept, times set), linking big files."""
    shutil.copytree(src, place.checkout, symlinks=True, ignore=shutil.ignore_patterns(*big_files))
    for name in big_files:
        _link_or_copy(src / name, place.checkout / name)
    for path in [place.checkout, *place.checkout.rglob("*")]:
        if not path.is_symlink() and path.name not in big_files:
            os.utime(path, (place.file_time, place.file_time))
    return place.checkout


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another file system
        shutil.copy2(src, dest)


def _assert_clean(store: Path) -> None:
    assert str(store) not in Path("/proc/mounts").read_text(), "a build left a mount behind"
    leftovers = [p.name for p in (store / "tmp").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == [], f"a build left temp files behind: {leftovers}"


def _build_in_both_places(
    tmp_path: Path,
    busybox_layout: Path,
    context: Path,
    args: tuple[str, ...] = (),
    big_files: tuple[str, ...] = (),
) -> list[tuple[str, Path]]:
    """Build ``context`` in the two places, one after the other: (manifest digest, OCI layout)."""
    built = []
    for place in _places(tmp_path):
        checkout = _checkout(context, place, big_files)
        layout = place.checkout.parent / "image"
        _builder(place, "load", f"oci:{busybox_layout}", "-t", "busybox:latest")
        started = time.time()
        flags = (*place.epoch, *args, "-t", "image:1", "-o", f"type=oci,dest={layout}")
        built.append((_builder(place, "build", *flags, str(checkout)), layout))
        _assert_clean(place.store)
        time.sleep(max(0.0, 1.0 - (time.time() - started)))  # the second build starts a second later
    return built


# -- the examples -------------------------------------------------------------------------------

EXAMPLE_NAMES = sorted(path.parent.name for path in EXAMPLES.glob("*/Dockerfile"))


@pytest.fixture(scope="session")
def debian_rootfs() -> Iterator[Path]:
    """rootfs.tar from make-rootfs, made once per mirror state and kept in ROOTFS_CACHE."""
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (bash .ci/setup installs it).")
    inputs = subprocess.run(
        [str(MAKE_ROOTFS), "--inputs"], capture_output=True, text=True, timeout=60, check=False
    )
    if inputs.returncode != 0:
        pytest.skip(f"the Debian mirror is unreachable, so no rootfs can be made: {inputs.stderr.strip()}")
    key = hashlib.sha256(MAKE_ROOTFS.read_bytes() + inputs.stdout.encode()).hexdigest()[:16]
    ROOTFS_CACHE.mkdir(parents=True, exist_ok=True)
    with open(ROOTFS_CACHE / ".lock", "w") as lock:  # one maker at a time, across test runs
        fcntl.flock(lock, fcntl.LOCK_EX)
        rootfs = ROOTFS_CACHE / key / "rootfs.tar"
        if not rootfs.exists():
            for stale in ROOTFS_CACHE.iterdir():
                if stale.is_dir():
                    shutil.rmtree(stale)  # another mirror state or script: never used again
            rootfs.parent.mkdir()
            made = subprocess.run(
                [str(MAKE_ROOTFS), str(rootfs)], capture_output=True, text=True, timeout=900, check=False
            )
            if made.returncode != 0:
                pytest.fail(f"make-rootfs failed:\n{made.stderr}")
    yield rootfs


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
def test_example_builds_identically_anywhere(
    tmp_path: Path, busybox_layout: Path, example: str, request: pytest.FixtureRequest
) -> None:
    context = tmp_path / "example" / example
    shutil.copytree(EXAMPLES / example, context, ignore=shutil.ignore_patterns("rootfs.tar*"))
    big_files: tuple[str, ...] = ()
    if example == "debian":  # its rootfs.tar is made by make-rootfs, not checked in
        _link_or_copy(request.getfixturevalue("debian_rootfs"), context / "rootfs.tar")
        big_files = ("rootfs.tar",)
    (first, layout), (second, _) = _build_in_both_places(
        tmp_path, busybox_layout, context, big_files=big_files
    )
    assert first == second
    assert read_config(layout, "1")["created"] == EPOCH_TEXT
    if example == "debian":
        layers = read_manifest(layout, "1")["layers"]
        assert len(layers) == 2, "ADD rootfs.tar and the minimizing RUN"
        names = _layer_names(layout, layers[0])
        assert {"usr/bin/bash", "etc/debian_version", "var/lib/dpkg/status"} <= names
        assert "dev/null" not in names and not any(n.startswith("var/log/dpkg") for n in names)


# -- layer cases --------------------------------------------------------------------------------

LAYER_CASES: dict[str, tuple[str, dict[str, tuple[str, int]], tuple[str, ...]]] = {
    # name: (Dockerfile, context files {path: (text, mode)}, extra build flags)
    "run-makes-every-file-type": (
        """\
FROM busybox:latest
RUN mkdir -p /data/a/b && echo one > /data/a/b/one && ln -s b/one /data/a/link \\
 && ln /data/a/b/one /data/a/hard && mkfifo /data/fifo && seq 1 400000 > /data/big \\
 && chmod 4755 /data/a/b/one && chmod 1777 /data/a && chown 1000:10 /data/a/b \\
 && touch -d @86400 /data/old && touch -d @4000000000 /data/future \\
 && umask > /data/umask && hostname > /data/hostname && mkdir /data/made-under-umask
""",
        {},
        (),
    ),
    "run-deletes-and-replaces": (
        """\
FROM busybox:latest
RUN rm /etc/group && rm -rf /usr/sbin && mkdir /usr/sbin && echo new > /usr/sbin/tool
RUN mv /etc/passwd /etc/passwd.tmp && mv /etc/passwd.tmp /etc/passwd && rm -rf /home
""",
        {},
        (),
    ),
    "copy-with-modes-owners-and-heredoc": (
        """\
FROM busybox:latest
COPY tree/ /srv/tree/
COPY --chown=1000:10 --chmod=640 tree/private.txt /srv/owned/
COPY <<EOF /etc/app.conf
mode=production
EOF
WORKDIR /srv/work/deep
ADD tree/run.sh /usr/local/bin/
""",
        {
            "tree/run.sh": ("#!/bin/sh\necho run\n", 0o755),
            "tree/private.txt": ("secret\n", 0o600),
            "tree/sub/dir/file.txt": ("nested\n", 0o644),
        },
        (),
    ),
    "multi-stage-copy-from": (
        """\
FROM busybox:latest AS build
RUN mkdir /out && echo built > /out/artifact && ln -s artifact /out/latest
FROM busybox:latest
COPY --from=build /out /opt/app
""",
        {},
        (),
    ),
    "scratch-tree": (
        "FROM scratch\nCOPY tree/ /\n",
        {"tree/bin/tool": ("#!/bin/sh\n", 0o755), "tree/etc/conf": ("x=1\n", 0o644)},
        (),
    ),
    "zstd-layers": (
        "FROM busybox:latest\nRUN seq 1 300000 > /numbers && echo z > /z\n",
        {},
        ("--compression", "zstd"),
    ),
}


def _make_context(base: Path, dockerfile: str, files: dict[str, tuple[str, int]]) -> Path:
    context = base / "case"
    context.mkdir()
    (context / "Dockerfile").write_text(dockerfile)
    for name, (text, mode) in files.items():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text(text)
        (context / name).chmod(mode)
    return context


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_case_builds_identically_anywhere(tmp_path: Path, busybox_layout: Path, case: str) -> None:
    dockerfile, files, args = LAYER_CASES[case]
    context = _make_context(tmp_path, dockerfile, files)
    (first, _), (second, _) = _build_in_both_places(tmp_path, busybox_layout, context, args)
    assert first == second


# -- what SOURCE_DATE_EPOCH means, and what holds without it --------------------------------------


def _layer_tar(layout: Path, desc: dict) -> tarfile.TarFile:
    data = (layout / "blobs" / "sha256" / desc["digest"][7:]).read_bytes()
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")


def _layer_names(layout: Path, desc: dict) -> set[str]:
    with _layer_tar(layout, desc) as tar:
        return set(tar.getnames())


def test_epoch_fixes_times_and_clamps_only_new_layers(
    tmp_path: Path, store: Path, busybox_layout: Path
) -> None:
    context = _make_context(tmp_path, LAYER_CASES["run-makes-every-file-type"][0], {})
    out = tmp_path / "oci"
    run_builder(
        "build",
        "-t",
        "t:1",
        "-o",
        f"type=oci,dest={out}",
        str(context),
        root=store,
        env={"SOURCE_DATE_EPOCH": str(EPOCH)},
    )
    config = read_config(out, "1")
    assert config["created"] == EPOCH_TEXT
    assert [h["created"] for h in config["history"][1:]] == [EPOCH_TEXT]
    base = read_manifest(busybox_layout)["layers"][0]
    layers = read_manifest(out, "1")["layers"]
    assert layers[0] == base, "the base layer is reused as it is, never rewritten"
    with _layer_tar(out, layers[1]) as tar:
        times = {member.name: member.mtime for member in tar.getmembers()}
        umask = tar.extractfile("data/umask")
        hostname = tar.extractfile("data/hostname")
        assert umask is not None and hostname is not None
        assert (umask.read(), hostname.read()) == (b"0022\n", b"builder\n")
    assert times["data/old"] == 86400, "a time before the epoch is kept"
    assert times["data/future"] == EPOCH and times["data/a/b/one"] == EPOCH
    assert max(times.values()) == EPOCH


@pytest.mark.parametrize(
    ("flags", "settings"),
    [
        ((), "gzip;encoder=isa-l;level=1;block=1048576"),
        (("--compression", "zstd", "--compression-level", "5"), "zstd;encoder=zstd-mt;level=5;block=1048576"),
        (("--compression", "uncompressed"), "uncompressed"),
    ],
    ids=["gzip", "zstd", "uncompressed"],
)
def test_without_epoch_times_are_real_and_layers_say_how_to_recompress(
    tmp_path: Path, store: Path, flags: tuple[str, ...], settings: str
) -> None:
    context = _make_context(tmp_path, "FROM busybox:latest\nRUN echo x > /x\n", {})
    started = time.time()
    run_builder("build", *flags, "-t", "t:1", str(context), root=store, env={"SOURCE_DATE_EPOCH": ""})
    image = json.loads(run_builder("inspect", "t:1", root=store).stdout)
    created = datetime.fromisoformat(image["config"]["created"].replace("Z", "+00:00")).timestamp()
    assert started - 2 <= created <= time.time() + 1, "without an epoch the image has the build's time"
    new_layer = image["manifest"]["layers"][1]
    assert new_layer["annotations"] == {COMPRESSION_ANNOTATION: settings}


# -- builder build --verify-reproducible ----------------------------------------------------------


def test_verify_reproducible_builds_twice_then_tags_and_writes(tmp_path: Path, store: Path) -> None:
    out = tmp_path / "oci"
    result = run_builder(
        "build",
        "--verify-reproducible",
        "-t",
        "hello:v",
        "-o",
        f"type=oci,dest={out}",
        str(EXAMPLES / "hello"),
        root=store,
        env={"SOURCE_DATE_EPOCH": str(EPOCH)},
    )
    digest = result.stdout.strip()
    assert f"reproducible: both clean builds gave {digest}" in result.stderr
    assert "[verify 2/2]" in result.stderr
    assert run_builder("images", root=store).stdout.count(digest) == 1
    index = json.loads((out / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [digest]
    _assert_clean(store)


def test_verify_reproducible_names_the_first_difference(tmp_path: Path, store: Path) -> None:
    dockerfile = "FROM busybox:latest\nRUN echo same > /same && head -c 16 /dev/urandom > /random\n"
    context = _make_context(tmp_path, dockerfile, {})
    result = run_builder(
        "build",
        "--verify-reproducible",
        "-t",
        "rnd:1",
        str(context),
        root=store,
        check=False,
        env={"SOURCE_DATE_EPOCH": str(EPOCH)},
    )
    assert result.returncode == 1
    assert "error: the build is not reproducible: two clean builds gave sha256:" in result.stderr
    expected = "layer 2 of 2 (RUN /bin/sh -c echo same > /same && head -c 16 /dev/urandom > /random)"
    assert f"{expected} differs first at /random: its content is sha256:" in result.stderr
    assert "Traceback" not in result.stderr
    assert "rnd" not in run_builder("images", root=store).stdout, "an image that did not verify is not tagged"
    _assert_clean(store)


def test_verify_reproducible_needs_an_epoch(tmp_path: Path, store: Path) -> None:
    result = run_builder(
        "build",
        "--verify-reproducible",
        str(EXAMPLES / "hello"),
        root=store,
        check=False,
        env={"SOURCE_DATE_EPOCH": ""},
    )
    assert result.returncode == 1
    assert "error: --verify-reproducible needs SOURCE_DATE_EPOCH" in result.stderr


DIFFERENCES = """\
FROM busybox:latest
ARG MODE=644
ARG MORE=
RUN echo x > /f && chmod $MODE /f && if [ -n "$MORE" ]; then echo more > /more; fi
ARG NOTE=
LABEL note=$NOTE
"""


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ((), ("MORE=1",), "differs first at /more, which only the second build has."),
        (("MORE=1",), (), "differs first at /more, which only the first build has."),
        ((), ("MODE=600",), "differs first at /f: its mode is 0644 against 0600."),
        (
            (),
            ("NOTE=x",),
            'the layers are the same but the image configs differ at config.Labels.note: "" against "x".',
        ),
    ],
    ids=["only-in-the-second", "only-in-the-first", "mode", "config-field"],
)
def test_image_difference_names_the_first_entry_or_field(
    tmp_path: Path, store: Path, first: tuple[str, ...], second: tuple[str, ...], expected: str
) -> None:
    context = _make_context(tmp_path, DIFFERENCES, {})
    digests = []
    for build_args in (first, second):
        flags = [part for arg in build_args for part in ("--build-arg", arg)]
        result = run_builder("build", "--source-date-epoch", str(EPOCH), *flags, str(context), root=store)
        digests.append(result.stdout.strip())
    found = image_difference(Store(store), digests[0], Store(store), digests[1])
    assert found.endswith(expected), found
    if expected.startswith("differs"):
        assert found.startswith("layer 2 of 2 (RUN "), found
