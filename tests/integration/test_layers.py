"""Layers that are right: each case is built with the CLI; every layer's entries are checked.

File-system changes made by RUN (whiteouts, opaque directories, renames, metadata-only
changes, links, odd file types and names), what must never be in a layer (the sandbox's mount
stubs, files only copied up), the layer limit, and every COPY and ADD rule of the Dockerfile
reference. The final trees are modelled from the layers as the OCI spec says a consumer applies
them. The differential run against BuildKit is tests/integration/test_docker_engine.py.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import http.server
import io
import lzma
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import zstandard

from tests.conftest import read_config, run_builder
from tests.integration.layouts import Layer, base_tar, build, final_tree, make_layout

pytestmark = pytest.mark.integration

Files = dict[str, str | bytes]


def _context(tmp_path: Path, dockerfile: str, files: Files | None = None) -> Path:
    context = tmp_path / "context"
    context.mkdir(exist_ok=True)
    (context / "Dockerfile").write_text(dockerfile)
    for name, content in (files or {}).items():
        path = context / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return context


def _build(
    tmp_path: Path, store: Path, dockerfile: str, files: Files | None = None, *args: str
) -> list[Layer]:
    return build(_context(tmp_path, dockerfile, files), store, tmp_path / "out", *args)


def _names(layer: Layer) -> list[str]:
    return list(layer)


def _history(tmp_path: Path) -> list[tuple[str, bool]]:
    config = read_config(tmp_path / "out", "1")
    return [(h["created_by"], h.get("empty_layer", False)) for h in config["history"][1:]]


# -- what RUN changes ---------------------------------------------------------------------------


def test_deletions_renames_and_opaque_directories(tmp_path: Path, store: Path) -> None:
    dockerfile = """\
FROM busybox:latest
RUN mkdir -p /d/sub && touch /d/a /d/sub/b
RUN rm -rf /d && mkdir /d && touch /d/c
RUN rm /etc/group
RUN mv /etc/passwd /etc/passwd2
RUN mv /d /e
"""
    layers = _build(tmp_path, store, dockerfile)
    assert [_names(layer) for layer in layers[1:]] == [
        ["d/", "d/a", "d/sub/", "d/sub/b"],
        ["d/", "d/.wh..wh..opq", "d/c"],
        ["etc/", "etc/.wh.group"],
        ["etc/", "etc/.wh.passwd", "etc/passwd2"],
        [".wh.d", "e/", "e/c"],
    ]
    marker = layers[2]["d/.wh..wh..opq"].info
    assert (marker.isreg(), marker.size, marker.mode) == (True, 0, 0)
    tree = final_tree(layers)
    assert "d" not in tree and "e/c" in tree and "e/a" not in tree and "e/sub" not in tree
    assert "etc/group" not in tree and "etc/passwd" not in tree
    assert tree["etc/passwd2"].data.startswith(b"root:x:0:0:")


def test_metadata_only_changes_carry_the_file(tmp_path: Path, store: Path) -> None:
    dockerfile = """\
FROM busybox:latest
RUN chmod 600 /etc/passwd
RUN chown 1000:10 /etc/group
RUN chmod 1777 /var
"""
    layers = _build(tmp_path, store, dockerfile)
    assert [_names(layer) for layer in layers[1:]] == [
        ["etc/", "etc/passwd"],
        ["etc/", "etc/group"],
        ["var/"],
    ]
    assert layers[1]["etc/passwd"].mode == 0o600
    assert layers[1]["etc/passwd"].data.startswith(b"root:x:0:0:"), "the content comes along"
    assert layers[2]["etc/group"].owner == (1000, 10)
    assert layers[3]["var/"].mode == 0o1777


def test_links_fifos_setuid_and_odd_names(tmp_path: Path, store: Path) -> None:
    dockerfile = """\
