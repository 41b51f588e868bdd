"""Crash safety: builds killed with SIGKILL at random moments never damage the store.

After every kill ``check_store`` must find nothing wrong but the temp files of the dead build;
every few kills, and at the end, a normal build must succeed on that store with the digest a
clean store gives (SOURCE_DATE_EPOCH is set), after which ``builder check`` finds nothing at
all. The random moments come from a seed printed with any failure (set CRASH_SEED to replay).
``builder check`` itself is tested on a store damaged on purpose.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.check import check_store
from builder.store import Store
from tests.conftest import run_builder

pytestmark = pytest.mark.integration

EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}
KILLS_PER_STORE = 17  # three stores: at least 51 kills
CHECK_EVERY = 6  # kills between two verifying builds

DOCKERFILE = """\
FROM busybox:latest AS base
COPY data.txt /data/data.txt
RUN seq 1 60000 > /data/numbers && mkdir -p /data/dir && echo one > /data/dir/one && echo {token}
WORKDIR /work/deep/dir
RUN cp /data/numbers ./numbers && rm /etc/group && ln -s numbers link && echo {token}

FROM busybox:latest
ARG V=0
COPY --from=base /data /data
RUN echo "$V" > /v && wc -l /data/numbers > /count && echo {token}
ENV DONE=1
"""


def step_processes(token: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if token in cmdline and "pytest" not in cmdline:
            found.append(f"{cmdline} ({_state(entry)})")
    return found


def _state(process: Path) -> str:
    """State, parent and PID namespace ids of a process, for the failure message."""
    try:
        status = (process / "status").read_text().splitlines()
    except OSError:
        return "gone"
    return ", ".join(line for line in status if line.split(":")[0] in ("State", "PPid", "NSpid"))


def build_command(context: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "builder", "build", "-q", "-t", "crash:1", *args, str(context)]


def build(context: Path, root: Path, *args: str) -> str:
    """A build that must succeed; its manifest digest."""
    result = run_builder("build", "-q", "-t", "crash:1", *args, str(context), root=root, env=EPOCH)
    return result.stdout.strip()


def kill_at(command: list[str], root: Path, delay: float) -> bool:
    """Start a build, SIGKILL it after ``delay`` seconds; False when it finished first."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **EPOCH, "BUILDER_ROOT": str(root)},
    )
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True
    return False


def wait_until_gone(token: str, why: str) -> None:
    deadline = time.monotonic() + 15
    while step_processes(token) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert step_processes(token) == [], f"{why}: the step's processes outlived the killed build"


def check_after_kill(root: Path) -> tuple[list[str], bool]:
    """What check finds besides the temp files a killed build leaves (which the next removes),
    and whether there were such files: whether the kill came in the middle of the build."""
    problems = check_store(Store(root), repair=False).problems
    damage = [f"{p.path}: {p.message}" for p in problems if p.path.parent != root / "tmp"]
    return damage, len(damage) < len(problems)


@pytest.fixture
def crash_context(tmp_path: Path) -> tuple[Path, str]:
    token = f"crash-token-{random.randrange(10**9)}"
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE.format(token=token))
    (context / "data.txt").write_text("data\n" * 1000)
    return context, token


def fresh_store(tmp_path: Path, name: str, layout: Path) -> Path:
    root = tmp_path / name
    run_builder("load", f"oci:{layout}", "-t", "busybox:latest", root=root)
    return root


def test_sigkill_at_random_moments_never_damages_the_store(
    tmp_path: Path, busybox_layout: Path, crash_context: tuple[Path, str]
) -> None:
    context, token = crash_context
    seed = int(os.environ.get("CRASH_SEED") or time.time_ns() % 10**9)
    rng = random.Random(seed)
    reference_root = fresh_store(tmp_path, "reference", busybox_layout)
    expected = build(context, reference_root)
    started = time.monotonic()
    assert build(context, reference_root, "--no-cache") == expected
    duration = time.monotonic() - started  # of a build that runs every step

    kills = mid_build = 0
    for number in range(3):
        root = fresh_store(tmp_path, f"store-{number}", busybox_layout)
        for attempt in range(KILLS_PER_STORE * 3):
            flavour = rng.choice([("--no-cache",)] * 3 + [("--build-arg", f"V={attempt}")] * 2 + [()])
            delay = rng.uniform(0, duration * 1.1)
            why = f"seed {seed}, store {number}, kill after {delay:.3f}s of build {' '.join(flavour)}"
            if not kill_at(build_command(context, *flavour), root, delay):
                continue
            kills += 1
            wait_until_gone(token, why)
            damage, left_temp_files = check_after_kill(root)
            assert damage == [], why
            mid_build += left_temp_files
            if kills % CHECK_EVERY == 0 or kills == KILLS_PER_STORE * (number + 1):
                assert build(context, root) == expected, why
                report = run_builder("check", root=root, check=False)
                assert report.returncode == 0, f"{why}\n{report.stdout}{report.stderr}"
            if kills >= KILLS_PER_STORE * (number + 1):
                break
    assert kills >= 3 * KILLS_PER_STORE, f"seed {seed}: only {kills} builds were killed before they ended"
    # how many kills land while temp files exist depends on the machine's load: ask only for some
    assert mid_build >= 5, f"seed {seed}: only {mid_build} of {kills} kills came mid-build"


