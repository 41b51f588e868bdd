"""Run one RUN step's command in a sandbox whose root is switched onto the step's overlay.

Standard library only, and nothing imported from the builder package: it runs as a script, and
a failed step can be replayed by hand with the command line that ``SandboxSpec.describe()`` prints.

Processes, as root::

    parent: makes the mount-point stubs in the root, waits, removes them (``Sandbox``)
      └── init: PID 1 of a new PID namespace; own mount, UTS, IPC (and net) namespaces,
                mounts, pivot_root, exec

The parent is the builder's sandbox server (``builder.sandboxserver``), which starts every RUN of
a build; run as a one-shot script (a spec on stdin, in a file or as ``--json``), the script's own
process. One fork per step: the parent creates init straight into a new PID namespace, and init
unshares the rest itself. Every mount is in init's mount namespace, so the kernel removes them
all when init ends, killed or not; the parent keeps the host's view of the root, with nothing
mounted on top, so once init is gone it can remove the stubs it made there (/proc, /etc/hosts,
...) and the step's layer does not show them. Nothing is written outside the root: the
generated /etc files live on a tmpfs of init's own.

Exit status: the command's own, 128+N when a signal killed it, 126/127 when it cannot be executed
or found (as a shell does), and ``SETUP_FAILED`` (125) when the sandbox itself could not be set up.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import select
import signal
import stat
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any, NamedTuple, NoReturn

__all__ = [
    "SETUP_FAILED",
    "STOP_SIGNALS",
    "BindMount",
    "Sandbox",
    "SandboxSpec",
    "SetupError",
    "exit_status",
    "main",
    "set_parent_death_signal",
]


SETUP_FAILED = 125  # like `docker run`: the sandbox failed, not the command
_NOT_EXECUTABLE = 126
_NOT_FOUND = 127
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NETWORKS = ("host", "none")
_SCRIPT = os.path.abspath(__file__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # each ends a sandbox after its cleanup

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_CAPABILITY_VERSION_3 = 0x20080522
# What a step keeps, as under Docker and BuildKit: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL,
# SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD, AUDIT_WRITE, SETFCAP.
# Without SYS_ADMIN a step cannot mount, nor unmount the read-only /proc/sys to write kernel
# knobs; without NET_ADMIN it cannot reconfigure the host network it shares.
_KEPT_CAPABILITIES = frozenset({0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31})
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

# The host devices a build may use; bind-mounted over empty files in a fresh tmpfs /dev.
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = {"fd": "/proc/self/fd", "ptmx": "pts/ptmx"} | {
    name: f"/proc/self/fd/{fd}" for fd, name in enumerate(("stdin", "stdout", "stderr"))
}
_ETC_FILES = ("hosts", "resolv.conf", "hostname")
# Remounting a bind read-only must repeat the flags the kernel locks on the source mount.
_LOCKED_FLAGS = {
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: MS_NOATIME,
    os.ST_NODIRATIME: MS_NODIRATIME,
    os.ST_RELATIME: MS_RELATIME,
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.sethostname.argtypes = (ctypes.c_char_p, ctypes.c_size_t)
_libc.prctl.argtypes = (ctypes.c_int,) + (ctypes.c_ulong,) * 4


# The values below are named tuples, not dataclasses: this module is on the path of every RUN,
# and importing dataclasses (with inspect) and making a class with it cost 8 ms there.


class BindMount(NamedTuple):
    """A host path mounted into the container (``RUN --mount=type=bind|cache|secret``)."""

    source: str  # host path
    target: str  # absolute path inside the container
    readonly: bool = True


class SandboxSpec(NamedTuple):
    """Everything one sandboxed command needs; JSON-serialisable so the script can take it.
    It is checked (:meth:`checked`) where it is read: ``from_json``, as every spec arrives."""

    root: str  # host path of the merged overlay dir, already mounted by the caller
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # the complete environment, in order
    cwd: str = "/"  # inside the container; created (root-owned, 0755) if missing
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()  # supplementary groups
    hostname: str = "builder"
    network: str = "host"  # "host" | "none" (a new namespace with only lo, up)
    hosts: str = ""  # content of /etc/hosts; "" = localhost lines and the hostname
    resolv_conf: str = ""  # content of /etc/resolv.conf; "" = a copy of the host's
    binds: tuple[BindMount, ...] = ()

    def checked(self) -> SandboxSpec:
        """This spec, if every field is valid; else ValueError naming the first that is not."""
        texts = (self.root, self.cwd, self.hostname, self.network, self.hosts, self.resolv_conf)
        _expect(all(isinstance(text, str) for text in texts), "text fields must be strings")
        _expect(_is_abs(self.root) and _is_abs(self.cwd), "root and cwd must be absolute paths")
        _expect(_is_strings(self.argv) and bool(self.argv), "argv must be a non-empty string list")
        pairs = isinstance(self.env, tuple) and all(
            isinstance(pair, tuple) and len(pair) == 2 and _is_strings(pair) for pair in self.env
        )
        _expect(pairs, "env must be a list of [name, value] string pairs")
        names = [name for name, _ in self.env]
        _expect(all(name and "=" not in name for name in names), "env names must be non-empty, no '='")
        _expect(len(set(names)) == len(names), "env names must be unique")
        ids = isinstance(self.groups, tuple) and all(
            type(n) is int and n >= 0 for n in (self.uid, self.gid, *self.groups)
        )
        _expect(ids, "uid, gid and groups must be non-negative integers")
        _expect(0 < len(self.hostname.encode()) <= 64, "hostname must be 1 to 64 bytes")
        _expect(self.network in _NETWORKS, f"network must be one of {', '.join(_NETWORKS)}")
        binds = isinstance(self.binds, tuple)
        _expect(binds and all(isinstance(b, BindMount) for b in self.binds), "bad binds")
        for bind in self.binds:
            _expect(_is_abs(bind.source), f"bind source {bind.source!r} must be an absolute path")
            _expect(_is_abs(bind.target), f"bind target {bind.target!r} must be an absolute path")
            _expect(isinstance(bind.readonly, bool), "bind readonly must be true or false")
        return self

    def to_json(self) -> str:
        return json.dumps({**self._asdict(), "binds": [bind._asdict() for bind in self.binds]})

    @classmethod
    def from_json(cls, text: str) -> SandboxSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid sandbox spec: not JSON ({e}).") from None
        _expect(isinstance(data, dict), "the spec must be a JSON object")
        unknown = sorted(set(data) - set(cls._fields))
        _expect(not unknown, f"unknown fields {', '.join(unknown)}")
        # JSON has lists where the spec has tuples (and dicts where it has BindMounts).
        convert: dict[str, Callable[[list[Any]], object]]
        convert = {"argv": tuple, "groups": tuple, "env": _pairs, "binds": _bind_mounts}
        try:
            for name, to_tuple in convert.items():
                if isinstance(data.get(name), list):
                    data[name] = to_tuple(data[name])
            spec = cls(**data)
        except TypeError as e:
            raise ValueError(f"invalid sandbox spec: {e}.") from None
        return spec.checked()

    def describe(self) -> str:
        """A shell command line that replays this step by hand (as root, root still mounted)."""
        import shlex  # only a failed step needs it (start-up time of the server)

        return shlex.join([sys.executable or "python3", "-I", "-S", _SCRIPT, "--json", self.to_json()])


def main(argv: list[str]) -> int:
    """The script: read one spec (a file, ``-`` or ``--json SPEC``), run it, return its status.
    A stop signal kills the sandbox and unwinds through its cleanups; a setup failure is one
    line on stderr and 125."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a caller's mask survives exec
        # If the caller dies, SIGTERM (not SIGKILL) so this process still cleans up.
        parent = os.getppid()
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != parent:  # it died before the signal was asked for
            return 128 + signal.SIGTERM
        return _run(_read_spec(argv))
    except _Interrupted as e:
        return 128 + e.signum
    except (SetupError, ValueError) as e:
        print(f"sandbox: {e}", file=sys.stderr, flush=True)
        return SETUP_FAILED


