"""Run the builder CLI in this process with timing hooks, for the benchmark runner.

    BENCH_PHASES=out.json python3 bench/probe.py build ...   (same arguments as ``builder``)

The hooks wrap a few functions of the product by name and only add up the time spent in them;
when a name is missing (the product moved on), that phase is simply not reported. At exit the
phases, the end of the last RUN and this process's peak resident memory (VmHWM) go to the JSON
file named by ``$BENCH_PHASES``; with ``$BENCH_CPROFILE`` set, a cProfile of the command goes
to that file. Standard library only, apart from the product itself.
"""

from __future__ import annotations

import gc

# As builder's entry point does before its imports (builder/__main__.py): the probe's own imports
# are most of builder's first ones, and with the collector on they cost builder's build 2 %.
gc.disable()
import atexit
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

# The builder under test: as installed in the runner's venv, or a source tree named by $BENCH_BUILDER_SRC.
if source := os.environ.get("BENCH_BUILDER_SRC"):
    sys.path.insert(0, source)

START = time.monotonic()
PHASES: dict[str, float] = {}
COUNTS: dict[str, int] = {}
MARKS: dict[str, float] = {}

# (module, attribute path, phase): what each phase means is in bench/README.md. Hooks go in when
# their module is first imported, so that the probe imports nothing the command would not.
HOOKS: tuple[tuple[str, str, str], ...] = (
    ("builder.sandboxserver", "run_sandboxed", "run"),
    ("builder.executor", "run_copy", "copy"),
    ("builder.layer", "write_layer", "layer"),
    ("builder.executor", "StageExecutor._commit", "commit"),
    ("builder.executor", "StageExecutor._key", "cache_key"),
    ("builder.snapshot", "Snapshotter.ensure", "unpack"),
    ("builder.snapshot", "_mount_overlay", "mount"),
    ("builder.snapshot", "_unmount", "mount"),
    ("builder.build", "_store_image", "image"),
    ("builder.build", "_write_output", "export"),
    ("builder.build", "publish", "export"),
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


def _install(module: ModuleType) -> None:
    """Wrap the hooked functions of a module that has just been executed (a missing one: no phase)."""
    for name, path, phase in HOOKS:
        if name != module.__name__:
            continue
        *owners, attribute = path.split(".")
        owner: Any = module
        for part in owners:
            owner = getattr(owner, part, None)
        func = getattr(owner, attribute, None) if owner is not None else None
        if callable(func):
            setattr(owner, attribute, _wrap(func, phase))


class _HookFinder:
    """Finds the hooked modules through the other finders and hooks them once they have run
    (a meta path finder by protocol: importlib.abc would cost the measured command 2 ms)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in {name for name, _, _ in HOOKS}:
            return None
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if finder is not self else None
            if spec is not None and hasattr(spec.loader, "exec_module"):
                _hook_loader(spec.loader)
                return spec
        return None


def _hook_loader(loader: Any) -> None:
    execute = loader.exec_module

    def exec_module(module: ModuleType) -> None:
        execute(module)
        _install(module)

    loader.exec_module = exec_module


def install() -> None:
    sys.meta_path.insert(0, _HookFinder())


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


def main() -> None:
    install()
    if out := os.environ.get("BENCH_PHASES"):
        # The command ends the process itself (os._exit), after running the exit handlers.
        atexit.register(report, out)
    from builder import __main__ as command  # the console script's entry, with its gc settings

    profile_out = os.environ.get("BENCH_CPROFILE")
    if not profile_out:
        command.main(sys.argv[1:])
    import cProfile

    profiler = cProfile.Profile()
    atexit.register(profiler.dump_stats, profile_out)  # runs first: exit handlers run last-in first
    profiler.enable()
    command.main(sys.argv[1:])


if __name__ == "__main__":
    main()
