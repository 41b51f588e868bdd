"""The command line: the one place that prints errors and picks exit codes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from builder.build import BuildRequest, Output, build, plan_build, resolve_image
from builder.cacheio import parse_cache_spec
from builder.errors import BuilderError, SandboxError
from builder.gc import disk_usage, parse_duration, parse_size, prune
from builder.layout import import_layout
from builder.oci import parse_reference
from builder.sandbox import private_mount_namespace
from builder.store import Store, default_root

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="store root (default: $BUILDER_ROOT or /var/lib/builder)",
    )


def _key_value(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    if not eq:
        value = os.environ.get(key, "")
    return key, value


def _output(text: str) -> tuple[str, Path]:
    fields = dict(part.partition("=")[::2] for part in text.split(","))
    kind, dest = fields.get("type", ""), fields.get("dest", "")
    if kind == "oci" and dest.endswith(".tar"):
        kind = "oci-archive"
    if kind not in ("oci", "oci-archive") or not dest:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected type=oci,dest=DIR or type=oci,dest=FILE.tar or type=oci-archive,dest=FILE"
        )
    return kind, Path(dest)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="builder", description="Build OCI images from Dockerfiles.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser("build", help="build an image from a Dockerfile")
    build.add_argument("context", type=Path, help="the build context directory")
    build.add_argument("-f", "--file", type=Path, help="the Dockerfile (default: CONTEXT/Dockerfile)")
    build.add_argument("-t", "--tag", action="append", default=[], help="name:tag to give the image")
    build.add_argument("--build-arg", action="append", type=_key_value, default=[], metavar="KEY=VALUE")
    build.add_argument("--target", help="the stage to build (default: the last)")
    build.add_argument(
        "-o", "--output", action="append", type=_output, default=[], metavar="type=oci,dest=DIR"
    )
    build.add_argument("--compression", default="gzip", help="layer compression: gzip, zstd or uncompressed")
    build.add_argument("--compression-level", type=int, help="compression level")
    build.add_argument("--source-date-epoch", type=int, help="timestamps for a reproducible image")
    build.add_argument("--no-cache", action="store_true", help="run every step, ignoring the cache")
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
    _store_args(build)
    build.set_defaults(handler=_build)

    load = commands.add_parser("load", help="import an image from an OCI layout or archive")
    load.add_argument("source", help="oci:DIR[:TAG] or oci-archive:FILE[:TAG]")
    load.add_argument("-t", "--tag", action="append", default=[], help="name:tag to give the image")
    _store_args(load)
    load.set_defaults(handler=_load)

    images = commands.add_parser("images", help="list the images in the store")
    _store_args(images)
    images.set_defaults(handler=_images)

    inspect = commands.add_parser("inspect", help="print an image's config")
    inspect.add_argument("image")
    _store_args(inspect)
    inspect.set_defaults(handler=_inspect)

    prune = commands.add_parser("prune", help="remove build cache and unreferenced data")
    prune.add_argument(
        "--keep-storage", type=parse_size, metavar="SIZE", help="keep up to SIZE of layers (500MB, 2GB)"
    )
    prune.add_argument(
        "--filter",
        dest="filters",
        action="append",
        default=[],
        metavar="until=DURATION",
        help="e.g. until=24h",
    )
    _store_args(prune)
    prune.set_defaults(handler=_prune)

    du = commands.add_parser("du", help="show the store's disk usage")
    _store_args(du)
    du.set_defaults(handler=_du)
    return parser


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: the running step is killed, mounts undone


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.command == "build":
            try:
                private_mount_namespace()
            except OSError as exc:
                raise SandboxError(f"builder needs root to build: {exc}") from exc
        return _dispatch(args)
    except BuilderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace) -> int:

    store = Store.open(args.root or default_root())
    handler: Callable[[argparse.Namespace, Store], int] = args.handler
    return handler(args, store)


def _build(args: argparse.Namespace, store: Store) -> int:

    request = BuildRequest(
        context=args.context,
        dockerfile=args.file,
        tags=tuple(args.tag),
        build_args=dict(args.build_arg),
        target=args.target,
        outputs=tuple(Output(kind, dest) for kind, dest in args.output),
        compression=args.compression,
        compression_level=args.compression_level,
        source_date_epoch=args.source_date_epoch,
        no_cache=args.no_cache,
        no_cache_filter=tuple(args.no_cache_filter),
        cache_from=tuple(parse_cache_spec(text, export=False) for text in args.cache_from),
        cache_to=tuple(parse_cache_spec(text, export=True) for text in args.cache_to),
    )
    if args.print_what == "plan":
        plan, _ = plan_build(request, store)
        print(json.dumps(plan.to_json(), indent=2, sort_keys=True))
        return 0
    log = (lambda _line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = build(request, store, log)
    for name in result.unused_args:
        print(f"warning: build arg {name} is not consumed by any ARG", file=sys.stderr)
    if not args.quiet:
        print(f"image {result.manifest_digest} ({result.executed} steps run)", file=sys.stderr)
    print(result.manifest_digest)
    return 0


def _load(args: argparse.Namespace, store: Store) -> int:

    transport, _, location = args.source.partition(":")
    if transport not in ("oci", "oci-archive") or not location:
        raise BuilderError(f"{args.source!r}: expected oci:DIR[:TAG] or oci-archive:FILE[:TAG].")
    path, _, select = location.partition(":")
    digest, _, _ = import_layout(store, Path(path), archive=transport == "oci-archive", select=select or None)
    for tag in args.tag:
        try:
            store.set_tag(str(parse_reference(tag)), digest)
        except ValueError as exc:
            raise BuilderError(f"{exc}.") from exc
    print(digest)
    return 0


def _images(args: argparse.Namespace, store: Store) -> int:

    for name, digest in store.tags().items():
        print(f"{name}\t{digest}")
    return 0


def _inspect(args: argparse.Namespace, store: Store) -> int:

    digest, manifest, config = resolve_image(store, args.image)
    print(json.dumps({"digest": digest, "manifest": manifest, "config": config}, indent=2, sort_keys=True))
    return 0


def _prune(args: argparse.Namespace, store: Store) -> int:
    until = None
    for text in args.filters:
        key, _, value = text.partition("=")
        if key != "until":
            raise BuilderError(f"--filter {text!r} is not understood; the filter is until=DURATION.")
        until = parse_duration(value)
    keep = parse_size(args.keep_storage) if args.keep_storage else None
    result = prune(store, keep_storage=keep, until=until)
    print(
        f"removed {result.records} cache records, {result.blobs} blobs and {result.snapshots} snapshots; "
        f"reclaimed {result.reclaimed / 1e6:.1f} MB"
    )
    return 0


def _du(args: argparse.Namespace, store: Store) -> int:
    usage = disk_usage(store)
    print(f"images\t{usage.images}")
    print(f"cache records\t{usage.records}")
    print(f"blobs\t{usage.blobs}\t{usage.blob_bytes / 1e6:.1f} MB")
    print(f"snapshots\t{usage.snapshots}\t{usage.snapshot_bytes / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
