"""Settings: each declared once, driving its command-line flag, its YAML key and its help.

A setting's value comes from the flag, else its environment variable, else the YAML config
file (``$BUILDER_CONFIG``, else /etc/builder/config.yaml when it exists), else its default.
Pure apart from the YAML parsing: the caller reads the file and passes its text in.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from msgspec import Struct

from builder.errors import BuilderError

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "SETTINGS",
    "Setting",
    "add_setting_flags",
    "parse_config",
    "resolve",
]

CONFIG_ENV = "BUILDER_CONFIG"
DEFAULT_CONFIG = "/etc/builder/config.yaml"


class Setting(Struct, frozen=True):
    key: str  # the YAML key; the flag is --key
    help: str
    kind: type  # str, int or list (a repeatable flag / a YAML list of strings)
    default: Any
    commands: tuple[str, ...]
    env: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.key.replace("-", "_")


_BUILDS = ("build",)
_STORE = (
    "build",
    "load",
    "images",
    "inspect",
    "prune",
    "du",
    "save",
    "push",
    "pull",
    "tag",
    "rmi",
    "history",
    "check",
)
_REGISTRY = ("build", "push", "pull", "save")

SETTINGS: tuple[Setting, ...] = (
    Setting("root", "the store root", str, "/var/lib/builder", _STORE, env="BUILDER_ROOT", metavar="DIR"),
    Setting(
        "compression",
        "layer compression (default: gzip when building, each layer's own when saving or pushing)",
        str,
        None,
        ("build", "save", "push"),
        choices=("gzip", "uncompressed", "zstd"),
    ),
    Setting(
        "compression-level", "compression level (gzip 0-3, zstd 1-22)", int, None, ("build", "save", "push")
    ),
    Setting(
        "insecure-registry",
        "a registry reached over plain HTTP (localhost and 127.0.0.0/8 always are)",
        list,
        [],
        _REGISTRY,
        metavar="HOST[:PORT]",
    ),
    Setting(
        "network",
        "the network of RUN steps without --network: default (the host's), none or host",
        str,
        "default",
        _BUILDS,
        choices=("default", "host", "none"),
    ),
)


def add_setting_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags of the settings a command takes; a flag not given stays None."""
    for setting in SETTINGS:
        if command not in setting.commands:
            continue
        help_text = f"{setting.help} (config key {setting.key}"
        help_text += f", environment {setting.env})" if setting.env else ")"
        if setting.kind is list:
            parser.add_argument(f"--{setting.key}", action="append", metavar=setting.metavar, help=help_text)
        else:
            parser.add_argument(
                f"--{setting.key}", type=setting.kind, metavar=setting.metavar, help=help_text
            )


def parse_config(text: str, source: str) -> dict[str, Any]:
    """The settings a YAML config file sets, checked against the table."""
    import yaml  # here, not at the top: most runs have no config file (start-up of the cached path)

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BuilderError(f"{source}: not valid YAML: {exc}".rstrip(".") + ".") from exc
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise BuilderError(f"{source}: the config must be a mapping of setting: value.")
    known = {setting.key: setting for setting in SETTINGS}
    values = {}
    for key, value in document.items():
        setting = known.get(str(key))
        if setting is None:
            raise BuilderError(f"{source}: unknown setting {key!r}; known: {', '.join(sorted(known))}.")
        if setting.kind is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, setting.kind) and not isinstance(value, bool)
        if not ok:
            raise BuilderError(f"{source}: {key} must be {_kind_name(setting.kind)}, not {value!r}.")
        if setting.choices and value not in setting.choices:
            raise BuilderError(f"{source}: {key} must be one of {', '.join(setting.choices)}, not {value!r}.")
        values[setting.key] = value
    return values


def _kind_name(kind: type) -> str:
    return {str: "a string", int: "a whole number", list: "a list of strings"}[kind]


def resolve(
    args: argparse.Namespace, config: Mapping[str, Any], environ: Mapping[str, str]
) -> dict[str, Any]:
    """Each setting's value for this run: flag, environment, config file, default."""
    values = {}
    for setting in SETTINGS:
        given = getattr(args, setting.dest, None)
        if given is not None:
            values[setting.key] = given
        elif setting.env and environ.get(setting.env):
            values[setting.key] = setting.kind(environ[setting.env])
        elif setting.key in config:
            values[setting.key] = config[setting.key]
        else:
            values[setting.key] = setting.default
    return values
