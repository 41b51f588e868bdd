"""How the command ends: its output written whole, or an error saying it could not be."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def builder(*args: str, root: Path, stdout: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BUILDER_ROOT": str(root)}
    return subprocess.run(
        [sys.executable, "-m", "builder", *args], stdout=stdout, stderr=subprocess.PIPE, text=True, env=env
    )


def test_the_output_reaches_a_pipe_whole(store: Path) -> None:
    result = builder("images", root=store, stdout=subprocess.PIPE)
    assert result.returncode == 0, result.stderr
    assert "busybox" in result.stdout and result.stdout.endswith("\n")


def test_output_that_cannot_be_written_is_an_error(store: Path) -> None:
    with open("/dev/full", "w") as full:
        result = builder("images", root=store, stdout=full.fileno())
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert result.stderr.strip() == "error: cannot write the output: No space left on device."


def test_a_reader_that_went_away_ends_the_command_quietly(store: Path) -> None:
    read, write = os.pipe()
    os.close(read)
    try:
        result = builder("images", root=store, stdout=write)
    finally:
        os.close(write)
    assert result.returncode == 1
    assert result.stderr == ""