FROM busybox:latest
RUN echo one > /h1 && ln /h1 /h2 && ln -s ../etc/passwd /rel && ln -s /etc/group /abs
RUN mkfifo /fifo && echo s > /s && chmod 4755 /s && chmod 2755 /bin
RUN touch "/a b" "$(printf '/new\\nline')" "/tab$(printf '\\t')name"
RUN ln /bin/busybox /bb
"""
    layers = _build(tmp_path, store, dockerfile)
    assert [_names(layer) for layer in layers[1:]] == [
        ["abs", "h1", "h2", "rel"],
        ["bin/", "fifo", "s"],
        ["a b", "new\nline", "tab\tname"],
        ["bb"],
    ]
    links = layers[1]
    assert links["h2"].info.islnk() and links["h2"].info.linkname == "h1"
    assert (links["rel"].info.issym(), links["rel"].info.linkname) == (True, "../etc/passwd")
    assert links["abs"].info.linkname == "/etc/group"
    assert layers[2]["fifo"].info.isfifo()
    assert layers[2]["s"].mode == 0o4755 and layers[2]["bin/"].mode == 0o2755
    # a hard link to a file of a lower layer is an independent file (current BuildKit's choice)
    assert layers[4]["bb"].info.isreg() and layers[4]["bb"].info.size > 100_000
    tree = final_tree(layers)
    assert tree["h2"].info.linkname == "h1" and tree["new\nline"].info.isreg()


def test_capabilities_and_user_xattrs_travel_into_the_layer(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path, "FROM busybox:latest\nCOPY ping /bin/ping\nRUN chmod 4755 /bin/ping\n")
    (context / "ping").write_bytes(b"\x7fELF not really")
    (context / "ping").chmod(0o755)
    if shutil.which("setcap"):
        subprocess.run(["setcap", "cap_net_raw+ep", str(context / "ping")], check=True)
    else:
        value = "0sAQAAAgAgAAAAAAAAAAAAAAAAAAA="  # cap_net_raw+ep, as setcap writes it
        subprocess.run(
            ["setfattr", "-n", "security.capability", "-v", value, str(context / "ping")], check=True
        )
    capability = os.getxattr(context / "ping", "security.capability")
    os.setxattr(context / "ping", "user.origin", b"context")
    layers = build(context, store, tmp_path / "out")
    copied = layers[1]["bin/ping"].info
    assert (
        copied.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape")
        == capability
    )
    assert copied.pax_headers["SCHILY.xattr.user.origin"] == "context"
    assert _names(layers[2]) == ["bin/", "bin/ping"]
    assert layers[2]["bin/ping"].mode == 0o4755


def test_copy_up_without_a_change_and_no_op_steps_make_no_layer(tmp_path: Path, store: Path) -> None:
    dockerfile = """\
FROM busybox:latest
RUN mv /etc/passwd /etc/t && mv /etc/t /etc/passwd
RUN cat /etc/group > /dev/null && touch -c /nonexistent
RUN true
WORKDIR /etc
RUN mkdir /tmp/x && rmdir /tmp/x
"""
    layers = _build(tmp_path, store, dockerfile)
    assert len(layers) == 1
    assert all(empty for _, empty in _history(tmp_path))


def test_mount_stubs_never_appear_but_real_changes_there_do(tmp_path: Path, store: Path) -> None:
    dockerfile = """\
FROM scratch
COPY --from=busybox:latest /bin /bin
RUN true
RUN echo x > /f
RUN echo root:x:0:0::/:/bin/sh > /etc/passwd && ls /proc/self /dev/null /sys > /dev/null
COPY hosts /etc/hosts
COPY resolv.conf /etc/
"""
    files: Files = {"hosts": "10.0.0.1 mine\n", "resolv.conf": "nameserver 10.0.0.2\n"}
    layers = _build(tmp_path, store, dockerfile, files)
    assert [_names(layer) for layer in layers[1:]] == [
        ["f"],
        ["etc/", "etc/passwd"],
        ["etc/", "etc/hosts"],
        ["etc/", "etc/resolv.conf"],
    ]
    tree = final_tree(layers)
    assert not {"proc", "dev", "sys", "etc/hostname"} & set(tree)
    assert tree["etc/hosts"].data == b"10.0.0.1 mine\n"


def test_129_layers_stack(tmp_path: Path, store: Path) -> None:
    lines = [
        "FROM busybox:latest",
        *(f"COPY f{i:03} /layers/" for i in range(127)),
        "RUN ls /layers > /count",
    ]
    files: Files = {f"f{i:03}": f"{i}\n" for i in range(127)}
    layers = _build(tmp_path, store, "\n".join(lines) + "\n", files)
    assert len(layers) == 129
    assert [_names(layer) for layer in layers[1:3]] == [
        ["layers/", "layers/f000"],
        ["layers/", "layers/f001"],
    ]
    assert _names(layers[128]) == ["count"]
    assert layers[128]["count"].data == "".join(f"f{i:03}\n" for i in range(127)).encode()


def test_past_the_layer_limit_is_a_clear_error(tmp_path: Path, store: Path, busybox_layout: Path) -> None:
    tiny = [_tar({f"l{i}": b""}) for i in range(200)]
    make_layout(tmp_path / "tall", [base_tar(busybox_layout), *tiny], compress=False)
    run_builder("load", f"oci:{tmp_path / 'tall'}", "-t", "tall:1", root=store)
    context = _context(tmp_path, "FROM tall:1\nRUN true\n")
    result = run_builder("build", str(context), root=store, check=False)
    assert result.returncode == 1
    error = result.stderr.splitlines()[-1]
    assert error.startswith("error: the image has 201 layers; overlay mounts here stack at most 200.")
    assert "Traceback" not in result.stderr


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_600_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


# -- COPY -----------------------------------------------------------------------------------------


def test_copy_destination_rules(tmp_path: Path, store: Path) -> None:
    dockerfile = """\
