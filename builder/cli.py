"""The command line: the one place that prints errors and picks exit codes."""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from msgspec import structs

from builder.build import BuildRequest, build, plan_build, resolve_image
from builder.config import CONFIG_ENV, DEFAULT_CONFIG, add_setting_flags, parse_config, resolve
from builder.credentials import RegistryOptions
from builder.errors import BuilderError, OutputError, SandboxError
from builder.export import OUTPUT_KINDS, Output, parse_output, write_output
from builder.images import Platform, image_history, parse_platform, reference, tag_key, tagged_images
from builder.oci import Reference
from builder.shortcut import invocation
from builder.snapshot import private_mount_namespace
from builder.stages import parse_build_args
from builder.store import Store

if TYPE_CHECKING:
    from builder.cacheio import CacheSpec

# The modules only some commands need (cacheio, check, distribution, gc, layout, verify) are
# imported by their handlers: a cached build should not pay for them (start-up time).

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _output(text: str) -> Output:
    try:
        return parse_output(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _save_output(text: str) -> Output:
    """``save -o``: an output spec, or a bare FILE for a Docker archive (as ``docker save -o``)."""
    return _output(text) if "=" in text else Output("docker", Path(text))


def _platform(text: str) -> Platform:
    try:
        return parse_platform(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _build_flags(build: argparse.ArgumentParser) -> None:
    build.add_argument("context", type=Path, help="the build context directory")
    build.add_argument("-f", "--file", type=Path, help="the Dockerfile (default: CONTEXT/Dockerfile)")
    build.add_argument("-t", "--tag", action="append", default=[], help="name:tag to give the image")
    build.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
    build.add_argument("--target", help="the stage to build (default: the last)")
    build.add_argument(
        "-o",
        "--output",
        action="append",
        type=_output,
        default=[],
        metavar="type=KIND,dest=PATH",
        help=f"where the image goes; KIND is one of {', '.join(OUTPUT_KINDS)} (name=REF for registry; "
        "compression=, compression-level= per output)",
    )
    build.add_argument("--pull", action="store_true", help="pull the base images even when stored")
    build.add_argument("--source-date-epoch", type=int, help="timestamps for a reproducible image")
    build.add_argument("--no-cache", action="store_true", help="run every step, ignoring the cache")
    build.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="id=NAME,src=FILE",
        help="a secret for RUN --mount=type=secret (src=FILE or env=VARIABLE); never stored",
    )
    build.add_argument(
        "--verify-reproducible",
        action="store_true",
        help="build twice in clean stores (needs SOURCE_DATE_EPOCH); fail naming the first difference",
    )
    build.add_argument(
        "--no-cache-filter",
        action="append",
        default=[],
        metavar="STAGE",
        help="run this stage without the cache",
    )
    build.add_argument(
        "--cache-from",
        action="append",
        default=[],
        metavar="type=local,src=DIR",
        help="import a build cache (type=local,src=DIR or type=registry,ref=REF)",
    )
    build.add_argument(
        "--cache-to",
        action="append",
        default=[],
        metavar="type=local,dest=DIR",
        help="export the build cache (type=local,dest=DIR or type=registry,ref=REF; mode=min|max)",
    )
    build.add_argument("--print", choices=["plan"], dest="print_what", help="print the build plan and stop")
    build.add_argument("-q", "--quiet", action="store_true", help="print only the image digest")
    build.set_defaults(handler=_build)


def _load_flags(load: argparse.ArgumentParser) -> None:
    load.add_argument(
        "source", help="oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker-archive:FILE[:NAME:TAG]"
    )
    load.add_argument("-t", "--tag", action="append", default=[], help="name:tag to give the image")
    load.set_defaults(handler=_load)


def _images_flags(images: argparse.ArgumentParser) -> None:
    images.add_argument("-q", "--quiet", action="store_true", help="print only the digests")
    images.set_defaults(handler=_images)


def _inspect_flags(inspect: argparse.ArgumentParser) -> None:
    inspect.add_argument("image")
    inspect.set_defaults(handler=_inspect)


def _history_flags(history: argparse.ArgumentParser) -> None:
    history.add_argument("image")
    history.set_defaults(handler=_history)


def _tag_flags(tag: argparse.ArgumentParser) -> None:
    tag.add_argument("source")
    tag.add_argument("targets", nargs="+", metavar="target")
    tag.set_defaults(handler=_tag)


def _rmi_flags(rmi: argparse.ArgumentParser) -> None:
    rmi.add_argument("images", nargs="+", metavar="image")
    rmi.set_defaults(handler=_rmi)


def _save_flags(save: argparse.ArgumentParser) -> None:
    save.add_argument("image")
    save.add_argument(
        "-o",
        "--output",
        action="append",
        type=_save_output,
        required=True,
        metavar="FILE|type=KIND,dest=PATH",
        help=f"a Docker archive FILE, or an output as in build ({', '.join(OUTPUT_KINDS)})",
    )
    save.set_defaults(handler=_save)


def _pull_flags(pull: argparse.ArgumentParser) -> None:
    pull.add_argument("image")
    pull.add_argument("--platform", type=_platform, help="os/arch[/variant] (default: the host's)")
    pull.set_defaults(handler=_pull)


def _push_flags(push: argparse.ArgumentParser) -> None:
    push.add_argument("image")
    push.add_argument("destination", nargs="?", help="where to push (default: the image's own name)")
    push.set_defaults(handler=_push)


def _prune_flags(prune: argparse.ArgumentParser) -> None:
    prune.add_argument("--keep-storage", metavar="SIZE", help="keep up to SIZE of layers (500MB, 2GB)")
    prune.add_argument(
        "--filter",
        dest="filters",
        action="append",
        default=[],
        metavar="until=DURATION",
        help="e.g. until=24h",
    )
    prune.set_defaults(handler=_prune)


def _du_flags(du: argparse.ArgumentParser) -> None:
    du.set_defaults(handler=_du)


def _check_flags(check: argparse.ArgumentParser) -> None:
    check.add_argument(
        "--repair", action="store_true", help="remove what is corrupt or stale (images are only reported)"
    )
    check.set_defaults(handler=_check)


_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "build": ("build an image from a Dockerfile", _build_flags),
    "load": ("import an image from an OCI layout or archive, or a Docker archive", _load_flags),
    "images": ("list the images in the store", _images_flags),
    "inspect": ("print an image's config", _inspect_flags),
    "history": ("show an image's history, newest first", _history_flags),
    "tag": ("give a stored image another name", _tag_flags),
    "rmi": ("remove image names (builder prune reclaims the space)", _rmi_flags),
    "save": ("write a stored image out (default: a Docker archive)", _save_flags),
    "pull": ("pull an image from a registry into the store", _pull_flags),
    "push": ("push a stored image to a registry", _push_flags),
    "prune": ("remove build cache and unreferenced data", _prune_flags),
    "du": ("show the store's disk usage", _du_flags),
    "check": ("verify every blob, record, tag and snapshot of the store", _check_flags),
}


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, told the terminal's width: argparse makes one for every flag it adds, and one
    left to find the width imports shutil, which a cached build has no other use for."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_terminal_columns() - 2)  # argparse's own margin


