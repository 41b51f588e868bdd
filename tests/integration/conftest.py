"""Registries for the integration tests: real docker-registry processes on 127.0.0.1."""

from __future__ import annotations

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
