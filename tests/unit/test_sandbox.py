"""The RUN sandbox: the spec as a value, then the real thing on a busybox root (needs root), run
by the builder's sandbox server (forked from this process, or a new Python when it cannot be).

Each root test runs on an overlay mount (lower: static busybox; upper: what a layer would hold),
and checks afterwards that no mount, process or temp file is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest

from builder import sandbox, sandboxserver
from builder.sandbox import SETUP_FAILED, BindMount, SandboxSpec
from builder.sandboxserver import run_sandboxed

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "cat", "id", "hostname", "mount", "ps", "ip", "env", "sleep", "touch", "true")
PATH = (("PATH", "/bin"),)
REPO = Path(__file__).resolve().parents[2]
TOKEN = "SANDBOX_TEST_TOKEN"

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not BUSYBOX.exists(), reason="needs root and busybox-static"
)


# --- the spec as a value --------------------------------------------------------------------


def full_spec() -> SandboxSpec:
    return SandboxSpec(
        root="/var/lib/builder/merged/1",
        argv=("/bin/sh", "-c", "echo 'it''s' \"$HOME\" | tr a b"),
        env=(("PATH", "/usr/bin:/bin"), ("HOME", "/root"), ("EMPTY", "")),
        cwd="/src",
        uid=1000,
        gid=1000,
        groups=(27, 100),
        hostname="step",
        network="none",
        resolv_conf="nameserver 192.0.2.1\n",
        binds=(BindMount("/host/cache", "/root/.cache", readonly=False),),
    )


def test_spec_round_trips_through_json() -> None:
    spec = full_spec()
    assert SandboxSpec.from_json(spec.to_json()) == spec
    minimal = SandboxSpec(root="/r", argv=("true",), env=())
    assert SandboxSpec.from_json(minimal.to_json()) == minimal


def test_describe_round_trips_through_shlex() -> None:
    spec = full_spec()
    words = shlex.split(spec.describe())
    assert words[:5] == [sys.executable, "-I", "-S", sandbox.__file__, "--json"]
    assert SandboxSpec.from_json(words[5]) == spec


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"argv": ()}, "argv"),
        ({"argv": ["sh"]}, "argv"),
        ({"cwd": "src"}, "absolute"),
        ({"root": ""}, "absolute"),
        ({"network": "bridge"}, "network"),
        ({"env": (("A", "1"), ("A", "2"))}, "unique"),
        ({"env": (("A=B", "1"),)}, "="),
        ({"env": (("A",),)}, "pairs"),
        ({"uid": -1}, "non-negative"),
        ({"gid": True}, "non-negative"),
        ({"groups": (1, "2")}, "non-negative"),
        ({"hostname": "h" * 65}, "hostname"),
        ({"binds": ("/a",)}, "binds"),
    ],
)
def test_spec_rejects_bad_values(change: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=f"invalid sandbox spec: .*{problem}"):
        full_spec()._replace(**change).checked()


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[]",
        json.dumps({"root": "/r", "argv": ["true"], "env": [], "color": "red"}),
        json.dumps({"root": "/r", "argv": ["true"]}),
        json.dumps({"root": "/r", "argv": ["true"], "env": [], "binds": [{"src": "/a"}]}),
        json.dumps({"root": "/r", "argv": ["true"], "env": [], "binds": [{"source": "a", "target": "/a"}]}),
    ],
)
def test_from_json_rejects_bad_specs(text: str) -> None:
    with pytest.raises(ValueError, match="invalid sandbox spec"):
        SandboxSpec.from_json(text)


def test_script_reports_a_bad_spec_as_a_setup_failure() -> None:
    result = subprocess.run(
        [sys.executable, "-I", sandbox.__file__, "--json", "{"], capture_output=True, text=True
    )
    assert result.returncode == SETUP_FAILED
    assert result.stderr.startswith("sandbox: invalid sandbox spec: not JSON")
    assert result.stderr.count("\n") == 1


# --- the real thing -------------------------------------------------------------------------


@dataclass
class Result:
    status: int
    out: str
    err: str


@dataclass
class Rootfs:
    lower: Path
    upper: Path
    merged: Path
    tmp: Path  # TMPDIR of the server: must stay empty
    logs: Path
    token: str  # in the environment of every process of this test, and of no other

    def spec(self, *argv: str, **fields: object) -> SandboxSpec:
        fields.setdefault("env", (*PATH, (TOKEN, self.token)))
        return SandboxSpec(root=str(self.merged), argv=argv, **fields)  # type: ignore[arg-type]

    def run(self, *argv: str, **fields: object) -> Result:
        return self.run_spec(self.spec(*argv, **fields))

    def run_spec(self, spec: SandboxSpec) -> Result:
        out, err = self.logs / "out", self.logs / "err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            status = run_sandboxed(spec, stdout=stdout, stderr=stderr)
        return Result(status, out.read_text(), err.read_text())

    def processes(self, text: str = "", *, server: bool = False) -> list[int]:
        """This test's processes (by token: the commands, and a server started as a new Python
        with its children) whose command line contains text; not zombies, and not the sandbox
        server (which runs until the test ends) unless asked."""
        pids = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            ours = f"{TOKEN}={self.token}".encode() in environ and int(entry) != os.getpid()
            wanted = server or not _is_server(int(entry))
            if ours and wanted and cmdline and text.encode() in cmdline:
                pids.append(int(entry))
        return pids

    def upper_entries(self) -> list[str]:
        return sorted(str(p.relative_to(self.upper)) for p in self.upper.rglob("*"))


def _is_server(pid: int) -> bool:
    """A sandbox server, by its name (a forked one has the command line of its builder)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text() == "sandbox-server\n"
    except OSError:
        return False


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def servers_of(parent: int) -> list[int]:
    """The sandbox servers whose parent is ``parent``."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if _is_server(int(entry)) and int(_stat(int(entry))[1]) == parent:
                found.append(int(entry))
    return found


def in_sessions(sessions: list[int]) -> list[int]:
    """The processes of these sessions (a server starts one, and its requests stay in it), not
    zombies: once the server is gone, whatever it left is reaped by init."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            state, _, _, session = _stat(int(entry))[:4]
            if int(session) in sessions and state != "Z":
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Running, or a zombie nobody reaps."""
    return Path(f"/proc/{pid}").exists()


@contextlib.contextmanager
def mounted_rootfs(base: Path, token: str) -> Iterator[Rootfs]:
    """A busybox root on an overlay mount below base, mounted as the builder mounts a step's."""
    names = ("lower", "upper", "merged", "tmp", "logs")
    fs = Rootfs(**{name: base / name for name in names}, token=token)
    for path in (fs.lower / "bin", fs.upper, base / "work", fs.merged, fs.tmp, fs.logs):
        path.mkdir(parents=True)
    shutil.copy2(BUSYBOX, fs.lower / "bin/busybox")
    for applet in APPLETS:
        (fs.lower / "bin" / applet).symlink_to("busybox")
    (fs.lower / "lib").symlink_to("usr/lib")  # for the host's /usr, when a test binds it
    (fs.lower / "lib64").symlink_to("usr/lib64")
    dirs = f"lowerdir={fs.lower},upperdir={fs.upper},workdir={base / 'work'}"
    options = f"{dirs},index=off,redirect_dir=off,metacopy=off"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, fs.merged], check=True)
    try:
        yield fs
    finally:
        subprocess.run(["umount", fs.merged], check=True)


