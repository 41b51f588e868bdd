"""Independent stages build at once: faster, with the same image, the same cache behaviour, and
the same clean ending when one fails or the build is interrupted."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import run_builder
from tests.integration.conftest import processes
from tests.integration.test_interrupts import Build, context, temp_entries

pytestmark = pytest.mark.integration

EPOCH = "1700000000"


def stages(body: dict[str, str]) -> str:
    """One stage per name running its RUN on busybox, then a stage copying /out of each."""
    text = "".join(f"FROM busybox:latest AS {name}\nRUN {run}\n" for name, run in body.items())
    return text + "FROM busybox:latest\n" + "".join(f"COPY --from={name} /out /out/{name}\n" for name in body)


THREE = stages(
    {
        name: f"sleep 2 && mkdir /out && echo {name} > /out/{name} && seq 1 30000 > /out/r"
        for name in ("a", "b", "c")
    }
)


def image(stdout: str) -> str:
    return stdout.strip().splitlines()[-1]


def test_independent_stages_run_at_once(tmp_path: Path, store: Path) -> None:
    started = time.monotonic()
    result = run_builder("build", str(context(tmp_path, THREE)), root=store)
    elapsed = time.monotonic() - started
    lines = result.stderr.splitlines()
    runs = [i for i, line in enumerate(lines) if re.match(r"\[[abc] 1/1\] RUN .*\(not cached", line)]
    ends = [i for i, line in enumerate(lines) if re.match(r"\[[abc] 1/1\] done in", line)]
    assert len(runs) == len(ends) == 3, result.stderr
    assert max(runs) < min(ends), f"a stage waited for another:\n{result.stderr}"
    assert elapsed < 5.0, f"three 2 s stages took {elapsed:.1f} s: not in parallel"
    assert "(6 steps run)" in result.stderr


def test_a_stage_runs_its_steps_before_a_copy_from_a_stage_being_built(tmp_path: Path, store: Path) -> None:
    """As in BuildKit: a stage waits for the stage it copies from only when it reaches the COPY."""
    text = (
        "FROM busybox:latest AS slow\nRUN sleep 2 && mkdir /out && echo slow > /out/slow\n"
        "FROM busybox:latest\nRUN echo early > /early\nCOPY --from=slow /out /out\n"
    )
    result = run_builder("build", str(context(tmp_path, text)), root=store)
    lines = result.stderr.splitlines()
    early = [i for i, line in enumerate(lines) if line.startswith("[stage-1 1/2] done in")]
    slow = [i for i, line in enumerate(lines) if line.startswith("[slow 1/1] done in")]
    copy = [i for i, line in enumerate(lines) if line.startswith("[stage-1 2/2] COPY")]
    assert len(early) == len(slow) == len(copy) == 1, result.stderr
    assert early[0] < slow[0] < copy[0], f"the RUN before the COPY waited:\n{result.stderr}"


def test_the_image_does_not_depend_on_the_timing(tmp_path: Path, busybox_layout: Path) -> None:
    """Built in parallel twice, each time in a fresh store, and stage by stage (each stage alone,
    one after another, then the final stage on their cached results): one digest."""
    ctx = context(tmp_path, THREE)

    def fresh_store(name: str) -> Path:
        root = tmp_path / name
        run_builder("load", f"oci:{busybox_layout}", "-t", "busybox:latest", root=root)
        return root

    def build(root: Path, *args: str) -> str:
        return image(run_builder("build", "--source-date-epoch", EPOCH, *args, str(ctx), root=root).stdout)

    parallel = [build(fresh_store(name)) for name in ("first", "second")]
    sequential = fresh_store("sequential")
    for name in ("a", "b", "c"):
        build(sequential, "--target", name)
    assert parallel == [build(sequential)] * 2
    for root in (tmp_path / "first", tmp_path / "second", sequential):
        assert temp_entries(root) == []
    assert str(tmp_path) not in Path("/proc/mounts").read_text()


def test_a_step_two_stages_share_runs_once(tmp_path: Path, store: Path) -> None:
    """Two stages reaching one cache key at once: one runs it, the other waits and hits, as when
    they ran one after the other."""
    same = "sleep 1 && mkdir /out && echo same > /out/same"
    result = run_builder("build", str(context(tmp_path, stages({"x": same, "y": same}))), root=store)
    run = f"RUN /bin/sh -c {same}"
    assert result.stderr.count(f"{run}  (not cached") == 1, result.stderr
    assert result.stderr.count(f"{run}  CACHED") == 1, result.stderr
    assert "(3 steps run)" in result.stderr, result.stderr


def test_a_failing_stage_stops_the_others(tmp_path: Path, store: Path, token: str) -> None:
    dockerfile = stages({"slow": f"sleep {token}", "broken": "sleep 1 && exit 3"})
    started = time.monotonic()
    result = run_builder("build", str(context(tmp_path, dockerfile)), root=store, check=False)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: {tmp_path / 'context' / 'Dockerfile'}:4: RUN '/bin/sh -c sleep 1 && exit 3' "
        "exited with status 3."
    ), result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 10, f"the sleeping stage held the failed build for {elapsed:.1f} s"
    assert processes(token) == [], "the sleeping stage outlived the build"
    assert temp_entries(store) == []


def test_an_interrupt_stops_every_running_stage(tmp_path: Path, store: Path, token: str) -> None:
    """Ctrl-C while two stages run steps that ignore stop signals and leave orphans behind."""
    stubborn = "trap '' TERM INT HUP; sleep {t} & (sleep {t} &); echo {name}-$((6 * 7)) >&2; sleep {t}; wait"
    dockerfile = stages({name: stubborn.format(t=token, name=name) for name in ("a", "b")})
    build = Build(context(tmp_path, dockerfile), store)
    build.wait_for("a-42")
    build.wait_for("b-42")
    assert len(processes(token)) >= 6, "both steps run their three sleeps"
    os.killpg(build.proc.pid, signal.SIGINT)
    started = time.monotonic()
    assert build.finish() == 130
    assert time.monotonic() - started < 10
    assert build.lines[-1] == "interrupted", build.lines
    assert not any("Traceback" in line for line in build.lines), build.lines
    assert processes(token) == [], "a step's processes outlived the build"
    assert temp_entries(store) == []
