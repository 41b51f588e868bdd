#!/usr/bin/env python3
"""Benchmarks: builder against BuildKit on the same machine, in the same run.

    python3 bench/run.py                 # the full run; writes bench/RESULTS.md and RESULTS.json
    python3 bench/run.py --quick         # a smoke run at small sizes, one repetition, no report
    python3 bench/run.py --only small-cold,small-cached --no-buildkit

Needs root (builder's sandbox and dockerd both do). BuildKit is the one bundled with Debian's
``docker.io``; the runner starts its own dockerd on private directories and stops it at the end.
Where dockerd cannot run, builder is measured alone and the report says why. Standard library
only. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import limits as limits_module
from engines import (
    QUIET,
    BuilderEngine,
    BuildKitEngine,
    EngineError,
    Sample,
    builder_source,
    remove_tree,
)
from scratchfs import KINDS, scratch_filesystem
from workloads import WORKLOADS, DebianBase, Engine, Scale, Workload

BENCH = Path(__file__).resolve().parent
DEFAULT_CACHE = Path("/tmp/builder-bench-cache")

Log = Callable[[str], None]


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition: a smoke run")
    parser.add_argument("--reps", type=int, help="repetitions per workload (default 9, slow ones 3)")
    names = ", ".join(w.name for w in WORKLOADS)
    parser.add_argument("--only", help=f"comma-separated workloads to run ({names})")
    parser.add_argument("--skip", default="", help="comma-separated workloads to leave out")
    parser.add_argument("--no-buildkit", action="store_true", help="measure builder alone")
    parser.add_argument("--no-limits", action="store_true", help="do not measure the machine's limits")
    parser.add_argument(
        "--report",
        type=Path,
        help="the Markdown report to write (default: bench/RESULTS.md, not with --quick)",
    )
    parser.add_argument(
        "--rev", help="measure builder as committed at REV (git archive; default: the working tree)"
    )
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a new one under /tmp)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="keeps the debootstrap rootfs")
    parser.add_argument("--profile", type=Path, help="write a cProfile of every builder build into DIR")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait before each timed command for the machine to go idle (default 10, quick 0)",
    )
    parser.add_argument(
        "--filesystem",
        choices=KINDS,
        default="loop",
        help="where both tools keep their state: a fresh journaled ext4 on a loop device mounted on "
        "the scratch directory (loop, the default; see bench/scratchfs.py) or the scratch directory "
        "as it is (here)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if os.geteuid() != 0:
        _log("bench/run.py needs root: builder's sandbox and dockerd both do.")
        return 2
    selected = [w for w in WORKLOADS if not args.only or w.name in args.only.split(",")]
    selected = [w for w in selected if w.name not in args.skip.split(",")]
    unknown = {*(args.only or "").split(","), *args.skip.split(",")} - {w.name for w in WORKLOADS} - {""}
    if unknown:
        _log(f"unknown workloads: {', '.join(sorted(unknown))}")
        return 2
    scale = Scale.make(args.quick, args.reps)
    QUIET["wait"] = args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 10.0)
    report_path = args.report or (None if args.quick else BENCH / "RESULTS.md")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="builder-bench-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        with scratch_filesystem(workdir, args.filesystem, keep=args.keep) as where:
            run = Run(args, scale, workdir, selected)
            run.machine["scratch file system"] = where
            try:
                run.execute()
                run.machine["load at the end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
            finally:
                run.close()
    except EngineError as exc:  # the scratch file system, or an engine's set-up
        _log(str(exc))
        return 2
    finally:
        if not args.keep:
            remove_tree(workdir)
    run.elapsed = time.monotonic() - started
    text = render(run)
    print(text)
    if report_path is not None:
        report_path.write_text(text)
        raw = report_path.with_suffix(".json")
        raw.write_text(json.dumps(run.to_json(), indent=1) + "\n")
        _log(f"wrote {report_path} and {raw}")
    return 1 if run.failures else 0


class Run:
    """One benchmark run: the engines, the workloads' samples, the machine's limits."""

    def __init__(self, args: argparse.Namespace, scale: Scale, workdir: Path, selected: list[type[Workload]]):
        self.args = args
        self.scale = scale
        self.workdir = workdir
        self.selected = selected
        self.command = "python3 bench/run.py" + "".join(f" {a}" for a in sys.argv[1:])
        self.date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        self.machine = machine_info(workdir)
        self.limits: list[limits_module.Limit] = []
        self.engines: list[Engine] = []
        self.buildkit_missing = ""
        self.samples: dict[str, dict[str, list[Sample]]] = {}
        self.extra: dict[str, dict[str, dict[str, list[Sample]]]] = {}
        self.workloads: dict[str, Workload] = {}
        self.notes: dict[str, str] = {}
        self.failures: list[str] = []
        self.describe: dict[str, str] = {}
        self.elapsed = 0.0

    def execute(self) -> None:
        source, revision = builder_source(self.args.rev, self.workdir)
        base = self.workdir / "busybox-layout"
        subprocess.run(
            [sys.executable, str(source / "fixtures" / "make_busybox_image.py"), str(base)],
            check=True,
            capture_output=True,
        )
        if not self.args.no_limits:
            _log("measuring the machine's limits")
            self.limits = limits_module.measure(self.workdir, quick=self.scale.quick, log=_log)
        builder = BuilderEngine(self.workdir, base, source)
        builder.profile_dir = self.args.profile
        if self.args.profile:
            self.args.profile.mkdir(parents=True, exist_ok=True)
        self.engines.append(builder)
        _log("setting up builder")
        builder.setup()
        self.describe["builder"] = builder.describe(revision)
        if self.args.no_buildkit:
            self.buildkit_missing = "not asked for (--no-buildkit)"
        else:
            buildkit = BuildKitEngine(self.workdir, base)
            self.engines.append(buildkit)
            _log("starting dockerd (BuildKit)")
            try:
                buildkit.setup()
                self.describe["buildkit"] = buildkit.describe()
            except EngineError as exc:
                self.buildkit_missing = str(exc)
                _log(f"BuildKit is unavailable: {exc}")
                buildkit.close()
                self.engines.remove(buildkit)
        contexts = self.workdir / "contexts"
        for cls in self.selected:
            cached = (self.args.cache / "debian-bookworm-minbase" / ".complete").exists()
            if cls is DebianBase and self.scale.quick and not self.args.only and not cached:
                self.notes[cls.name] = "skipped in --quick (no cached debootstrap rootfs; name it in --only)"
                continue
            self.run_workload(cls(contexts, self.scale, self.args.cache))

    def run_workload(self, workload: Workload) -> None:
        name = workload.name
        self.workloads[name] = workload
        _log(f"{name}: making the context")
        try:
            workload.make_context()
        except EngineError as exc:
            self.notes[name] = f"skipped: {exc}"
            _log(f"{name}: skipped: {exc}")
            return
        engines = [e for e in self.engines if e.name == "builder" or not workload.builder_only]
        samples: dict[str, list[Sample]] = {e.name: [] for e in engines}
        failed: set[str] = set()
        try:
            for engine in engines:
                try:
                    workload.prepare(engine)
                except EngineError as exc:
                    self.fail(name, engine, exc, failed)
            for index in range(1, workload.reps + 1):
                workload.before_rep(index)
                for engine in engines:
                    if engine.name in failed:
                        continue
                    try:
                        sample = workload.rep(engine, index)
                    except EngineError as exc:
                        self.fail(name, engine, exc, failed)
                        continue
                    samples[engine.name].append(sample)
                    _log(
                        f"{name} {index}/{workload.reps} {engine.name}: {sample.wall:.2f}s wall, "
                        f"{sample.cpu:.2f}s CPU, {sample.peak_mib:.0f} MiB"
                    )
            for engine in engines:
                if engine.name not in failed:
                    try:
                        workload.finish(engine)
                    except EngineError as exc:
                        self.fail(name, engine, exc, failed)
        finally:
            workload.close()
        self.samples[name] = samples
        self.extra[name] = workload.extra

    def fail(self, name: str, engine: Engine, exc: EngineError, failed: set[str]) -> None:
        failed.add(engine.name)
        message = f"{name} on {engine.name} failed: {exc}"
        self.failures.append(message)
        _log(message)

    def close(self) -> None:
        for engine in reversed(self.engines):
            try:
                engine.close()
            except Exception as exc:  # cleanup must go on for the others
                _log(f"closing {engine.name}: {exc}")

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "date": self.date,
            "machine": self.machine,
            "versions": self.describe,
            "buildkit_missing": self.buildkit_missing,
            "limits": [asdict(limit) for limit in self.limits],
            "samples": {
                name: {engine: [asdict(s) for s in samples] for engine, samples in by_engine.items()}
                for name, by_engine in self.samples.items()
            },
            "extra": {
                name: {
                    engine: {label: [asdict(s) for s in samples] for label, samples in labels.items()}
                    for engine, labels in by_engine.items()
                }
                for name, by_engine in self.extra.items()
            },
            "notes": self.notes,
            "failures": self.failures,
            "elapsed": self.elapsed,
        }


def machine_info(workdir: Path) -> dict[str, str]:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    where = str(workdir.resolve())
    mount = max(
        (m for m in mounts if where == m[1] or where.startswith(m[1].rstrip("/") + "/")),
        key=lambda m: len(m[1]),
        default=["?", "/", "unknown", ""],
    )
    return {
        "cpu": f"{model}, {len(os.sched_getaffinity(0))} cores",
        "memory": f"{int(mem) / (1 << 20):.1f} GiB",
        "kernel": platform.release(),
        "os": _os_name(),
        "filesystem": f"{mount[2]} on {mount[0]}, mounted at {mount[1]} ({mount[3]})",
        "python": sys.version.split()[0],
        "load at the start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _os_name() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.system()


# -- the report ---------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fmt(value: float, unit: str = "s") -> str:
    if value != value:  # NaN
        return "—"
    if unit == "s":
        return f"{value:.2f} s" if value < 100 else f"{value:.0f} s"
    return f"{value:.0f} {unit}"


def _after_run(sample: Sample) -> float:
    return sample.wall - sample.phases.get("run", 0.0)


def _ratio(ratio: float) -> str:
    return "—" if ratio != ratio else f"{ratio:.2f}"


def _goal_met(goal: str, ratio: float) -> str:
    if goal.startswith("≤") and ratio == ratio:
        bound = float(goal.split()[1])
        return "yes" if ratio <= bound else "**no**"
    return ""


def _limit(run: Run, name: str) -> float:
    for limit in run.limits:
        if limit.name == name:
            return limit.value
    return float("nan")


def _limit_prefix(run: Run, prefix: str) -> float:
    for limit in run.limits:
        if limit.name.startswith(prefix):
            return limit.value
    return float("nan")


def render(run: Run) -> str:
    lines = [
        "# Benchmarks: builder against BuildKit",
        "",
        "Made by `bench/run.py` (see bench/README.md for what is measured and how). Figures are",
        "medians; ratios are builder / BuildKit (lower is better); times are wall-clock seconds of",
        "the build command, CPU is user + system of every process doing the work, peak is the",
        "resident memory high-water mark of the builder process or of dockerd.",
        "",
        f"- Command: `{run.command}` (as root), {run.date}, {run.elapsed / 60:.1f} minutes in all.",
    ]
    for key, value in run.machine.items():
        lines.append(f"- {key[0].upper()}{key[1:]}: {value}")
    for name, text in run.describe.items():
        lines.append(f"- {name}: {text}")
    if run.buildkit_missing:
        lines.append(f"- **BuildKit was not measured**: {run.buildkit_missing}")
    lines += ["", "## Results", ""]
    lines += _results_table(run)
    lines += _big_layer_section(run)
    lines += _stages_section(run)
    lines += _limits_section(run)
    if run.notes or run.failures:
        lines += ["", "## Notes", ""]
        lines += [f"- {name}: {note}" for name, note in run.notes.items()]
        lines += [f"- FAILED: {failure.splitlines()[0]}" for failure in run.failures]
    return "\n".join(lines) + "\n"


def _other_load(samples: Sequence[Sample]) -> float:
    """Cores busy with other work during the samples (median): the noise the figures carry."""
    return _median([s.notes.get("other_cpu", 0.0) / s.wall for s in samples if s.wall > 0])


def _results_table(run: Run) -> list[str]:
    rows = [
        "| workload | reps | builder | BuildKit | ratio | ratio of bests | target | met "
        "| builder CPU | BuildKit CPU | builder peak | dockerd peak | other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_engine in run.samples.items():
        workload = run.workloads[name]
        ours, theirs = by_engine.get("builder", []), by_engine.get("buildkit", [])
        wall_b, wall_k = _median([s.wall for s in ours]), _median([s.wall for s in theirs])
        ratio = wall_b / wall_k if theirs and ours else float("nan")
        best = min(s.wall for s in ours) / min(s.wall for s in theirs) if theirs and ours else float("nan")
        goal = workload.goal if name not in ("big-gzip", "big-zstd") else "(see below)"
        rows.append(
            f"| {workload.title} | {len(ours)} | {_fmt(wall_b)} | {_fmt(wall_k)} | "
            f"{_ratio(ratio)} | {_ratio(best)} | {goal} | {_goal_met(goal, ratio)} | "
            f"{_fmt(_median([s.cpu for s in ours]))} | {_fmt(_median([s.cpu for s in theirs]))} | "
            f"{_fmt(_median([s.peak_mib for s in ours]), 'MiB')} | "
            f"{_fmt(_median([s.peak_mib for s in theirs]), 'MiB')} | {_other_load(ours + theirs):.2f} |"
        )
    rows += [
        "",
        "Other load: how many cores other work on the machine kept busy during the timed commands",
        "(median over both tools' samples; 0 is a quiet machine, 2 is all of it).",
    ]
    return rows


def _big_layer_section(run: Run) -> list[str]:
    gz = run.samples.get("big-gzip", {})
    zs = run.samples.get("big-zstd", {})
    if not gz and not zs:
        return []
    workload = run.workloads.get("big-gzip") or run.workloads["big-zstd"]
    assert isinstance(workload.scale, Scale)
    size = workload.scale.big_files * workload.scale.big_file_size
    mib = size / (1 << 20)
    lines = [
        "",
        f"## The big layer: the work after the RUN ({mib:,.0f} MiB in {workload.scale.big_files:,} files)",
        "",
        "After-RUN = wall time of the whole command minus the RUN itself: for builder the diff,",
        "sha256, compression, blob commit and the OCI layout export (measured by bench/probe.py);",
        "for BuildKit the export of the build result into dockerd's image store plus `docker push`",
        "to a local registry, which is dockerd's gzip path (Go's gzip at its default level) —",
        "dockerd's BuildKit has no OCI exporter. Both include the client's start-up.",
        "",
        "| | after-RUN | MiB/s | RUN | blob MiB | ratio to BuildKit | peak | phases (median s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    reference = _median([_after_run(s) for s in gz.get("buildkit", [])])
    rows = [("builder, gzip", gz.get("builder", [])), ("builder, zstd", zs.get("builder", []))]
    rows.append(("BuildKit, gzip (build + push)", gz.get("buildkit", [])))
    for label, samples in rows:
        if not samples:
            continue
        after = _median([_after_run(s) for s in samples])
        blob = _median([sum(s.notes.get("layer_sizes", [0])) for s in samples]) / (1 << 20)
        ratio = after / reference if reference == reference and "BuildKit" not in label else float("nan")
        phases = sorted({k for s in samples for k in s.phases})
        detail = ", ".join(f"{k} {_median([s.phases.get(k, 0.0) for s in samples]):.2f}" for k in phases)
        run_time = _median([s.phases.get("run", 0.0) for s in samples])
        lines.append(
            f"| {label} | {_fmt(after)} | {mib / after:,.0f} | {_fmt(run_time)} | {blob:,.0f} | "
            f"{_ratio(ratio)} | {_fmt(_median([s.peak_mib for s in samples]), 'MiB')} | {detail} |"
        )
    alone = run.extra.get("big-gzip", {}).get("builder", {})
    if alone:
        lines += [
            "",
            "builder's `write_layer` alone on the same kind of tree (bench/layer_profile.py: no RUN before",
            "it, no overlay, the tree's pages clean), each mode adding one piece to the previous:",
            "",
            "| write_layer alone | wall | CPU | MiB/s |",
            "|---|---|---|---|",
        ]
        for label, samples in alone.items():
            wall, cpu = samples[0].wall, samples[0].cpu
            lines.append(
                f"| {label.removeprefix('alone-')} | {_fmt(wall)} | {_fmt(cpu)} | {mib / wall:,.0f} |"
            )
    lines += [
        "",
        *_floor_lines(run, samples_gz=gz.get("builder", []), samples_zs=zs.get("builder", []), size=size),
    ]
    return lines


def _floor_lines(run: Run, *, samples_gz: list[Sample], samples_zs: list[Sample], size: int) -> list[str]:
    """The machine's floor for the after-RUN work, from the measured limits."""
    if not run.limits:
        return []
    mib = size / (1 << 20)
    cores = len(os.sched_getaffinity(0))
    sha = _limit(run, "sha256")
    write = _limit(run, "disk write + fsync")
    lines = [
        "Floor: the after-RUN work can go no faster than the larger of (a) one sha256 pass over the tar",
        "(one stream cannot be hashed in parallel), (b) the CPU work of sha256 of the tar, the",
        "compressor and sha256 of the blob spread over all cores, (c) writing the blob with fsync.",
        "",
        "| codec | floor | measured after-RUN | measured / floor |",
        "|---|---|---|---|",
    ]
    for label, rate_name, samples in (
        ("gzip (isal -1)", "gzip isal -1", samples_gz),
        ("zstd -3", "zstd -3, one core", samples_zs),
    ):
        rate = _limit(run, rate_name)
        if not samples or rate != rate or rate <= 0:
            continue
        blob = _median([sum(s.notes.get("layer_sizes", [0])) for s in samples]) / (1 << 20)
        floor = max(mib / sha, (mib / sha + mib / rate + blob / sha) / cores, blob / write)
        after = _median([_after_run(s) for s in samples])
        lines.append(f"| {label} | {_fmt(floor)} | {_fmt(after)} | {after / floor:.2f} |")
    zlib6 = _limit(run, "gzip zlib -6")
    if zlib6 == zlib6 and zlib6 > 0:
        lines += [
            "",
            f"For scale: one core of zlib at level 6 (about what BuildKit's Go gzip does) needs "
            f"{mib / zlib6:.1f} s for this layer.",
        ]
    return lines


