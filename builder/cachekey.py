"""Cache keys for build steps, and why two keys differ.

A key is the digest of named components, each the digest of one canonical JSON value:
the recipe version, the parent key, the step's kind, each semantic field of the step and each
input (content digests, the epoch). Keeping the components lets a miss be explained by name
("the command changed", "ENV HOME changed", "app.conf changed"); the per-item details (one
digest per environment variable or source file) narrow it down further. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from msgspec import Struct, field

from builder.digest import sha256_digest
from builder.oci import canonical_json

__all__ = ["CACHE_RECIPE", "CacheKey", "base_key", "explain_miss", "step_fields", "step_key"]

# Bump when the meaning of a key changes: it costs every user their cache, so rarely.
CACHE_RECIPE = "builder-cache-v1"
_NON_SEMANTIC = frozenset({"line", "created_by"})  # where a step is written, not what it does
_MAX_NAMED = 5
_FIELD_NAMES = {
    "argv": "the command",
    "env": "the environment",
    "user": "the user",
    "workdir": "the working directory",
    "network": "the network mode",
    "sources": "the source list",
    "dest": "the destination",
    "chown": "--chown",
    "chmod": "--chmod",
    "from_stage": "--from",
    "from_image": "--from",
    "inline": "the heredoc content",
    "path": "the path",
}


class CacheKey(Struct, frozen=True):
    digest: str
    components: dict[str, str]
    details: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "components": self.components, "details": self.details}


def _hash(value: Any) -> str:
    return sha256_digest(canonical_json(value))


def base_key(diff_ids: list[str]) -> str:
    """The parent key of a stage's first step: the base image's layers."""
    return _hash({"recipe": CACHE_RECIPE, "base": diff_ids})


def step_fields(step: Struct) -> dict[str, Any]:
    """A planned step's semantic fields, every one (defaults included), nested values as
    dicts; canonical JSON writes the tuples as arrays."""
    return {k: v for k, v in msgspec.to_builtins(step).items() if k not in _NON_SEMANTIC}


def step_key(
    parent: str,
    kind: str,
    fields: Mapping[str, Any],
    inputs: Mapping[str, Any],
    details: Mapping[str, Mapping[str, str]] | None = None,
) -> CacheKey:
    """The key of one step; ``details`` are finer digests kept only to explain misses."""
    components = {"recipe": _hash(CACHE_RECIPE), "parent": parent, "kind": _hash(kind)}
    components |= {f"field:{name}": _hash(value) for name, value in sorted(fields.items())}
    components |= {f"input:{name}": _hash(value) for name, value in sorted(inputs.items())}
    return CacheKey(_hash(components), components, {k: dict(v) for k, v in (details or {}).items()})


def explain_miss(current: CacheKey, previous: Mapping[str, Any] | None) -> str:
    """Why ``current`` missed, against the same step of the previous build (a to_json dict)."""
    if previous is None:
        return "no earlier build of this step"
    if previous.get("digest") == current.digest:
        return "its cache record is gone (pruned, or never exported)"
    old = previous.get("components") or {}
    changed = [name for name, value in current.components.items() if old.get(name) != value]
    changed += [name for name in old if name not in current.components]
    if changed == ["parent"]:
        return "an earlier step changed"
    reasons = [_describe(name, current, previous) for name in changed if name != "parent"]
    return "; ".join(dict.fromkeys(reasons))


def _describe(name: str, current: CacheKey, previous: Mapping[str, Any]) -> str:
    kind, _, field_name = name.partition(":")
    old_details = (previous.get("details") or {}).get(field_name)
    new_details = current.details.get(field_name)
    if old_details is not None and new_details is not None:
        items = _changed_items(old_details, new_details)
        if items:
            noun = "ENV/ARG" if field_name == "env" else "source"
            return f"{noun} {items} changed"
    if kind == "input" and field_name == "epoch":
        return "SOURCE_DATE_EPOCH changed"
    if name == "recipe":
        return "the cache recipe changed (a builder upgrade)"
    return f"{_FIELD_NAMES.get(field_name, field_name)} changed"


def _changed_items(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    names = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    shown = ", ".join(names[:_MAX_NAMED])
    return shown + (f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else "")