@functools.cache
def _terminal_columns() -> int:
    """$COLUMNS, else the width of the terminal on standard output, else 80 (as shutil's)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(1).columns or 80
    except OSError:
        return 80


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The command line's parser. Only the command being run gets its flags (start-up time);
    without a known command (none, --help, a typo) every command does, for the usage."""
    wanted = argv[0] if argv and argv[0] in _COMMANDS else None
    parser = argparse.ArgumentParser(
        prog="builder", description="Build OCI images from Dockerfiles.", formatter_class=_HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_flags) in _COMMANDS.items():
        if wanted in (None, name):
            sub = commands.add_parser(name, help=help_text, formatter_class=_HelpFormatter)
            add_flags(sub)
            add_setting_flags(sub, name)
    return parser


_interrupted = False  # set by the first SIGTERM or Ctrl-C


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM and Ctrl-C unwind as KeyboardInterrupt: the running step is killed, mounts
    undone, temp dirs removed. Only the first signal raises: a second would cut that short."""
    global _interrupted
    if not _interrupted:
        _interrupted = True
        raise KeyboardInterrupt


def _raise_if_interrupted() -> None:
    """Raise again an interrupt that Python swallowed (one raised while a finaliser ran is only
    printed), so that the build still stops at its next step."""
    if _interrupted:
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    global _interrupted
    _interrupted = False
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = _parser(arguments).parse_args(arguments)
    args.arguments = arguments
    previous = {stop: signal.getsignal(stop) for stop in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _interrupt)
    if previous[signal.SIGINT] is not signal.SIG_IGN:  # as a background job's is
        signal.signal(signal.SIGINT, _interrupt)
    try:
        if args.command == "build":
            try:
                private_mount_namespace()
            except OSError as exc:
                raise SandboxError(f"builder needs root to build: {exc}") from exc
        code = _dispatch(args)
        _flush_output()
        return code
    except (Exception, KeyboardInterrupt) as exc:
        # An error raised while an interrupt unwound (a cleanup it cut short) is the interrupt's.
        if _interrupted or isinstance(exc, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if not isinstance(exc, BuilderError):
            raise
        if not (isinstance(exc, OutputError) and exc.quiet):
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:  # done: a signal no longer unwinds anything (SIGTERM now just ends the process) ...
        for stop, handler in previous.items():
            if _interrupted:  # ... but once interrupted, another must not cut the exit (130) short
                signal.signal(stop, signal.SIG_IGN)
            elif handler is not None:
                signal.signal(stop, handler)


def _dispatch(args: argparse.Namespace) -> int:
    for key, value in resolve(args, _config_file(), os.environ).items():
        setattr(args, key.replace("-", "_"), value)
    store = Store.open(Path(args.root))
    handler: Callable[[argparse.Namespace, Store], int] = args.handler
    return handler(args, store)


def _config_file() -> dict[str, Any]:
    """The YAML config: $BUILDER_CONFIG, else /etc/builder/config.yaml when present."""
    path = Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if os.environ.get(CONFIG_ENV):
            raise BuilderError(f"the config file {path} (from ${CONFIG_ENV}) does not exist.") from None
        return {}
    except OSError as exc:
        raise BuilderError(f"cannot read the config file {path}: {exc.strerror}.") from exc
    return parse_config(text, str(path))


def _secret(text: str) -> tuple[str, bytes]:
    """``id=NAME,src=FILE`` or ``id=NAME,env=VARIABLE`` (``id=NAME`` alone: the variable NAME)."""
    fields = dict(part.partition("=")[::2] for part in text.split(",") if part)
    name = fields.get("id", "")
    if not name or not set(fields) <= {"id", "src", "source", "env", "type"}:
        raise BuilderError(
            f"--secret {text!r} is not understood; expected id=NAME,src=FILE or id=NAME,env=VARIABLE."
        )
    source = fields.get("src") or fields.get("source")
    if source:
        try:
            return name, Path(source).read_bytes()
        except OSError as exc:
            raise BuilderError(f"cannot read the secret {name!r} from {source}: {exc.strerror}.") from exc
    variable = fields.get("env") or name
    if variable not in os.environ:
        raise BuilderError(f"the secret {name!r} comes from ${variable}, which is not set.")
    return name, os.environ[variable].encode()


def _build(args: argparse.Namespace, store: Store) -> int:

    request = BuildRequest(
        context=args.context,
        dockerfile=args.file,
        tags=tuple(args.tag),
        build_args=parse_build_args(args.build_arg, os.environ),
        target=args.target,
        outputs=tuple(args.output),
        compression=args.compression or "gzip",
        compression_level=args.compression_level,
        network=args.network,
        secrets=dict(_secret(text) for text in args.secret),
        source_date_epoch=args.source_date_epoch,
        no_cache=args.no_cache,
        no_cache_filter=tuple(args.no_cache_filter),
        cache_from=_cache_specs(args.cache_from, export=False),
        cache_to=_cache_specs(args.cache_to, export=True),
        registry=RegistryOptions(insecure=tuple(args.insecure_registry)),
        pull=args.pull,
        shortcut=None if args.verify_reproducible else _shortcut_key(args.arguments),
    )
    if args.print_what == "plan":
        plan, _ = plan_build(request, store)
        _out(json.dumps(plan.to_json(), indent=2, sort_keys=True))
        return 0

    def log(line: str) -> None:
        _raise_if_interrupted()
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    run = build
    if args.verify_reproducible:
        from builder.verify import verify_build  # see the note on the imports

        run = verify_build
    result = run(request, store, log)
    for name in result.unused_args:
        print(f"warning: build arg {name} is not consumed by any ARG", file=sys.stderr)
    if not args.quiet:
        print(f"image {result.manifest_digest} ({result.executed} steps run)", file=sys.stderr)
    _out(result.manifest_digest)
    return 0


def _shortcut_key(arguments: Sequence[str]) -> str | None:
    found = invocation(arguments)
    return found.key if found is not None else None


def _cache_specs(texts: Sequence[str], *, export: bool) -> tuple[CacheSpec, ...]:
    if not texts:
        return ()
    from builder.cacheio import parse_cache_spec  # see the note on the imports

    return tuple(parse_cache_spec(text, export=export) for text in texts)


def _load(args: argparse.Namespace, store: Store) -> int:
    from builder.layout import import_docker_archive, import_layout  # see the note on the imports

    transport, _, location = args.source.partition(":")
    if transport not in ("oci", "oci-archive", "docker-archive") or not location:
        raise BuilderError(
            f"{args.source!r}: expected oci:DIR[:TAG], oci-archive:FILE[:TAG] "
            "or docker-archive:FILE[:NAME:TAG]."
        )
    path, _, select = location.partition(":")
    with store.lease():  # a prune meanwhile must not take the blobs before the tag names them
        if transport == "docker-archive":
            digest, _, _ = import_docker_archive(store, Path(path), select or None)
        else:
            digest, _, _ = import_layout(
                store, Path(path), archive=transport == "oci-archive", select=select or None
            )
        for tag in args.tag:
            store.set_tag(tag_key(reference(tag)), digest)
    _out(digest)
    return 0


def _images(args: argparse.Namespace, store: Store) -> int:

    if args.quiet:
        for digest in dict.fromkeys(digest for _, digest in tagged_images(store)):
            _out(digest)
        return 0
    rows = [("REPOSITORY", "TAG", "DIGEST", "SIZE")]
    for ref, digest in tagged_images(store):
        name = Reference(ref.registry, ref.repository, None, None).familiar
        rows.append((name, ref.tag or "", digest, _size(_image_size(store, digest))))
    _print_table(rows)
    return 0


def _inspect(args: argparse.Namespace, store: Store) -> int:

    digest, manifest, config = resolve_image(store, args.image)
    _out(json.dumps({"digest": digest, "manifest": manifest, "config": config}, indent=2, sort_keys=True))
    return 0


def _history(args: argparse.Namespace, store: Store) -> int:
    _, manifest, config = resolve_image(store, args.image)
    rows = [("CREATED", "CREATED BY", "SIZE", "COMMENT")]
    for entry in image_history(manifest, config):
        rows.append((entry.created, entry.created_by, _size(entry.size or 0), entry.comment))
    _print_table(rows)
    return 0


def _tag(args: argparse.Namespace, store: Store) -> int:
    digest, _, _ = resolve_image(store, args.source)
    targets = [reference(text) for text in args.targets]
    for target in targets:
        if target.digest:
            raise BuilderError(f"{target.familiar} has a digest; a tag is name[:tag].")
    for target in targets:
        store.set_tag(tag_key(target), digest)
    return 0


def _rmi(args: argparse.Namespace, store: Store) -> int:
    for ref in [reference(text) for text in args.images]:
        if ref.digest and ref.tag is None:  # name@digest: every tag of that name on that image
            names = [tag_key(r) for r, d in tagged_images(store) if r.name == ref.name and d == ref.digest]
        else:
            names = [tag_key(ref)] if store.get_tag(tag_key(ref)) else []
        if not names:
            raise BuilderError(f"the image {ref.familiar} is not in the store {store.root}.")
        for name in names:
            store.remove_tag(name)
            _out(f"untagged {name}")
    return 0


def _save(args: argparse.Namespace, store: Store) -> int:
    digest, _, _ = resolve_image(store, args.image)
    ref = reference(args.image)
    names = [ref] if ref.tag else []
    registry = RegistryOptions(insecure=tuple(args.insecure_registry))
    for output in args.output:
        compression = output.compression or args.compression
        level = output.level if output.level is not None else args.compression_level
        chosen = structs.replace(output, compression=compression, level=level)
        _out(write_output(store, digest, chosen, names, registry, _log))
    return 0


def _pull(args: argparse.Namespace, store: Store) -> int:
    registry = RegistryOptions(insecure=tuple(args.insecure_registry))
    from builder.distribution import pull_image  # see the note on the imports

    digest, _, _ = pull_image(store, reference(args.image), registry, _log, platform=args.platform)
    _out(digest)
    return 0


def _push(args: argparse.Namespace, store: Store) -> int:
    digest, _, _ = resolve_image(store, args.image)
    output = Output(
        "registry",
        name=args.destination or args.image,
        compression=args.compression,
        level=args.compression_level,
    )
    registry = RegistryOptions(insecure=tuple(args.insecure_registry))
    _out(write_output(store, digest, output, [], registry, _log))
    return 0


def _log(line: str) -> None:
    _raise_if_interrupted()
    print(line, file=sys.stderr, flush=True)


def _image_size(store: Store, digest: str) -> int:
    manifest = store.read_json(digest)
    return sum(int(blob.get("size", 0)) for blob in [manifest.get("config", {}), *manifest.get("layers", [])])


def _size(count: int) -> str:
    """Bytes as Docker shows them: 0B, 512B, 4.1kB, 1.2MB, 3.4GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return f"{count}B"


