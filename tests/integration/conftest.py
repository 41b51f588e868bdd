"""Fixtures of the integration tests: real docker-registry processes on 127.0.0.1, and tokens that
find a step's processes."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.registry import Registry, htpasswd_auth, start_registry, start_token_registry

USERS = {"alice": "s3cret"}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """An anonymous registry, stopped (and checked stopped) after the test."""
    server = start_registry(tmp_path / "registry")
    yield server
    server.stop()
    assert server.process.poll() is not None


@pytest.fixture
def basic_registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry with basic auth (htpasswd) for the users in ``USERS``."""
    server = start_registry(tmp_path / "basic", htpasswd_auth(tmp_path / "basic", USERS))
    yield server
    server.stop()


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry that wants bearer tokens from a token service knowing ``USERS``."""
    server = start_token_registry(tmp_path / "token", USERS)
    yield server
    server.stop()


def processes(token: str) -> list[str]:
    """The processes of a step: those whose command line holds the token."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, ValueError):
            continue
        if token in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.fixture
def token() -> Iterator[str]:
    """A sleep duration no other process uses; whatever still sleeps it is killed at the end."""
    value = f"{random.randrange(10**5, 10**6)}.{random.randrange(10**3)}"
    yield value
    for line in processes(value):
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
