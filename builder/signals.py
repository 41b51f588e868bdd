"""Holding interrupts back while something must not be cut in half.

SIGINT and SIGTERM unwind a build as KeyboardInterrupt, which Python raises between any two
bytecodes: inside a cleanup (which then stops half done) or inside a library that holds a
lock at that moment (which then deadlocks on its next call). Such sections run with both
signals blocked; a signal that comes meanwhile is delivered, and raised, right after.

Python raises it in the main thread only, but the kernel hands a signal to any thread that
does not block it, and one taken by another thread is raised in the main thread at its next
bytecode, blocked there or not. So every thread the builder starts blocks both signals for
good: the main thread alone receives them, and holding them back there works.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

__all__ = ["deferred_signals", "leave_signals_to_main_thread"]

_STOP = frozenset({signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Block SIGINT and SIGTERM for the block's duration (in this thread, where Python runs its
    signal handlers when it is the main one)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def leave_signals_to_main_thread() -> None:
    """Block SIGINT and SIGTERM in this (worker) thread for the rest of its life. Processes it
    starts inherit the mask: a child that must see the signals unblocks them (the sandbox does)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP)
