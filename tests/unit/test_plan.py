"""The plan's API: build-arg syntax, which base images a target needs, purity, the stage graph.

What a plan contains for a given Dockerfile is pinned by the golden folders
(test_golden_dockerfiles.py); these tests cover what a golden cannot show.
"""

from __future__ import annotations

import copy
import json

import pytest

from builder.dockerfile import parse_dockerfile
from builder.errors import BuilderError, DockerfileError
from builder.plan import DEFAULT_PATH, CopyStep, Plan, RunStep, make_plan
from builder.stages import base_images, parse_build_args, platform_args

AUTO = platform_args("linux", "amd64")
IMAGE = {"config": {"Env": [f"PATH={DEFAULT_PATH}"], "Cmd": ["sh"]}}
STAGES = """\
ARG BASE=busybox
FROM $BASE AS base
FROM alpine AS tools
FROM base AS build
COPY --from=tools /bin/tool /bin/
FROM golang AS unused
FROM debian AS release
RUN --mount=from=build,target=/b true
"""


def plan(text: str, target: str | None = None, **build_args: str) -> Plan:
    dockerfile = parse_dockerfile(text)
    refs = base_images(dockerfile, build_args, AUTO, target)
    configs = dict.fromkeys(refs, IMAGE)
    return make_plan(dockerfile, base_configs=configs, build_args=build_args, auto_args=AUTO, target=target)


def test_build_args_as_the_cli_takes_them() -> None:
    environ = {"FROM_ENV": "e"}
    assert parse_build_args(["A=1", "B=", "C=x=y", "FROM_ENV", "UNSET"], environ) == {
        "A": "1",
        "B": "",
        "C": "x=y",
        "FROM_ENV": "e",
    }


@pytest.mark.parametrize("item", ["", "=1", " A=1", "A B=1"])
def test_invalid_build_args(item: str) -> None:
    with pytest.raises(BuilderError, match="invalid --build-arg"):
        parse_build_args([item], {})


def test_base_images_of_every_stage_or_of_what_a_target_needs() -> None:
    dockerfile = parse_dockerfile(STAGES)
    assert base_images(dockerfile, {}, AUTO) == ("busybox", "alpine", "golang", "debian")
    assert base_images(dockerfile, {}, AUTO, "build") == ("busybox", "alpine")
    assert base_images(dockerfile, {"BASE": "ubuntu"}, AUTO, "release") == ("ubuntu", "alpine", "debian")


def test_only_the_stages_the_target_needs_are_planned() -> None:
    result = plan(STAGES)
    assert result.order == (0, 1, 2, 4)
    assert [stage.built for stage in result.stages] == [True, True, True, False, True]
    assert result.stages[4].needs == (2,)
    assert result.stages[2].needs == (0, 1)
    assert result.images == ("busybox", "alpine", "debian")


def test_a_missing_base_config_is_named() -> None:
    dockerfile = parse_dockerfile("FROM busybox\n")
    with pytest.raises(BuilderError, match="no config for the base image busybox"):
        make_plan(dockerfile, base_configs={}, build_args={}, auto_args=AUTO)


def test_the_plan_is_pure() -> None:
    """Same input, same plan; the base configs handed in are not changed."""
    config = {"config": {"Env": ["PATH=/bin"], "Labels": {"a": "b"}, "OnBuild": ["RUN true"]}}
    before = copy.deepcopy(config)
    text = "FROM app\nLABEL c=d\nENV X=1\nONBUILD RUN false\n"
    dockerfile = parse_dockerfile(text)
    first = make_plan(dockerfile, base_configs={"app": config}, build_args={}, auto_args=AUTO)
    second = make_plan(dockerfile, base_configs={"app": config}, build_args={}, auto_args=AUTO)
    assert first == second
    assert config == before


def test_to_json_leaves_defaults_out_and_writes_environments_as_name_value() -> None:
    data = json.loads(json.dumps(plan("FROM busybox\nRUN --network=none true\n").to_json()))
    step = data["stages"][0]["steps"][0]
    assert step["network"] == "none"
    assert step["env"] == [f"PATH={DEFAULT_PATH}"]
    assert "mounts" not in step and "security" not in step
    assert "warnings" not in data and "built" not in data["stages"][0]


def test_step_types_the_executor_reads() -> None:
    result = plan("FROM busybox AS a\nFROM busybox\nWORKDIR /w\nCOPY --from=a --chown=1:2 x y\nRUN echo\n")
    copy_step, run_step = result.stages[1].steps[1:]
    assert isinstance(copy_step, CopyStep) and isinstance(run_step, RunStep)
    assert (copy_step.from_stage, copy_step.dest, copy_step.chown) == (0, "/w/y", "1:2")
    assert (run_step.argv, run_step.workdir) == (("/bin/sh", "-c", "echo"), "/w")


def test_errors_name_the_file_and_line() -> None:
    with pytest.raises(DockerfileError) as caught:
        make_plan(
            parse_dockerfile("FROM busybox\n\nRUN --mount=type=nope true\n", "ctx/Dockerfile"),
            base_configs={"busybox": IMAGE},
            build_args={},
            auto_args=AUTO,
        )
    assert (caught.value.filename, caught.value.line) == ("ctx/Dockerfile", 3)
    assert str(caught.value).startswith("ctx/Dockerfile:3: unsupported --mount type 'nope'")
