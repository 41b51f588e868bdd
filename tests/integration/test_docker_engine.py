"""A Docker engine as a consumer of builder's images and as the reference builder.

Consumer: ``docker load`` takes builder's docker-archive output (type=docker) and ``docker run``
honours its config. Only gzip layers are checked: dockerd 20.10 cannot read zstd layers.

Reference: the same busybox base is loaded into a private dockerd (tests/dockerd.py) under the
same name; each Dockerfile below is built by BuildKit (``DOCKER_BUILDKIT=1 docker build``, the
engine's bundled BuildKit, about v0.8) and by builder, both exported as docker archives
(``docker save``; builder's type=docker), and compared: the image config, the history (which
entries make a layer) and every layer's entries (type, mode, owner, size, content digest, link
target, whiteouts). A difference fails the test.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_builder
from tests.dockerd import Dockerd, dockerd_fixture  # noqa: F401 (the fixture, for pytest to find)

pytestmark = pytest.mark.integration

# The diff_id of an empty tar (two zero blocks). BuildKit commits a layer for every filesystem
# step, even one that changed nothing (a WORKDIR that exists); builder writes no layer and marks
# the history entry empty_layer, by design (README, "How it differs from BuildKit").
EMPTY_TAR_DIFF_ID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "Labels",
               "Healthcheck", "StopSignal", "Shell", "OnBuild", "Volumes")  # fmt: skip
# BuildKit v0.8's runc executor creates mount points in the root file system of a RUN step: /dev,
# /proc and /sys when the image lacks them (they stay in the layer as empty directories) and
# /etc/hosts and /etc/resolv.conf (removed afterwards, but /etc's mtime has changed, so /etc is in
# the layer with nothing below it). builder keeps its mount stubs and their parents out of layers
# (DESIGN.md, "The sandbox for RUN"), as current BuildKit does. Such a directory entry with
# nothing below it in the same layer is dropped from BuildKit's side only.
BUILDKIT_RUN_MOUNT_POINTS = frozenset({"dev", "proc", "sys", "etc"})


# -- reading docker archives ---------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    config: dict[str, Any]
    diff_ids: list[str]
    layers: list[list[tarfile.TarInfo]]  # entries of each layer, in tar order
    digests: list[dict[str, str]]  # sha256 of each layer's regular files, by name


def read_docker_archive(path: Path) -> Image:
    """The single image of a docker archive as ``docker save`` or builder write it."""
    with tarfile.open(path) as archive:
        (entry,) = json.load(_member(archive, "manifest.json"))
        config = json.load(_member(archive, entry["Config"]))
        layers, digests = [], []
        for name in entry["Layers"]:
            data = _member(archive, name).read()
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as layer:
                members = layer.getmembers()
                digests.append(
                    {m.name: hashlib.sha256(_member(layer, m.name).read()).hexdigest()
                     for m in members if m.isreg()}
                )  # fmt: skip
            layers.append(members)
    return Image(config, config["rootfs"]["diff_ids"], layers, digests)


def _member(archive: tarfile.TarFile, name: str) -> io.BufferedReader:
    stream = archive.extractfile(name)
    assert stream is not None, f"{name} is not a file in the archive"
    return stream  # type: ignore[return-value]


# -- the engine and the two builds ---------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_busybox(dockerd: Dockerd, busybox_layout: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """busybox:latest in dockerd, loaded from ``builder save`` of the same base builder uses."""
    work = tmp_path_factory.mktemp("docker-busybox")
    archive = work / "busybox.tar"
    run_builder("load", f"oci:{busybox_layout}", "-t", "busybox:latest", root=work / "store")
    run_builder("save", "busybox:latest", "-o", str(archive), root=work / "store")
    assert "Loaded image: busybox:latest" in dockerd.docker("load", "-i", str(archive)).stdout
    return dockerd.docker("image", "inspect", "--format", "{{.Id}}", "busybox:latest").stdout.strip()


def _context(path: Path, files: Mapping[str, str | bytes]) -> Path:
    path.mkdir(parents=True)
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        (path / name).chmod(0o755 if name.endswith(".sh") else 0o644)
    return path


def _buildkit(dockerd: Dockerd, context: Path, tag: str, args: list[str], out: Path) -> Image:
    dockerd.docker("build", "--network", "none", "--progress", "plain", "-t", tag, *args, str(context))
    dockerd.docker("save", "-o", str(out), tag)
    return read_docker_archive(out)


def _builder(store: Path, context: Path, tag: str, args: list[str], out: Path) -> Image:
    run_builder("build", "--network", "none", "-t", tag, *args, "-o", f"type=docker,dest={out}",
                str(context), root=store)  # fmt: skip
    return read_docker_archive(out)


# -- normalising what may differ ------------------------------------------------------------------


def config_of(image: Image) -> dict[str, Any]:
    """The runtime config's compared keys; null, empty and absent are one (ArgsEscaped, which
    BuildKit sets for Windows' sake, is not compared)."""
    config = image.config.get("config") or {}
    return {key: config.get(key) or None for key in CONFIG_KEYS} | {
        "os": image.config["os"],
        "architecture": image.config["architecture"],
    }


