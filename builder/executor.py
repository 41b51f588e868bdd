"""Run planned stages: cache lookups, RUN in the sandbox, COPY and WORKDIR through overlay.

Each filesystem step gets a cache key from the parent key, the step's semantic fields and the
content digests of its inputs (recipe versioned below). A hit reuses the recorded result
without mounting anything; a miss mounts the layers, runs the step, diffs the upper dir into a
layer (or none, when nothing changed) and records the result.

Stages may run at once in threads (builder.stagegraph): each gets an executor of its own
(``for_stage``); what they share (the stop flag, the log, the cache-key claims) is in ``_Control``.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from msgspec import Struct, field

from builder.buildcontext import BuildContext, digest_entry
from builder.cachekey import CacheKey, base_key, explain_miss, step_fields, step_key
from builder.compression import COMPRESSION_ANNOTATION, COMPRESSIONS, Compression
from builder.digest import sha256_digest
from builder.errors import BuilderError, ContextError, SandboxError, StepFailed
from builder.fscopy import make_dirs
from builder.oci import canonical_json, format_time
from builder.plan import ConfigStep, CopyStep, RunStep, Stage, Step, WorkdirStep
from builder.snapshot import Mounted, Snapshotter
from builder.store import Store, remove_tree
from builder.transfer import run_copy, source_digests
from builder.users import Identity, resolve_user

__all__ = ["BuildSettings", "ImageState", "Layer", "StageExecutor"]

HISTORY_COMMENT = "builder.dockerfile.v0"

_ROOT = Identity(0, 0)
Json = dict[str, Any]
Log = Callable[[str], None]


class Layer(Struct, frozen=True):
    diff_id: str
    blob: Json  # the OCI descriptor of its compressed blob


class ImageState(Struct):
    """An image being built: its full config document and its layers, bottom first."""

    config: Json
    layers: list[Layer] = field(default_factory=list)

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]


class BuildSettings(Struct, frozen=True):
    compression: Compression
    level: int | None
    epoch: int | None  # SOURCE_DATE_EPOCH: clamps file times, fixes history times
    no_cache: bool
    no_cache_filter: tuple[str, ...]  # stage names or indexes built without the cache
    network: str  # the network of RUN steps that do not choose one
    dockerfile: str  # the Dockerfile's name, for messages
    secrets: Mapping[str, bytes] = field(default_factory=dict)  # --secret: never keyed or stored
    previous_keys: Mapping[str, Json] = field(default_factory=dict)  # last build's, to explain misses
    # Stages no image of this build holds (COPY --from and RUN --mount sources alone): their
    # layers are stored as plain tars, hashed once and never compressed, as BuildKit compresses
    # nothing before an export. A later build that ships one compresses it then, once.
    unshipped: frozenset[int] = frozenset()


@contextlib.contextmanager
def _merged(mounting: AbstractContextManager[Mounted]) -> Iterator[Path]:
    with mounting as mounted:
        yield mounted.merged


class _Stopped(Exception):
    """A stage given up because another one failed or the build was interrupted."""


class _Control:
    """What the executors of one build's concurrent stages share."""

    def __init__(self, log: Log) -> None:
        self.stopping = threading.Event()
        self._log = log
        self._log_lock = threading.Lock()
        self._claims_lock = threading.Lock()
        self._claims: dict[str, threading.Lock] = {}

    def log(self, line: str) -> None:
        """Lines from several threads, each written whole."""
        with self._log_lock:
            self._log(line)

    def check(self) -> None:
        """Give the stage up once the build is stopping (checked between steps)."""
        if self.stopping.is_set():
            raise _Stopped

    @contextlib.contextmanager
    def claim(self, key: str) -> Iterator[None]:
        """Held while a step with this cache key is looked up and run: a stage that reaches the
        same key meanwhile waits, then hits the cache, as it would have in sequence."""
        with self._claims_lock:
            lock = self._claims.setdefault(key, threading.Lock())
        with lock:
            yield


