from __future__ import annotations

import argparse

import pytest

from builder.config import SETTINGS, add_setting_flags, parse_config, resolve
from builder.errors import BuilderError


def _args(command: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_setting_flags(parser, command)
    return parser.parse_args(argv)


def test_every_setting_has_a_flag_on_its_commands() -> None:
    for setting in SETTINGS:
        for command in setting.commands:
            assert hasattr(_args(command, []), setting.dest)


def test_flag_beats_environment_beats_file_beats_default() -> None:
    config = parse_config("root: /from/file\ncompression: zstd\n", "config.yaml")
    values = resolve(_args("build", ["--root", "/from/flag"]), config, {"BUILDER_ROOT": "/from/env"})
    assert values["root"] == "/from/flag"
    assert resolve(_args("build", []), config, {"BUILDER_ROOT": "/from/env"})["root"] == "/from/env"
    assert resolve(_args("build", []), config, {})["root"] == "/from/file"
    assert resolve(_args("build", []), {}, {})["root"] == "/var/lib/builder"
    assert resolve(_args("build", []), config, {})["compression"] == "zstd"
    assert resolve(_args("build", []), {}, {})["network"] == "default"


def test_lists_accumulate_from_repeated_flags() -> None:
    args = _args("push", ["--insecure-registry", "a:5000", "--insecure-registry", "b"])
    assert resolve(args, {}, {})["insecure-registry"] == ["a:5000", "b"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("roots: /x\n", "unknown setting 'roots'"),
        ("compression: brotli\n", "compression must be one of gzip, uncompressed, zstd"),
        ("compression-level: high\n", "compression-level must be a whole number"),
        ("insecure-registry: host\n", "insecure-registry must be a list of strings"),
        ("- a\n- b\n", "the config must be a mapping"),
        ("root: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_files_name_the_file_and_the_key(text: str, message: str) -> None:
    with pytest.raises(BuilderError, match="config.yaml: .*" + message.replace("(", r"\(")):
        parse_config(text, "config.yaml")


def test_an_empty_config_sets_nothing() -> None:
    assert parse_config("", "config.yaml") == {}