def test_concurrent_builds_and_a_check_share_one_store(store: Path, crash_context: tuple[Path, str]) -> None:
    """Builds on one store run side by side (as on a CI runner), a check waits for them."""
    context, _ = crash_context
    env = {**os.environ, **EPOCH, "BUILDER_ROOT": str(store)}
    commands = [
        build_command(context),
        build_command(context, "--no-cache"),
        build_command(context, "--build-arg", "V=1"),
        [sys.executable, "-m", "builder", "check"],
        build_command(context, "--build-arg", "V=2", "--no-cache"),
    ]
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for c in commands
    ]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * len(procs), [err for _, err in results]
    digests = [out.strip() for out, _ in results]
    assert digests[0] == digests[1] and len(set(digests[:3] + digests[4:])) == 3
    assert run_builder("check", root=store, check=False).returncode == 0


def test_check_finds_and_repairs_damage(tmp_path: Path, store: Path, busybox_layout: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM busybox:latest\nRUN echo one > /one\nRUN echo two > /two\n")
    expected = build(context, store)
    assert run_builder("check", root=store, check=False).returncode == 0

    config = json.loads(run_builder("inspect", "crash:1", root=store).stdout)["config"]
    records = sorted((store / "cache").glob("*.json"))
    layers = {json.loads(r.read_text())["layer"]["blob"]["digest"] for r in records}
    base_layer = json.loads(run_builder("inspect", "busybox:latest", root=store).stdout)["manifest"][
        "layers"
    ][0]
    corrupt = store / "blobs" / "sha256" / base_layer["digest"][7:]
    corrupt.write_bytes(corrupt.read_bytes()[:-10])  # the base image's layer: busybox is damaged
    records[0].write_text("{not json")  # a record a crash cannot make; check must still say so
    lost = {
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "digest": "sha256:" + "1" * 64,
        "size": 5,
    }
    layer = {"diff_id": config["rootfs"]["diff_ids"][-1], "blob": lost}
    (store / "cache" / ("0" * 64 + ".json")).write_text(json.dumps({"created": 0, "layer": layer}))
    stale = store / "tmp" / "build-stale"
    (stale / "mnt").mkdir(parents=True)
    (stale / ".lock").touch()
    (store / "tmp" / "blob-partial").write_bytes(b"half a blob")

    report = run_builder("check", root=store, check=False)
    assert report.returncode == 1
    tag_file = store / "tags" / "docker.io%2Flibrary%2Fbusybox%3Alatest"
    base_snapshot = store / "snapshots" / config["rootfs"]["diff_ids"][0][7:]
    problems = report.stdout.splitlines()
    for expected_problem in (
        f"problem: {corrupt}: the blob is corrupt",
        f"problem: {records[0]}: the cache record does not parse.",
        f"problem: {store / 'cache' / ('0' * 64 + '.json')}: the cached step's layer is lost",
        f"problem: {stale}: a build, load or pull that was killed left this behind.",
        f"problem: {store / 'tmp' / 'blob-partial'}: a build, load or pull that was killed left this behind.",
        f"problem: {tag_file}: the image docker.io/library/busybox:latest is damaged",
        f"problem: {base_snapshot}: no sound stored blob holds layer",
    ):
        assert any(line.startswith(expected_problem) for line in problems), (
            f"{expected_problem}\n{report.stdout}"
        )
    assert not any(digest[7:] in report.stdout for digest in layers), "a sound layer was reported"

    repaired = run_builder("check", "--repair", root=store, check=False)
    assert repaired.returncode == 1, "the damaged image cannot be repaired, only reported"
    assert [line for line in repaired.stdout.splitlines() if line.startswith("problem:")] == [
        line for line in problems if "busybox:latest is damaged" in line or "crash:1 is damaged" in line
    ]
    assert not corrupt.exists() and not stale.exists()

    run_builder("load", f"oci:{busybox_layout}", "-t", "busybox:latest", root=store)
    assert run_builder("check", root=store, check=False).returncode == 0
    assert build(context, store) == expected


def test_a_tag_is_renamed_into_place_between_the_store_sync_and_a_sync_of_its_directory(
    tmp_path: Path, store: Path
) -> None:
    """The order that makes a tag durable, and never ahead of what it reaches: the blobs are
    renamed in, the whole store is synced (the tag's bytes with it), then the tag is renamed
    into place and its directory synced: two flushes. Read from the build's system calls."""
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM busybox:latest\nRUN echo durable > /d\n")
    trace = tmp_path / "trace"
    calls = "syncfs,fsync,fdatasync,rename,renameat,renameat2"
    argv = ["strace", "-f", "-qq", "-o", str(trace), "-e", f"trace={calls}"]
    result = subprocess.run(
        [*argv, sys.executable, "-m", "builder", "build", "-t", "durable:1", str(context)],
        env={**os.environ, "BUILDER_ROOT": str(store)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    calls = [line.split(None, 1)[1] for line in trace.read_text().splitlines()]
    tag = next(i for i, call in enumerate(calls) if "/tags/" in call and call.startswith("rename"))
    last_blob = max(i for i, call in enumerate(calls) if "/blobs/sha256/" in call)
    syncs = [i for i, call in enumerate(calls) if call.startswith("syncfs")]
    sync = max(i for i in syncs if i < tag)
    assert last_blob < sync, calls
    flushes = [i for i, call in enumerate(calls) if call.startswith(("fsync", "fdatasync"))]
    assert not [i for i in flushes if sync < i < tag], "the tag's bytes were flushed again"
    assert [i for i in flushes if i > tag], calls
