"""Walk the stage graph: each stage starts as soon as the stage it is built FROM is built.

Stages run at once, each in a thread (a RUN waits in a child process; hashing and compression
release the GIL), as BuildKit runs its graph: a stage that copies from another runs its steps
before that COPY while the other is still building, and waits at the COPY. Nothing a stage
produces depends on that timing: each stage has an executor of its own, and a cache key reached
by two stages at once is run by one of them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping

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
    """Build the stages of ``plan.order``, each as soon as its base is built, at most ``jobs``
    working at once, on the base ``images`` (``scratch`` for FROM scratch); return the images
    and the built stages by reference and index. The first stage to fail fails the build with its
    own error, the others are stopped; every stage has cleaned up when this returns or raises."""
    return _Walk(plan, images, scratch, executor, jobs).run()


_STOP_POLL = 0.1  # seconds between two stop_all calls while stopped stages finish
_Finished = tuple[int, StageExecutor, ImageState | BaseException]


class _Built(Mapping[int | str, ImageState]):
    """The base images and the stages built so far, as the stages read them.

    A stage reading a stage that is not built yet (a COPY --from after steps that need nothing
    from it) waits for it, and meanwhile gives its turn to work to another stage. It only ever
    waits for a stage before it in the build order, so the first unfinished stage never waits.
    """

    def __init__(
        self,
        images: Mapping[str, ImageState],
        expected: set[int],
        turns: threading.Semaphore,
        check: Callable[[], None],
    ) -> None:
        self._items: dict[int | str, ImageState] = {}
        self._items.update(images)
        self._expected = expected  # the stages that will be built
        self._turns = turns
        self._check = check  # raises once the build is stopping
        self._changed = threading.Condition()

    def __getitem__(self, key: int | str) -> ImageState:
        found = self._items.get(key)
        if found is not None:
            return found
        if key not in self._expected:
            raise KeyError(key)
        self._turns.release()
        try:
            with self._changed:
                while key not in self._items:
                    self._check()
                    self._changed.wait()
                return self._items[key]
        finally:
            self._turns.acquire()

    def __iter__(self) -> Iterator[int | str]:
        return iter(dict(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def add(self, index: int, state: ImageState) -> None:
        with self._changed:
            self._items[index] = state
            self._changed.notify_all()

    def wake(self) -> None:
        """Have the waiting stages look at the stop flag."""
        with self._changed:
            self._changed.notify_all()


class _Walk:
    """One walk of the stage graph, driven by the main thread.

    While stages run in threads, the main thread waits in one place only, ``finished.get``, where
    an interrupt (KeyboardInterrupt) may land; everything else it does with the signals deferred,
    so that no thread it started is ever lost track of. A stage that is the only one able to run
    runs in the main thread, exactly as in a sequential build (what it reads is built then: a
    stage it waited for would have had to be able to run too). Working stages hold one of
    ``jobs`` turns.
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
        self.turns = threading.Semaphore(jobs)
        self.built = _Built(images, set(plan.order), self.turns, executor.control.check)
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
                    with self.turns:
                        state = executor.run_stage(*self._inputs(alone))
                    self._done(alone, executor, state)
                    continue
                finished = self.finished.get()
                with deferred_signals():
                    self._end(*finished)
        finally:
            with deferred_signals():
                self._stop()
        return dict(self.built)

    def _start_ready(self) -> int | None:
        """Start each stage whose base is built in a thread of its own; or, when it is the only
        stage that can run, return it to be run in this thread."""
        ready = [i for i in self.waiting if self.plan.stages[i].base_stage in (None, *self.built)]
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

    def _inputs(self, index: int) -> tuple[Stage, ImageState, Mapping[int | str, ImageState]]:
        """A stage, its base and what it reads."""
        stage = self.plan.stages[index]
        if stage.base_stage is not None:
            base = self.built[stage.base_stage]
        elif stage.base_image is not None:
            base = self.built[stage.base_image]
        else:
            base = self.scratch
        return stage, base, self.built

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
            with self.turns:
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
        self.built.add(index, state)
        self.executor.absorb(executor)

    def _stop(self) -> None:
        """Stop the stages still running (a stage failed, or the build was interrupted) and wait
        until each has cleaned up: the work dir and the mounts go once this returns."""
        if not self.running:
            return
        from builder.sandboxserver import stop_all  # a RUN may have started it

        self.executor.control.stopping.set()
        self.built.wake()
        # Each thread is joined, not awaited on ``finished``: an interrupt landing just after
        # ``finished.get`` returned has lost that stage's report.
        while self.running:
            stop_all()  # every round: a stage may have started a RUN since the last one
            index, thread = next(iter(self.running.items()))
            thread.join(timeout=_STOP_POLL)
            if not thread.is_alive():
                del self.running[index]
