"""Ctrl-C and SIGTERM during a build, and a build killed outright.

An interrupted build stops the running step's whole process tree (the step below ignores the
signals and leaves a double-forked orphan behind, as badly behaved scripts do), unmounts
everything, removes its temp dirs and exits with 130. What a SIGKILLed build leaves behind, the
next build removes.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import run_builder
from tests.integration.conftest import processes

pytestmark = pytest.mark.integration

STARTED = "step-42"  # what the step prints once running; its source says "step-$((6 * 7))"


def stubborn_step(token: str) -> str:
    """A step that ignores stop signals and runs three sleeps, one an orphan of a subshell."""
    sleeps = f"sleep {token}"
    return (
        "FROM busybox:latest\n"
        f"RUN trap '' TERM INT HUP; {sleeps} & ({sleeps} &); echo \"step-$((6 * 7))\" >&2; {sleeps}; wait\n"
    )


class Build:
    """A build run as a user runs it, in a process group (a terminal's job) of its own."""

    def __init__(self, context: Path, root: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "builder", "build", *args, str(context)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "BUILDER_ROOT": str(root)},
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.lines:
            assert self.proc.poll() is None, f"the build ended early: {self.lines}"
            assert time.monotonic() < deadline, f"{text!r} never came: {self.lines}"
            time.sleep(0.02)

    def wait_for_lines(self, count: int, timeout: float = 30) -> None:
        """Until the build has printed ``count`` lines (or ended); 0 waits for nothing."""
        deadline = time.monotonic() + timeout
        while len(self.lines) < count and self.proc.poll() is None:
            assert time.monotonic() < deadline, f"the build printed only {self.lines}"
            time.sleep(0.002)

    def finish(self, timeout: float = 30) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hung build fails the test, and is not left running
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise
        self._reader.join(timeout=5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


def context(tmp_path: Path, dockerfile: str, name: str = "context") -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "Dockerfile").write_text(dockerfile)
    return path


def temp_entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "tmp").iterdir() if not p.name.endswith(".lock"))


def ctrl_c(build: Build) -> None:
    os.killpg(build.proc.pid, signal.SIGINT)  # what a terminal sends to the foreground job


def sigterm(build: Build) -> None:
    build.proc.send_signal(signal.SIGTERM)


def sigterm_twice(build: Build) -> None:
    build.proc.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    build.proc.send_signal(signal.SIGTERM)  # an impatient user: the cleanup must still finish


@pytest.mark.parametrize("interrupt", [ctrl_c, sigterm, sigterm_twice], ids=lambda f: f.__name__)
def test_interrupt_stops_the_step_and_cleans_up(
    tmp_path: Path, store: Path, token: str, interrupt: Callable[[Build], None]
) -> None:
    build = Build(context(tmp_path, stubborn_step(token)), store)
    build.wait_for(STARTED)
    assert len(processes(token)) >= 3, "the step runs its three sleeps"
    interrupt(build)
    assert build.finish() == 130
    assert build.lines[-1] == "interrupted", build.lines
    assert not any("Traceback" in line for line in build.lines), build.lines
    assert processes(token) == [], "the step's processes outlived the build"
    assert temp_entries(store) == []
    assert str(store) not in Path("/proc/self/mountinfo").read_text()


def test_a_killed_build_is_cleaned_up_by_the_next(tmp_path: Path, store: Path, token: str) -> None:
    build = Build(context(tmp_path, stubborn_step(token)), store)
    build.wait_for(STARTED)
    build.proc.kill()
    assert build.finish() == -signal.SIGKILL
    deadline = time.monotonic() + 15  # the sandbox learns of its parent's death and kills the step
    while processes(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes(token) == [], "the step's processes outlived the killed build"
    assert [name[:6] for name in temp_entries(store)] == ["build-"]

    report = run_builder("check", root=store, check=False)
    assert report.returncode == 1 and "killed left this behind" in report.stdout, report.stdout

    run_builder("build", str(context(tmp_path, "FROM busybox:latest\nRUN true\n", "next")), root=store)
    assert temp_entries(store) == []
    assert run_builder("check", root=store, check=False).returncode == 0


MANY_STEPS = """\
FROM busybox:latest AS base
RUN seq 1 30000 > /numbers && echo {token}
WORKDIR /work/dir
COPY Dockerfile /work/dir/
FROM busybox:latest
COPY --from=base /numbers /numbers
RUN wc -l /numbers > /count && echo {token}
"""


def test_interrupts_at_random_moments_always_clean_up(tmp_path: Path, store: Path, token: str) -> None:
    """SIGTERM anywhere in a build (while mount(8) runs, a layer is written, a stage is
    mounted for COPY --from...) ends in 130, never a traceback, and leaves nothing behind. The
    moment: a random line of the build's output, then up to 5 ms more (a step takes about 10 ms)."""
    seed = int(os.environ.get("INTERRUPT_SEED") or time.time_ns() % 10**9)
    rng = random.Random(seed)
    ctx = context(tmp_path, MANY_STEPS.format(token=token))
    timed = Build(ctx, store, "--no-cache")
    assert timed.finish() == 0
    interrupted = 0
    for attempt in range(12):
        line, delay = rng.randrange(1, len(timed.lines)), rng.uniform(0, 0.005)
        build = Build(ctx, store, *(["--no-cache"] if attempt % 4 else []))  # a cached build too
        build.wait_for_lines(line)
        time.sleep(delay)
        build.proc.send_signal(signal.SIGTERM)
        code = build.finish()
        why = f"seed {seed}, attempt {attempt}, SIGTERM {delay:.3f}s after line {line}: {build.lines}"
        # A signal that comes as Python exits, the image made, ends the process the plain way.
        finished = code == -signal.SIGTERM and build.lines[-1].startswith("image sha256:")
        assert code in (0, 130) or finished, why
        interrupted += code == 130
        assert not any("Traceback" in line for line in build.lines), why
        assert processes(token) == [] and temp_entries(store) == [], why
    assert interrupted >= 6, f"seed {seed}: only {interrupted} of 12 builds were interrupted"
    assert run_builder("check", root=store, check=False).returncode == 0