@pytest.fixture
def rootfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rootfs]:
    """A root, and a sandbox server of the test's own (it inherits TMPDIR and the token)."""
    with mounted_rootfs(tmp_path, uuid.uuid4().hex) as fs:
        monkeypatch.setenv("TMPDIR", str(fs.tmp))
        monkeypatch.setenv(TOKEN, fs.token)  # the server inherits it; commands get it from the spec
        try:
            yield fs
        finally:
            servers = servers_of(os.getpid())
            sandboxserver.shutdown()
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text(), "a mount leaked"
    assert list(fs.tmp.iterdir()) == [], "the sandbox wrote to the temp dir"
    assert not fs.processes(server=True), "a process was left behind"
    assert not [pid for pid in servers if alive(pid)], "the server was left behind (or a zombie)"
    assert not in_sessions(servers), "a process of the server was left behind"


def _wait_for(condition: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _in_background(rootfs: Rootfs, action: Callable[[], None]) -> Callable[[], None]:
    """Run action in a thread; the returned join() re-raises its failure. A failed action kills
    the test's processes, so the main thread is not left waiting on a command that never ends."""
    failures: list[BaseException] = []

    def target() -> None:
        try:
            action()
        except BaseException as e:
            failures.append(e)
            for pid in rootfs.processes():
                os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join() -> None:
        thread.join()
        if failures:
            raise failures[0]

    return join


@needs_root
@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_exit_status_passes_through(rootfs: Rootfs, code: int) -> None:
    assert rootfs.run("sh", "-c", f"exit {code}").status == code


@needs_root
def test_environment_is_exactly_the_spec(rootfs: Rootfs) -> None:
    env = (("PATH", "/bin"), ("B", "two words"), ("A", ""))
    assert rootfs.run("env", env=env).out == "PATH=/bin\nB=two words\nA=\n"


@needs_root
def test_stdin_is_dev_null(rootfs: Rootfs) -> None:
    result = rootfs.run("cat")
    assert (result.status, result.out) == (0, "")


@needs_root
def test_user_groups_and_a_created_working_directory(rootfs: Rootfs) -> None:
    result = rootfs.run("sh", "-c", "id; pwd", uid=1000, gid=1001, groups=(44, 27), cwd="/w/d")
    assert result.out == "uid=1000 gid=1001 groups=27,44\n/w/d\n"
    for path in (rootfs.upper / "w", rootfs.upper / "w/d"):  # kept, as Docker keeps WORKDIR
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o755)