def history_of(image: Image, base_entries: int) -> list[tuple[str, bool]]:
    """(instruction, empty_layer) per step. The texts differ on purpose (BuildKit writes "RUN |1
    A=x ...", "COPY ... # buildkit", Go struct dumps for EXPOSE and HEALTHCHECK; builder the
    instruction as written), so only the instruction word is compared. BuildKit's empty layers
    count as no layer (see EMPTY_TAR_DIFF_ID)."""
    layer_ids = iter(image.diff_ids)
    steps = []
    for index, entry in enumerate(image.config["history"]):
        empty = bool(entry.get("empty_layer"))
        if not empty and next(layer_ids) == EMPTY_TAR_DIFF_ID:
            empty = True
        if index >= base_entries:
            steps.append((entry.get("created_by", "").split(" ", 1)[0], empty))
    return steps


Listing = dict[str, tuple[str, int | None, int, int, int, str, str]]


def layers_of(image: Image, *, buildkit: bool) -> list[Listing]:
    """Each non-empty layer as name -> (type, permission bits, uid, gid, size, link, content).

    Ignored on purpose: mtimes, user and group names, the type bits Go's tar puts into the mode
    field, and a whiteout's mode and link name (it is a marker; BuildKit writes 0600, builder 0)."""
    listings = []
    for diff_id, entries, digests in zip(image.diff_ids, image.layers, image.digests, strict=True):
        if diff_id == EMPTY_TAR_DIFF_ID:
            continue
        listing: Listing = {}
        for info in entries:
            name = info.name.rstrip("/")
            if buildkit and _mount_point_stub(info, entries):
                continue
            if name.rpartition("/")[2].startswith(".wh."):
                # BuildKit's whiteouts may even carry a hard link name (the first whiteout's)
                listing[name] = ("whiteout", None, info.uid, info.gid, 0, "", "")
                continue
            kind = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink"}.get(
                info.type, "file" if info.isreg() else f"type {info.type!r}"
            )
            listing[name] = (kind, info.mode & 0o7777, info.uid, info.gid, info.size, info.linkname,
                             digests.get(info.name, ""))  # fmt: skip
        listings.append(listing)
    return listings


def _mount_point_stub(info: tarfile.TarInfo, entries: list[tarfile.TarInfo]) -> bool:
    name = info.name.rstrip("/")
    if not info.isdir() or name not in BUILDKIT_RUN_MOUNT_POINTS:
        return False
    return not any(other.name.startswith(name + "/") for other in entries)


def layer_differences(ours: list[Listing], theirs: list[Listing]) -> list[str]:
    """Readable differences, layer by layer (builder's side first)."""
    found = []
    for number, (mine, reference) in enumerate(zip(ours, theirs, strict=True), start=1):
        for name in sorted(mine.keys() | reference.keys()):
            if mine.get(name) != reference.get(name):
                found.append(
                    f"layer {number} {name}: builder {mine.get(name)} BuildKit {reference.get(name)}"
                )
    return found


# -- the cases ------------------------------------------------------------------------------------


