"""The builder's sandbox server: one per builder process, a child of it that starts each RUN
step as a ``builder.sandbox.Sandbox``, so that a step costs a fork, not a new Python.

Processes, as root::

    builder ── server (forked from the builder; named sandbox-server): stubs in, stubs out
                 └── init: PID 1 of the step's PID namespace, mounts, pivot_root, exec

A new Python per RUN cost about 60 ms. From the already started server, a ``RUN true`` takes
about 5 ms, one fork included (about 1.5 ms of it: copying its page tables, then a page fault
and a page copy for each page that the server or init writes first); forking the server from
the builder takes about 1, where a Python started for it took about 55. The builder sends each
request on the server's control socket: a socket of the request's own, which then carries the
spec to the server and the exit status back, and the command's stdout and stderr. Hanging up
that socket stops the request (its PID namespace is killed); the server ends when its control
socket closes or the builder dies.

The server is forked from the main thread of a builder that has no other thread yet (forking a
threaded process could copy a lock another thread holds); ``build`` starts it that way with
``start_server``. A process that asks for it later, from a thread or with threads running, starts
the server as a new Python instead (this module run with ``-c``), as slow as before.
"""

from __future__ import annotations

import _socket  # see _socketpair
import _thread
import atexit
import contextlib
import gc
import os
import select
import signal
import struct
import sys
import time
from collections.abc import Iterator
from types import FrameType
from typing import IO, Any, NoReturn

from builder.sandbox import (
    SETUP_FAILED,
    STOP_SIGNALS,
    Sandbox,
    SandboxSpec,
    SetupError,
    exit_status,
    set_parent_death_signal,
)

__all__ = ["run_sandboxed", "shutdown", "start_server", "stop_all"]

STOP_TIMEOUT = 10.0  # seconds a stopped sandbox gets to end (its processes killed) and be cleaned up
_NAME = b"sandbox-server"  # its name in ps and /proc/PID/comm (the command line is the builder's)
# The new Python of a server started from a thread: -I keeps the environment and the current
# directory off sys.path, so the directory that holds the builder package is added last.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BOOTSTRAP = (
    "import sys; sys.path.append(sys.argv[1]); from builder import sandboxserver as s; s._main(sys.argv[2:])"
)


def start_server() -> None:
    """Start this process's sandbox server now, unless one runs. Forked (about 1 ms) when called
    from the main thread of a process that has no other thread; otherwise, and for a caller that
    did not start one, run_sandboxed starts it as a new Python (about 55 ms)."""
    _server()


def run_sandboxed(
    spec: SandboxSpec,
    *,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
) -> int:
    """Run spec in a child of this process's sandbox server (started on first use) and return the
    exit status (128+signal when killed). Threads may call it at once: each call has a process of
    its own. stdout and stderr are descriptors or files; None is this process's.

    On any exception, KeyboardInterrupt included, the whole process tree is killed and the
    exception re-raised; a call that ``stop_all`` stopped raises KeyboardInterrupt. Either happens
    only once the sandbox has cleaned up (or failed to within STOP_TIMEOUT).
    """
    out, err = _fileno(stdout, 1), _fileno(stderr, 2)
    with _registered(_Request()) as request:
        try:
            request.send(_server(), spec, out, err)
            status = request.wait()
        except BaseException:
            request.stop()
            raise
    if request.stopped:
        raise KeyboardInterrupt
    if status is None:
        os.write(err, b"sandbox: the sandbox server ended while the step ran.\n")
        return SETUP_FAILED
    return status


def stop_all() -> None:
    """Stop every sandbox of this process that runs now, from any thread: each is killed with its
    whole PID namespace, and its run_sandboxed call raises KeyboardInterrupt in its own thread
    once the sandbox has cleaned up."""
    with _requests_lock:
        for request in _requests:
            request.stopped = True
            request.hang_up()


def shutdown() -> None:
    """Stop this process's sandbox server and wait for it to end; a later run_sandboxed call
    starts a new one. Also run at exit."""
    global _running
    with _server_lock:
        server, _running = _running, None
    if server is not None:
        server.close()