def _stages_section(run: Run) -> list[str]:
    samples = run.samples.get("three-stages")
    if not samples:
        return []
    copy_all = run.samples.get("three-stages-copy-all", {})
    lines = [
        "",
        "## Three independent stages",
        "",
        "Each stage alone (cold, `--target`) is the reference: a builder that runs independent",
        "stages in parallel takes about the slowest stage, plus a last stage that takes a file",
        "from each. With `three-stages-copy-all`, the last stage copies all 96 MiB the stages",
        "wrote (and compresses them again): serial work after the stages, which the reference",
        "leaves out.",
        "",
        "| | whole build | stage a | stage b | stage c | whole / slowest stage "
        "| copy-all build | copy-all / slowest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for engine, full in samples.items():
        solos = run.extra.get("three-stages", {}).get(engine, {})
        solo = {name: _median([s.wall for s in solos.get(name, [])]) for name in ("a", "b", "c")}
        slowest = max(solo.values()) if solo else float("nan")
        whole = _median([s.wall for s in full])
        everything = _median([s.wall for s in copy_all.get(engine, [])])
        lines.append(
            f"| {engine} | {_fmt(whole)} | {_fmt(solo['a'])} | {_fmt(solo['b'])} | {_fmt(solo['c'])} | "
            f"{whole / slowest:.2f} | {_fmt(everything)} | {everything / slowest:.2f} |"
        )
    return lines


def _limits_section(run: Run) -> list[str]:
    if not run.limits:
        return []
    lines = ["", "## This machine's limits", "", "| what | measured | note |", "|---|---|---|"]
    for limit in run.limits:
        value = f"{limit.value:,.0f}" if limit.value >= 100 else f"{limit.value:,.1f}"
        lines.append(f"| {limit.name} | {value} {limit.unit} | {limit.note} |")
    lines += ["", *_closeness(run)]
    return lines


def _closeness(run: Run) -> list[str]:
    """How close each workload comes to what the machine allows."""
    out = ["How close each workload is to these limits (builder's medians):", ""]
    mount = _limit(run, "overlay mount+umount") / 1000
    python = _limit(run, "python3 -I -S -c pass") / 1000
    fork = _limit(run, "fork+exec /bin/true") / 1000
    small = run.samples.get("small-cold", {}).get("builder", [])
    if small and mount == mount and python == python:
        runs = _median([s.notes.get("counts", {}).get("run", 0) for s in small])
        writes = _median([s.notes.get("counts", {}).get("commit", 0) for s in small])
        wall = _median([s.wall for s in small])
        floor = python + writes * mount + runs * fork
        out.append(
            f"- small-cold: {wall:.2f} s for {writes:.0f} filesystem steps ({runs:.0f} RUN). A bare "
            f"Python start ({python * 1000:.0f} ms), a fresh overlay per step ({mount * 1000:.1f} ms) "
            f"and a fork+exec per RUN ({fork * 1000:.1f} ms) come to {floor:.2f} s; the rest is "
            "builder's imports, the sandbox's set-up and the layer commits."
        )
    cached = run.samples.get("small-cached", {}).get("builder", [])
    if cached and python == python:
        wall = _median([s.wall for s in cached])
        out.append(
            f"- small-cached: {wall:.2f} s, against {python:.2f} s for a bare Python start: "
            f"{wall / python:.1f} times the start-up alone."
        )
    copy = run.samples.get("copy-50k", {}).get("builder", [])
    create = _limit(run, "create 1 KiB files")
    workload = run.workloads.get("copy-50k")
    if copy and create == create and workload is not None:
        files = workload.scale.copy_files
        wall = _median([s.wall for s in copy])
        out.append(
            f"- copy-50k: {files / wall:,.0f} files/s end to end (hash, copy, diff, tar, compress), "
            f"against {create:,.0f} files/s for bare file creation."
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
