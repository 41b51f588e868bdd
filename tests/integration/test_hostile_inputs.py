"""Hostile inputs, in the style of umoci's and containerd's breakout tables.

Every row builds for real with the CLI next to a marker directory on the host that the input
aims at: hostile ADD tars, context symlinks pointing out, COPY sources and destinations and
WORKDIRs climbing with ``..`` or through symlinks, and base images (written as OCI layouts and
loaded) whose layers carry ``../`` names, symlink escapes and hard links to host files. Each
row must leave the host untouched, and be either contained in the image (checked in its final
tree) or refused with one clear sentence and no traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import Result, run_builder
from tests.integration.layouts import Entry, base_tar, final_tree, make_layout, read_layers
from tests.unit import tartest
from tests.unit.tartest import directory, file, hardlink, symlink

pytestmark = pytest.mark.integration

UP = "../" * 24  # from any directory the builder works in, far enough to reach /
NOT_BELOW = "which is not a file this layer or the ones below it contain"
Tree = dict[str, Entry]


@dataclass(frozen=True)
class Case:
    """``{host}`` in any text is the marker directory's path without its leading slash."""

    id: str
    dockerfile: str
    files: dict[str, str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)  # context symlinks: name -> target
    tar: tuple[tartest.Entry, ...] = ()  # the context's evil.tar, for ADD
    base: tuple[tartest.Entry, ...] = ()  # a layer of the evil:1 image, on top of busybox
    refused: str = ""  # a part of the one-line error; empty: the build must succeed
    contained: Callable[[Tree, str], bool] = lambda tree, host: True


def _has(path: str) -> Callable[[Tree, str], bool]:
    return lambda tree, host: path.format(host=host) in tree


def _file_in(path: str, content: bytes) -> Callable[[Tree, str], bool]:
    return lambda tree, host: tree[path.format(host=host)].data == content


CASES = [
    # -- ADD of a hostile tar -----------------------------------------------------------------
    Case("tar-dotdot-name", "ADD evil.tar /dst/", tar=(file(UP + "{host}/pwned", b"x"),),
         contained=_file_in("dst/{host}/pwned", b"x")),
    Case("tar-absolute-name", "ADD evil.tar /dst/", tar=(file("/{host}/pwned", b"x"),),
         contained=_file_in("dst/{host}/pwned", b"x")),
    Case("tar-symlink-then-write-through", "ADD evil.tar /dst/",
         tar=(symlink("esc", "/{host}"), file("esc/pwned", b"x")), contained=_has("dst/{host}/pwned")),
    Case("tar-relative-symlink-then-write-through", "ADD evil.tar /dst/",
         tar=(symlink("up", UP), file("up/{host}/pwned", b"x")), contained=_has("dst/{host}/pwned")),
    Case("tar-symlink-over-a-directory-then-write", "ADD evil.tar /etc/",
         tar=(symlink("ssl", "/{host}"), file("ssl/secret", b"overwritten")),
         contained=_file_in("etc/{host}/secret", b"overwritten")),
    Case("tar-hardlink-climbing-out", "ADD evil.tar /dst/", tar=(hardlink("hl", UP + "{host}/secret"),),
         refused="is a hard link to"),
    Case("tar-hardlink-to-an-absolute-host-path", "ADD evil.tar /dst/",
         tar=(hardlink("hl", "/{host}/secret"),), refused=NOT_BELOW),
    Case("tar-hardlink-through-a-symlink", "ADD evil.tar /dst/",
         tar=(symlink("esc", "/{host}"), hardlink("hl", "esc/secret")),
         refused=NOT_BELOW),
    Case("tar-whiteout-climbing-out", "ADD evil.tar /dst/", tar=(file(UP + "{host}/.wh.secret"),)),
    Case("tar-replaces-the-root", "ADD evil.tar /dst/", tar=(file("."),),
         refused="would replace the root directory"),
    Case("tar-symlink-loop-in-parents", "ADD evil.tar /dst/",
         tar=(symlink("a", "b"), symlink("b", "a"), file("a/x")), refused="has a symlink loop"),
    Case("tar-device-node", "ADD evil.tar /dst/", tar=(tartest.char("null", 1, 3),),
         contained=_has("dst/null")),
    # -- the build context --------------------------------------------------------------------
    Case("context-absolute-symlink-source", "COPY escape /", links={"escape": "/{host}/secret"},
         refused="resolves outside the build context: escape is a symbolic link"),
    Case("context-relative-symlink-source", "COPY escape /", links={"escape": UP + "{host}/secret"},
         refused="resolves outside the build context: escape is a symbolic link"),
    Case("context-symlinked-directory-in-the-path", "COPY hostdir/secret /", links={"hostdir": "/{host}"},
         refused="resolves outside the build context: hostdir is a symbolic link"),
    Case("context-symlinked-directory-before-a-wildcard", "COPY hostdir/* /", links={"hostdir": "/{host}"},
         refused="resolves outside the build context: hostdir is a symbolic link"),
    Case("context-symlink-inside-a-copied-directory", "COPY dir /dir/", files={"dir/f": "f"},
         links={"dir/to-host": "/{host}/secret"},
         contained=lambda tree, host: tree["dir/to-host"].info.linkname == f"/{host}/secret"),
    Case("context-source-climbing-with-dotdot", "COPY " + UP + "{host}/secret /",
         refused="is not in the build context"),
    Case("context-parents-climbing-with-dotdot", "COPY --parents " + UP + "{host}/./secret /p/",
         refused="is not in the build context"),
    # -- destinations and WORKDIR -------------------------------------------------------------
    Case("dest-climbing-with-dotdot", "COPY f /" + UP + "{host}/pwned", files={"f": "f"},
         contained=_file_in("{host}/pwned", b"f")),
    Case("dest-through-an-absolute-symlink", "RUN ln -s /{host} /hostlink\nCOPY f /hostlink/pwned",
         files={"f": "f"}, contained=_has("{host}/pwned")),
    Case("dest-through-a-climbing-symlink", "RUN ln -s " + UP + " /up\nCOPY f /up/{host}/pwned",
         files={"f": "f"}, contained=_has("{host}/pwned")),
    Case("dest-is-a-symlink-to-a-host-file", "RUN mkdir -p /{host} && ln -s /{host}/secret /s\nCOPY f /s",
         files={"f": "f"}, contained=_file_in("s", b"f")),
    Case("workdir-climbing-with-dotdot", "WORKDIR /" + UP + "{host}/wd\nRUN touch here",
         contained=_has("{host}/wd/here")),
    Case("workdir-through-a-symlink", "RUN ln -s /{host} /h\nWORKDIR /h/wd\nRUN touch here",
         contained=_has("{host}/wd/here")),
    Case("chown-names-from-a-passwd-symlinked-to-the-host", "RUN ln -sf /{host}/passwd /etc/passwd\n"
         "COPY --chown=evil f /", files={"f": "f"}, refused="unable to find user 'evil'"),
    # -- base images ----------------------------------------------------------------------------
    Case("base-layer-dotdot-name", "RUN test -f /{host}/pwned", base=(file(UP + "{host}/pwned", b"x"),)),
    Case("base-layer-symlink-then-write-through", "RUN test -f /{host}/pwned",
         base=(symlink("esc", "/{host}"), file("esc/pwned", b"x"))),
    Case("base-layer-hardlink-to-a-host-file", "RUN true", base=(hardlink("hl", UP + "{host}/secret"),),
         refused="is a hard link to"),
    Case("base-layer-hardlink-to-an-absolute-host-path", "RUN true", base=(hardlink("hl", "/{host}/secret"),),
         refused=NOT_BELOW),
    Case("copy-from-an-image-through-its-escaping-symlink", "COPY --from=evil:1 /esc/secret /",
         base=(symlink("esc", "/{host}"),), refused="is not in that stage or image"),
]  # fmt: skip


