"""The command: ``builder`` (its console script calls :func:`main`) and ``python -m builder``.

A command lives for one build, and most of its objects are its modules' own: classes, functions,
compiled patterns. A collection while they import finds no garbage but walks everything made so
far, and the interpreter's final collections at exit walk it all again: together about 12 ms of
a fully cached build. So collection is off while the modules import, and what they made is then
frozen out of every later collection. Importing ``builder.cli`` as a library changes nothing.

The command then ends the way the interpreter would, but for tearing its objects down one by
one, which nothing needs and which took about 5 ms of a build that ran a step: see :func:`main`.
"""

import gc

gc.disable()  # first: the imports below (typing among them) make objects too
import atexit
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

try:
    from builder import cli
finally:
    gc.freeze()
    gc.enable()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the command and end the process with its exit status: the exit handlers run (the
    sandbox server's shutdown is one) and the command has flushed its output, as at a normal
    exit, then ``os._exit``. An exception that escapes the command (a bug, or argparse's exit
    for ``--help`` and usage errors) ends the process the usual way."""
    code = cli.main(argv)
    atexit._run_exitfuncs()
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
