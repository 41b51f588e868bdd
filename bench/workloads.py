"""The workloads: generated build contexts and what one repetition of each does.

Each workload makes its context once (deterministically: a seeded generator, no clock), then
for each repetition runs the same scenario on every engine in turn (builder, BuildKit, builder,
...), so that drift in the machine's load hits both alike. What is timed is the build command
only; resetting caches, editing files and the like happen before the clock starts.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from engines import BENCH, BuilderEngine, BuildKitEngine, EngineError, Sample

Engine = BuilderEngine | BuildKitEngine


@dataclass(frozen=True)
class Scale:
    """Sizes and repetitions: the full run, or ``--quick`` for a smoke run of the harness."""

    quick: bool
    reps: int  # for the small, fast workloads
    big_reps: int  # for the slow ones
    big_files: int
    big_file_size: int
    copy_files: int
    stage_sleep: int
    stage_files: int  # of 128 KiB each, per stage

    @classmethod
    def make(cls, quick: bool, reps: int | None) -> Scale:
        if quick:
            return cls(True, reps or 1, reps or 1, 1000, 53688, 5000, 1, 64)
        # 20,000 files of 53,688 bytes: 1,073,760,000 bytes, 1 GiB and 18 KB
        # Nine of a small workload: its tenths of a second move with the VM's speed from minute to minute.
        return cls(False, reps or 9, reps or 3, 20000, 53688, 50000, 2, 256)


class Workload:
    """One scenario; subclasses say how to make the context and what one repetition does."""

    name: ClassVar[str]
    title: ClassVar[str]
    goal: ClassVar[str]
    builder_only: ClassVar[bool] = False
    slow: ClassVar[bool] = False

    def __init__(self, root: Path, scale: Scale, cache: Path) -> None:
        self.dir = root / self.name
        self.scale = scale
        self.cache = cache
        self.extra: dict[str, dict[str, list[Sample]]] = {}  # engine -> label -> samples

    @property
    def reps(self) -> int:
        return self.scale.big_reps if self.slow else self.scale.reps

    def make_context(self) -> None:
        raise NotImplementedError

    def prepare(self, engine: Engine) -> None:
        """Untimed, once per engine, before the first repetition."""

    def before_rep(self, index: int) -> None:
        """Untimed, once per repetition, before any engine runs it."""

    def rep(self, engine: Engine, index: int) -> Sample:
        raise NotImplementedError

    def finish(self, engine: Engine) -> None:
        """Untimed or extra measurements after the repetitions (see ``extra``)."""

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def tag(self, index: int) -> str:
        return f"bench-{self.name}:{index}"


class Rebuilt(Workload):
    """Repetitions that build again what ``prepare`` built once, in the same cache."""

    def prepare(self, engine: Engine) -> None:
        engine.reset()
        engine.build(self.dir, tag=self.tag(0))

    def rep(self, engine: Engine, index: int) -> Sample:
        return engine.build(self.dir, tag=self.tag(0))


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)


def _text(rng: random.Random, size: int) -> str:
    words = ("alpha", "beta", "gamma", "delta", "service", "config", "value", "port", "true", "42")
    out: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(words)
        out.append(word)
        length += len(word) + 1
    return " ".join(out)[:size] + "\n"


# -- twenty small steps ------------------------------------------------------------------------

SMALL_DOCKERFILE = """\
FROM busybox:latest
ENV APP_HOME=/app LANG=C.UTF-8
LABEL org.example.bench=small
WORKDIR /app
COPY config/ /app/config/
RUN mkdir -p /app/data /app/bin /app/log
RUN cat /etc/group > /app/data/groups.txt && echo "bench:x:2000:" >> /app/data/groups.txt
COPY static/ /app/static/
RUN sed -i 's/^app:/appuser:/' /etc/passwd
RUN ln -s /app/bin/main.sh /usr/bin/app-main
RUN rm /bin/vi
WORKDIR /app/work
RUN for i in 1 2 3 4 5 6 7 8 9 10; do echo "line $i" > file$i.txt; done
COPY docs/README.txt /app/docs/
RUN chmod -R go-w /app/config
ENV MODE=production
RUN tar -cf /app/data/config.tar -C /app config
EXPOSE 8080
COPY src/main.sh /app/bin/main.sh
RUN chmod 755 /app/bin/main.sh && sh /app/bin/main.sh > /app/log/out.txt
CMD ["/app/bin/main.sh"]
"""

MAIN_SH = '#!/bin/sh\necho "main $MODE"\nls /app/config | wc -l\n'


class SmallCold(Workload):
    name = "small-cold"
    title = "20 small steps, cold"
    goal = "≤ 0.3"

    def make_context(self) -> None:
        make_small_context(self.dir)

    def rep(self, engine: Engine, index: int) -> Sample:
        engine.reset()
        return engine.build(self.dir, tag=self.tag(index))


def make_small_context(ctx: Path) -> None:
    if (ctx / "Dockerfile").exists():
        return
    rng = random.Random(20)
    _write(ctx / "Dockerfile", SMALL_DOCKERFILE)
    for i in range(10):
        _write(ctx / "config" / f"part{i}.conf", _text(rng, 200 + 40 * i))
    for i in range(40):
        _write(ctx / "static" / f"asset{i:02}.css", _text(rng, 1500))
    _write(ctx / "docs" / "README.txt", _text(rng, 3000))
    _write(ctx / "src" / "main.sh", MAIN_SH)
    (ctx / "src" / "main.sh").chmod(0o755)


class SmallCached(Rebuilt, SmallCold):
    name = "small-cached"
    title = "20 small steps, fully cached"
    goal = "≤ 0.7"


class SmallEdit(SmallCached):
    name = "small-edit"
    title = "20 small steps, one late COPY edited"
    goal = "≤ 0.5"

    def before_rep(self, index: int) -> None:
        _write(self.dir / "src" / "main.sh", MAIN_SH + f"echo edit {index}\n")


# -- one RUN writing 1 GiB in 20,000 files ---------------------------------------------------------


def big_dockerfile(files: int, size: int) -> str:
    # Half the files random, half random over 16 letters (gzip ratio about 1.9 on those):
    # no long-range repeats, so no compressor gets an easy ride. Two writers, one per core.
    half = files // 2
    return (
        "FROM busybox:latest\n"
        "RUN mkdir /data; M=$(printf 'abcdefghijklmnop%.0s' $(seq 16)); \\\n"
        f"    ( head -c {half * size} /dev/urandom | tr '\\000-\\377' \"$M\" | \\\n"
        f"      {{ i=0; while [ $i -lt {half} ]; do \\\n"
        f"        dd of=/data/c$i bs={size} count=1 iflag=fullblock 2>/dev/null; i=$((i+1)); \\\n"
        "      done; } ) & \\\n"
        f"    i=0; while [ $i -lt {half} ]; do \\\n"
        f"      dd if=/dev/urandom of=/data/r$i bs={size} count=1 2>/dev/null; i=$((i+1)); done; \\\n"
        f'    wait; test "$(ls /data | wc -l)" -eq {2 * half}\n'
    )


class BigLayer(Workload):
    name = "big-gzip"
    title = "RUN writes 1 GiB in 20,000 files, gzip, export"
    goal = "after-RUN ≤ 0.5"
    slow = True
    extra_args: ClassVar[tuple[str, ...]] = ()

    def make_context(self) -> None:
        _write(self.dir / "Dockerfile", big_dockerfile(self.scale.big_files, self.scale.big_file_size))
        if self.scale.quick:
            self.title = self.title.replace(
                "1 GiB in 20,000", f"{self.size_mib:.0f} MiB in {self.scale.big_files:,}"
            )

    @property
    def size_mib(self) -> float:
        return self.scale.big_files * self.scale.big_file_size / (1 << 20)

    def finish(self, engine: Engine) -> None:
        """builder's write_layer alone on the same tree (bench/layer_profile.py): no RUN, no overlay."""
        if self.name != "big-gzip" or not isinstance(engine, BuilderEngine):
            return
        argv = [sys.executable, str(BENCH / "layer_profile.py"), "--source", str(engine.source)]
        argv += ["--files", str(self.scale.big_files), "--size", str(self.scale.big_file_size)]
        argv += ["--modes", "walk,sha256,gzip,zstd", "--dir", str(self.dir.parent)]
        result = subprocess.run(argv, env=engine.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise EngineError(f"bench/layer_profile.py failed:\n{result.stderr[-2000:]}")
        alone: dict[str, list[Sample]] = {}
        for line in result.stdout.splitlines():
            words = line.split()
            if len(words) == 5 and words[0] in ("walk", "sha256", "gzip", "zstd"):
                alone[f"alone-{words[0]}"] = [Sample(float(words[1]), float(words[2]), 0.0)]
        self.extra[engine.name] = alone

    def rep(self, engine: Engine, index: int) -> Sample:
        engine.reset()
        out = self.dir.parent / f"{self.name}-oci"
        try:
            return engine.build(self.dir, tag=self.tag(index), oci_dest=out, extra=self.extra_args)
        finally:
            shutil.rmtree(out, ignore_errors=True)


class BigLayerZstd(BigLayer):
    name = "big-zstd"
    title = "RUN writes 1 GiB in 20,000 files, zstd, export"
    goal = "after-RUN near the machine's floor"
    builder_only = True
    extra_args = ("--compression", "zstd")


# -- COPY of 50,000 small files with a .dockerignore ---------------------------------------------------

DOCKERIGNORE = "# bench\nnode_modules\n.git\n**/*.log\n*.tmp\n"


class Copy50k(Workload):
    name = "copy-50k"
    title = "COPY 50,000 small files, .dockerignore"
    goal = "≤ 0.7"
    slow = True

    def make_context(self) -> None:
        ctx = self.dir
        rng = random.Random(50000)
        _write(ctx / "Dockerfile", "FROM busybox:latest\nCOPY . /app\n")
        _write(ctx / ".dockerignore", DOCKERIGNORE)
        kept = self.scale.copy_files - 2  # the Dockerfile and .dockerignore are copied too
        blob = _text(rng, 8192).encode()
        for i in range(kept):
            path = ctx / "src" / f"pkg{i // 5000:02}" / f"mod{i // 500 % 10}" / f"file{i:05}.txt"
            start = rng.randrange(0, 4096)
            _write(path, blob[start : start + rng.randrange(100, 4000)])
        for i in range(kept // 10):  # ignored: node_modules, .git, logs and temp files
            where = (
                ctx / "node_modules" / f"lib{i % 50}" / f"index{i}.js",
                ctx / ".git" / "objects" / f"{i % 256:02x}" / f"obj{i}",
                ctx / "src" / f"pkg{i % 10:02}" / f"debug{i}.log",
                ctx / f"scratch{i}.tmp",
            )[i % 4]
            _write(where, blob[: rng.randrange(100, 2000)])
        if self.scale.quick:
            self.title = self.title.replace("50,000", f"{self.scale.copy_files:,}")

    def rep(self, engine: Engine, index: int) -> Sample:
        engine.reset()
        return engine.build(self.dir, tag=self.tag(index))


class Copy50kCached(Rebuilt, Copy50k):
    name = "copy-50k-cached"
    title = "COPY 50,000 small files, .dockerignore, fully cached"
    goal = "(no target; reported)"


# -- a Debian base image from a debootstrap rootfs --------------------------------------------------

DEBIAN_DOCKERFILE = """\
FROM scratch
COPY rootfs/ /
RUN useradd -m -u 1000 app && echo bench > /etc/bench-stamp
CMD ["bash"]
"""


class DebianBase(Workload):
    name = "debian-base"
    title = "Debian base image from a debootstrap rootfs"
    goal = "(no target; reported)"
    slow = True
    skipped = ""

    def make_context(self) -> None:
        rootfs = debootstrap_rootfs(self.cache)
        ctx = self.dir
        ctx.mkdir(parents=True, exist_ok=True)
        _write(ctx / "Dockerfile", DEBIAN_DOCKERFILE)
        # device nodes stay out: neither builder nor BuildKit copies them the same way
        pack = subprocess.Popen(
            ["tar", "-C", str(rootfs), "--exclude=./dev/*", "-cf", "-", "."], stdout=subprocess.PIPE
        )
        (ctx / "rootfs").mkdir()
        unpack = subprocess.run(["tar", "-C", str(ctx / "rootfs"), "-xpf", "-"], stdin=pack.stdout)
        pack.wait()
        if pack.returncode or unpack.returncode:
            raise EngineError("cannot copy the debootstrap rootfs into the context.")

    def rep(self, engine: Engine, index: int) -> Sample:
        engine.reset()
        return engine.build(self.dir, tag=self.tag(index))


def debootstrap_rootfs(cache: Path) -> Path:
    """A minbase bookworm rootfs, made once into the cache; EngineError when no mirror answers."""
    rootfs = cache / "debian-bookworm-minbase"
    if (rootfs / ".complete").exists():
        return rootfs
    if shutil.which("debootstrap") is None:
        raise EngineError("debootstrap is not installed (apt-get install debootstrap).")
    shutil.rmtree(rootfs, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    mirror = _apt_mirror()
    argv = ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        shutil.rmtree(rootfs, ignore_errors=True)
        tail = "\n".join(result.stdout.splitlines()[-5:] + result.stderr.splitlines()[-5:])
        raise EngineError(f"debootstrap could not build a rootfs from {mirror}:\n{tail}")
    # what Debian's official images drop: package lists and apt's binary caches
    for sub in ("var/lib/apt/lists", "var/cache/apt"):
        for child in (rootfs / sub).glob("*"):
            if child.is_file():
                child.unlink()
    (rootfs / ".complete").write_text(mirror + "\n")
    return rootfs


def _apt_mirror() -> str:
    """The Debian mirror apt is configured with here, else deb.debian.org."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if path.suffix == ".sources" and words[:1] == ["URIs:"]:
                uris = words[1:]
            elif words[:1] == ["deb"]:
                uris = [w for w in words[1:] if "://" in w][:1]
            else:
                continue
            for uri in uris:
                if uri.rstrip("/").endswith("/debian"):
                    return uri
    return "http://deb.debian.org/debian"


# -- three independent stages -------------------------------------------------------------------


def stages_dockerfile(sleep: int, files: int, *, copy_all: bool) -> str:
    """Three stages that each sleep, then write ``files`` random files of 128 KiB; a last stage
    copies one file (an artifact) from each, or with ``copy_all`` everything they wrote."""
    stage = (
        "FROM busybox:latest AS {name}\n"
        f"RUN sleep {sleep} && mkdir /out && i=0; while [ $i -lt {files} ]; do "
        "dd if=/dev/urandom of=/out/{name}$i bs=65536 count=2 2>/dev/null; i=$((i+1)); done\n"
    )
    text = "".join(stage.format(name=name) for name in ("a", "b", "c"))
    text += "FROM busybox:latest\n"
    if copy_all:
        text += "".join(f"COPY --from={name} /out /out/{name}\n" for name in ("a", "b", "c"))
    else:
        text += "".join(f"COPY --from={name} /out/{name}0 /artifacts/{name}\n" for name in ("a", "b", "c"))
    return text


class ThreeStages(Workload):
    """The stages run at once: the whole build against each stage built alone. The last stage
    takes an artifact from each, so that what is measured is how the stages overlap; the
    variant below has it copy (and compress again) all 96 MiB they wrote, serial work that no
    builder can overlap and that the reference leaves out."""

    name = "three-stages"
    title = "three independent stages, then one that takes a file from each"
    goal = "≈ the slowest stage"
    slow = True
    copy_all = False

    def make_context(self) -> None:
        dockerfile = stages_dockerfile(self.scale.stage_sleep, self.scale.stage_files, copy_all=self.copy_all)
        _write(self.dir / "Dockerfile", dockerfile)

    def rep(self, engine: Engine, index: int) -> Sample:
        engine.reset()
        return engine.build(self.dir, tag=self.tag(index))

    def finish(self, engine: Engine) -> None:
        """Each stage alone (cold): the reference for "≈ the slowest stage"."""
        solos: dict[str, list[Sample]] = {}
        for name in ("a", "b", "c"):
            engine.reset()
            solos[name] = [engine.build(self.dir, tag=f"bench-stage-{name}:0", target=name)]
        self.extra[engine.name] = solos


class ThreeStagesCopyAll(ThreeStages):
    name = "three-stages-copy-all"
    title = "three independent stages, then one that copies all their output"
    goal = "(no target; reported)"
    copy_all = True

    def finish(self, engine: Engine) -> None:
        """The stages alone are the same as three-stages': measured there."""


WORKLOADS: Sequence[type[Workload]] = (
    SmallCold,
    SmallCached,
    SmallEdit,
    BigLayer,
    BigLayerZstd,
    Copy50k,
    Copy50kCached,
    DebianBase,
    ThreeStages,
    ThreeStagesCopyAll,
)
