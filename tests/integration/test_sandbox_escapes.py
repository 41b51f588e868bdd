"""RUN steps that try to break out, built through the CLI: each attempt stays in the image.

The classic chroot escape needs a process that calls chroot() without chdir() (no busybox
applet does), so a 131-byte static x86-64 program is written here from its machine code:
mkdir("escape-dir"); chroot("escape-dir"); chdir("..") 64 times; chroot("."); execve(argv[1..]).
A control test shows the same program does leave a bare chroot, so the escape tests cannot pass
because the program is broken. Every test says "HOST PATH WAS CHANGED" when the host is touched.
"""

from __future__ import annotations

import gzip
import io
import platform
import struct
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import read_manifest, run_builder

pytestmark = pytest.mark.integration
x86_64 = pytest.mark.skipif(platform.machine() != "x86_64", reason="the escape program is x86-64 code")

# as(1) output for the program above; the strings "escape-dir", ".." and "." end it.
ESCAPE_CODE = bytes.fromhex(
    "488d3d65000000beed010000b8530000000f05488d3d52000000b8a10000000f0541bc40000000488d3d4900"
    "0000b8500000000f0541ffcc75ed488d3d39000000b8a10000000f05488b0c24488d742410488b3e488d54cc"
    "10b83b0000000f05bf7f000000b83c0000000f056573636170652d646972002e2e002e00"
)


def escape_program() -> bytes:
    """A static ELF executable: one header, one loadable segment, the code right after."""
    base, headers = 0x400000, 64 + 56
    size = headers + len(ESCAPE_CODE)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    elf = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 0x3E, 1, base + headers, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    segment = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return elf + segment + ESCAPE_CODE


def image_files(layout: Path, tag: str) -> dict[str, bytes]:
    """The regular files of an image in an OCI layout, layers applied in order."""
    files: dict[str, bytes] = {}
    for layer in read_manifest(layout, tag)["layers"]:
        data = gzip.decompress((layout / "blobs" / "sha256" / layer["digest"][7:]).read_bytes())
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                head, _, name = member.name.rpartition("/")
                if name.startswith(".wh."):
                    gone = f"{head}/{name[4:]}" if head else name[4:]
                    files = {k: v for k, v in files.items() if k != gone and not k.startswith(gone + "/")}
                elif member.isfile():
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    files[member.name] = extracted.read()
    return files


def build_image(
    tmp_path: Path, store: Path, dockerfile: str, files: dict[str, bytes] | None = None
) -> dict[str, bytes]:
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(dockerfile)
    for name, data in (files or {}).items():
        (context / name).write_bytes(data)
    out = tmp_path / "oci"
    run_builder(
        "build", "--no-cache", "-t", "escape:1", "-o", f"type=oci,dest={out}", str(context), root=store
    )
    return image_files(out, "1")


@pytest.fixture
def host_dir(tmp_path: Path) -> Path:
    """A host directory the steps aim at; it must stay empty."""
    path = tmp_path / f"host-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


