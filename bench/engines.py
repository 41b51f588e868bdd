"""The two builders under test, driven the same way: reset the cache, build, measure.

``BuilderEngine`` runs this checkout's builder (through ``probe.py``, which adds phase timings)
with a fresh store per cold run, copied from a template that already holds the unpacked base
image, as ``docker load`` leaves an engine. ``BuildKitEngine`` starts its own ``dockerd`` (Debian's
``docker.io``, which bundles BuildKit) on private directories and a private socket, loads the
same base image from a docker-archive made here, and a local ``docker-registry`` for the one
workload that needs a gzip export (dockerd's BuildKit has no OCI exporter; ``docker push`` is
its gzip path).

Every measurement: wall time of the client command; CPU time of all the processes doing the
work (the builder and its children; or dockerd, containerd and the registry, from
``/proc/PID/stat`` including reaped children, plus the client); peak resident memory of the
builder process (``VmHWM``) or of dockerd (``VmHWM`` after resetting it through ``clear_refs``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# The probe as a module, not a script: a script is compiled on every run, a module's bytecode is
# kept (about 1 % of a fully cached build). -P: the current directory stays off sys.path, so that
# the builder imported is the venv's, never a checkout's that the runner was started in.
PROBE = ("-P", "-c", f"import sys; sys.path.insert(0, {str(BENCH)!r}); import probe; probe.main()")
DOCKER = "/usr/bin/docker"  # Debian's client; /usr/local/bin/docker may be a bare client
DOCKERD = "/usr/sbin/dockerd"
REGISTRY = "/usr/bin/docker-registry"
_TICKS = os.sysconf("SC_CLK_TCK")


class EngineError(Exception):
    """A build or an engine command failed; the message says which and shows its output."""


@dataclass
class Sample:
    """One timed command: seconds of wall and CPU, peak memory in MiB, phases in seconds."""

    wall: float
    cpu: float
    peak_mib: float
    phases: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def plus(self, other: Sample) -> Sample:
        """Two commands one after the other (a build, then its push)."""
        phases = dict(self.phases)
        for name, value in other.phases.items():
            phases[name] = phases.get(name, 0.0) + value
        notes = {**self.notes, **other.notes}
        for name in ("other_cpu", "waited"):
            notes[name] = self.notes.get(name, 0.0) + other.notes.get(name, 0.0)
        return Sample(
            self.wall + other.wall, self.cpu + other.cpu, max(self.peak_mib, other.peak_mib), phases, notes
        )


@dataclass(frozen=True)
class _Measured:
    wall: float
    cpu: float  # of the command and its reaped children
    status: int
    busy: float  # CPU seconds the whole machine spent meanwhile, whoever spent them


def machine_busy() -> float:
    """CPU seconds all cores have been busy since boot (user, nice, system, irq, softirq, steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _TICKS


# Seconds to wait, before each timed command, for other work on the machine to calm down.
QUIET = {"wait": 0.0, "cores": 0.3}


def settle() -> float:
    """Write back every dirty page, then wait (at most ``QUIET["wait"]`` s) until the machine is
    nearly idle; the seconds waited.

    The sync keeps one command's writeback out of the next one's time: builder's syncfs before
    a tag, and dockerd's fsyncs, would otherwise write the pages of the previous build, of the
    other engine and of the reset (a store copied or pruned) too.
    """
    started = time.monotonic()
    os.sync()
    while time.monotonic() - started < QUIET["wait"]:
        before = machine_busy()
        time.sleep(1.0)
        if machine_busy() - before < QUIET["cores"]:
            break
    return time.monotonic() - started


def _run_measured(argv: Sequence[str], env: dict[str, str], log: Path) -> _Measured:
    """Run ``argv`` with its output appended to ``log``; its wall and CPU time, and the machine's."""
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        busy = machine_busy()
        started = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        busy = machine_busy() - busy
        proc.returncode = os.waitstatus_to_exitcode(status)
    return _Measured(wall, usage.ru_utime + usage.ru_stime, proc.returncode, busy)


def _tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _proc_cpu(pid: int) -> float:
    """utime + stime + reaped children's, in seconds (0 when the process is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / _TICKS


def _proc_hwm_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _reset_hwm(pid: int) -> None:
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].encode().decode("unicode_escape")
        if target.startswith(prefix) or target == str(path):
            found.append(target)
    return found


def unmount_all(path: Path) -> None:
    """Lazily unmount whatever a crashed run left below ``path``, deepest first."""
    for target in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def remove_tree(path: Path) -> None:
    if path.exists():
        unmount_all(path)
        shutil.rmtree(path, ignore_errors=True)


def builder_source(rev: str | None, workdir: Path) -> tuple[Path, str]:
    """The tree to measure and its name: REV exported with git archive, or the working tree."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    if rev is None:
        return REPO, (git("describe", "--always", "--dirty") or "(not a git checkout)") + " (working tree)"
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    if not commit:
        raise SystemExit(f"bench: {rev!r} is not a commit of {REPO}.")
    source = workdir / "source"
    source.mkdir()
    archive = subprocess.Popen(
        ["git", "-C", str(REPO), "archive", commit, "builder", "fixtures", "pyproject.toml", "README.md"],
        stdout=subprocess.PIPE,
    )
    subprocess.run(["tar", "-x", "-C", str(source)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise SystemExit(f"bench: git archive {commit} failed.")
    return source, f"{commit[:12]} ({git('log', '-1', '--format=%s', commit)[:60]})"


# -- builder -------------------------------------------------------------------------------------


class BuilderEngine:
    """This checkout's builder, one private store per cold run."""

    name = "builder"

    def __init__(self, workdir: Path, base_layout: Path, source: Path = REPO) -> None:
        self.workdir = workdir / "builder"
        self.base_layout = base_layout
        self.source = source  # the tree whose builder/ package is measured
        self.template = self.workdir / "template"
        self.root = self.workdir / "store"
        self.log = self.workdir / "log.txt"
        unwanted = ("BUILDER_ROOT", "SOURCE_DATE_EPOCH", "PYTHONDONTWRITEBYTECODE", "PYTHONPATH")
        self.env = {k: v for k, v in os.environ.items() if k not in unwanted}
        # builder as a user installs it (as pipx does): its own venv, a non-editable install with
        # its bytecode compiled; the probe runs on the venv's interpreter.
        self.venv = self.workdir / "venv"
        self.python = str(self.venv / "bin" / "python3")
        self.profile_dir: Path | None = None  # set to get a cProfile of each build (bench/profile)

    def describe(self, revision: str) -> str:
        return f"builder {revision} on Python {sys.version.split()[0]} (installed in a venv)"

    def setup(self) -> None:
        """The venv with builder installed; a template store with the base image loaded and its
        snapshot unpacked."""
        remove_tree(self.workdir)
        self.workdir.mkdir(parents=True)
        package = self.workdir / "package"  # a copy: installing writes build files into the tree
        shutil.copytree(
            self.source / "builder", package / "builder", ignore=shutil.ignore_patterns("__pycache__")
        )
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(self.source / name, package / name)
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
        subprocess.run(
            [self.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(package)],
            env=self.env,
            check=True,
        )
        self._cli("load", f"oci:{self.base_layout}", "-t", "busybox:latest", root=self.template)
        warm = self.workdir / "warm"
        warm.mkdir()
        (warm / "Dockerfile").write_text("FROM busybox:latest\nRUN true\n")
        self._cli("build", "-q", str(warm), root=self.template)
        shutil.rmtree(warm)

    def _cli(self, *args: str, root: Path) -> None:
        argv = [self.python, *PROBE, *args, "--root", str(root)]
        status = _run_measured(argv, self.env, self.log).status
        if status != 0:
            raise EngineError(f"builder {' '.join(args)} failed ({status}):\n{_tail(self.log)}")

    def reset(self) -> None:
        """A cold cache: a fresh copy of the template store (base image present, nothing built)."""
        remove_tree(self.root)
        subprocess.run(["cp", "-a", str(self.template), str(self.root)], check=True)

    def build(
        self,
        context: Path,
        *,
        tag: str,
        dockerfile: Path | None = None,
        target: str | None = None,
        oci_dest: Path | None = None,
        extra: Sequence[str] = (),
    ) -> Sample:
        phases_file = self.workdir / "phases.json"
        phases_file.unlink(missing_ok=True)
        argv = [self.python, *PROBE, "build", "-q", "--root", str(self.root), "-t", tag, *extra]
        if dockerfile is not None:
            argv += ["-f", str(dockerfile)]
        if target is not None:
            argv += ["--target", target]
        if oci_dest is not None:
            remove_tree(oci_dest)
            argv += ["--output", f"type=oci,dest={oci_dest}"]
        argv.append(str(context))
        env = {**self.env, "BENCH_PHASES": str(phases_file)}
        if self.profile_dir is not None:
            env["BENCH_CPROFILE"] = str(self.profile_dir / f"{tag.replace(':', '-')}.prof")
        waited = settle()
        measured = _run_measured(argv, env, self.log)
        if measured.status != 0:
            raise EngineError(f"builder build of {context} failed ({measured.status}):\n{_tail(self.log)}")
        report = json.loads(phases_file.read_text())
        sample = Sample(measured.wall, measured.cpu, report["peak_kib"] / 1024, dict(report["phases"]))
        sample.notes["other_cpu"] = max(0.0, measured.busy - measured.cpu)
        sample.notes["waited"] = waited
        sample.notes["marks"] = report["marks"]
        sample.notes["counts"] = report["counts"]
        if oci_dest is not None:
            sample.notes["layer_sizes"] = _oci_layer_sizes(oci_dest)
        return sample

    def close(self) -> None:
        remove_tree(self.workdir)


def _oci_layer_sizes(layout: Path) -> list[int]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
    return [int(layer["size"]) for layer in manifest["layers"]]


# -- BuildKit (dockerd) ----------------------------------------------------------------------------

_VERTEX = re.compile(r"^#(\d+) (\[.*?\] )?(.*)$")
_DONE = re.compile(r"^#(\d+) (DONE|CACHED)(?: ([\d.]+)s)?")
_EXPORTING = re.compile(r"^#\d+ exporting layers(?: ([\d.]+)s)? done")


def parse_progress(text: str) -> dict[str, float]:
    """Phase times from ``--progress plain``: RUN and COPY vertices, and the image export."""
    names: dict[str, str] = {}
    phases: dict[str, float] = {}
    for line in text.splitlines():
        if done := _DONE.match(line):
            name = names.get(done.group(1), "")
            seconds = float(done.group(3) or 0.0)
            kind = name.split(" ", 1)[0]
            if kind in ("RUN", "COPY", "ADD"):
                key = "run" if kind == "RUN" else "copy"
                phases[key] = phases.get(key, 0.0) + seconds
            elif name.startswith("exporting to image"):
                phases["export"] = phases.get("export", 0.0) + seconds
            elif name.startswith("[internal] load build context"):
                phases["context"] = phases.get("context", 0.0) + seconds
            continue
        if exporting := _EXPORTING.match(line):
            phases["export_layers"] = float(exporting.group(1) or 0.0)
            continue
        if (vertex := _VERTEX.match(line)) and vertex.group(1) not in names:
            text_part = vertex.group(3)
            if vertex.group(2) and vertex.group(2).startswith("[internal]"):
                text_part = vertex.group(2) + text_part
            names[vertex.group(1)] = text_part.strip()
    return phases


class BuildKitEngine:
    """dockerd with BuildKit on private directories; started and stopped by the runner."""

    name = "buildkit"

    def __init__(self, workdir: Path, base_layout: Path) -> None:
        self.workdir = workdir / "buildkit"
        self.base_layout = base_layout
        # unix sockets and containerd paths must stay short: exec-root lives directly in /tmp
        self.exec_root = Path(tempfile.mkdtemp(prefix="bkx-", dir="/tmp"))
        self.sock = self.exec_root / "d.sock"
        self.log = self.workdir / "log.txt"
        self.dockerd: subprocess.Popen[bytes] | None = None
        self.registry: subprocess.Popen[bytes] | None = None
        self.registry_addr = ""
        self.tags: set[str] = set()
        self.version = ""
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.workdir),
            "DOCKER_HOST": f"unix://{self.sock}",
            "DOCKER_BUILDKIT": "1",
            "DOCKER_CONFIG": str(self.workdir / "client"),
        }

    def describe(self) -> str:
        return self.version

    def setup(self) -> None:
        """Start dockerd and load the base image; EngineError says why it cannot run here."""
        for tool in (DOCKER, DOCKERD):
            if not os.access(tool, os.X_OK):
                raise EngineError(f"{tool} is not installed (apt-get install docker.io).")
        remove_tree(self.workdir)
        self.workdir.mkdir(parents=True)
        argv = [
            DOCKERD,
            f"--data-root={self.workdir / 'data'}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.exec_root / 'dockerd.pid'}",
            f"--host=unix://{self.sock}",
            "--iptables=false",
            "--bridge=none",  # builds use --network host, like builder's default
        ]
        with (self.workdir / "dockerd.log").open("wb") as out:
            self.dockerd = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while True:
            probe = subprocess.run(
                [DOCKER, "version", "--format", "{{.Server.Version}}"],
                env=self.env,
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0:
                self.version = f"dockerd {probe.stdout.strip()} (its bundled BuildKit)"
                break
            if self.dockerd.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / "dockerd.log").read_text(errors="replace").splitlines()[-15:]
                raise EngineError("dockerd did not start:\n" + "\n".join(log))
            time.sleep(0.5)
        archive = self.workdir / "busybox.tar"
        with archive.open("wb") as out:
            oci_to_docker_archive(self.base_layout, out, "busybox:latest")
        self._docker("load", "-i", str(archive))
        archive.unlink()

    def _docker(self, *args: str) -> str:
        result = subprocess.run([DOCKER, *args], env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise EngineError(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def _pids(self) -> list[int]:
        pids = []
        if self.dockerd is not None:
            pids.append(self.dockerd.pid)
            children = Path(f"/proc/{self.dockerd.pid}/task/{self.dockerd.pid}/children")
            with contextlib.suppress(OSError):
                pids += [int(p) for p in children.read_text().split()]  # containerd
        if self.registry is not None:
            pids.append(self.registry.pid)
        return pids

    def reset(self) -> None:
        """A cold cache: the built images removed and the whole build cache pruned."""
        if self.tags:
            subprocess.run(
                [DOCKER, "image", "rm", "-f", *sorted(self.tags)], env=self.env, capture_output=True
            )
            self.tags.clear()
        self._docker("builder", "prune", "-af")

    def _measured(self, argv: Sequence[str], log: Path) -> tuple[Sample, int]:
        pids = self._pids()
        assert self.dockerd is not None
        _reset_hwm(self.dockerd.pid)
        waited = settle()
        before = {pid: _proc_cpu(pid) for pid in pids}
        measured = _run_measured(argv, self.env, log)
        cpu = measured.cpu + sum(_proc_cpu(pid) - start for pid, start in before.items())
        peak = _proc_hwm_kib(self.dockerd.pid) / 1024
        sample = Sample(measured.wall, cpu, peak)
        sample.notes["other_cpu"] = max(0.0, measured.busy - cpu)
        sample.notes["waited"] = waited
        return sample, measured.status

    def build(
        self,
        context: Path,
        *,
        tag: str,
        dockerfile: Path | None = None,
        target: str | None = None,
        oci_dest: Path | None = None,
        extra: Sequence[str] = (),
    ) -> Sample:
        argv = [DOCKER, "build", "--network", "host", "--progress", "plain", "-t", tag, *extra]
        if dockerfile is not None:
            argv += ["-f", str(dockerfile)]
        if target is not None:
            argv += ["--target", target]
        argv.append(str(context))
        self.tags.add(tag)
        log = self.workdir / "build.txt"
        log.unlink(missing_ok=True)
        os.sync()
        sample, status = self._measured(argv, log)
        text = log.read_text(errors="replace")
        with self.log.open("a") as out:
            out.write(text)
        if status != 0:
            raise EngineError(f"docker build of {context} failed ({status}):\n{_tail(log)}")
        sample.phases = parse_progress(text)
        if oci_dest is not None:
            sample = sample.plus(self.push(tag))
        return sample

    def start_registry(self) -> None:
        if self.registry is not None:
            return
        if not os.access(REGISTRY, os.X_OK):
            raise EngineError(f"{REGISTRY} is not installed (apt-get install docker-registry).")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.registry_addr = f"127.0.0.1:{port}"
        config = self.workdir / "registry.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {self.workdir / 'registry'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.registry_addr}\n"
        )
        with (self.workdir / "registry.log").open("wb") as out:
            self.registry = subprocess.Popen(
                [REGISTRY, "serve", str(config)], stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.registry_addr}/v2/", timeout=2):
                    return
            except OSError:
                if self.registry.poll() is not None or time.monotonic() > deadline:
                    raise EngineError("docker-registry did not start; see registry.log.") from None
                time.sleep(0.2)

    def push(self, tag: str) -> Sample:
        """The gzip export: ``docker push`` to the local registry (gzip at Go's default level)."""
        self.start_registry()
        remote = f"{self.registry_addr}/bench/{tag.replace(':', '-')}:latest"
        self._docker("tag", tag, remote)
        self.tags.add(remote)
        log = self.workdir / "push.txt"
        log.unlink(missing_ok=True)
        os.sync()
        sample, status = self._measured([DOCKER, "push", remote], log)
        if status != 0:
            raise EngineError(f"docker push {remote} failed ({status}):\n{_tail(log)}")
        sample.phases = {"push": sample.wall}
        sample.notes["layer_sizes"] = self._remote_layer_sizes(remote)
        return sample

    def _remote_layer_sizes(self, remote: str) -> list[int]:
        _, _, rest = remote.partition("/")
        name, _, ref = rest.rpartition(":")
        request = urllib.request.Request(
            f"http://{self.registry_addr}/v2/{name}/manifests/{ref}",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        )
        with (
            contextlib.suppress(OSError, ValueError, KeyError),
            urllib.request.urlopen(request, timeout=10) as r,
        ):
            return [int(layer["size"]) for layer in json.load(r)["layers"]]
        return []

    def close(self) -> None:
        for proc in (self.registry, self.dockerd):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.registry = self.dockerd = None
        remove_tree(self.workdir)
        remove_tree(self.exec_root)


# -- a docker-archive of an OCI layout, for docker load ---------------------------------------------


def oci_to_docker_archive(layout: Path, out: io.BufferedIOBase, tag: str) -> None:
    """Write the layout's single image as a docker-archive (uncompressed layers) to ``out``."""
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_bytes())
    config = (blobs / manifest["config"]["digest"][7:]).read_bytes()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layers = []
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, config_name, config)
        for layer in manifest["layers"]:
            with tempfile.TemporaryFile() as plain:
                with (blobs / layer["digest"][7:]).open("rb") as blob:
                    reader = gzip.GzipFile(fileobj=blob) if layer["mediaType"].endswith("gzip") else blob
                    shutil.copyfileobj(reader, plain, 1 << 20)
                size = plain.tell()
                plain.seek(0)
                name = f"{layer['digest'][7:]}/layer.tar"
                info = tarfile.TarInfo(name)
                info.size = size
                tar.addfile(info, plain)
                layers.append(name)
        listing = [{"Config": config_name, "RepoTags": [tag], "Layers": layers}]
        _add_bytes(tar, "manifest.json", json.dumps(listing).encode())


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@contextlib.contextmanager
def engine_session(engine: BuilderEngine | BuildKitEngine) -> Iterator[None]:
    try:
        yield
    finally:
        engine.close()