class SetupError(Exception):
    """The sandbox could not be set up, or argv[0] not found or run (with a shell's status)."""

    def __init__(self, message: str, status: int = SETUP_FAILED) -> None:
        super().__init__(message)
        self.status = status


class Sandbox:
    """A spec made ready to start: its working directory and mount-point stubs made in the root
    (``close`` removes the stubs), and what init needs worked out before the fork: init is a
    copy of its parent, and every page of it that init writes costs a copy.

    Its parent, single-threaded, starts it, waits for init (its pidfd is readable once init and
    its whole PID namespace have ended), then closes it.
    """

    def __init__(self, spec: SandboxSpec) -> None:
        self.spec = spec
        if os.geteuid() != 0:
            raise SetupError("the sandbox needs root; rootless builds are not supported yet.")
        if not os.path.isdir(spec.root):
            raise SetupError(f"the root {spec.root} is not a directory.")
        if os.path.realpath(spec.root) == "/":
            raise SetupError("the root must not be the host's own root directory.")
        self._env = dict(spec.env)
        self._pivot_root = _pivot_root_syscall()
        os.umask(0o022)  # for the stubs and a missing working directory, as for the command
        self._stubs = _Stubs(spec.root)
        try:
            self._dropped = _capabilities_to_drop()
            self._etc_files = _etc_files(spec)
            _make_cwd(spec.root, spec.cwd)
            self._points = _make_mount_points(spec, self._stubs)
        except OSError as e:
            self._stubs.remove()
            raise SetupError(f"cannot prepare {e.filename or 'the sandbox'}: {e.strerror}.") from e
        except BaseException:
            self._stubs.remove()
            raise

    def start(self, stdout: int, stderr: int) -> int:
        """Fork init, PID 1 of a new PID namespace, with these as its stdout and stderr; return its
        PID (in the caller's namespace). Raises SetupError or OSError when it cannot."""
        # A pidfd of this process: to put the PID namespace for its children back to its own
        # after the fork, and for init to see whether this process died before init asked for
        # its parent-death signal.
        parent = os.pidfd_open(os.getpid())
        try:
            # Only the next child goes into the new namespace, as its PID 1; this process stays.
            _libc_check(_libc.unshare(CLONE_NEWPID), "cannot create a PID namespace")
            try:
                pid = os.fork()
                if pid == 0:
                    self._init(stdout, stderr, parent)
            finally:
                reset = _libc.setns(parent, CLONE_NEWPID)
            if reset != 0:  # the next child would go into this one's namespace: give up on both
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                _libc_check(reset, "cannot leave the new PID namespace")
        finally:
            os.close(parent)
        return pid

    def close(self) -> None:
        """Remove the stubs (once init has ended)."""
        self._stubs.remove()

    def _init(self, stdout: int, stderr: int, parent: int) -> NoReturn:
        """PID 1: set up the root, drop privileges, exec. Never returns into the caller's code."""
        status = SETUP_FAILED
        try:
            os.dup2(stdout, 1)
            os.dup2(stderr, 2)
            # Dispositions of the parent must not reach the command: SIG_IGN survives exec.
            for signum in (*STOP_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            set_parent_death_signal(signal.SIGKILL)
            if select.select([parent], [], [], 0)[0]:  # the parent died before the signal was set
                os._exit(128 + signal.SIGKILL)
            self._enter_root()
            self._exec_command()
        except SetupError as e:
            status = e.status
            _report(f"sandbox: {e}")
        except OSError as e:
            _report(f"sandbox: cannot set up the root: {e}.")
        except BaseException as e:  # a bug here must still end this process, never return
            _report(f"sandbox: unexpected error while setting up: {e!r}.")
        os._exit(status)

    def _enter_root(self) -> None:
        """In namespaces of its own, mount the API filesystems and switch root onto the spec's."""
        spec, points = self.spec, self._points
        network = CLONE_NEWNET if spec.network == "none" else 0
        namespaces = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | network
        _libc_check(_libc.unshare(namespaces), "cannot create namespaces")
        hostname = spec.hostname.encode()
        _libc_check(_libc.sethostname(hostname, len(hostname)), "cannot set the hostname")
        if network:
            _loopback_up()
        # Private first: nothing mounted from here on may propagate to the host.
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        # pivot_root needs the new root to be a mount point; a bind onto itself makes sure it is.
        _mount(spec.root, spec.root, None, MS_BIND | MS_REC)
        _remount(spec.root, MS_NODEV)  # a step may mknod (as under Docker), never open a host device
        _mount_etc_files(self._etc_files, points.etc, scratch=points.dev)
        _mount("proc", points.proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for name in ("sys", "sysrq-trigger"):  # kernel-wide knobs stay read-only, as in Docker
            path = os.path.join(points.proc, name)
            if os.path.exists(path):
                _bind(path, path, readonly=True)
        _mount_dev(points.dev)
        _mount("sysfs", points.sys, "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for bind, target in points.binds:
            # a target below /dev is on the fresh tmpfs there, which hides the stub made for it
            _ensure_mount_point(target, directory=os.path.isdir(bind.source))
            _bind(bind.source, target, readonly=bind.readonly)
        # Switch root the runc way: no bare chroot (escapable by root) and no stub directory. With
        # both arguments ".", the old root ends up stacked on the new one, at ".".
        os.chdir(spec.root)
        _libc_check(_libc.syscall(self._pivot_root, b".", b"."), f"cannot pivot_root to {spec.root}")
        _libc_check(_libc.umount2(b".", MNT_DETACH), "cannot detach the old root")
        os.chdir("/")

    def _exec_command(self) -> NoReturn:
        spec = self.spec
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        _drop_capabilities(self._dropped)
        os.setgroups(spec.groups)
        os.setgid(spec.gid)
        os.setuid(spec.uid)
        # A change of user or group clears the parent-death signal: ask for it again.
        set_parent_death_signal(signal.SIGKILL)
        os.umask(0o022)
        try:
            os.chdir(spec.cwd)
        except OSError as e:
            raise SetupError(f"cannot enter the working directory {spec.cwd}: {e.strerror}.") from e
        _exec(spec.argv, self._env)


class _Interrupted(BaseException):
    """A stop signal arrived before init existed: unwind through the cleanups and exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_init_pidfd: int | None = None  # set while init runs, so a stop signal can kill its namespace


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    if _init_pidfd is None:
        # The unwinding this starts removes the stubs: a second stop signal (a caller that
        # asks twice) must not cut that cleanup short.
        for stop in STOP_SIGNALS:
            signal.signal(stop, signal.SIG_IGN)
        raise _Interrupted(signum)
    # Killing PID 1 makes the kernel kill everything else in the PID namespace.
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(_init_pidfd, signal.SIGKILL)


def _read_spec(argv: list[str]) -> SandboxSpec:
    if len(argv) == 2 and argv[0] == "--json":
        return SandboxSpec.from_json(argv[1])
    if argv in ([], ["-"]):
        return SandboxSpec.from_json(sys.stdin.read())
    if len(argv) == 1 and not argv[0].startswith("-"):
        try:
            with open(argv[0], encoding="utf-8") as f:
                return SandboxSpec.from_json(f.read())
        except OSError as e:
            raise SetupError(f"cannot read the spec {argv[0]}: {e.strerror}.") from None
    raise SetupError("usage: sandbox.py SPEC_FILE | - | --json SPEC.")


def _run(spec: SandboxSpec) -> int:
    """Prepare, start init and wait for it; always remove the stubs."""
    global _init_pidfd
    sandbox = Sandbox(spec)
    try:
        # Blocked until the pidfd is known, so a stop signal cannot slip between fork and pidfd.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = sandbox.start(1, 2)
        except OSError as e:
            raise SetupError(f"cannot start the sandbox: {e.strerror}.") from e
        try:
            _init_pidfd = os.pidfd_open(pid)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            _, status = os.waitpid(pid, 0)
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
    finally:
        # Cleanup runs next and must not be cut short: a second stop signal is ignored.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if _init_pidfd is not None:
            os.close(_init_pidfd)
            _init_pidfd = None
        sandbox.close()
    return exit_status(os.waitstatus_to_exitcode(status))


def exit_status(code: int) -> int:
    """subprocess and waitstatus give -N for a signal; a shell says 128+N."""
    return 128 - code if code < 0 else code


def _report(line: str) -> None:
    """A line on stderr from init, unbuffered: the parent's sys.stderr buffer is not init's."""
    with contextlib.suppress(OSError):
        os.write(2, f"{line}\n".encode(errors="backslashreplace"))


def _mount_etc_files(files: dict[str, bytes], targets: dict[str, str], *, scratch: str) -> None:
    """Bind the generated /etc files read-only from a tmpfs of init's mount namespace, mounted on
    the directory ``scratch`` only while they are written: nothing on the host to clean up."""
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    _mount("tmpfs", scratch, "tmpfs", flags, "mode=755")
    for name, data in files.items():
        fd = os.open(os.path.join(scratch, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
    _mount(None, scratch, None, MS_REMOUNT | MS_RDONLY | flags)  # read-only for every bind of it
    for name, target in targets.items():
        _mount(os.path.join(scratch, name), target, None, MS_BIND)
    _libc_check(_libc.umount2(_c(scratch), 0), f"cannot unmount {scratch}")


def _mount_dev(dev: str) -> None:
    # nodev: the host devices bound below still open (a bind keeps its source's flags)
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NODEV | MS_STRICTATIME, "mode=755,size=65536k")
    for name in _DEVICES:
        node = os.path.join(dev, name)
        os.close(os.open(node, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
        _mount(f"/dev/{name}", node, None, MS_BIND)
    pts, shm = os.path.join(dev, "pts"), os.path.join(dev, "shm")
    os.mkdir(pts, 0o755)
    options = "newinstance,ptmxmode=0666,mode=0620,gid=5"
    _mount("devpts", pts, "devpts", MS_NOSUID | MS_NOEXEC, options)
    os.mkdir(shm, 0o755)
    _mount("shm", shm, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k")
    for name, target in _DEV_LINKS.items():
        os.symlink(target, os.path.join(dev, name))


def _pivot_root_syscall() -> ctypes.c_long:
    """glibc has no pivot_root() wrapper; the syscall number is per architecture."""
    machine = os.uname().machine
    number = _SYS_PIVOT_ROOT.get(machine)
    if number is None:
        raise SetupError(f"pivot_root is not known on {machine}.")
    return ctypes.c_long(number)


@functools.cache
def _capabilities_to_drop() -> tuple[int, ...]:
    """Every capability this kernel knows but _KEPT_CAPABILITIES."""
    with open("/proc/sys/kernel/cap_last_cap", "rb") as f:  # bytes: no codec to import (0.7 ms)
        last = int(f.read())
    return tuple(cap for cap in range(last + 1) if cap not in _KEPT_CAPABILITIES)


def _drop_capabilities(dropped: tuple[int, ...]) -> None:
    """Limit what the command can ever hold to _KEPT_CAPABILITIES: bounding, inheritable and
    ambient sets (exec gives root the bounding set, plus the inheritable one)."""
    for cap in dropped:
        _libc_check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"cannot drop capability {cap}")
    _libc_check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "cannot clear capabilities")
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    sets = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: bits 0-31, then 32-63
    _libc_check(_libc.capget(header, sets), "cannot read the capabilities")
    kept = sum(1 << cap for cap in _KEPT_CAPABILITIES)
    sets[2] &= kept & 0xFFFFFFFF
    sets[5] &= kept >> 32
    _libc_check(_libc.capset(header, sets), "cannot set the capabilities")


def _exec(argv: tuple[str, ...], env: dict[str, str]) -> NoReturn:
    """execvpe with the command's own PATH, failing like a shell: 127 not found, 126 not runnable."""
    name = argv[0]
    search = env.get("PATH", _DEFAULT_PATH)
    paths = [name] if "/" in name else [os.path.join(d or ".", name) for d in search.split(":")]
    unrunnable: OSError | None = None
    for path in paths:
        try:
            os.execve(path, argv, env)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:  # EACCES, ENOEXEC, ...: keep looking, as execvp does
            unrunnable = unrunnable or e
    if unrunnable is not None:
        raise SetupError(f"{name}: cannot execute: {unrunnable.strerror}.", _NOT_EXECUTABLE)
    where = "" if "/" in name else f" in PATH {search}"
    raise SetupError(f"{name}: command not found{where}.", _NOT_FOUND)


class _MountPoints(NamedTuple):
    """Host paths, inside the root, of everything init mounts on."""

    proc: str
    dev: str
    sys: str
    etc: dict[str, str]  # /etc file name -> host path
    binds: tuple[tuple[BindMount, str], ...]


def _ensure_mount_point(path: str, *, directory: bool) -> None:
    if os.path.lexists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if directory:
        os.mkdir(path)
    else:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def _make_mount_points(spec: SandboxSpec, stubs: _Stubs) -> _MountPoints:
    for bind in spec.binds:
        if not os.path.exists(bind.source):
            raise SetupError(f"the bind source {bind.source} does not exist.")
    return _MountPoints(
        proc=stubs.ensure("/proc", directory=True),
        dev=stubs.ensure("/dev", directory=True),
        sys=stubs.ensure("/sys", directory=True),
        etc={name: stubs.ensure(f"/etc/{name}", directory=False) for name in _ETC_FILES},
        binds=tuple((b, stubs.ensure(b.target, directory=os.path.isdir(b.source))) for b in spec.binds),
    )


class _Stubs:
    """Mount points created in the root for one run, removed afterwards so no layer shows them.

    Creating a stub also changes its parent directory's mtime, which would put a copied-up
    directory such as /etc into the layer; that mtime is restored unless the command changed the
    directory as well.

    File stubs after the first are hard links to it: the inode is the dear part of a stub (ext4
    without a journal searches past every inode freed in the last half minute for one to reuse:
    0.4 to 1 ms a stub during a build here), and a link allocates none.
    """

    def __init__(self, root: str) -> None:
        self._root = root
        self._created: list[str] = []  # parents before children
        self._times: dict[str, tuple[int, int]] = {}  # pre-existing parent -> (atime, mtime)
        self._mtime_after: dict[str, int] = {}  # its mtime once the stubs were in
        self._file: str | None = None  # the first file stub

    def ensure(self, path: str, *, directory: bool) -> str:
        """The host path of ``path`` in the root, created (with its parents) if missing."""
        host = _resolve_in_root(self._root, path)
        relative = os.path.relpath(host, self._root)
        parts = [] if relative == "." else relative.split(os.sep)
        current = self._root
        for index, part in enumerate(parts):
            parent, current = current, os.path.join(current, part)
            want_dir = directory or index < len(parts) - 1
            try:
                is_dir = stat.S_ISDIR(os.lstat(current).st_mode)
            except FileNotFoundError:
                self._create(parent, current, directory=want_dir)
                continue
            if is_dir != want_dir:
                kind = "a directory" if want_dir else "a file"
                raise SetupError(f"{path} in the root must be {kind} to mount on it.")
        return host

    def _create(self, parent: str, path: str, *, directory: bool) -> None:
        if parent not in self._created and parent not in self._times:
            st = os.stat(parent)
            self._times[parent] = (st.st_atime_ns, st.st_mtime_ns)
        if directory:
            os.mkdir(path, 0o755)
        else:
            self._make_file(path)
        self._created.append(path)
        if parent in self._times:
            self._mtime_after[parent] = os.stat(parent).st_mtime_ns

    def _make_file(self, path: str) -> None:
        if self._file is not None:
            try:
                os.link(self._file, path)
                return
            except OSError:  # on another file system than the first (something mounted in the root)
                pass
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        self._file = self._file or path

    def remove(self) -> None:
        """Remove the stubs, deepest first; keep any the command filled (they are content)."""
        untouched = [d for d, mtime in self._mtime_after.items() if _mtime(d) == mtime]
        for path in reversed(self._created):
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(path)
                elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    os.unlink(path)
        for directory in untouched:
            with contextlib.suppress(OSError):
                os.utime(directory, ns=self._times[directory], follow_symlinks=False)
        self._created.clear()


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _resolve_in_root(root: str, path: str) -> str:
    """The host path that ``path`` names inside root: symlinks are followed as if root were /,
    so an image's /etc/resolv.conf -> /run/... lands in the root, never on the host."""
    todo = [part for part in path.split("/") if part not in ("", ".")]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            done = done[:-1]
            continue
        current = os.path.join(root, *done, part)
        try:
            is_link = stat.S_ISLNK(os.lstat(current).st_mode)
        except FileNotFoundError:
            is_link = False
        except NotADirectoryError:
            raise SetupError(
                f"cannot resolve {path} in the root: /{'/'.join(done)} is not a directory."
            ) from None
        if not is_link:
            done.append(part)
            continue
        hops += 1
        if hops > 40:
            raise SetupError(f"cannot resolve {path} in the root: too many symbolic links.")
        target = os.readlink(current)
        if target.startswith("/"):
            done = []
        todo[:0] = [p for p in target.split("/") if p not in ("", ".")]
    return os.path.join(root, *done)


def _make_cwd(root: str, cwd: str) -> None:
    """Create a missing working directory as Docker does: root-owned, 0755, kept in the layer."""
    host = _resolve_in_root(root, cwd)
    if not os.path.isdir(host):
        try:
            os.makedirs(host, mode=0o755)
        except FileExistsError:
            raise SetupError(f"the working directory {cwd} is not a directory.") from None


def _etc_files(spec: SandboxSpec) -> dict[str, bytes]:
    """The content of /etc/hosts, resolv.conf and hostname, which init bind-mounts read-only."""
    resolv_conf = spec.resolv_conf
    if not resolv_conf:
        with contextlib.suppress(FileNotFoundError), open("/etc/resolv.conf", encoding="utf-8") as f:
            resolv_conf = f.read()
    hosts = spec.hosts or _default_hosts(spec.hostname)
    contents = {"hosts": hosts, "resolv.conf": resolv_conf, "hostname": spec.hostname + "\n"}
    return {name: contents[name].encode() for name in _ETC_FILES}


def _loopback_up() -> None:
    """ifconfig lo up: struct ifreq is a 16-byte name, then the flags (a short), 40 bytes in all."""
    import fcntl  # only network=none needs these (start-up time of every builder command)
    import socket
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("16sH22x", b"lo", 0)
            flags = struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
    except OSError as e:
        raise SetupError(f"cannot bring the loopback interface up: {e.strerror}.") from e


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    result = _libc.mount(_c(source), _c(target), _c(fstype), flags, _c(data or None))
    _libc_check(result, f"cannot mount {fstype or source} on {target}")


def _bind(source: str, target: str, *, readonly: bool) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    if readonly:  # MS_RDONLY is ignored on the first call; a bind goes read-only by a remount
        _remount(target, MS_RDONLY)


def _remount(target: str, flags: int) -> None:
    """Add ``flags`` to a bind mount, repeating those the kernel locks on it."""
    locked = os.statvfs(target).f_flag
    kept = sum(ms for st, ms in _LOCKED_FLAGS.items() if locked & st)
    _mount(None, target, None, MS_BIND | MS_REMOUNT | flags | kept)


def set_parent_death_signal(signum: int) -> None:
    _libc_check(_libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0), "cannot set the parent-death signal")


def _libc_check(result: int, what: str) -> None:
    if result != 0:
        raise SetupError(f"{what}: {os.strerror(ctypes.get_errno())}.")


def _c(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _default_hosts(hostname: str) -> str:
    return f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def _expect(condition: bool, problem: str) -> None:
    if not condition:
        raise ValueError(f"invalid sandbox spec: {problem}.")


def _is_abs(path: object) -> bool:
    return isinstance(path, str) and path.startswith("/")


def _is_strings(values: object) -> bool:
    return isinstance(values, tuple) and all(isinstance(v, str) for v in values)


def _pairs(values: list[object]) -> tuple[object, ...]:
    return tuple(tuple(v) if isinstance(v, list) else v for v in values)


def _bind_mounts(values: list[object]) -> tuple[object, ...]:
    return tuple(BindMount(**v) if isinstance(v, dict) else v for v in values)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