FROM busybox:latest
COPY *.txt /multi/
COPY a.txt b.txt /etc
COPY dir /contents
COPY dir /trailing/
COPY a.txt /renamed
COPY link-to-a /followed
COPY dir-link /through/
COPY h?.txt [ab].txt /classes/
WORKDIR /work
COPY a.txt .
COPY ../../../a.txt ./up/
"""
    files: Files = {"a.txt": "a\n", "b.txt": "b\n", "dir/x": "x\n", "dir/sub/y": "y\n", "h1.txt": "h\n"}
    context = _context(tmp_path, dockerfile, files)
    (context / "link-to-a").symlink_to("a.txt")
    (context / "dir" / "inner-link").symlink_to("/etc/shadow")
    (context / "dir-link").symlink_to("dir")
    layers = build(context, store, tmp_path / "out")
    dir_entries = ["inner-link", "sub/", "sub/y", "x"]
    assert [_names(layer) for layer in layers[1:]] == [
        ["multi/", "multi/a.txt", "multi/b.txt", "multi/h1.txt"],
        ["etc/", "etc/a.txt", "etc/b.txt"],
        ["contents/", *(f"contents/{n}" for n in dir_entries)],
        ["trailing/", *(f"trailing/{n}" for n in dir_entries)],
        ["renamed"],
        ["followed"],
        ["through/", *(f"through/{n}" for n in dir_entries)],
        ["classes/", "classes/a.txt", "classes/b.txt", "classes/h1.txt"],
        ["work/"],
        ["work/", "work/a.txt"],
        ["work/", "work/up/", "work/up/a.txt"],
    ]
    assert layers[6]["followed"].info.isreg() and layers[6]["followed"].data == b"a\n"
    assert layers[3]["contents/inner-link"].info.linkname == "/etc/shadow", "a nested symlink stays one"
    assert all(entry.owner == (0, 0) for layer in layers[1:] for entry in layer.values())


def test_several_sources_need_a_directory(tmp_path: Path, store: Path) -> None:
    context = _context(tmp_path, "FROM busybox:latest\nCOPY *.txt /nowhere\n", {"a.txt": "", "b.txt": ""})
    result = run_builder("build", str(context), root=store, check=False)
    assert result.returncode == 1
    assert (
        "Dockerfile:2: When using COPY with more than one source file, the destination must be a "
        "directory and end with a /, and /nowhere is neither." in result.stderr
    )


def test_a_wildcard_that_matches_nothing_copies_nothing(tmp_path: Path, store: Path) -> None:
    layers = _build(tmp_path, store, "FROM busybox:latest\nCOPY *.none /x/\nCOPY a.txt /\n", {"a.txt": ""})
    assert [_names(layer) for layer in layers[1:]] == [["a.txt"]]


def test_dockerignore_with_double_star_and_exceptions(tmp_path: Path, store: Path) -> None:
    ignore = "**/*.log\nbuild\n!build/keep/**\nnode_modules\n*.md\n!README.md\n# comment\n.dockerignore\n"
    files: Files = {
        ".dockerignore": ignore,
        "README.md": "r",
        "NOTES.md": "n",
        "app.log": "",
        "src/main.py": "",
        "src/deep/debug.log": "",
        "build/out.o": "",
        "build/keep/lib/k.so": "",
        "node_modules/m/index.js": "",
    }
    layers = _build(tmp_path, store, "FROM busybox:latest\nCOPY . /app/\n", files)
    (tmp_path / "context" / "node_modules" / "m" / "index.js").write_text("changed, but ignored")
    again = run_builder("build", str(tmp_path / "context"), root=store)
    assert "(0 steps run)" in again.stderr, "what .dockerignore leaves out is not in the cache key"
    assert _names(layers[1]) == [
        "app/",
        "app/Dockerfile",
        "app/README.md",
        "app/build/",
        "app/build/keep/",
        "app/build/keep/lib/",
        "app/build/keep/lib/k.so",
        "app/src/",
        "app/src/deep/",
        "app/src/main.py",
    ]


def test_a_dockerfile_specific_dockerignore_wins(tmp_path: Path, store: Path) -> None:
    ignore = "b\n**/*.Dockerfile*\n"
    files: Files = {".dockerignore": "a\n", "build/app.Dockerfile.dockerignore": ignore, "a": "", "b": ""}
    context = _context(tmp_path, "", files)
    (context / "build" / "app.Dockerfile").write_text("FROM busybox:latest\nCOPY . /c/\n")
    layers = build(context, store, tmp_path / "out", "-f", str(context / "build" / "app.Dockerfile"))
    assert _names(layers[1]) == ["c/", "c/.dockerignore", "c/Dockerfile", "c/a", "c/build/"]


def test_chown_by_name_and_number_and_chmod_octal_and_symbolic(tmp_path: Path, store: Path) -> None:
    dockerfile = """\