def _fill(entry: tartest.Entry, host: str) -> tartest.Entry:
    name, link = entry.name.replace("{host}", host), entry.linkname.replace("{host}", host)
    return tartest.Entry(name, entry.type, entry.data, link, entry.mode, devmajor=entry.devmajor,
                         devminor=entry.devminor)  # fmt: skip


def _snapshot(top: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Everything about the marker tree a change would show: names, types, modes, times, bytes."""
    found = {}
    for path in [top, *sorted(top.rglob("*"))]:
        info = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        found[str(path)] = (info.st_mode, info.st_mtime_ns, info.st_nlink, data)
    return found


@pytest.fixture
def host(tmp_path: Path) -> Path:
    marker = tmp_path / "host"
    (marker / "sub").mkdir(parents=True)
    (marker / "secret").write_text("TOP SECRET\n")
    (marker / "passwd").write_text("evil:x:4242:4242::/:/bin/sh\n")
    return marker


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_input_is_contained_or_refused(
    case: Case, tmp_path: Path, store: Path, host: Path, busybox_layout: Path
) -> None:
    rel = str(host).lstrip("/")
    context = tmp_path / "context"
    context.mkdir()
    base = "evil:1" if case.base else "busybox:latest"
    (context / "Dockerfile").write_text(f"FROM {base}\n{case.dockerfile.replace('{host}', rel)}\n")
    for name, text in case.files.items():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text(text)
    for name, target in case.links.items():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target.replace("{host}", rel), context / name)
    if case.tar:
        (context / "evil.tar").write_bytes(tartest.build(*(_fill(e, rel) for e in case.tar)))
    before = _snapshot(host)
    result = _build(case, tmp_path, context, store, busybox_layout, rel)
    assert _snapshot(host) == before, "HOST PATH WAS CHANGED"
    assert not (tmp_path / "pwned").exists(), "HOST PATH WAS CHANGED"
    assert "Traceback" not in result.stderr
    if case.refused:
        error = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1, result.stderr
        assert error.startswith("error: ") and case.refused in error, error
        assert re.search(r"\.\s+[A-Z]", error) is None, f"not one sentence: {error}"
        return
    assert result.returncode == 0, result.stderr
    assert case.contained(final_tree(read_layers(tmp_path / "out", "1")), rel)


def _build(case: Case, tmp_path: Path, context: Path, store: Path, busybox: Path, rel: str) -> Result:
    if case.base:
        layer = tartest.build(directory("tmp", mode=0o1777), *(_fill(e, rel) for e in case.base))
        make_layout(tmp_path / "evil", [base_tar(busybox), layer])
        loaded = run_builder("load", f"oci:{tmp_path / 'evil'}", "-t", "evil:1", root=store, check=False)
        if loaded.returncode != 0:
            return loaded
    out = f"type=oci,dest={tmp_path / 'out'}"
    return run_builder("build", "-t", "hostile:1", "--output", out, str(context), root=store, check=False)