def _tar() -> bytes:
    """A small tar for ADD to unpack: a file, a hard link to it, a symlink, a 0700 directory
    owned by 1000:1000."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, mode, link, data in (
            ("t/", tarfile.DIRTYPE, 0o700, "", b""),
            ("t/file", tarfile.REGTYPE, 0o640, "", b"in the tar\n"),
            ("t/hard", tarfile.LNKTYPE, 0o640, "t/file", b""),
            ("t/soft", tarfile.SYMTYPE, 0o777, "file", b""),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.linkname, info.size = kind, mode, link, len(data)
            info.uid = info.gid = 1000
            info.mtime = 1_000_000_000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass(frozen=True)
class Case:
    files: dict[str, str | bytes]
    args: tuple[str, ...] = ()


CASES = {
    "env_and_arg_scoping": Case(
        {
            "Dockerfile": """\
ARG BASE=busybox:latest
ARG OUTSIDE=outside
FROM ${BASE}
ARG V=default
ARG EMPTY=
ENV A=${V} B=${V:-fallback} C=${EMPTY:-fallback} D=${V:+set} E=${EMPTY:+set} F="${V}-$V" G='${V}' \\
    H=pre\\$V
ENV PATH=/opt/bin:$PATH
ENV LEGACY some value with spaces
ARG OUTSIDE
RUN echo "$A|$B|$C|$D|$E|$F|$G|$H|$V|$OUTSIDE|$PATH|$LEGACY" > /args.txt
ENV V=from-env
ARG V=arg-default
RUN echo "$V" > /shadowed.txt
LABEL version=$V derived="${A}+${EMPTY:-none}"
"""
        },
        ("--build-arg", "V=cli"),
    ),
    "multi_stage_and_workdir": Case(
        {
            "Dockerfile": """\
FROM busybox:latest AS build
WORKDIR /src/out
RUN echo built > artifact && mkdir lib && echo x > lib/x && chmod 600 lib/x && ln -s artifact link \\
    && ln artifact hard
FROM busybox:latest AS other
RUN echo other > /other.txt
FROM busybox:latest
COPY --from=build /src/out/ /app/
COPY --from=1 /other.txt /app/other.txt
WORKDIR /app/a/b/c
WORKDIR rel
ENV SUB=sub
WORKDIR $SUB/${SUB}2
WORKDIR /tmp
RUN pwd > /pwd.txt
"""
        }
    ),
    "copy_chown_chmod_dockerignore": Case(
        {
            "Dockerfile": """\
FROM busybox:latest
COPY . /ctx/
COPY --chown=app:wheel dir /owned/
COPY --chown=1000 --chmod=0755 a.txt /x/y/
COPY --chmod=600 run.sh a.txt /multi/
COPY --chmod=640 dir /modes/
ADD a.txt /added.txt
ADD tree.tar /unpacked/
""",
            ".dockerignore": "*.log\n!keep.log\nsecret/\n**/*.tmp\n",
            "a.txt": "a\n",
            "run.sh": "#!/bin/sh\necho run\n",
            "keep.log": "kept\n",
            "drop.log": "dropped\n",
            "secret/key": "hidden\n",
            "dir/sub/b.txt": "b\n",
            "dir/c.tmp": "temporary\n",
            "tree.tar": _tar(),
        }
    ),
    "whiteouts_and_opaque_dirs": Case(
        {
            "Dockerfile": """\
FROM busybox:latest
RUN rm /etc/group && rm -r /home && mkdir -p /var/new/keep && echo n > /var/new/f
RUN rm -r /var/new && mkdir /var/new && echo m > /var/new/g
RUN echo changed > /etc/passwd && mv /root /root2 && rm /bin/vi
"""
        }
    ),
    "metadata_instructions": Case(
        {
            "Dockerfile": """\