@x86_64
def test_the_escape_program_leaves_a_bare_chroot(tmp_path: Path, host_dir: Path) -> None:
    """The control: against a plain chroot, the program reaches the host's root."""
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "escape").write_bytes(escape_program())
    (root / "escape").chmod(0o755)
    script = f"echo escaped > {host_dir}/proof"
    result = subprocess.run(
        ["chroot", str(root), "/escape", "/bin/sh", "-c", script], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (host_dir / "proof").read_text() == "escaped\n"


@x86_64
def test_classic_chroot_escape_stays_in_the_image(tmp_path: Path, store: Path, host_dir: Path) -> None:
    script = (
        f"cat /marker > /proof; test -e {host_dir} && echo host-visible >> /proof;"
        f" mkdir -p {host_dir} && echo escaped > {host_dir}/proof"
    )
    dockerfile = (
        "FROM busybox:latest\nCOPY escape /escape\nRUN echo image > /marker && chmod 755 /escape\n"
        f"RUN /escape /bin/sh -c '{script}'\n"
    )
    files = build_image(tmp_path, store, dockerfile, {"escape": escape_program()})
    assert list(host_dir.iterdir()) == [], "HOST PATH WAS CHANGED"
    assert files["proof"] == b"image\n", "the step saw the host's root"
    assert files[f"{host_dir}/proof"[1:]] == b"escaped\n"


def test_host_processes_are_invisible_through_proc(tmp_path: Path, store: Path) -> None:
    token = f"{uuid.uuid4().int % 10**6}.{uuid.uuid4().int % 10**6}"  # a sleep nobody else runs
    sleeper = subprocess.Popen(["sleep", token])
    try:
        dockerfile = (
            "FROM busybox:latest\n"
            "RUN cat /proc/[0-9]*/cmdline | tr '\\0' ' ' > /cmdlines;"
            " ls -d /proc/[0-9]* > /pids; ls /proc/1/root > /root-of-1\n"
        )
        files = build_image(tmp_path, store, dockerfile)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert token.encode() not in files["cmdlines"], "a host process was visible"
    assert len(files["pids"].split()) <= 4, files["pids"]
    assert b"marker" not in files["root-of-1"] and b"bin" in files["root-of-1"]


def test_writing_through_proc_root_stays_in_the_image(tmp_path: Path, store: Path, host_dir: Path) -> None:
    script = (
        "for p in /proc/[0-9]* /proc/self /proc/thread-self; do"
        f" mkdir -p $p/root{host_dir} && echo pwned > $p/root{host_dir}/pwned-${{p##*/}}; done;"
        f" ls {host_dir} > /written"
    )
    files = build_image(tmp_path, store, f"FROM busybox:latest\nRUN {script}\n")
    assert list(host_dir.iterdir()) == [], "HOST PATH WAS CHANGED"
    assert b"pwned-1" in files["written"].split()
    assert files[f"{host_dir}/pwned-1"[1:]] == b"pwned\n"


@pytest.fixture
def host_untouched() -> Iterator[None]:
    """The host's mounts, a harmless kernel-wide setting and the loopback addresses, which the
    step tries to change; whatever it did is put back before the test fails."""
    knob = Path("/proc/sys/vm/stat_interval")
    before = (knob.read_text(), Path("/proc/self/mountinfo").read_text())
    yield
    changed = []
    if knob.read_text() != before[0]:
        knob.write_text(before[0])
        changed.append(str(knob))
    addresses = subprocess.run(["ip", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
    if ADDRESS in addresses:
        subprocess.run(["ip", "addr", "del", f"{ADDRESS}/32", "dev", "lo"], check=True)
        changed.append("the loopback addresses")
    if Path("/proc/self/mountinfo").read_text() != before[1]:
        changed.append("the mount table")
    assert changed == [], f"HOST WAS CHANGED: {', '.join(changed)}"


ADDRESS = "192.0.2.77"
ATTEMPTS = {
    "mount-tmpfs": "mkdir -p /mnt && mount -t tmpfs none /mnt",
    "mount-proc": "mkdir -p /p && mount -t proc proc /p",
    "unmount-proc-sys": "umount /proc/sys",
    "remount-proc-sys": "mount -o remount,rw /proc/sys",
    "write-proc-sys": "echo 7 > /proc/sys/vm/stat_interval",
    "host-network": f"ip addr add {ADDRESS}/32 dev lo",
    "open-mknod-dev": "mknod /dev/mine c 1 3 && echo x > /dev/mine",
    "open-mknod-root": "mknod /mine c 1 3 && echo x > /mine",
}


@pytest.mark.usefixtures("host_untouched")
def test_mounts_devices_and_kernel_settings_are_refused(tmp_path: Path, store: Path) -> None:
    """A step runs as root but without CAP_SYS_ADMIN or CAP_NET_ADMIN, and device nodes it makes
    (it may, as under Docker) cannot be opened: nothing it tries reaches the host."""
    script = "; ".join(
        f"if {cmd}; then echo {name} >> /done; fi 2>/dev/null" for name, cmd in ATTEMPTS.items()
    )
    dockerfile = f"FROM busybox:latest\nRUN {script}; rm -f /dev/mine /mine; touch /done\n"
    files = build_image(tmp_path, store, dockerfile)
    assert files["done"] == b"", f"these were allowed: {files['done'].decode().split()}"


def test_usual_root_powers_still_work(tmp_path: Path, store: Path) -> None:
    """What builds need keeps working: chown, chmod, mknod, chroot, writing to /dev/null."""
    script = (
        "chown 1000:1000 /tmp && chmod 700 /tmp && mknod /node c 1 3 && echo ok > /dev/null"
        " && chroot / sh -c 'ls -lnd /tmp /node' > /listing"
    )
    files = build_image(tmp_path, store, f"FROM busybox:latest\nRUN {script}\n")
    listing = {line.split()[-1]: line.split() for line in files["listing"].decode().splitlines()}
    tmp, node = listing["/tmp"], listing["/node"]
    assert (tmp[0], tmp[2], tmp[3]) == ("drwx------", "1000", "1000")
    assert node[0].startswith("c") and node[4] == "1,"