class _Request:
    """The builder's end of one request: a socket pair, the other end handed to the server.

    The server reads the spec from it and starts the sandbox; once that has ended and its stubs
    are removed, the server writes its exit status back. Shutting down our sending side asks the
    server to stop the sandbox.
    """

    def __init__(self) -> None:
        self.sock, self._theirs = _socketpair(_socket.SOCK_STREAM)
        self.stopped = False  # by stop_all

    def send(self, control: _socket.socket, spec: SandboxSpec, stdout: int, stderr: int) -> None:
        """A server that has gone shows later, as a request that ends without a status."""
        data = spec.to_json().encode()
        try:
            if self.stopped:  # by stop_all before it started: not started at all
                return
            with contextlib.suppress(ConnectionError):
                _send_fds(control, _REQUEST, [self._theirs.fileno(), stdout, stderr])
                self._theirs.close()  # the server has its own copy now
                self.sock.sendall(struct.pack("!I", len(data)) + data)
        finally:
            self._theirs.close()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, or None when the server hung up without sending one."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(4, _socket.MSG_WAITALL)
        return struct.unpack("!i", data)[0] if len(data) == 4 else None

    def hang_up(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(_socket.SHUT_WR)

    def stop(self) -> None:
        """Make the server stop the child and wait for it to clean up, a bounded time."""
        self.hang_up()
        with contextlib.suppress(OSError):  # TimeoutError included
            self.wait(STOP_TIMEOUT)

    def close(self) -> None:
        self.sock.close()
        self._theirs.close()


_REQUEST = b"run"  # the message that carries a request's descriptors on the control socket
_INT = struct.Struct("i")  # a descriptor, as SCM_RIGHTS carries it
# Plain locks from _thread: the server process does not need the threading module's start-up time.
_requests_lock = _thread.allocate_lock()
_requests: set[_Request] = set()  # running now, for stop_all
_server_lock = _thread.allocate_lock()
_running: _ForkedServer | _ScriptServer | None = None
_builder_streams: tuple[object, ...] = ()  # in a forked server: kept, never used
atexit.register(shutdown)  # a builder never leaves its server behind


@contextlib.contextmanager
def _registered(request: _Request) -> Iterator[_Request]:
    """Known to stop_all while it runs; closed only once stop_all can no longer reach it."""
    with _requests_lock:
        _requests.add(request)
    try:
        yield request
    finally:
        with _requests_lock:
            _requests.discard(request)
        request.close()


def _fileno(stream: int | IO[Any] | None, default: int) -> int:
    if stream is None:
        return default
    return stream if isinstance(stream, int) else stream.fileno()


# The sockets are the C module's, which the socket module wraps: importing that module costs
# about 3 ms (it makes enum classes of all its constants), a tenth of a build that runs one step.
# What this needs of it beyond the C module is its two helpers for passing descriptors, below.


def _socketpair(kind: int) -> tuple[_socket.socket, _socket.socket]:
    return _socket.socketpair(_socket.AF_UNIX, kind)


def _send_fds(sock: _socket.socket, message: bytes, fds: list[int]) -> None:
    """socket.send_fds: ``message`` with the descriptors ``fds`` attached."""
    rights = b"".join(_INT.pack(fd) for fd in fds)
    sock.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])


def _recv_fds(sock: _socket.socket, size: int, most: int) -> tuple[bytes, list[int]]:
    """socket.recv_fds: a message and the descriptors attached to it (close-on-exec)."""
    message, ancillary, _, _ = sock.recvmsg(
        size, _socket.CMSG_LEN(most * _INT.size), _socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += (fd for (fd,) in _INT.iter_unpack(data[: len(data) - len(data) % _INT.size]))
    return message, fds


def _server() -> _socket.socket:
    """The control socket of this process's server, started if none runs."""
    global _running
    with _server_lock:
        if _running is None or not _running.running():
            if _running is not None:
                _running.close()
                _running = None
            if _may_fork():
                # Held back until the server is known: an interrupt must not lose track of it.
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
                try:
                    _running = _ForkedServer()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            else:
                _running = _ScriptServer()
        return _running.control


def _may_fork() -> bool:
    """Whether this is the main thread (its id is the process's) and the process's only thread."""
    return _thread.get_native_id() == os.getpid() and len(os.listdir("/proc/self/task")) == 1


class _ForkedServer:
    """The server as a fork of this process: it has every module it needs already imported.

    Forked from the main thread, so its parent-death signal comes when the builder ends, and
    reaped here when it has ended (``running``) or after its control socket is hung up.
    """

    def __init__(self) -> None:
        self.control, theirs = _socketpair(_socket.SOCK_SEQPACKET)
        builder = os.getpid()
        try:
            self.pid = os.fork()
            if self.pid == 0:
                _forked_server(theirs, builder)
        except OSError:
            self.control.close()
            raise
        finally:
            theirs.close()
        self._ended = False

    def running(self) -> bool:
        if not self._ended:
            self._ended = os.waitpid(self.pid, os.WNOHANG)[0] != 0
        return not self._ended

    def close(self) -> None:
        """Hang up the control socket: the server stops its children, then ends."""
        with contextlib.suppress(OSError):
            self.control.shutdown(_socket.SHUT_RDWR)
        if not self._ended:
            with contextlib.suppress(ChildProcessError):  # reaped by someone else (SIGCHLD ignored)
                os.waitpid(self.pid, 0)
            self._ended = True
        self.control.close()


def _forked_server(control: _socket.socket, builder: int) -> NoReturn:
    """The forked server's process: nothing of the builder's but its memory, which it never hands
    back (no atexit handler, no buffer flushed, no finalizer run: it ends with os._exit)."""
    global _builder_streams
    status = 1
    _builder_streams = (sys.stdin, sys.stdout, sys.stderr)  # if freed, they would be flushed here
    try:
        gc.freeze()  # the builder's objects are never collected here, so none is finalized here
        fd = control.fileno()
        os.closerange(3, fd)
        os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        os.setsid()  # a terminal's Ctrl-C is the builder's alone: it stops the server
        _reset_signals()
        status = _serve(control, builder)
    except BaseException as e:  # a bug here must still end this process, never return
        with contextlib.suppress(OSError):
            os.write(2, f"sandbox: the sandbox server failed: {e!r}.\n".encode())
    os._exit(status)


def _reset_signals() -> None:
    """The dispositions of a new Python (SIGPIPE and SIGXFSZ ignored), the builder's handlers gone;
    the stop signals stay blocked until the server's own handlers are in."""
    signal.set_wakeup_fd(-1)
    for signum in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}:
        wanted = signal.SIG_IGN if signum in (signal.SIGPIPE, signal.SIGXFSZ) else signal.SIG_DFL
        if signal.getsignal(signum) is not wanted:
            with contextlib.suppress(OSError, ValueError):  # those glibc keeps for itself
                signal.signal(signum, wanted)
    signal.pthread_sigmask(signal.SIG_SETMASK, STOP_SIGNALS)