FROM busybox:latest
SHELL ["/bin/sh", "-ec"]
RUN echo "shell $0" > /shell.txt
USER app:wheel
RUN touch /tmp/mine
EXPOSE 80 443/tcp 53/udp 7000-7001/udp
LABEL a=1 "b c"="d e"
VOLUME /data ["/logs"]
HEALTHCHECK --interval=30s --timeout=3s --start-period=1s --retries=2 CMD ["/bin/true"]
STOPSIGNAL SIGUSR1
CMD ["kept", "because", "set", "before"]
ENTRYPOINT ["/bin/echo", "hi"]
"""
        }
    ),
    "onbuild": Case(
        {
            "Dockerfile": """\
FROM busybox:latest AS parent
ONBUILD RUN echo triggered > /triggered.txt
FROM parent AS child
RUN echo child > /child.txt
FROM busybox:latest
ONBUILD RUN echo onbuild
ONBUILD COPY a /b
COPY --from=child /triggered.txt /child.txt /copied/
"""
        }
    ),
    "entrypoint_shell_form_resets_cmd": Case(
        {"Dockerfile": "FROM busybox:latest\nENTRYPOINT echo $HOME\nHEALTHCHECK NONE\nUSER 1000:1000\n"}
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_builder_matches_buildkit(
    case: Case, dockerd: Dockerd, docker_busybox: str, store: Path, tmp_path: Path
) -> None:
    context = _context(tmp_path / "context", case.files)
    theirs = _buildkit(dockerd, context, "case:buildkit", list(case.args), tmp_path / "buildkit.tar")
    ours = _builder(store, context, "case:builder", list(case.args), tmp_path / "builder.tar")

    base_entries = 1  # the busybox fixture's one history entry
    assert theirs.config["history"][0] == ours.config["history"][0]
    assert config_of(ours) == config_of(theirs)
    assert history_of(ours, base_entries) == history_of(theirs, base_entries)
    assert ours.diff_ids[0] == theirs.diff_ids[0], "both start from the same base layer"
    our_layers, their_layers = layers_of(ours, buildkit=False), layers_of(theirs, buildkit=True)
    assert len(our_layers) == len(their_layers)
    differences = layer_differences(our_layers, their_layers)
    assert differences == [], "\n".join(differences)


# -- docker load and docker run of builder's image ---------------------------------------------------

RUNNABLE = {
    "Dockerfile": """\
FROM busybox:latest
ENV GREETING="hello world" SUFFIX=from
WORKDIR /srv/app
COPY data.txt .
RUN echo "$(cat data.txt)+ran" > data.txt && chown app data.txt
USER app
CMD echo "$GREETING $SUFFIX $(pwd) as $(id -u):$(id -g) $(cat data.txt) $(stat -c %U data.txt)"
""",
    "data.txt": "copied\n",
}


def test_docker_loads_and_runs_a_builder_image(dockerd: Dockerd, store: Path, tmp_path: Path) -> None:
    """The archive is whole (base layer included): this test does not need busybox in dockerd."""
    context = _context(tmp_path / "context", RUNNABLE)
    archive = tmp_path / "image.tar"
    digest = run_builder("build", "-q", "-t", "runnable:1", "-o", f"type=docker,dest={archive}",
                         str(context), root=store).stdout.strip()  # fmt: skip
    manifest = json.loads(run_builder("inspect", digest, root=store).stdout)["manifest"]
    assert {layer["mediaType"] for layer in manifest["layers"]} <= {
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    }, "gzip only: dockerd 20.10 cannot read zstd layers"

    assert "Loaded image: runnable:1" in dockerd.docker("load", "-i", str(archive)).stdout
    inspected = json.loads(dockerd.docker("image", "inspect", "runnable:1").stdout)[0]
    assert inspected["Id"] == manifest["config"]["digest"], "Docker's image id is builder's config digest"
    image = read_docker_archive(archive)
    assert inspected["RootFS"]["Layers"] == image.diff_ids
    assert inspected["Config"]["User"] == "app"

    ran = dockerd.docker("run", "--rm", "--network", "none", "runnable:1")
    assert ran.stdout == "hello world from /srv/app as 1000:1000 copied+ran app\n"
    overridden = dockerd.docker("run", "--rm", "--network", "none", "-e", "GREETING=bye", "runnable:1")
    assert overridden.stdout.startswith("bye from /srv/app ")
