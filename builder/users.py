"""USER and ``--chown`` names resolved against the image's own /etc/passwd and /etc/group."""

from __future__ import annotations

from pathlib import Path

from msgspec import Struct

from builder.errors import BuilderError
from builder.rootpath import resolve_in_root

__all__ = ["Identity", "resolve_chown", "resolve_user"]


class Identity(Struct, frozen=True):
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def _table(root: Path, path: str) -> list[list[str]]:
    """The colon-separated records of a file inside the image (empty when it is missing)."""
    try:
        text = resolve_in_root(root, path).read_text(errors="replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _lookup_group(root: Path, group: str, spec: str) -> int:
    if group.isdigit():
        return int(group)
    for record in _table(root, "/etc/group"):
        if len(record) >= 3 and record[0] == group and record[2].isdigit():
            return int(record[2])
    raise BuilderError(f"unable to find group {group!r} (from {spec!r}): no matching entry in /etc/group.")


def resolve_user(root: Path, spec: str) -> Identity:
    """``user[:group]`` by name or number, with the supplementary groups of a named user."""
    user, _, group = (spec or "0").partition(":")
    uid = gid = None
    name = None
    for record in _table(root, "/etc/passwd"):
        named = len(record) >= 4 and (record[0] == user or (user.isdigit() and record[2] == user))
        if named and record[2].isdigit() and record[3].isdigit():
            uid, gid, name = int(record[2]), int(record[3]), record[0]
            break
    if uid is None:
        if not user.isdigit():
            raise BuilderError(f"unable to find user {user!r}: no matching entry in /etc/passwd.")
        uid, gid = int(user), 0
    assert gid is not None
    if group:
        return Identity(uid, _lookup_group(root, group, spec))
    extra = tuple(
        sorted(
            {
                int(record[2])
                for record in _table(root, "/etc/group")
                if len(record) >= 4 and record[2].isdigit() and name in record[3].split(",")
            }
        )
    )
    return Identity(uid, gid, extra)


def resolve_chown(root: Path, spec: str) -> Identity:
    """``--chown=user[:group]``; without a group the GID is the UID, as the reference says."""
    user, _, group = spec.partition(":")
    uid = int(user) if user.isdigit() else resolve_user(root, user).uid
    return Identity(uid, _lookup_group(root, group, spec) if group else uid)
