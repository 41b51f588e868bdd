"""The builder's sandbox server, seen from outside: a build's RUN steps share one server, which
ends with the build, whether the build finishes or is killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SERVER_NAME = "sandbox-server\n"  # forked from the builder, it has its command line: named apart


def servers_of(parent: int) -> list[int]:
    """The sandbox servers whose parent is ``parent``."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            name = Path(f"/proc/{entry}/comm").read_text()
            ppid = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1]
        except OSError:
            continue
        if name == SERVER_NAME and int(ppid) == parent:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Running, or a zombie nobody reaps."""
    return Path(f"/proc/{pid}/stat").exists()


def start_build(
    tmp_path: Path, store: Path, dockerfile: str, name: str = "context"
) -> subprocess.Popen[bytes]:
    context = tmp_path / name
    context.mkdir()
    (context / "Dockerfile").write_text(dockerfile)
    return subprocess.Popen(
        [sys.executable, "-m", "builder", "build", "--no-cache", str(context)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "BUILDER_ROOT": str(store)},
    )


def wait_for_server(build: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 30
    while not (found := servers_of(build.pid)):
        assert build.poll() is None and time.monotonic() < deadline, "no server started"
        time.sleep(0.01)
    (server,) = found
    return server


def test_a_finished_build_stops_its_server(tmp_path: Path, store: Path) -> None:
    runs = "".join(f"RUN echo {n} > /file{n} && sleep 0.{n}\n" for n in range(1, 6))
    build = start_build(tmp_path, store, f"FROM busybox:latest\n{runs}")
    server = wait_for_server(build)
    assert build.wait(timeout=120) == 0
    assert not alive(server), "the server outlived its build"


def test_a_killed_build_leaves_no_server(tmp_path: Path, store: Path) -> None:
    build = start_build(tmp_path, store, "FROM busybox:latest\nRUN sleep 100\n")
    server = wait_for_server(build)
    build.send_signal(signal.SIGKILL)
    build.wait()
    deadline = time.monotonic() + 15
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(server), "the server outlived its killed build"
    # What the killed build left in the store, the next one removes (the store fixture checks).
    assert start_build(tmp_path, store, "FROM busybox:latest\nRUN true\n", "next").wait(timeout=120) == 0