def _out(text: str) -> None:
    """A line of the command's output (stdout); one that cannot be written is an OutputError."""
    try:
        print(text)
    except OSError as exc:
        raise OutputError(exc) from exc


def _flush_output() -> None:
    """Write out what the command printed: output that cannot be written fails the command."""
    try:
        sys.stdout.flush()
    except OSError as exc:
        raise OutputError(exc) from exc


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        _out("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _prune(args: argparse.Namespace, store: Store) -> int:
    from builder.gc import parse_duration, parse_size, prune  # see the note on the imports

    until = None
    for text in args.filters:
        key, _, value = text.partition("=")
        if key != "until":
            raise BuilderError(f"--filter {text!r} is not understood; the filter is until=DURATION.")
        until = parse_duration(value)
    keep = parse_size(args.keep_storage) if args.keep_storage is not None else None
    result = prune(store, keep_storage=keep, until=until)
    _out(
        f"removed {result.records} cache records, {result.blobs} blobs and {result.snapshots} snapshots; "
        f"reclaimed {result.reclaimed / 1e6:.1f} MB"
    )
    return 0


def _check(args: argparse.Namespace, store: Store) -> int:
    from builder.check import check_store  # see the note on the imports

    result = check_store(store, repair=args.repair)
    for problem in result.problems:
        status = "repaired" if problem in result.repaired else "problem"
        _out(f"{status}: {problem.path}: {problem.message}")
    checked = ", ".join(f"{count} {kind}" for kind, count in result.checked.items())
    summary = f"checked {checked}: {len(result.problems)} problems, {len(result.repaired)} repaired"
    if any(problem.repair for problem in result.remaining):
        summary += "; builder check --repair removes what is corrupt or stale"
    print(summary + ".", file=sys.stderr)
    return EXIT_ERROR if result.remaining else 0


def _du(args: argparse.Namespace, store: Store) -> int:
    from builder.gc import disk_usage  # see the note on the imports

    usage = disk_usage(store)
    _out(f"images\t{usage.images}")
    _out(f"cache records\t{usage.records}")
    _out(f"blobs\t{usage.blobs}\t{usage.blob_bytes / 1e6:.1f} MB")
    _out(f"snapshots\t{usage.snapshots}\t{usage.snapshot_bytes / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