@needs_root
def test_hostname_and_generated_etc_files(rootfs: Rootfs) -> None:
    script = "hostname; cat /etc/hostname /etc/hosts /etc/resolv.conf; echo x >/etc/hosts"
    result = rootfs.run("sh", "-c", script, hostname="step-3", resolv_conf="nameserver 192.0.2.1\n")
    hosts = "127.0.0.1\tlocalhost step-3\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    assert result.out == "step-3\nstep-3\n" + hosts + "nameserver 192.0.2.1\n"
    assert result.status != 0 and "Read-only file system" in result.err
    assert rootfs.run("cat", "/etc/hosts", hosts="192.0.2.7\tdb\n").out == "192.0.2.7\tdb\n"


@needs_root
def test_resolv_conf_defaults_to_the_hosts(rootfs: Rootfs) -> None:
    host = Path("/etc/resolv.conf").read_text() if Path("/etc/resolv.conf").exists() else ""
    assert rootfs.run("cat", "/etc/resolv.conf").out == host


@needs_root
def test_command_is_pid_1_and_host_processes_are_invisible(rootfs: Rootfs) -> None:
    lines = rootfs.run("sh", "-c", "echo $$; ls /proc").out.split()
    assert lines[0] == "1"
    assert {int(entry) for entry in lines[1:] if entry.isdigit()} <= {1, 2}


@needs_root
def test_api_filesystems(rootfs: Rootfs) -> None:
    script = (
        "ls /dev; echo ok >/dev/null; head -c 4 /dev/zero | wc -c;"
        " touch /sys/x 2>/dev/null || echo sys-ro; touch /proc/sys/x 2>/dev/null || echo proc-sys-ro;"
        " touch /dev/shm/x && echo shm-rw"
    )
    (rootfs.lower / "bin/head").symlink_to("busybox")
    (rootfs.lower / "bin/wc").symlink_to("busybox")
    words = rootfs.run("sh", "-c", script).out.split()
    devices = {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "ptmx", "fd"}
    assert devices <= set(words)
    assert words[-4:] == ["4", "sys-ro", "proc-sys-ro", "shm-rw"]


@needs_root
def test_network_none_has_only_loopback_and_it_is_up(rootfs: Rootfs) -> None:
    result = rootfs.run("sh", "-c", "ls /sys/class/net; cat /sys/class/net/lo/flags", network="none")
    names, flags = result.out.split()
    assert names == "lo" and int(flags, 16) & 1
    host = sorted(os.listdir("/sys/class/net"))
    assert rootfs.run("ls", "/sys/class/net").out.split() == host


ESCAPE = """
import os
os.mkdir("/x")
os.chroot("/x")  # root is now /x, while the working directory stays outside it
for _ in range(64):
    os.chdir("..")
os.chroot(".")
print(os.path.exists({marker!r}))
"""


