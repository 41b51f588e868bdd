"""The wiring of a build: parse → resolve bases → plan → execute stages → image → outputs.

The library entry point. It prints nothing itself: progress goes to the ``log`` it is handed,
errors are raised as :class:`builder.errors.BuilderError`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Mapping
from importlib.machinery import PathFinder
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msgspec import Struct, ValidationError, convert, field, structs, to_builtins

from builder import dockerfile as dockerfile_module
from builder.buildcontext import BuildContext, FileSums
from builder.compression import COMPRESSIONS
from builder.credentials import RegistryOptions
from builder.digest import sha256_digest
from builder.distribution import fetch_image
from builder.dockerfile import Dockerfile, parse_dockerfile
from builder.errors import BuilderError, DockerfileError, StoreError
from builder.executor import BuildSettings, ImageState, Layer, StageExecutor
from builder.export import Output, write_output
from builder.fetch import is_url, parse_git_source
from builder.images import host_arch, resolve_image
from builder.oci import (
    CONFIG_MEDIA_TYPE,
    canonical_json,
    descriptor,
    image_manifest,
    new_image_config,
    parse_reference,
)
from builder.plan import CopyStep, Plan, make_plan
from builder.shortcut import Witness
from builder.snapshot import Snapshotter
from builder.stagegraph import run_stages
from builder.stages import base_images, platform_args
from builder.store import Store

if TYPE_CHECKING:
    from builder.cacheio import CacheSpec

__all__ = [
    "BuildRequest",
    "BuildResult",
    "Output",
    "build",
    "host_arch",
    "plan_build",
    "publish",
    "resolve_image",
    "source_date_epoch",
]

Json = dict[str, Any]
Log = Callable[[str], None]

# Stages built at once, when the graph allows: most of a stage's time is spent waiting for a
# RUN or in compressors that release the GIL, so a few more than the cores keep them busy.
_STAGE_JOBS = max(4, os.cpu_count() or 1)


class BuildRequest(Struct, frozen=True):
    context: Path
    dockerfile: Path | None = None  # default: CONTEXT/Dockerfile
    tags: tuple[str, ...] = ()
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    outputs: tuple[Output, ...] = ()
    compression: str = "gzip"
    compression_level: int | None = None
    source_date_epoch: int | None = None
    no_cache: bool = False
    network: str = "default"  # for RUN steps without --network: default (the host's), none or host
    secrets: Mapping[str, bytes] = field(default_factory=dict)  # --secret id → bytes
    no_cache_filter: tuple[str, ...] = ()  # stages (by name or index) to run without the cache
    cache_from: tuple[CacheSpec, ...] = ()
    cache_to: tuple[CacheSpec, ...] = ()
    registry: RegistryOptions = field(default_factory=RegistryOptions)
    pull: bool = False  # pull every base image again, even one the store holds
    shortcut: str | None = None  # the key a fully cached build leaves its shortcut under

    @property
    def dockerfile_path(self) -> Path:
        return self.dockerfile or self.context / "Dockerfile"


class BuildResult(Struct, frozen=True):
    manifest_digest: str
    config_digest: str
    executed: int  # steps that ran; 0 on a fully cached rebuild
    unused_args: tuple[str, ...]


def _image_state(store: Store, ref: str, request: BuildRequest, log: Log) -> ImageState:
    """A base image from the store, pulled first when the reference names a registry and the
    store does not hold it (or always, with ``request.pull``)."""
    try:
        _, manifest, config = fetch_image(store, ref, request.registry, log, pull=request.pull)
    except BuilderError as exc:  # the Dockerfile names the image: say which file
        raise DockerfileError(str(exc), filename=str(request.dockerfile_path)) from exc
    diff_ids = config["rootfs"]["diff_ids"]
    layers = [Layer(diff_id, desc) for diff_id, desc in zip(diff_ids, manifest["layers"], strict=True)]
    return ImageState(config, layers)


def source_date_epoch(request: BuildRequest) -> int | None:
    """SOURCE_DATE_EPOCH from --source-date-epoch, a build arg or the environment, in that order."""
    if request.source_date_epoch is not None:
        return request.source_date_epoch
    text = request.build_args.get("SOURCE_DATE_EPOCH") or os.environ.get("SOURCE_DATE_EPOCH")
    if not text:
        return None
    if not text.isdigit():
        raise BuilderError(f"SOURCE_DATE_EPOCH={text!r} is not a whole number of seconds.")
    return int(text)


def plan_build(
    request: BuildRequest, store: Store, log: Log = lambda _line: None
) -> tuple[Plan, dict[str, ImageState]]:
    """Parse the Dockerfile and plan it against the base images (pulled when needed)."""
    path = request.dockerfile_path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DockerfileError(f"cannot read the Dockerfile: {exc.strerror}", filename=str(path)) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DockerfileError(f"is not UTF-8 text (byte {exc.start})", filename=str(path), line=line) from exc
    dockerfile = _parse(store, text, str(path))
    auto_args = platform_args("linux", host_arch())
    bases = base_images(dockerfile, request.build_args, auto_args, request.target)
    images = {ref: _image_state(store, ref, request, log) for ref in bases}
    plan = make_plan(
        dockerfile,
        base_configs={ref: state.config for ref, state in images.items()},
        build_args=request.build_args,
        auto_args=auto_args,
        target=request.target,
    )
    for ref in plan.images:
        if ref not in images:
            images[ref] = _image_state(store, ref, request, log)
    return plan, images


def _parse(store: Store, text: str, filename: str) -> Dockerfile:
    """The Dockerfile parsed, or as parsed before. A parse depends on the text, the file name
    (for messages) and the parser alone, so a rebuild takes it from the store's memo and never
    loads dockerfile_parse and logging: about 5 ms of a cached build's start-up."""
    key = sha256_digest(canonical_json({"parser": _parser_identity(), "filename": filename, "text": text}))
    known = store.get_memo(key)
    if known is not None:
        with contextlib.suppress(ValidationError):  # another shape: parsed again below
            return convert(known, Dockerfile)
    dockerfile = parse_dockerfile(text, filename)
    with contextlib.suppress(StoreError):  # only a cache: a store that cannot take it fails no build
        store.put_memo(key, to_builtins(dockerfile))
    return dockerfile


