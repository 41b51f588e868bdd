"""The parse memo: a rebuild takes its Dockerfile's parse from the store, not from the parser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from builder import build as build_module
from builder.build import BuildRequest, plan_build
from builder.dockerfile import Dockerfile
from builder.store import Store

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = "FROM scratch\nENV A=1\nCOPY a /a\nRUN --mount=type=cache,target=/c true\n"


def _context(tmp_path: Path, text: str = DOCKERFILE) -> Path:
    context = tmp_path / "context"
    context.mkdir(exist_ok=True)
    (context / "Dockerfile").write_text(text)
    return context


def _memos(store: Store) -> list[Path]:
    return sorted((store.root / "memo").glob("*.json"))


def _no_parse(text: str, filename: str = "Dockerfile") -> Dockerfile:
    raise AssertionError(f"{filename} was parsed again")


def test_a_second_plan_takes_the_parse_from_the_memo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store.open(tmp_path / "store")
    request = BuildRequest(context=_context(tmp_path))
    first, _ = plan_build(request, store)
    assert len(_memos(store)) == 1
    monkeypatch.setattr(build_module, "parse_dockerfile", _no_parse)
    second, _ = plan_build(request, store)
    assert second == first


def test_an_edited_dockerfile_is_parsed_again(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    request = BuildRequest(context=_context(tmp_path))
    plan_build(request, store)
    edited, _ = plan_build(BuildRequest(context=_context(tmp_path, DOCKERFILE + "ENV B=2\n")), store)
    assert len(_memos(store)) == 2
    assert [step.line for step in edited.stages[0].steps][-1] == 5


def test_the_same_text_under_another_name_is_parsed_for_that_name(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    context = _context(tmp_path)
    (context / "Other.Dockerfile").write_text(DOCKERFILE)
    plan_build(BuildRequest(context=context), store)
    plan_build(BuildRequest(context=context, dockerfile=context / "Other.Dockerfile"), store)
    names = {json.loads(path.read_text())["filename"] for path in _memos(store)}
    assert names == {str(context / "Dockerfile"), str(context / "Other.Dockerfile")}


def test_a_memo_of_another_shape_is_parsed_again_and_replaced(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    request = BuildRequest(context=_context(tmp_path))
    first, _ = plan_build(request, store)
    (memo,) = _memos(store)
    memo.write_text(json.dumps({"filename": "x", "instructions": "not a list"}))
    again, _ = plan_build(request, store)
    assert again == first
    assert json.loads(memo.read_text())["instructions"][0]["keyword"] == "FROM"


def test_a_rebuild_does_not_load_dockerfile_parse(tmp_path: Path) -> None:
    """The point of the memo: a new process planning the same Dockerfile again does not import
    dockerfile_parse (and logging with it)."""
    store, context = tmp_path / "store", _context(tmp_path)
    script = (
        "import sys; from pathlib import Path\n"
        "from builder.build import BuildRequest, plan_build\n"
        "from builder.store import Store\n"
        f"plan_build(BuildRequest(context=Path({str(context)!r})), Store.open(Path({str(store)!r})))\n"
        "print('dockerfile_parse' in sys.modules, 'logging' in sys.modules)\n"
    )
    runs = [
        subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    assert [run.stdout.split() for run in runs] == [["True", "True"], ["False", "False"]]