class _ScriptServer:
    """The server as a new Python, for a process that cannot fork it: its control socket, and a
    thread that starts the server and then waits for it (reaping it when it ends).

    The thread is there because PR_SET_PDEATHSIG fires when the *thread* that forked a process
    ends, not its process: a worker thread that started the server and then finished would kill
    it. Starting it with fork+exec (subprocess) is safe in a process that has threads.
    """

    def __init__(self) -> None:
        import threading

        self.control, theirs = _socketpair(_socket.SOCK_SEQPACKET)
        self._started = threading.Event()
        self._failure: OSError | None = None
        self._thread = threading.Thread(
            target=self._start_and_wait, args=(theirs,), name="sandbox-server", daemon=True
        )
        self._thread.start()
        self._started.wait()
        theirs.close()
        if self._failure is not None:
            self.control.close()
            raise self._failure

    def _start_and_wait(self, theirs: _socket.socket) -> None:
        import subprocess

        # Stop signals are the main thread's to take (it may hold them back for a while).
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        fd = theirs.fileno()
        try:
            # A new session keeps a terminal's Ctrl-C away from it: the builder alone stops it.
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, _PACKAGE_PARENT, str(fd), str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(fd,),
                start_new_session=True,
            )
        except OSError as e:
            self._failure = e
            return
        finally:
            self._started.set()
        proc.wait()

    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Hang up the control socket: the server stops its children, then ends."""
        with contextlib.suppress(OSError):
            self.control.shutdown(_socket.SHUT_RDWR)
        self._thread.join()
        self.control.close()


def _main(argv: list[str]) -> NoReturn:
    """The new Python of a _ScriptServer: ``CONTROL_FD BUILDER_PID``."""
    sys.exit(_serve(_socket.socket(fileno=int(argv[0])), int(argv[1])))


def _serve(control: _socket.socket, builder: int) -> int:
    """The server: a child per request until the control socket closes, the builder dies or a
    stop signal comes; then stop the children still running (they clean up) and end."""
    with open("/proc/self/comm", "wb") as comm:
        comm.write(_NAME)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by whoever started it
    children = _Children(control)
    try:
        set_parent_death_signal(signal.SIGTERM)  # a builder that died before this closed the socket
        if os.getppid() == builder:  # else it died before the signal was asked for
            children.serve()
    except _Stopped:
        pass
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        children.stop()
    return 0


class _Stopped(BaseException):
    """A stop signal came to the server: stop the children and end."""


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


class _Child:
    """One running sandbox of the server's (compared and hashed by identity)."""

    __slots__ = ("pid", "pidfd", "sandbox", "sock", "watched")

    def __init__(self, sandbox: Sandbox, pid: int, pidfd: int, sock: _socket.socket) -> None:
        self.sandbox = sandbox
        self.pid = pid  # of its init
        self.pidfd = pidfd  # readable once init and all its PID namespace have ended
        self.sock = sock  # the server's end of the request
        self.watched = True  # whether the poll set still has sock (it leaves on hang-up)