@functools.cache
def _parser_identity() -> str:
    """What the parse depends on besides its input: builder's parser and the installed
    dockerfile_parse (found without importing it), by their files' names, sizes and times."""
    files = [Path(dockerfile_module.__file__)]
    spec = PathFinder.find_spec("dockerfile_parse")
    for where in (spec.submodule_search_locations or []) if spec is not None else []:
        files += sorted(Path(where).glob("*.py"))
    stamps = ((path, path.stat()) for path in files)
    return ",".join(f"{path}:{info.st_size}:{info.st_mtime_ns}" for path, info in stamps)


def build(request: BuildRequest, store: Store, log: Log) -> BuildResult:
    """Build the image the request describes, tag it in the store and write its outputs."""
    with store.lease():  # nothing this build writes is pruned while it runs
        witness = _witness(request)
        if witness is None:
            return _build(request, store, log, None)
        store.read_log = witness
        try:
            return _build(request, store, _logged(log, witness.lines), witness)
        finally:
            store.read_log = None


def _build(request: BuildRequest, store: Store, log: Log, witness: Witness | None) -> BuildResult:
    if request.compression not in COMPRESSIONS:
        raise BuilderError(
            f"unknown compression {request.compression!r}; choose one of {', '.join(sorted(COMPRESSIONS))}."
        )
    build_id = sha256_digest(
        canonical_json({"dockerfile": str(request.dockerfile_path.resolve()), "target": request.target})
    )
    previous_keys = store.get_explanation(build_id)
    settings = BuildSettings(
        compression=COMPRESSIONS[request.compression],
        level=request.compression_level,
        epoch=source_date_epoch(request),
        no_cache=request.no_cache,
        no_cache_filter=request.no_cache_filter,
        network=request.network,
        secrets=request.secrets,
        dockerfile=str(request.dockerfile_path),
        previous_keys=previous_keys,
    )
    for spec in request.cache_from:
        _import_cache(store, spec, request.registry, log)
    if witness is not None:
        witness.resolved(request.dockerfile_path, required=True)
    plan, images = plan_build(request, store, log)
    if witness is not None and _fetches(plan):
        witness.sound = False
    if not any(spec.mode == "max" for spec in request.cache_to):  # mode=max ships every stage
        settings = structs.replace(
            settings, unshipped=frozenset(plan.order) - set(_base_chain(plan, plan.target))
        )
    for warning in plan.warnings:
        log(f"warning: {warning}")
    sums_key = sha256_digest(canonical_json({"file-sums": str(request.context.resolve())}))
    known = store.get_memo(sums_key)
    sums = FileSums(known if isinstance(known, dict) else None)
    context = BuildContext.load(request.context, request.dockerfile_path, sums, witness)
    snapshots = Snapshotter(store)
    scratch = ImageState(new_image_config(host_arch()))
    try:
        with store.workdir() as workdir:
            executor = StageExecutor(store, snapshots, context, settings, workdir, log)
            results = run_stages(plan, images, scratch, executor, jobs=_STAGE_JOBS)
    finally:  # what was hashed is right whatever became of the build
        _keep_sums(store, sums_key, sums)
    if executor.keys != previous_keys:
        store.put_explanation(build_id, executor.keys)
    for spec in request.cache_to:
        _export_cache(store, spec, plan, executor.stage_keys, settings, request.registry, log)
    store.read_log = None  # what follows writes the build's outputs, which are not its inputs
    final = results[plan.target]
    manifest_digest, config_digest = _store_image(store, final)
    publish(request, store, manifest_digest, log)
    if witness is not None and request.shortcut is not None and executor.executed == 0:
        digests = [manifest_digest, config_digest, *(str(layer.blob["digest"]) for layer in final.layers)]
        if not request.tags:  # a tag would have synced them: a shortcut's tag counts on it
            store.sync()
        _leave_shortcut(store, request.shortcut, witness, digests, plan.unused_args)
    return BuildResult(manifest_digest, config_digest, executor.executed, plan.unused_args)