@needs_root
def test_classic_chroot_escape_does_not_reach_the_host(rootfs: Rootfs, tmp_path: Path) -> None:
    marker = tmp_path / "host-marker"
    marker.touch()
    code = ESCAPE.format(marker=str(marker))
    result = rootfs.run("/usr/bin/python3", "-I", "-S", "-c", code, binds=(BindMount("/usr", "/usr"),))
    assert (result.status, result.err) == (0, "")
    assert result.out == "False\n", "HOST ROOT REACHED"


@needs_root
def test_the_escape_works_against_a_bare_chroot(rootfs: Rootfs, tmp_path: Path) -> None:
    """The control: the escape test above would notice an escape."""
    marker = tmp_path / "host-marker"
    marker.touch()
    (rootfs.merged / "usr").mkdir()
    python = f"python3 -I -S -c {shlex.quote(ESCAPE.format(marker=str(marker)))}"
    script = f"mount --bind /usr {rootfs.merged}/usr && chroot {rootfs.merged} {python}"
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    assert result.stdout == "True\n", result.stderr


@needs_root
def test_writing_through_proc_1_root_stays_in_the_root(rootfs: Rootfs, tmp_path: Path) -> None:
    marker = tmp_path / "host-marker"
    marker.touch()
    (rootfs.lower / "bin/mkdir").symlink_to("busybox")
    script = (
        f"test -e /proc/1/root{marker} && echo host-visible;"
        f" mkdir -p /proc/1/root{tmp_path} && echo pwned >/proc/1/root{tmp_path}/pwned"
    )
    result = rootfs.run("sh", "-c", script)
    assert (result.status, result.out) == (0, "")
    assert not (tmp_path / "pwned").exists(), "HOST PATH WAS CHANGED"
    assert (rootfs.merged / str(tmp_path)[1:] / "pwned").read_text() == "pwned\n"


@needs_root
def test_stubs_in_an_empty_root_leave_nothing_in_the_layer(rootfs: Rootfs) -> None:
    before = rootfs.merged.stat().st_mtime_ns
    data = rootfs.tmp.parent / "data"
    data.mkdir()
    result = rootfs.run("ls", "/proc/1", "/mnt/data", binds=(BindMount(str(data), "/mnt/data"),))
    assert result.status == 0, result.err
    assert rootfs.upper_entries() == []
    assert rootfs.merged.stat().st_mtime_ns == before


@needs_root
def test_pre_existing_mount_points_stay_and_symlinks_resolve_in_the_root(rootfs: Rootfs) -> None:
    etc = rootfs.lower / "etc"
    etc.mkdir()
    (etc / "hosts").write_text("mine\n")
    (etc / "resolv.conf").symlink_to("../run/resolv.conf")  # dangling, as in systemd images
    (rootfs.lower / "proc").mkdir()
    os.utime(etc, ns=(10**18, 10**18))
    result = rootfs.run("cat", "/etc/hosts", "/run/resolv.conf", resolv_conf="nameserver ::1\n")
    assert result.out.endswith("builder\n::1\tlocalhost ip6-localhost ip6-loopback\nnameserver ::1\n")
    assert (rootfs.merged / "etc/hosts").read_text() == "mine\n"
    assert (rootfs.merged / "proc").is_dir()
    assert rootfs.upper_entries() == ["etc"]  # copied up by the stub, then restored as it was
    assert (rootfs.merged / "etc").stat().st_mtime_ns == 10**18


@needs_root
def test_symlinked_mount_points_resolve_inside_the_root(rootfs: Rootfs, tmp_path: Path) -> None:
    host_etc, host_proc = tmp_path / "host-etc", tmp_path / "host-proc"
    host_etc.mkdir()
    host_proc.mkdir()
    (rootfs.lower / "etc").symlink_to(host_etc)  # absolute: means <root>/<host_etc>
    (rootfs.lower / "proc").symlink_to("../" * 20 + str(host_proc)[1:])  # ".." stops at the root
    result = rootfs.run("sh", "-c", "cat /etc/hostname; echo $$ >/dev/null; ls /proc/1/root/bin/sh")
    assert (result.status, result.out) == (0, "builder\n/proc/1/root/bin/sh\n")
    assert list(host_etc.iterdir()) == [] and list(host_proc.iterdir()) == [], "HOST PATH WAS CHANGED"
    assert rootfs.upper_entries() == []


