"""A private Docker engine for the tests: Debian's dockerd (with its bundled BuildKit) on its own
data root, exec root, pid file and unix socket, with no bridge and no iptables, so it touches
nothing of the host's and nothing of another engine's.

``start_dockerd`` starts one and waits until it answers; ``Dockerd.stop`` ends it, unmounts what
it left mounted and removes its directories. The ``dockerd`` fixture is session scoped and is
started only by the tests that ask for it. An engine that cannot start FAILS the test with the
tail of dockerd's log: CI installs docker.io (.ci/setup), so a missing engine is a broken setup,
not a reason to skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["DOCKER", "DOCKERD", "Dockerd", "dockerd_fixture", "start_dockerd"]

DOCKER = "/usr/bin/docker"  # Debian's client, which matches the engine; /usr/local/bin may hold another
DOCKERD = "/usr/sbin/dockerd"
START_SECONDS = 60


@dataclass
class Dockerd:
    process: subprocess.Popen[bytes]
    data_root: Path
    exec_root: Path
    log: Path
    env: dict[str, str]  # the client's environment: DOCKER_HOST, DOCKER_BUILDKIT=1, DOCKER_CONFIG
    version: str = ""

    def docker(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the Docker client against this engine; fail with its output if ``check``."""
        proc = subprocess.run(
            [DOCKER, *args],
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def log_tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no dockerd log)"

    def _children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        with contextlib.suppress(OSError):
            return [int(pid) for pid in path.read_text().split()]
        return []

    def stop(self) -> None:
        """Stop dockerd (and the containerd it started), unmount its mounts, remove its dirs."""
        children = self._children()  # containerd, which dockerd starts in a session of its own
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                # dockerd runs in its own session; its process group is only what it started
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for pid in children:  # normally dockerd has stopped them already
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for root in (self.data_root, self.exec_root):
            _unmount_below(root)
            shutil.rmtree(root, ignore_errors=True)


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    targets = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].encode().decode("unicode_escape")
        if target == str(path) or target.startswith(prefix):
            targets.append(target)
    return targets


def _unmount_below(path: Path) -> None:
    for target in sorted(_mounts_below(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def start_dockerd(workdir: Path) -> Dockerd:
    """Start dockerd with its data root and client config under ``workdir``; fail the calling
    test with dockerd's log tail when it cannot start."""
    for tool in (DOCKER, DOCKERD):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} is not installed: .ci/setup installs docker.io.", pytrace=False)
    workdir.mkdir(parents=True, exist_ok=True)
    data_root = workdir / "data"
    # unix socket paths must stay under 108 bytes, containerd's below the exec root included
    exec_root = Path(tempfile.mkdtemp(prefix="dkx-", dir="/tmp"))
    sock = exec_root / "d.sock"
    log = workdir / "dockerd.log"
    config = workdir / "daemon.json"  # not the host's /etc/docker/daemon.json
    config.write_text("{}\n")
    argv = [
        DOCKERD,
        f"--config-file={config}",
        f"--data-root={data_root}",
        f"--exec-root={exec_root}",
        f"--pidfile={exec_root / 'dockerd.pid'}",
        f"--host=unix://{sock}",
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        "--storage-driver=overlay2",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(workdir),
        "DOCKER_HOST": f"unix://{sock}",
        "DOCKER_BUILDKIT": "1",
        "DOCKER_CONFIG": str(workdir / "client"),
    }
    engine = Dockerd(process, data_root, exec_root, log, env)
    deadline = time.monotonic() + START_SECONDS
    while True:
        probe = engine.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=30)
        if probe.returncode == 0:
            engine.version = probe.stdout.strip()
            return engine
        if process.poll() is not None or time.monotonic() > deadline:
            status = process.poll()
            engine.stop()
            why = f"exited with {status}" if status is not None else f"did not answer in {START_SECONDS} s"
            pytest.fail(f"dockerd {why}; the end of its log:\n{engine.log_tail()}", pytrace=False)
        time.sleep(0.3)


@pytest.fixture(scope="session", name="dockerd")
def dockerd_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """A private dockerd for the session; stopped and cleaned up even when tests fail."""
    engine = start_dockerd(tmp_path_factory.mktemp("dockerd"))
    try:
        yield engine
    finally:
        engine.stop()
        left = _mounts_below(engine.data_root) + _mounts_below(engine.exec_root)
        assert left == [], f"dockerd left mounts behind: {left}"
        assert engine.process.poll() is not None, "dockerd is still running"