FROM busybox:latest
COPY --chown=app:wheel f /named/
COPY --chown=1234 f /numeric/
COPY --chown=app dir /owned/
COPY --chmod=4751 f /octal
COPY --chmod=u+x,g-r,o= dir /symbolic/
COPY --chmod=a=rX dir /capital-x/
"""
    layers = _build(tmp_path, store, dockerfile, {"f": "f", "dir/g": "g", "dir/sub/h": "h"})
    assert layers[1]["named/"].owner == layers[1]["named/f"].owner == (1000, 10)
    assert layers[2]["numeric/f"].owner == (1234, 1234), "no group: the GID is the UID"
    assert {e.owner for e in layers[3].values()} == {(1000, 1000)}
    assert layers[4]["octal"].mode == 0o4751
    assert [(n, e.mode) for n, e in layers[5].items()] == [
        ("symbolic/", 0o755),
        ("symbolic/g", 0o700),
        ("symbolic/sub/", 0o710),
        ("symbolic/sub/h", 0o700),
    ]
    assert layers[6]["capital-x/g"].mode == 0o444 and layers[6]["capital-x/sub/"].mode == 0o555


def test_copy_from_a_stage_and_an_image(tmp_path: Path, store: Path) -> None:
    dockerfile = """\
FROM busybox:latest AS build
RUN mkdir -p /out/bin && echo tool > /out/bin/tool && chown -R 1000:1000 /out && ln -s tool /out/bin/alias
FROM scratch
COPY --from=build /out /
COPY --from=busybox:latest /etc/pass* /etc/
COPY --from=0 --chown=7:7 /out/bin/tool /copied
"""
    layers = _build(tmp_path, store, dockerfile)
    assert [_names(layer) for layer in layers] == [
        ["bin/", "bin/alias", "bin/tool"],
        ["etc/", "etc/passwd"],
        ["copied"],
    ]
    assert layers[0]["bin/tool"].owner == (1000, 1000), "--from keeps the owners"
    assert layers[0]["bin/alias"].info.linkname == "tool"
    assert layers[2]["copied"].owner == (7, 7) and layers[2]["copied"].data == b"tool\n"


def test_link_parents_and_exclude(tmp_path: Path, store: Path) -> None:
    dockerfile = """\
