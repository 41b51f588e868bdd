"""``RUN --mount`` values: BuildKit's comma-separated syntax read into a typed ``Mount``.

The model is BuildKit's ``instructions/commands_runmount.go``. A mount is parsed after its
words are expanded in the stage's variables, except ``from=``, which names a stage or an image
as written (see :func:`mount_from`). Pure.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from typing import Any

from msgspec import Struct, structs

from builder.dockerfile import suggest
from builder.instructions import InvalidValue

__all__ = ["Mount", "mount_from", "parse_mount"]


class Mount(Struct, frozen=True):
    """A ``RUN --mount``, defaults filled in; ``target`` is absolute (empty for an env-only secret)."""

    type: str  # bind | cache | tmpfs | secret | ssh
    target: str
    source: str = ""  # bind, cache: the path inside ``from`` (or the context); secret: its id
    from_stage: int | None = None
    from_image: str | None = None  # bind, cache: an image; neither: the build context (cache: empty)
    readonly: bool = False
    id: str = ""  # cache, secret, ssh
    sharing: str = ""  # cache: shared | private | locked
    required: bool = False  # secret, ssh
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None  # tmpfs, in bytes
    env: str | None = None  # secret: also (or only) exposed as this environment variable


_MOUNT_TYPES = ("bind", "cache", "tmpfs", "secret", "ssh")
_MOUNT_KEYS = {
    "type": "type", "from": "from", "source": "source", "src": "source", "target": "target",
    "dst": "target", "destination": "target", "readonly": "readonly", "ro": "readonly",
    "readwrite": "readwrite", "rw": "readwrite", "required": "required", "id": "id",
    "sharing": "sharing", "mode": "mode", "uid": "uid", "gid": "gid", "size": "size", "env": "env",
}  # fmt: skip
_MOUNT_ONLY = {
    "sharing": ("cache",), "mode": ("cache", "secret", "ssh"), "uid": ("cache", "secret", "ssh"),
    "gid": ("cache", "secret", "ssh"), "required": ("secret", "ssh"), "size": ("tmpfs",), "env": ("secret",),
    "from": ("bind", "cache"), "source": ("bind", "cache", "secret"),
}  # fmt: skip
_GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_GO_FALSE = ("0", "f", "F", "FALSE", "false", "False")
# Patterns are compiled on first use (re's own cache), not at import: most builds use few of them.
_SIZE = r"(\d+(?:\.\d+)*) ?([kKmMgGtTpP])?[iI]?[bB]?"
_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50}


def _go_bool(key: str, value: str) -> bool:
    if value in _GO_TRUE or value in _GO_FALSE:
        return value in _GO_TRUE
    raise InvalidValue(f"--mount {key}={value} is not a boolean; use true or false.")


def _mount_fields(spec: str, expand: Callable[[str], str]) -> dict[str, str]:
    """The ``key=value`` fields of a --mount value, keys canonical, values expanded."""
    import csv  # here and below: only a RUN with --mount needs it (start-up time)

    try:
        rows = list(csv.reader([spec], strict=True))
    except csv.Error as exc:
        raise InvalidValue(f"--mount={spec} is not a valid comma-separated list: {exc}.") from exc
    fields: dict[str, str] = {}
    for field in rows[0] if rows else []:
        name, eq, value = field.partition("=")
        key = _MOUNT_KEYS.get(name.lower())
        if key is None:
            raise InvalidValue(f"unknown --mount option {name!r}{suggest(name.lower(), list(_MOUNT_KEYS))}")
        if not eq:
            if key not in ("readonly", "readwrite", "required"):
                raise InvalidValue(f"the --mount option {name!r} needs a value: {name}=<value>.")
            value = "true"
        elif key == "from" and re.search(r"\$.", value):
            raise InvalidValue(
                f"--mount from={value}: variables are not expanded here; name a stage instead."
            )
        fields[key] = expand(value)
    return fields


def _mount_type(fields: dict[str, str]) -> str:
    kind = fields.get("type", "bind").lower()
    if kind not in _MOUNT_TYPES:
        raise InvalidValue(f"unsupported --mount type {kind!r}{suggest(kind, list(_MOUNT_TYPES))}")
    for key, types in _MOUNT_ONLY.items():
        if key in fields and kind not in types:
            raise InvalidValue(
                f"--mount type={kind} does not take {key}=; only {' and '.join(types)} mounts do."
            )
    return kind


def _number(key: str, value: str, base: int) -> int:
    digits = "[0-7]+" if base == 8 else "[0-9]+"
    if not re.fullmatch(digits, value) or int(value, base) >= 2**32:
        raise InvalidValue(f"--mount {key}={value} is not a valid {'octal ' if base == 8 else ''}number.")
    return int(value, base)


def _size(value: str) -> int:
    match = re.fullmatch(_SIZE, value)
    if match is None or match[1].count(".") > 1:
        raise InvalidValue(f"--mount size={value} is not a size such as 64m or 1g.")
    return int(float(match[1]) * _SIZE_UNITS[(match[2] or "").lower()])


def parse_mount(
    spec: str,
    expand: Callable[[str], str],
    *,
    workdir: str,
    ssh_index: int,
    resolve_from: Callable[[str], tuple[int | None, str | None]],
) -> Mount:
    """A ``RUN --mount`` value, as BuildKit reads it, with its defaults filled in."""
    fields = _mount_fields(spec, expand)
    kind = _mount_type(fields)
    target = fields.get("target", "")
    if target:
        target = posixpath.normpath(posixpath.join(workdir, target))
        target = "/" + target.lstrip("/")
    elif kind in ("bind", "cache", "tmpfs"):
        raise InvalidValue(f"--mount type={kind} needs a target: target=<path>.")
    if kind in ("bind", "cache", "tmpfs") and target == "/":
        raise InvalidValue(f"--mount type={kind} cannot be mounted on /.")
    readonly = kind not in ("cache", "tmpfs")
    if "readonly" in fields:
        readonly = _go_bool("readonly", fields["readonly"])
    if "readwrite" in fields:
        readonly = not _go_bool("readwrite", fields["readwrite"])
    from_stage, from_image = resolve_from(fields["from"]) if fields.get("from") else (None, None)
    mount = Mount(
        kind,
        target,
        source=fields.get("source", ""),
        from_stage=from_stage,
        from_image=from_image,
        readonly=readonly,
        id=fields.get("id", ""),
        sharing=fields.get("sharing", "").lower(),
        required=_go_bool("required", fields["required"]) if "required" in fields else False,
        mode=_number("mode", fields["mode"], 8) if "mode" in fields else None,
        uid=_number("uid", fields["uid"], 10) if "uid" in fields else None,
        gid=_number("gid", fields["gid"], 10) if "gid" in fields else None,
        size=_size(fields["size"]) if "size" in fields else None,
        env=fields.get("env"),
    )
    return _mount_defaults(mount, ssh_index)


def _mount_defaults(mount: Mount, ssh_index: int) -> Mount:
    changes: dict[str, Any] = {}
    if mount.type == "cache":
        if mount.sharing not in ("", "shared", "private", "locked"):
            raise InvalidValue(f"--mount sharing={mount.sharing} is not one of shared, private or locked.")
        changes = {"id": mount.id or mount.target, "sharing": mount.sharing or "shared"}
    elif mount.type == "secret":
        if mount.source and mount.id:
            raise InvalidValue("a secret --mount takes source= or id=, not both.")
        secret = mount.id or mount.source or posixpath.basename(mount.target)
        if not secret:
            raise InvalidValue("a secret --mount needs an id (or a target to name it after).")
        target = mount.target or ("" if mount.env else f"/run/secrets/{secret}")
        changes = {"id": secret, "source": "", "target": target}
    elif mount.type == "ssh":
        changes = {
            "id": mount.id or "default",
            "target": mount.target or f"/run/buildkit/ssh_agent.{ssh_index}",
        }
    return structs.replace(mount, **changes)


def mount_from(spec: str) -> str | None:
    """The from= of a --mount, as written (it cannot hold variables)."""
    import csv

    for field_ in next(csv.reader([spec]), []):
        key, eq, value = field_.partition("=")
        if eq and key.lower() == "from" and "$" not in value:
            return value
    return None