class StageExecutor:
    """Runs stages of one build; owns nothing but what it is handed.

    Each stage runs in an executor of its own (``for_stage``): its own work dir, so that two
    stages never share a scratch name, and its own counters, added up as stages end.
    """

    def __init__(
        self,
        store: Store,
        snapshots: Snapshotter,
        context: BuildContext,
        settings: BuildSettings,
        workdir: Path,
        log: Log,
    ) -> None:
        self.store = store
        self.snapshots = snapshots
        self.context = context
        self.settings = settings
        self.workdir = workdir
        self.control = _Control(log)
        self.executed = 0  # steps that ran (not served from the cache)
        self.keys: dict[str, Json] = {}  # "stage/step" → CacheKey.to_json(), for the next explanation
        self.stage_keys: dict[int, list[str]] = {}  # the cache keys each stage used, for --cache-to
        self.needs_sandbox = False  # whether the stage being run has RUN steps
        self.ships = True  # whether the stage's layers go into an image (see BuildSettings.unshipped)

    def for_stage(self, index: int) -> StageExecutor:
        """An executor for stage ``index``: the same collaborators, stop flag, claims and log,
        with a work dir and counters of its own."""
        workdir = self.workdir / f"stage-{index}"
        try:
            workdir.mkdir(exist_ok=True)
        except OSError as exc:
            raise self.store.storage_error(exc) from exc
        executor = copy.copy(self)
        executor.workdir = workdir
        executor.executed, executor.keys, executor.stage_keys = 0, {}, {}
        executor.ships = index not in self.settings.unshipped
        return executor

    def absorb(self, finished: StageExecutor) -> None:
        """Count what the executor of a finished stage did."""
        self.executed += finished.executed
        self.keys |= finished.keys
        self.stage_keys |= finished.stage_keys

    def run_stage(
        self, stage: Stage, base: ImageState, sources: Mapping[int | str, ImageState]
    ) -> ImageState:
        """Build ``stage`` on ``base``; ``sources`` holds the stages and images COPY --from reads."""
        state = ImageState(dict(base.config), list(base.layers))
        history = list(state.config.get("history") or [])
        parent = base_key(state.diff_ids)
        used = self.stage_keys.setdefault(stage.index, [])
        ignored = self.settings.no_cache_filter
        skip_cache = self.settings.no_cache or stage.name in ignored or str(stage.index) in ignored
        created = self._base_time(base)
        total = len(stage.steps)
        self.needs_sandbox = any(isinstance(step, RunStep) for step in stage.steps)
        for number, step in enumerate(stage.steps, 1):
            self.control.check()
            tag = f"[{stage.name or f'stage-{stage.index}'} {number}/{total}]"
            if isinstance(step, ConfigStep):
                history.append(self._history(step, created, empty=True))
                continue
            key = self._key(parent, step, sources)
            slot = f"{stage.index}/{number}"
            self.keys[slot] = key.to_json()
            used.append(key.digest)
            record = self._result(
                step, key, slot=slot, tag=tag, skip_cache=skip_cache, state=state, sources=sources
            )
            created = float(record["created"])
            if record["layer"] is not None:
                state.layers.append(self._layer(record["layer"]))
            history.append(self._history(step, created, empty=record["layer"] is None))
            parent = key.digest
        state.config["config"] = stage.config
        if stage.author is not None:
            state.config["author"] = stage.author
        state.config["history"] = history
        state.config["rootfs"] = {"type": "layers", "diff_ids": state.diff_ids}
        state.config["created"] = format_time(created)
        return state

    def _result(
        self,
        step: Step,
        key: CacheKey,
        *,
        slot: str,
        tag: str,
        skip_cache: bool,
        state: ImageState,
        sources: Mapping[int | str, ImageState],
    ) -> Json:
        """The step's recorded result, from the cache or by running it (and recording it)."""
        label = f"{tag} {step.created_by}"
        with self.control.claim(key.digest):
            self.control.check()
            record = None if skip_cache else self._cached(key.digest)
            if record is not None:
                self.control.log(f"{label}  CACHED")
                return record
            previous = self.settings.previous_keys.get(slot)
            why = "--no-cache" if skip_cache else explain_miss(key, previous)
            self.control.log(f"{label}  (not cached: {why})")
            if self.needs_sandbox:  # started at the first miss, before a commit starts threads
                from builder.sandboxserver import start_server  # a cached build never needs it

                try:
                    start_server()  # forked while this is the only thread: about 1 ms instead of 55
                except OSError as exc:
                    raise self._fail(step, _sandbox_failure(exc)) from exc
            started = time.monotonic()
            record = self._execute(step, state, sources)
            self.store.put_cache(key.digest, record)
            self.executed += 1
            self.control.log(f"{tag} done in {time.monotonic() - started:.2f}s")
        return record

    def _base_time(self, base: ImageState) -> float:
        if self.settings.epoch is not None:
            return float(self.settings.epoch)
        text = base.config.get("created")
        if isinstance(text, str):
            try:
                return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
            except ValueError:
                pass
        return 0.0

    def _history(self, step: Step, created: float, *, empty: bool) -> Json:
        entry: Json = {
            "created": format_time(self.settings.epoch if self.settings.epoch is not None else created),
            "created_by": step.created_by,
            "comment": HISTORY_COMMENT,
        }
        if empty:
            entry["empty_layer"] = True
        return entry

    # cache

    def _key(self, parent: str, step: Step, sources: Mapping[int | str, ImageState]) -> CacheKey:
        fields = step_fields(step)
        inputs: Json = {"epoch": self.settings.epoch}
        details: dict[str, dict[str, str]] = {}
        if isinstance(step, RunStep):
            details["env"] = {name: sha256_digest(value.encode()) for name, value in step.env}
            inputs |= self._bind_inputs(step, sources)
        if isinstance(step, CopyStep):
            inputs["sources"], found = self._source_digest(step, sources)
            if found is not None:
                details["sources"] = found
        return step_key(parent, type(step).__name__, fields, inputs, details)

    def _source_digest(
        self, step: CopyStep, sources: Mapping[int | str, ImageState]
    ) -> tuple[Any, dict[str, str] | None]:
        """What the copied content is: a stage's or image's layers, or the context files' digests."""
        origin = self._origin(step, sources)
        try:
            if origin is not None:
                found = self._origin_digests(step, origin)
            else:
                found = source_digests(step, self.context, None, self.workdir)
        except BuilderError as exc:
            raise self._fail(step, str(exc)) from exc
        return sha256_digest(canonical_json(found)), found

    def _bind_inputs(self, step: RunStep, sources: Mapping[int | str, ImageState]) -> Json:
        """What a RUN's bind mounts show it: context content, or a stage's or image's layers."""
        inputs: Json = {}
        for mount in step.mounts:
            if mount.type != "bind":
                continue
            if mount.from_stage is not None or mount.from_image is not None:
                origin = sources[mount.from_stage if mount.from_stage is not None else str(mount.from_image)]
                inputs[f"mount:{mount.target}"] = origin.diff_ids
                continue
            found: dict[str, str] = {}
            try:
                sums = self.context.sums
                for source in self.context.match(mount.source or "."):
                    top = self.context.describe(source)
                    found[source.relpath] = digest_entry(source.relpath, top, sums=sums)
                    for entry in self.context.entries(source) if source.path.is_dir() else ():
                        name = f"{source.relpath}/{entry.rel}"
                        found[name] = digest_entry(name, entry, sums=sums)
            except BuilderError as exc:
                raise self._fail(step, str(exc)) from exc
            inputs[f"mount:{mount.target}"] = sha256_digest(canonical_json(found))
        return inputs

    def _origin_digests(self, step: CopyStep, origin: ImageState) -> dict[str, str]:
        """The content of the paths copied from a stage or image, as BuildKit keys COPY --from.

        Layers name their content, so the result is memoised by them: a cached source stage
        costs no mount; a rebuilt one that made the same files still hits.
        """
        selection = {"sources": list(step.sources), "exclude": list(step.exclude), "parents": step.parents}
        memo = sha256_digest(canonical_json({"layers": origin.diff_ids, **selection}))
        found = self.store.get_memo(memo)
        if isinstance(found, dict):
            return found
        with self.snapshots.mount(origin.diff_ids, self.workdir, writable=False) as src:
            found = source_digests(step, self.context, src.merged, self.workdir)
        self.store.put_memo(memo, found)
        return found

    def _layer(self, recorded: Json) -> Layer:
        """A recorded layer in this build's compression: a cache filled by a gzip build serves a
        zstd build with zstd blobs (converted once; the store keeps both). A stage that ships
        nothing takes any."""
        blob, compression = recorded["blob"], self.settings.compression
        if self.ships and blob.get("mediaType") != compression.media_type:
            from builder.export import layer_as  # only when compressions differ (cached-path start-up)

            blob = layer_as(self.store, dict(blob), recorded["diff_id"], compression, self.settings.level)
        return Layer(recorded["diff_id"], blob)

    def _cached(self, key: str) -> Json | None:
        """A recorded result whose layer is still in the store, or None."""
        record = self.store.get_cache(key)
        if record is None or "created" not in record or "layer" not in record:
            return None
        layer = record["layer"]
        blob = layer.get("blob", {}) if layer is not None else None
        if blob is not None and not self.store.has_blob(str(blob.get("digest")), blob.get("size")):
            return None  # gone, or cut short by a power cut before the store was synced
        self.store.touch_cache(key)
        return record

    # execution

    def _execute(self, step: Step, state: ImageState, sources: Mapping[int | str, ImageState]) -> Json:
        now = float(self.settings.epoch) if self.settings.epoch is not None else time.time()
        # COPY --link writes onto nothing: its layer does not depend on the ones below.
        lowers = [] if isinstance(step, CopyStep) and step.link else state.diff_ids
        with self.snapshots.mount(lowers, self.workdir, writable=True) as mounted:
            if isinstance(step, RunStep):
                self._run(step, mounted, sources)
            elif isinstance(step, CopyStep):
                self._copy(step, mounted, sources, state)
            elif isinstance(step, WorkdirStep):
                self._mkdir(step, mounted)
        assert mounted.upper is not None
        try:
            layer = self._commit(mounted.upper, lowers)
        finally:
            remove_tree(mounted.upper)  # committed: renamed away already
        return {"created": now, "layer": layer}

    def _commit(self, upper: Path, diff_ids: list[str]) -> Json | None:
        from builder.layer import write_layer  # a cached build writes none (start-up time)

        lowers = [self.snapshots.path(d) for d in reversed(diff_ids)]
        epoch = self.settings.epoch
        compression, level = (
            (self.settings.compression, self.settings.level)
            if self.ships
            else (COMPRESSIONS["uncompressed"], None)
        )
        with self.store.blob_writer() as writer:
            blob = write_layer(upper, lowers, writer.file, compression=compression, level=level, epoch=epoch)
            if blob is None:
                return None
            writer.commit_hashed(blob.digest)
        desc = {
            "mediaType": blob.media_type,
            "digest": blob.digest,
            "size": blob.size,
            # How to recompress the tar to these bytes, for whoever verifies the build.
            "annotations": {COMPRESSION_ANNOTATION: compression.settings(level)},
        }
        self.store.add_layer_blob(blob.diff_id, desc)
        self.snapshots.commit(blob.diff_id, upper)
        return {"diff_id": blob.diff_id, "blob": desc}

    def _fail(self, step: Step, message: str) -> BuilderError:
        return StepFailed(f"{self.settings.dockerfile}:{step.line}: {message}")

    def _run(self, step: RunStep, mounted: Mounted, sources: Mapping[int | str, ImageState]) -> None:
        from builder.runmounts import run_mounts  # only a RUN that misses needs these (start-up time)
        from builder.sandbox import SandboxSpec
        from builder.sandboxserver import run_sandboxed

        def open_origin(stage: int | None, image: str | None) -> AbstractContextManager[Path]:
            origin = sources[stage if stage is not None else str(image)]
            return _merged(self.snapshots.mount(origin.diff_ids, self.workdir, writable=False))

        try:
            identity = resolve_user(mounted.merged, step.user)
            with run_mounts(
                step,
                scratch=self.workdir / f"run-{step.line}",
                cache_root=self.store.root / "cachemounts",
                context=self.context,
                secrets=self.settings.secrets,
                open_origin=open_origin,
            ) as (binds, extra_env):
                spec = SandboxSpec(
                    root=str(mounted.merged),
                    argv=step.argv,
                    env=tuple({**dict(step.env), **extra_env}.items()),
                    cwd=step.workdir,
                    uid=identity.uid,
                    gid=identity.gid,
                    groups=identity.groups,
                    network=self._network(step),
                    binds=binds,
                )
                sys.stdout.flush()
                try:
                    status = run_sandboxed(spec, stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno())
                except OSError as exc:  # no sandbox server could be started (fork or exec failed)
                    raise SandboxError(_sandbox_failure(exc)) from exc
        except BuilderError as exc:
            raise self._fail(step, str(exc)) from exc
        if status != 0:
            command = " ".join(step.argv)
            what = "could not be started" if status == 125 else f"exited with status {status}"
            raise self._fail(step, f"RUN {command!r} {what}.")

    def _network(self, step: RunStep) -> str:
        chosen = self.settings.network if step.network == "default" else step.network
        return "none" if chosen == "none" else "host"

    def _origin(self, step: CopyStep, sources: Mapping[int | str, ImageState]) -> ImageState | None:
        if step.from_stage is not None:
            return sources[step.from_stage]
        if step.from_image is not None:
            return sources[step.from_image]
        return None

    def _copy(
        self, step: CopyStep, mounted: Mounted, sources: Mapping[int | str, ImageState], state: ImageState
    ) -> None:
        origin = self._origin(step, sources)
        # --chown by name reads the image's /etc/passwd, which a --link copy does not write onto.
        by_name = step.chown is not None and not step.chown.replace(":", "").isdigit()
        try:
            with contextlib.ExitStack() as stack:
                mount = partial(self.snapshots.mount, workdir=self.workdir, writable=False)
                src = stack.enter_context(mount(origin.diff_ids)).merged if origin else None
                users = stack.enter_context(mount(state.diff_ids)).merged if step.link and by_name else None
                run_copy(step, mounted.merged, self.context, src, self.workdir, users or mounted.merged)
        except BuilderError as exc:
            raise self._fail(step, str(exc)) from exc
        except OSError as exc:  # the store's file system (heredoc files, the copy's writes)
            raise self._fail(step, str(self.store.storage_error(exc))) from exc

    def _mkdir(self, step: WorkdirStep, mounted: Mounted) -> None:
        try:
            make_dirs(mounted.merged, step.path, _ROOT)
        except (OSError, ContextError) as exc:
            raise self._fail(step, f"WORKDIR {step.path} cannot be created: {exc}") from exc


def _sandbox_failure(exc: OSError) -> str:
    return f"the sandbox could not be started: {exc.strerror or exc}."