FROM busybox:latest
RUN ln -s /elsewhere /linked
COPY --link f /linked/deep/
COPY --parents a/b/c.txt a/*/d.txt x/./y/z.txt /p/
COPY --exclude=*.md --exclude=sub/skip dir /ex/
COPY --exclude=*.txt *.txt *.md /top/
COPY --link --chown=app:wheel f /owned
COPY --parents dir/sub /pd/
"""
    files: Files = {
        "f": "f",
        "a/b/c.txt": "c",
        "a/q/d.txt": "d",
        "x/y/z.txt": "z",
        "dir/keep": "",
        "dir/doc.md": "",
        "dir/sub/skip": "",
        "dir/sub/also": "",
        "one.txt": "",
        "two.md": "",
    }
    layers = _build(tmp_path, store, dockerfile, files)
    assert [_names(layer) for layer in layers[2:]] == [
        ["linked/", "linked/deep/", "linked/deep/f"],
        ["p/", "p/a/", "p/a/b/", "p/a/b/c.txt", "p/a/q/", "p/a/q/d.txt", "p/y/", "p/y/z.txt"],
        ["ex/", "ex/keep", "ex/sub/", "ex/sub/also"],
        ["top/", "top/two.md"],
        ["owned"],
        ["pd/", "pd/dir/", "pd/dir/sub/", "pd/dir/sub/also", "pd/dir/sub/skip"],
    ]
    assert layers[6]["owned"].owner == (1000, 10), "--link reads the names from the image below"
    tree = final_tree(layers)
    assert tree["linked"].info.isdir(), "a --link layer is written onto nothing: it replaces the symlink"


def test_heredoc_sources(tmp_path: Path, store: Path) -> None:
    dockerfile = """\
FROM busybox:latest
ARG WHO=world
COPY <<greeting.txt <<-"raw" /docs/
hello $WHO
greeting.txt
\tno $WHO here
\traw
COPY --chmod=755 <<EOF /usr/local/bin/run
#!/bin/sh
echo run
EOF
RUN /usr/local/bin/run > /ran
"""
    layers = _build(tmp_path, store, dockerfile)
    assert [_names(layer) for layer in layers[1:]] == [
        ["docs/", "docs/greeting.txt", "docs/raw"],
        ["usr/", "usr/local/", "usr/local/bin/", "usr/local/bin/run"],
        ["ran"],
    ]
    assert layers[1]["docs/greeting.txt"].data == b"hello world\n"
    assert layers[1]["docs/raw"].data == b"no $WHO here\n"
    assert layers[1]["docs/raw"].mode == 0o644 and layers[2]["usr/local/bin/run"].mode == 0o755
    assert layers[3]["ran"].data == b"run\n"


# -- ADD ------------------------------------------------------------------------------------------

_ARCHIVED = {"pkg/bin/tool": b"#!/bin/sh\n", "pkg/share/doc": b"doc\n"}


def _archive(kind: str) -> bytes:
    plain = _tar(_ARCHIVED)
    compressors: dict[str, Callable[[bytes], bytes]] = {
        "plain": lambda data: data,
        "gzip": partial(gzip.compress, mtime=0),
        "bzip2": bz2.compress,
        "xz": lzma.compress,
        "zstd": zstandard.ZstdCompressor().compress,
    }
    return compressors[kind](plain)


def test_add_unpacks_local_archives_and_copies_other_files(tmp_path: Path, store: Path) -> None:
    kinds = ["plain", "gzip", "bzip2", "xz", "zstd"]
    files: Files = {f"a-{kind}.archive": _archive(kind) for kind in kinds}
    files["not-a-tar.gz"] = gzip.compress(b"just text", mtime=0)
    files["empty.tar"] = bytes(1024)
    lines = [f"ADD a-{kind}.archive /{kind}" for kind in kinds]
    dockerfile = "FROM busybox:latest\n" + "\n".join(lines) + "\nADD --chown=1000 *.gz empty.tar /files/\n"
    dockerfile += "ADD --unpack=false a-gzip.archive /kept/\nCOPY a-plain.archive /copied/\n"
    dockerfile += "ADD --chown=1000 a-xz.archive /owned/\n"
    layers = _build(tmp_path, store, dockerfile, files)
    for kind, layer in zip(kinds, layers[1:6], strict=True):
        prefix = f"{kind}/"
        assert _names(layer) == [
            prefix,
            *(prefix + n for n in ["pkg/", "pkg/bin/", "pkg/bin/tool", "pkg/share/", "pkg/share/doc"]),
        ]
        assert layer[f"{kind}/pkg/share/doc"].data == b"doc\n"
        assert layer[f"{kind}/pkg/bin/tool"].owner == (0, 0)
    assert _names(layers[6]) == ["files/", "files/empty.tar", "files/not-a-tar.gz"]
    assert layers[6]["files/not-a-tar.gz"].owner == (1000, 1000)
    assert _names(layers[7]) == ["kept/", "kept/a-gzip.archive"]
    assert _names(layers[8]) == ["copied/", "copied/a-plain.archive"], "COPY never unpacks"
    assert layers[9]["owned/"].owner == (1000, 1000), "--chown makes the directory unpacked into"
    assert layers[9]["owned/pkg/bin/tool"].owner == (0, 0), "the entries keep the owners they carry"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving a directory, in a thread; stopped afterwards."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_add_url_with_checksum(tmp_path: Path, store: Path, web: tuple[str, Path]) -> None:
    url, root = web
    (root / "tool.sh").write_bytes(b"#!/bin/sh\necho tool\n")
    (root / "pkg.tgz").write_bytes(_archive("gzip"))
    digest = "sha256:" + hashlib.sha256(b"#!/bin/sh\necho tool\n").hexdigest()
    dockerfile = f"""\
FROM busybox:latest
ADD --checksum={digest} {url}/tool.sh /usr/bin/
ADD {url}/pkg.tgz /named
ADD --chmod=755 {url}/tool.sh?x=1 /opt/run
"""
    layers = _build(tmp_path, store, dockerfile)
    assert [_names(layer) for layer in layers[1:]] == [
        ["usr/", "usr/bin/", "usr/bin/tool.sh"],
        ["named"],
        ["opt/", "opt/run"],
    ]
    assert layers[1]["usr/bin/tool.sh"].mode == 0o600, "a downloaded file is 0600"
    assert layers[2]["named"].data == _archive("gzip"), "a remote archive is not unpacked"
    assert layers[3]["opt/run"].mode == 0o755

    again = run_builder("build", str(tmp_path / "context"), root=store)
    assert "(0 steps run)" in again.stderr, "the same bytes hit the cache"
    (root / "pkg.tgz").write_bytes(b"changed")
    again = run_builder("build", str(tmp_path / "context"), root=store)
    assert "(2 steps run)" in again.stderr, "new bytes run that step and the one after it"

    (root / "tool.sh").write_bytes(b"tampered")
    failed = run_builder("build", "--no-cache", str(tmp_path / "context"), root=store, check=False)
    assert failed.returncode == 1
    assert f"not the --checksum {digest}." in failed.stderr and "Traceback" not in failed.stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_add_git_repository(tmp_path: Path, store: Path, web: tuple[str, Path]) -> None:
    url, root = web
    work = tmp_path / "work"
    git = partial(subprocess.run, check=True, capture_output=True, text=True, cwd=work)
    work.mkdir()
    git(["git", "init", "-q"])
    (work / "README").write_text("readme\n")
    (work / "sub").mkdir()
    (work / "sub" / "s").write_text("s\n")
    git(["git", "add", "."])
    git(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one"])
    git(["git", "tag", "v1"])
    commit = str(git(["git", "rev-parse", "HEAD"]).stdout).strip()
    git(["git", "clone", "-q", "--bare", str(work), str(root / "repo.git")])
    git(["git", "update-server-info"], cwd=root / "repo.git")
    dockerfile = f"""\
FROM busybox:latest
ADD {url}/repo.git#v1:sub /from-sub/
ADD --keep-git-dir=true --checksum={commit[:12]} {url}/repo.git /whole/
"""
    layers = _build(tmp_path, store, dockerfile)
    assert _names(layers[1]) == ["from-sub/", "from-sub/s"]
    whole = _names(layers[2])
    assert whole[:2] == ["whole/", "whole/.git/"] and "whole/README" in whole and "whole/sub/s" in whole
    assert layers[2]["whole/README"].data == b"readme\n"