def _witness(request: BuildRequest) -> Witness | None:
    """A witness for a build that may leave a shortcut: a plain one (see builder.shortcut)."""
    plain = not (
        request.outputs
        or request.cache_from
        or request.cache_to
        or request.no_cache
        or request.no_cache_filter
        or request.pull
        or request.secrets
    )
    return Witness() if plain and request.shortcut is not None else None


def _logged(log: Log, lines: list[str]) -> Log:
    def both(line: str) -> None:
        lines.append(line)
        log(line)

    return both


def _fetches(plan: Plan) -> bool:
    """Whether a step names a URL or a Git repository (fetched or asked again by every build)."""
    return any(
        is_url(source) or parse_git_source(source) is not None
        for stage in plan.stages
        for step in stage.steps
        if isinstance(step, CopyStep) and step.add
        for source in step.sources
    )


def _leave_shortcut(
    store: Store, key: str, witness: Witness, digests: list[str], unused: tuple[str, ...]
) -> None:
    """Leave the build's shortcut (the image's blobs first): only a cache, which a store that
    cannot take it loses."""
    with contextlib.suppress(StoreError, OSError):
        for digest in digests:
            path = store.blob_path(digest)
            witness.blob(path, path.stat().st_size)
        entry = witness.entry(digests[0], unused)
        if entry is not None:
            store.put_memo(key, entry)


def _keep_sums(store: Store, key: str, sums: FileSums) -> None:
    """Remember the context's digests for the next build. Only a cache: a store that cannot take
    them fails no build, nor hides why one failed."""
    if sums.changed:
        with contextlib.suppress(StoreError):
            store.put_memo(key, sums.kept)


def publish(request: BuildRequest, store: Store, manifest_digest: str, log: Log) -> None:
    """What a build does last with its image: tag it in the store and write the outputs."""
    names = [parse_reference(tag) for tag in request.tags]
    for ref in names:
        store.set_tag(str(ref), manifest_digest)
    for output in request.outputs:
        compression = output.compression or request.compression
        write_output(
            store,
            manifest_digest,
            structs.replace(output, compression=compression),
            names,
            request.registry,
            log,
        )


def _import_cache(store: Store, spec: CacheSpec, registry: RegistryOptions, log: Log) -> None:
    """Take what a cache source has; a missing or broken one is a warning, as in BuildKit."""
    from builder.cacheio import import_cache  # only --cache-from needs it (start-up of the cached path)

    try:
        count = import_cache(store, spec, registry)
    except BuilderError as exc:
        log(f"warning: the cache from {spec.location} was not imported: {exc}")
        return
    log(f"imported {count} cache records from {spec.location}")


def _export_cache(
    store: Store,
    spec: CacheSpec,
    plan: Plan,
    stage_keys: Mapping[int, list[str]],
    settings: BuildSettings,
    registry: RegistryOptions,
    log: Log,
) -> None:
    """mode=min: the steps of the final image's stages; mode=max: every stage built."""
    from builder.cacheio import export_cache  # only --cache-to needs it (start-up of the cached path)

    stages = plan.order if spec.mode == "max" else _base_chain(plan, plan.target)
    keys = [key for index in stages for key in stage_keys.get(index, [])]
    try:
        digest = export_cache(store, spec, keys, registry, settings.compression, settings.level)
    except BuilderError as exc:
        if not spec.ignore_error:
            raise
        log(f"warning: the cache export to {spec.location} failed: {exc}")
        return
    log(f"exported {len(keys)} cache keys to {spec.location} ({digest})")


def _base_chain(plan: Plan, index: int) -> list[int]:
    """A stage and the stages it is built FROM: what ends up in its image."""
    chain = [index]
    while (base := plan.stages[chain[-1]].base_stage) is not None:
        chain.append(base)
    return chain


def _store_image(store: Store, state: ImageState) -> tuple[str, str]:
    config = dict(state.config)
    config.pop("id", None)
    config_bytes = canonical_json(config)
    config_digest = store.write_blob(config_bytes)
    manifest = image_manifest(
        descriptor(CONFIG_MEDIA_TYPE, config_bytes), [dict(layer.blob) for layer in state.layers]
    )
    return store.write_blob(canonical_json(manifest)), config_digest
