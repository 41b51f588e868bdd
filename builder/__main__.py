"""The command: ``builder`` (its console script calls :func:`main`) and ``python -m builder``.

A command lives for one build, and most of its objects are its modules' own: classes, functions,
compiled patterns. A collection while they import finds no garbage but walks everything made so
far, and the interpreter's final collections at exit walk it all again: together about 12 ms of
a fully cached build. So collection is off while the modules import, and what they made is then
frozen out of every later collection. Importing ``builder.cli`` as a library changes nothing.
"""

import gc
from collections.abc import Sequence

gc.disable()
try:
    from builder import cli
finally:
    gc.freeze()
    gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
