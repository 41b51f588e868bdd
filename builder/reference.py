"""Image references as Docker writes and normalises them: ``name[:tag][@digest]``.

The grammar alone, in plain strings: builder.oci's ``Reference`` is the value the rest of
builder passes around; this is what a shortcut (builder.shortcut) needs to name a tag without
loading the value classes.
"""

from __future__ import annotations

import re

__all__ = ["DEFAULT_REGISTRY", "reference_text", "split_reference"]

_NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REFERENCE = re.compile(
    rf"(?P<name>{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*"
    r"|[A-Za-z0-9.-]+(?::[0-9]+)?(?:/" + _NAME_COMPONENT + ")+)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)
DEFAULT_REGISTRY = "docker.io"


def split_reference(text: str) -> tuple[str, str, str | None, str | None]:
    """Registry, repository, tag and digest of ``name[:tag][@digest]``, normalised as Docker
    does (a bare name gets ``:latest``, a Docker Hub one ``library/``). Raises ValueError."""
    match = _REFERENCE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a valid image reference (expected name[:tag][@sha256:digest], lower-case name)"
        )
    name, tag, digest = match["name"], match["tag"], match["digest"]
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = DEFAULT_REGISTRY, name
        if "/" not in repository:
            repository = f"library/{repository}"
    if tag is None and digest is None:
        tag = "latest"
    return registry, repository, tag, digest


def reference_text(registry: str, repository: str, tag: str | None, digest: str | None) -> str:
    """The full form: ``registry/repository[:tag][@digest]``."""
    text = f"{registry}/{repository}"
    if tag:
        text += f":{tag}"
    if digest:
        text += f"@{digest}"
    return text
