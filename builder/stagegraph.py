"""Walk the stage graph: each stage starts as soon as the stages it reads are built.

Independent stages run at once, each in a thread (a RUN waits in a child process; hashing and
compression release the GIL). Nothing a stage produces depends on that timing: each stage has an
executor of its own, and a cache key reached by two stages at once is run by one of them.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Mapping

from builder.executor import ImageState, StageExecutor
from builder.plan import Plan, RunStep, Stage
from builder.signals import deferred_signals, leave_signals_to_main_thread

__all__ = ["run_stages"]


def run_stages(
    plan: Plan,
    images: Mapping[str, ImageState],
    scratch: ImageState,
    executor: StageExecutor,
    *,
    jobs: int,
) -> dict[int | str, ImageState]:
    """Build the stages of ``plan.order``, each as soon as the stages it reads are built, at most
    ``jobs`` at once, on the base ``images`` (``scratch`` for FROM scratch); return the images
    and the built stages by reference and index. The first stage to fail fails the build with its
    own error, the others are stopped; every stage has cleaned up when this returns or raises."""
    return _Walk(plan, images, scratch, executor, jobs).run()


_STOP_POLL = 0.1  # seconds between two stop_all calls while stopped stages finish
_Finished = tuple[int, StageExecutor, ImageState | BaseException]


class _Walk:
    """One walk of the stage graph, driven by the main thread.

    While stages run in threads, the main thread waits in one place only, ``finished.get``, where
    an interrupt (KeyboardInterrupt) may land; everything else it does with the signals deferred,
    so that no thread it started is ever lost track of. A stage that is the only one able to run
    runs in the main thread, exactly as in a sequential build.
    """

    def __init__(
        self,
        plan: Plan,
        images: Mapping[str, ImageState],
        scratch: ImageState,
        executor: StageExecutor,
        jobs: int,
    ) -> None:
        self.plan = plan
        self.scratch = scratch
        self.executor = executor
        self.jobs = jobs
        self.built: dict[int | str, ImageState] = dict(images.items())
        self.waiting = list(plan.order)
        self.running: dict[int, threading.Thread] = {}
        self.finished: queue.SimpleQueue[_Finished] = queue.SimpleQueue()

    def run(self) -> dict[int | str, ImageState]:
        try:
            while self.waiting or self.running:
                with deferred_signals():
                    alone = self._start_ready()
                if alone is not None:
                    executor = self.executor.for_stage(alone)
                    self._done(alone, executor, executor.run_stage(*self._inputs(alone)))
                    continue
                finished = self.finished.get()
                with deferred_signals():
                    self._end(*finished)
        finally:
            with deferred_signals():
                self._stop()
        return self.built

    def _start_ready(self) -> int | None:
        """Start each stage whose inputs are built in a thread of its own; or, when it is the
        only stage that can run, return it to be run in this thread."""
        built = self.built.keys()
        ready = [i for i in self.waiting if built >= set(self.plan.stages[i].needs)]
        ready = ready[: self.jobs - len(self.running)]
        for index in ready:
            self.waiting.remove(index)
        if len(ready) == 1 and not self.running:
            return ready[0]
        if any(isinstance(step, RunStep) for index in ready for step in self.plan.stages[index].steps):
            from builder.sandboxserver import start_server  # not on a cached build's path

            start_server()  # forked before the threads exist: about 1 ms instead of 55
        for index in ready:
            executor = self.executor.for_stage(index)
            # Started with the signals deferred here, so it blocks them from its first instant.
            args = (index, executor, *self._inputs(index))
            thread = threading.Thread(target=self._work, args=args, name=f"stage-{index}")
            self.running[index] = thread
            thread.start()
        return None

    def _inputs(self, index: int) -> tuple[Stage, ImageState, dict[int | str, ImageState]]:
        """A stage, its base and what it reads (a copy: the main thread adds to ``built``)."""
        stage = self.plan.stages[index]
        if stage.base_stage is not None:
            base = self.built[stage.base_stage]
        elif stage.base_image is not None:
            base = self.built[stage.base_image]
        else:
            base = self.scratch
        return stage, base, dict(self.built)

    def _work(
        self,
        index: int,
        executor: StageExecutor,
        stage: Stage,
        base: ImageState,
        sources: Mapping[int | str, ImageState],
    ) -> None:
        leave_signals_to_main_thread()
        outcome: ImageState | BaseException
        try:
            outcome = executor.run_stage(stage, base, sources)
        except BaseException as exc:  # raised again by the main thread
            outcome = exc
        self.finished.put((index, executor, outcome))

    def _end(self, index: int, executor: StageExecutor, outcome: ImageState | BaseException) -> None:
        self.running.pop(index).join()
        if isinstance(outcome, BaseException):
            raise outcome
        self._done(index, executor, outcome)

    def _done(self, index: int, executor: StageExecutor, state: ImageState) -> None:
        self.built[index] = state
        self.executor.absorb(executor)

    def _stop(self) -> None:
        """Stop the stages still running (a stage failed, or the build was interrupted) and wait
        until each has cleaned up: the work dir and the mounts go once this returns."""
        if not self.running:
            return
        from builder.sandboxserver import stop_all  # a RUN may have started it

        self.executor.control.stopping.set()
        while self.running:
            stop_all()  # every round: a stage may have started a RUN since the last one
            with contextlib.suppress(queue.Empty):
                index, _, _ = self.finished.get(timeout=_STOP_POLL)
                self.running.pop(index).join()
