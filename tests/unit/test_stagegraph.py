"""The stage walk's stop: it waits for every stage thread, however their reports went."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from builder.dockerfile import parse_dockerfile
from builder.executor import ImageState
from builder.plan import make_plan
from builder.stagegraph import _Walk

TWO_STAGES = "FROM scratch AS a\nCOPY x /x\nFROM scratch\nCOPY --from=a /x /y\n"


@pytest.mark.timeout(10)
def test_stop_joins_a_stage_whose_report_was_lost() -> None:
    """An interrupt that lands just after ``finished.get`` returned loses that stage's report;
    stopping must still end once the stage's thread has ended, not wait for the report forever."""
    plan = make_plan(parse_dockerfile(TWO_STAGES), base_configs={}, build_args={}, auto_args={})
    control = SimpleNamespace(stopping=threading.Event(), check=lambda: None)
    executor: Any = SimpleNamespace(control=control)
    walk = _Walk(plan, {}, ImageState({}), executor, jobs=2)
    stage = threading.Thread(target=time.sleep, args=(0.2,))
    stage.start()
    walk.running[0] = stage  # its report is not in walk.finished
    walk._stop()
    assert control.stopping.is_set()
    assert walk.running == {} and not stage.is_alive()
