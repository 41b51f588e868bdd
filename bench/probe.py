"""Run the builder CLI in this process with timing hooks, for the benchmark runner.

    BENCH_PHASES=out.json python3 bench/probe.py build ...   (same arguments as ``builder``)

The hooks wrap a few functions of the product by name and only add up the time spent in them;
when a name is missing (the product moved on), that phase is simply not reported. At exit the
phases, the end of the last RUN and this process's peak resident memory (VmHWM) go to the JSON
file named by ``$BENCH_PHASES``; with ``$BENCH_CPROFILE`` set, a cProfile of the command goes
to that file. Standard library only, apart from the product itself.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The builder under test: a source tree named by the runner (a ``--rev`` export), else this checkout.
sys.path.insert(0, os.environ.get("BENCH_BUILDER_SRC") or str(Path(__file__).resolve().parent.parent))

from builder import build as build_module
from builder import cli, executor, snapshot

START = time.monotonic()
PHASES: dict[str, float] = {}
COUNTS: dict[str, int] = {}
MARKS: dict[str, float] = {}

# (owner, attribute, phase): what each phase means is in bench/README.md
HOOKS: tuple[tuple[Any, str, str], ...] = (
    (executor, "run_sandboxed", "run"),
    (executor, "run_copy", "copy"),
    (executor, "write_layer", "layer"),
    (getattr(executor, "StageExecutor", None), "_commit", "commit"),
    (getattr(executor, "StageExecutor", None), "_key", "cache_key"),
    (getattr(snapshot, "Snapshotter", None), "ensure", "unpack"),
    (snapshot, "_run", "mount_cmd"),
    (build_module, "_store_image", "image"),
    (build_module, "_write_output", "export"),
    (build_module, "publish", "export"),
)


def _wrap(func: Callable[..., Any], phase: str) -> Callable[..., Any]:
    @functools.wraps(func)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return func(*args, **kwargs)
        finally:
            ended = time.monotonic()
            PHASES[phase] = PHASES.get(phase, 0.0) + ended - started
            COUNTS[phase] = COUNTS.get(phase, 0) + 1
            MARKS[phase + "_end"] = ended - START

    return timed


def install() -> None:
    for owner, name, phase in HOOKS:
        func = getattr(owner, name, None) if owner is not None else None
        if callable(func):
            setattr(owner, name, _wrap(func, phase))


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def report(path: str) -> None:
    document = {
        "phases": PHASES,
        "counts": COUNTS,
        "marks": MARKS,
        "total": time.monotonic() - START,
        "peak_kib": _peak_kib(),
    }
    Path(path).write_text(json.dumps(document, sort_keys=True))


def main() -> int:
    install()
    profile_out = os.environ.get("BENCH_CPROFILE")
    try:
        if not profile_out:
            return cli.main(sys.argv[1:])
        import cProfile

        profiler = cProfile.Profile()
        try:
            return int(profiler.runcall(cli.main, sys.argv[1:]))
        finally:
            profiler.dump_stats(profile_out)
    finally:
        if out := os.environ.get("BENCH_PHASES"):
            report(out)


if __name__ == "__main__":
    sys.exit(main())
