from __future__ import annotations

from pathlib import Path

import pytest

from builder.errors import BuilderError
from builder.users import Identity, resolve_chown, resolve_user


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n")
    (tmp_path / "etc/group").write_text("root:x:0:\nwheel:x:10:app,other\nstaff:x:50:\napp:x:1001:\n")
    return tmp_path


@pytest.mark.parametrize(
    ("spec", "identity"),
    [
        ("", Identity(0, 0, ())),
        ("app", Identity(1000, 1001, (10,))),
        ("1000", Identity(1000, 1001, (10,))),
        ("app:staff", Identity(1000, 50)),
        ("4242", Identity(4242, 0)),
        ("4242:77", Identity(4242, 77)),
    ],
)
def test_user_resolution(root: Path, spec: str, identity: Identity) -> None:
    assert resolve_user(root, spec) == identity


def test_unknown_user_is_an_error(root: Path) -> None:
    with pytest.raises(BuilderError, match="unable to find user 'ghost'"):
        resolve_user(root, "ghost")


@pytest.mark.parametrize(
    ("spec", "identity"),
    [
        ("app", Identity(1000, 1000)),
        ("app:staff", Identity(1000, 50)),
        ("7", Identity(7, 7)),
        ("7:8", Identity(7, 8)),
    ],
)
def test_chown_uses_the_uid_as_gid_without_a_group(root: Path, spec: str, identity: Identity) -> None:
    assert resolve_chown(root, spec) == identity