class _Children:
    """The server's running sandboxes, and what it polls: the control socket, each init's pidfd
    and each request socket (hung up when the builder gives up on the request)."""

    def __init__(self, control: _socket.socket) -> None:
        self._control = control
        self._poll = select.poll()
        self._poll.register(control, select.POLLIN)
        self._by_fd: dict[int, _Child] = {}  # by pidfd and by socket

    def serve(self) -> None:
        control = self._control.fileno()
        while True:
            # The control socket last: a sandbox that ended in this round has closed its
            # descriptors, and a new request may reuse their numbers.
            for fd, _ in sorted(self._poll.poll(), key=lambda event: event[0] == control):
                child = self._by_fd.get(fd)
                if fd == control and not self._accept():
                    return
                if child is not None and fd == child.pidfd:
                    self._finish(child)
                elif child is not None:
                    self._hang_up(child)

    def stop(self) -> None:
        """Kill every sandbox (its init: the kernel kills the rest of its PID namespace) and clean
        up each once it has ended; one that has not within STOP_TIMEOUT (stuck in the kernel) is
        left to end alone."""
        children = set(self._by_fd.values())
        for child in children:
            signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT
        for child in children:
            ended, _, _ = select.select([child.pidfd], [], [], max(0.0, deadline - time.monotonic()))
            if ended:
                self._finish(child)

    def _accept(self) -> bool:
        """Start the sandbox of the next request; False once the control socket has closed."""
        message, fds = _recv_fds(self._control, len(_REQUEST), 3)
        if not message:
            return False
        if message != _REQUEST or len(fds) != 3:  # not run_sandboxed's: nobody to answer
            for fd in fds:
                os.close(fd)
            return True
        sock = _socket.socket(fileno=fds[0])
        # Held back until the sandbox is registered: a stop signal must find it among those to
        # stop, with its stubs to remove.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._start(sock, fds[1], fds[2])
        finally:
            os.close(fds[1])
            os.close(fds[2])
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return True

    def _start(self, sock: _socket.socket, stdout: int, stderr: int) -> None:
        """Read the spec, prepare and start its sandbox; a failure is one line on the request's
        stderr and SETUP_FAILED."""
        try:
            sandbox = Sandbox(_receive_spec(sock))
            try:
                pid = sandbox.start(stdout, stderr)
            except BaseException:
                sandbox.close()
                raise
        except (SetupError, ValueError, OSError) as e:
            problem = f"cannot start the sandbox: {e.strerror or e}." if isinstance(e, OSError) else str(e)
            with contextlib.suppress(OSError):  # the builder may have gone
                os.write(stderr, f"sandbox: {problem}\n".encode())
            with contextlib.closing(sock), contextlib.suppress(OSError):
                sock.sendall(struct.pack("!i", SETUP_FAILED))
            return
        child = _Child(sandbox, pid, os.pidfd_open(pid), sock)
        self._by_fd[child.pidfd] = self._by_fd[sock.fileno()] = child
        self._poll.register(child.pidfd, select.POLLIN)
        self._poll.register(sock, select.POLLRDHUP)

    def _hang_up(self, child: _Child) -> None:
        """The builder gave up on the request: kill the sandbox; its status is sent once it has
        ended and its stubs are removed."""
        self._poll.unregister(child.sock)  # a hang-up stays readable: it would be seen again
        child.watched = False
        signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)

    def _finish(self, child: _Child) -> None:
        _, status = os.waitpid(child.pid, 0)
        child.sandbox.close()  # before the status: the builder finds the root as it was
        with contextlib.suppress(OSError):  # the builder may have gone
            child.sock.sendall(struct.pack("!i", exit_status(os.waitstatus_to_exitcode(status))))
        self._poll.unregister(child.pidfd)
        if child.watched:
            self._poll.unregister(child.sock)
        del self._by_fd[child.pidfd], self._by_fd[child.sock.fileno()]
        os.close(child.pidfd)
        child.sock.close()


def _receive_spec(sock: _socket.socket) -> SandboxSpec:
    """The spec from the builder: its length in 4 bytes, then the JSON."""
    (size,) = struct.unpack("!I", _receive_exactly(sock, 4))
    return SandboxSpec.from_json(_receive_exactly(sock, size).decode())


def _receive_exactly(sock: _socket.socket, size: int) -> bytes:
    data = sock.recv(size, _socket.MSG_WAITALL)
    if len(data) != size:
        raise SetupError("the builder hung up before it sent the whole spec.")
    return data
