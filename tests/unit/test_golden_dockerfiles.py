"""Golden Dockerfiles: parse and plan every case under fixtures/dockerfiles.

Each ``fixtures/dockerfiles/<case>/`` holds a ``Dockerfile`` and either ``plan.json`` (the plan,
as ``builder build --print plan`` prints it) or ``error.txt`` (the error, as the CLI prints it
after "error: "). An optional ``args.json`` gives ``build_args`` (a list, as passed to
--build-arg), ``environ`` (for --build-arg NAME without a value), ``target`` and ``images``
(base image configs by reference; any other base gets a busybox-like config).

Regenerate with ``UPDATE_GOLDEN=1 python -m pytest tests/unit/test_golden_dockerfiles.py``, then
read every changed golden against the Dockerfile reference before committing it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from builder.dockerfile import parse_dockerfile
from builder.errors import BuilderError
from builder.plan import DEFAULT_PATH, make_plan
from builder.stages import base_images, parse_build_args, platform_args

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "dockerfiles"
CASES = sorted(path for path in FIXTURES.iterdir() if (path / "Dockerfile").is_file())
DEFAULT_IMAGE = {"config": {"Env": [f"PATH={DEFAULT_PATH}"], "Cmd": ["sh"]}}
OUTCOMES = ("plan.json", "error.txt")


def outcome(case: Path) -> tuple[str, str]:
    """The golden file name this case produces and its content."""
    args_file = case / "args.json"
    args = json.loads(args_file.read_text()) if args_file.exists() else {}
    auto_args = platform_args("linux", "amd64")
    target = args.get("target")
    try:
        build_args = parse_build_args(args.get("build_args", []), args.get("environ", {}))
        dockerfile = parse_dockerfile((case / "Dockerfile").read_bytes().decode(), "Dockerfile")
        images = base_images(dockerfile, build_args, auto_args, target)
        configs = {ref: args.get("images", {}).get(ref, DEFAULT_IMAGE) for ref in images}
        plan = make_plan(
            dockerfile, base_configs=configs, build_args=build_args, auto_args=auto_args, target=target
        )
    except BuilderError as exc:
        return "error.txt", f"{exc}\n"
    return "plan.json", json.dumps(plan.to_json(), indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_golden(case: Path) -> None:
    name, actual = outcome(case)
    if os.environ.get("UPDATE_GOLDEN"):
        for stale in OUTCOMES:
            (case / stale).unlink(missing_ok=True)
        (case / name).write_text(actual)
        return
    other = OUTCOMES[1 - OUTCOMES.index(name)]
    assert not (case / other).exists(), f"expected {other}, but the case produced {name}:\n{actual}"
    assert (case / name).read_text() == actual


def test_the_goldens_cover_enough_cases() -> None:
    valid = [case for case in CASES if (case / "plan.json").exists()]
    invalid = [case for case in CASES if (case / "error.txt").exists()]
    assert len(valid) >= 80
    assert len(invalid) >= 25
    assert len(valid) + len(invalid) == len(CASES)
