"""The command: ``builder`` (its console script calls :func:`main`) and ``python -m builder``.

A command lives for one build, and most of its objects are its modules' own: classes, functions,
compiled patterns. A collection while they import finds no garbage but walks everything made so
far, and the interpreter's final collections at exit walk it all again: together about 12 ms of
a fully cached build. So collection is off while the modules import, and what they made is then
frozen out of every later collection. Importing ``builder.cli`` as a library changes nothing.
A build that its shortcut answers (builder.shortcut) ends before ``builder.cli`` is loaded.

The command then ends the way the interpreter would, but for tearing its objects down one by
one, which nothing needs and which took about 5 ms of a build that ran a step: see :func:`main`.
"""

from __future__ import annotations

import gc

gc.disable()  # first: the imports below (typing among them) make objects too
import atexit
import contextlib
import errno
import os
import signal
import sys
from collections.abc import Sequence

from builder import shortcut

TYPE_CHECKING = False  # typing only for the type checker: a shortcut never loads it
if TYPE_CHECKING:
    from types import FrameType
    from typing import NoReturn


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the command and end the process with its exit status: the exit handlers run (the
    sandbox server's shutdown is one) and the command has flushed its output, as at a normal
    exit, then ``os._exit``. An exception that escapes the command (a bug, or argparse's exit
    for ``--help`` and usage errors) ends the process the usual way."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    code = _shortcut(arguments)
    if code is None:
        code = _run_cli(arguments)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):  # what a failed command printed before it failed
        with contextlib.suppress(OSError):
            stream.flush()
    os._exit(code)


def _shortcut(arguments: list[str]) -> int | None:
    """The exit status of a build its shortcut answered, or None: the command must run. Stopped
    as builder.cli stops a command: SIGTERM as Ctrl-C, ``interrupted`` and 130."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        answer = shortcut.run(arguments)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return None if answer is None else _print(answer)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _print(answer: shortcut.Answer) -> int:
    """What builder.cli prints for a build, and how it fails when the output cannot be written."""
    try:
        if answer.log:
            print("\n".join(answer.log), file=sys.stderr, flush=True)
        print(answer.image, flush=True)
    except OSError as exc:
        if exc.errno != errno.EPIPE:  # as builder.errors.OutputError
            print(f"error: cannot write the output: {exc.strerror or exc}.", file=sys.stderr)
        return 1
    return 0


def _run_cli(arguments: list[str]) -> int:
    try:
        from builder import cli
    finally:
        gc.freeze()
        gc.enable()
    return cli.main(arguments)


if __name__ == "__main__":
    main()