@needs_root
def test_a_stub_parent_the_command_changed_keeps_its_new_mtime(rootfs: Rootfs) -> None:
    (rootfs.lower / "etc").mkdir()
    os.utime(rootfs.lower / "etc", ns=(10**18, 10**18))
    assert rootfs.run("touch", "/etc/new").status == 0
    assert rootfs.upper_entries() == ["etc", "etc/new"]
    assert (rootfs.merged / "etc").stat().st_mtime_ns != 10**18


@needs_root
def test_bind_mounts_read_only_and_read_write(rootfs: Rootfs, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in").write_text("from host\n")
    script = "cat /data/in; touch /data/out"
    result = rootfs.run("sh", "-c", script, binds=(BindMount(str(data), "/data"),))
    assert result.out == "from host\n" and "Read-only file system" in result.err
    bind = BindMount(str(data), "/data", readonly=False)
    assert rootfs.run("sh", "-c", script, binds=(bind,)).status == 0
    assert (data / "out").exists()
    assert rootfs.upper_entries() == []


@needs_root
def test_missing_and_unrunnable_commands_fail_like_a_shell(rootfs: Rootfs) -> None:
    missing = rootfs.run("no-such-command")
    assert missing.status == 127
    assert missing.err == "sandbox: no-such-command: command not found in PATH /bin.\n"
    (rootfs.lower / "bin/script").write_text("#!/bin/sh\n")
    assert rootfs.run("script").status == 126
    assert rootfs.run("/bin/nope").status == 127


@needs_root
def test_setup_failures_exit_125_with_one_sentence(rootfs: Rootfs, tmp_path: Path) -> None:
    spec = rootfs.spec("true")._replace(root=str(tmp_path / "missing"))
    result = rootfs.run_spec(spec)
    assert result.status == SETUP_FAILED
    assert result.err == f"sandbox: the root {tmp_path}/missing is not a directory.\n"
    (rootfs.lower / "dev").write_text("not a directory")
    result = rootfs.run("true")
    assert (result.status, result.err) == (
        125,
        "sandbox: /dev in the root must be a directory to mount on it.\n",
    )


@needs_root
def test_a_command_killed_by_a_signal_gives_128_plus_n(rootfs: Rootfs) -> None:
    seen: list[str] = []

    def kill_the_command() -> None:
        _wait_for(lambda: rootfs.processes("sleep 4243"))
        # The host sees only the overlay: the sandbox's mounts live in its own namespace.
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        seen.extend(line for line in mounts if str(rootfs.merged) in line)
        os.kill(rootfs.processes("sleep 4243")[0], signal.SIGKILL)

    join = _in_background(rootfs, kill_the_command)
    assert rootfs.run("sleep", "4243").status == 128 + signal.SIGKILL
    join()
    assert len(seen) == 1 and " overlay " in seen[0]


@needs_root
def test_an_interrupted_caller_leaves_no_process_behind(rootfs: Rootfs) -> None:
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def interrupt_main_thread() -> None:
        _wait_for(lambda: rootfs.processes("sleep 4244") and rootfs.processes("sleep 4245"))
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        join = _in_background(rootfs, interrupt_main_thread)
        with pytest.raises(KeyboardInterrupt):
            rootfs.run("sh", "-c", "sleep 4244 & sleep 4245")
        join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert rootfs.processes() == []
    assert rootfs.upper_entries() == []


@needs_root
def test_a_caller_killed_outright_leaves_nothing_behind(rootfs: Rootfs) -> None:
    spec_file = rootfs.logs / "spec.json"
    spec_file.write_text(rootfs.spec("sh", "-c", "sleep 4246 & sleep 4247").to_json())
    code = (
        "import sys; from builder import sandbox, sandboxserver as s;"
        " s.run_sandboxed(sandbox.SandboxSpec.from_json(open(sys.argv[1]).read()))"
    )
    caller = subprocess.Popen([sys.executable, "-c", code, spec_file], cwd=REPO)
    try:
        _wait_for(lambda: rootfs.processes("sleep 4246") and rootfs.processes("sleep 4247"))
        (server,) = servers_of(caller.pid)
    finally:
        caller.kill()
        caller.wait()
    # The server sees its control socket close (and gets SIGTERM as its parent-death signal): it
    # stops its child, which kills the tree and cleans up; then the server ends, no orphan left.
    _wait_for(lambda: not rootfs.processes(server=True) and not alive(server))
    assert not in_sessions([server])
    assert rootfs.upper_entries() == []


@needs_root
@pytest.mark.parametrize("uid", [0, 1000])  # a change of user clears the parent-death signal
def test_a_killed_server_takes_the_command_with_it(rootfs: Rootfs, uid: int) -> None:
    def kill_the_server() -> None:
        _wait_for(lambda: rootfs.processes("sleep 4248"))
        (command,) = rootfs.processes("sleep 4248")
        server = int(_stat(command)[1])  # the command is init, the server's child: one fork a run
        assert _is_server(server)
        os.kill(server, signal.SIGKILL)

    join = _in_background(rootfs, kill_the_server)
    result = rootfs.run("sleep", "4248", uid=uid, gid=uid)
    join()
    assert (result.status, result.err) == (
        SETUP_FAILED,
        "sandbox: the sandbox server ended while the step ran.\n",
    )
    _wait_for(lambda: not rootfs.processes("sleep 4248"))
    # SIGKILL gave it no chance to remove the stubs; the builder discards such a step anyway.


@needs_root
def test_describe_replays_the_step(rootfs: Rootfs) -> None:
    spec = rootfs.spec("sh", "-c", 'echo "it\'s $X"; exit 3', env=(("X", "a 'b'"),))
    result = subprocess.run(spec.describe(), shell=True, capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (3, "it's a 'b'\n")


@needs_root
def test_a_stopped_script_kills_the_command_and_removes_its_stubs(rootfs: Rootfs) -> None:
    spec_file = rootfs.logs / "spec.json"  # not on the command line, where processes() would see it
    spec_file.write_text(rootfs.spec("sh", "-c", "sleep 4251 & sleep 4252").to_json())
    script = subprocess.Popen([sys.executable, "-I", "-S", sandbox.__file__, spec_file])
    try:
        _wait_for(lambda: rootfs.processes("sleep 4251") and rootfs.processes("sleep 4252"))
        script.send_signal(signal.SIGTERM)
        assert script.wait(timeout=15) == 128 + signal.SIGKILL  # its init, killed with its namespace
    finally:
        script.kill()
        script.wait()
    assert rootfs.processes() == []
    assert rootfs.upper_entries() == []


@needs_root
def test_file_stubs_on_two_file_systems(rootfs: Rootfs) -> None:
    """The file stubs are hard links to the first where they can be; /etc/resolv.conf -> /run
    on a file system of its own cannot be one."""
    (rootfs.lower / "etc").mkdir()
    (rootfs.lower / "etc/resolv.conf").symlink_to("../run/resolv.conf")
    (rootfs.lower / "run").mkdir()
    run = rootfs.merged / "run"
    subprocess.run(["mount", "-t", "tmpfs", "run", run], check=True)
    try:
        result = rootfs.run("cat", "/etc/hostname", "/etc/resolv.conf", resolv_conf="nameserver ::1\n")
        assert (result.status, result.out) == (0, "builder\nnameserver ::1\n"), result.err
        assert list(run.iterdir()) == []
    finally:
        subprocess.run(["umount", run], check=True)
    assert rootfs.upper_entries() == ["etc"]  # copied up by the stubs, then restored as it was


@needs_root
def test_runs_from_several_threads_at_once(rootfs: Rootfs, tmp_path: Path) -> None:
    """The first run waits for a file that only the second makes: run one after the other, the
    first would give up after 10 s and exit 1."""
    shared = tmp_path / "shared"
    shared.mkdir()
    bind = (BindMount(str(shared), "/shared", readonly=False),)
    wait = "for i in $(seq 200); do [ -e /shared/go ] && break; sleep 0.05; done"
    results: dict[str, Result] = {}
    with mounted_rootfs(tmp_path / "second", rootfs.token) as second:

        def first() -> None:
            script = f"{wait}; [ -e /shared/go ] || exit 1; echo first; echo oops >&2; exit 3"
            results["first"] = rootfs.run("sh", "-c", script, binds=bind)

        join = _in_background(rootfs, first)
        _wait_for(lambda: rootfs.processes("sleep 0.05"))
        results["second"] = second.run("sh", "-c", "echo second; touch /shared/go; exit 4", binds=bind)
        join()
    assert results == {"first": Result(3, "first\n", "oops\n"), "second": Result(4, "second\n", "")}
    assert rootfs.upper_entries() == []


@needs_root
def test_stop_all_stops_a_run_in_another_thread_after_its_cleanup(rootfs: Rootfs) -> None:
    seen: list[object] = []

    def run() -> None:
        with pytest.raises(KeyboardInterrupt):
            rootfs.run("sh", "-c", "sleep 4249 & sleep 4250")
        seen.extend((rootfs.processes(), rootfs.upper_entries()))  # as the call raised

    join = _in_background(rootfs, run)
    _wait_for(lambda: rootfs.processes("sleep 4249") and rootfs.processes("sleep 4250"))
    sandboxserver.stop_all()
    join()
    assert seen == [[], []]


@needs_root
def test_a_mount_made_after_the_server_started_is_seen_by_later_runs(rootfs: Rootfs) -> None:
    """As the CLI does: a private mount namespace first, then the server (on the first run),
    then more mounts (the next step's overlay) that later sandboxes must see."""
    late = rootfs.merged / "late"
    late.mkdir()
    code = (
        "import subprocess, sys; from builder import sandbox, snapshot, sandboxserver as s\n"
        "snapshot.private_mount_namespace()\n"
        "assert s.run_sandboxed(sandbox.SandboxSpec.from_json(sys.argv[1])) == 0\n"
        "subprocess.run(['mount', '-t', 'tmpfs', 'late', sys.argv[2]], check=True)\n"
        "open(sys.argv[2] + '/file', 'w').write('mounted later\\n')\n"
        "sys.exit(s.run_sandboxed(sandbox.SandboxSpec.from_json(sys.argv[3])))\n"
    )
    first, second = rootfs.spec("true"), rootfs.spec("cat", "/late/file")
    args = [sys.executable, "-c", code, first.to_json(), str(late), second.to_json()]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "mounted later\n", "")
    assert str(late) not in Path("/proc/self/mountinfo").read_text()
    assert list(late.iterdir()) == []


@needs_root
def test_the_server_outlives_the_thread_that_started_it(rootfs: Rootfs) -> None:
    """PR_SET_PDEATHSIG fires when the thread that forked a process ends: a worker thread that
    made the first run and finished must not take the server with it."""
    first: list[int] = []
    worker = threading.Thread(target=lambda: first.append(rootfs.run("true").status))
    worker.start()
    worker.join()
    (server,) = servers_of(os.getpid())
    assert b"sandboxserver" in Path(f"/proc/{server}/cmdline").read_bytes()  # not forked: a thread ran
    time.sleep(0.2)  # a parent-death signal would have arrived by now
    assert (first, rootfs.run("sh", "-c", "exit 5").status) == ([0], 5)
    assert servers_of(os.getpid()) == [server]


@needs_root
def test_start_server_forks_it_from_the_main_thread(rootfs: Rootfs) -> None:
    assert os.listdir("/proc/self/task") == [str(os.getpid())], "the test runner has a thread"
    sandboxserver.start_server()
    _wait_for(lambda: servers_of(os.getpid()))  # named once it runs
    (server,) = servers_of(os.getpid())
    assert Path(f"/proc/{server}/cmdline").read_bytes() == Path("/proc/self/cmdline").read_bytes()
    assert _stat(server)[3] == str(server)  # a session of its own: Ctrl-C is for the builder
    sandboxserver.start_server()  # one server per process
    assert rootfs.run("sh", "-c", "exit 6").status == 6
    assert servers_of(os.getpid()) == [server]


FORKED = """
import atexit, os, sys
from builder import sandboxserver
read, write = os.pipe()
sys.stdout.write("buffered, ")  # to a pipe: flushed at exit, by this process only
atexit.register(lambda: sys.stdout.write("at exit"))
sandboxserver.start_server()
os.close(write)
assert os.read(read, 1) == b"", "the server holds a descriptor of the builder"
sandboxserver.shutdown()
"""


def test_a_forked_server_keeps_nothing_of_the_builder() -> None:
    """No descriptor (a pipe's reader would wait for the server), no buffer flushed twice, no
    atexit handler run twice; and reaped by shutdown."""
    result = subprocess.run(
        [sys.executable, "-c", FORKED], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "buffered, at exit", "")
