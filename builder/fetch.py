"""ADD's remote sources: files over HTTP(S) and Git repositories, fetched into a scratch dir.

A URL is downloaded once per build and named by its content: the cache key uses the
``--checksum`` when given, else the sha256 of the bytes, never a date. The file gets mode 0600
and the server's Last-Modified time, as in BuildKit. A Git source (``git@``, ``git://``,
``ssh://``, or an http(s) URL ending in ``.git``, with an optional ``#ref:subdir``) is cloned
with the ``git`` program, without the system's or the user's git configuration, and named by
its commit.
"""

from __future__ import annotations

import os
import posixpath
import re
import urllib.parse
from pathlib import Path

from msgspec import Struct

from builder.digest import StreamSha256, sha256_hex
from builder.errors import ContextError

__all__ = ["Fetched", "GitSource", "fetch_git", "fetch_url", "is_url", "parse_git_source", "url_filename"]

_CHUNK = 1 << 20
_TIMEOUT = 60
_GIT_TIMEOUT = 600


class Fetched(Struct, frozen=True):
    """A fetched source in the scratch dir: the file or checkout, and what names its content."""

    path: Path
    digest: str  # sha256:<hex> of a file, or the commit of a checkout


class GitSource(Struct, frozen=True):
    remote: str
    ref: str  # "" for the remote's default branch
    subdir: str
    checksum: str  # "" or a commit hash (prefix) the ref must resolve to
    keep_git_dir: bool | None


def is_url(source: str) -> bool:
    """An http(s) URL that is not a Git repository."""
    return source.startswith(("http://", "https://")) and parse_git_source(source) is None


def parse_git_source(source: str) -> GitSource | None:
    """A Git source as BuildKit recognises one, or None; ``#ref:subdir`` or ``?ref=&subdir=``."""
    remote, _, fragment = source.partition("#")
    remote, _, query = remote.partition("?")
    scp_like = re.fullmatch(r"[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:.+", remote) is not None
    if remote.startswith(("http://", "https://")):
        if not urllib.parse.urlsplit(remote).path.endswith(".git"):
            return None
    elif not remote.startswith(("git://", "ssh://")) and not scp_like:
        return None
    ref, _, subdir = fragment.partition(":")
    options = dict(urllib.parse.parse_qsl(query))
    keep = options.get("keep-git-dir")
    return GitSource(
        remote,
        options.get("ref", ref),
        options.get("subdir", subdir).strip("/"),
        options.get("checksum", ""),
        None if keep is None else keep.lower() in ("1", "true"),
    )


def url_filename(url: str) -> str:
    """The name a downloaded file gets: the URL path's last component, as BuildKit names it."""
    base = posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    return base if base not in ("", ".", "..") else "__unnamed__"


def fetch_url(url: str, scratch: Path, checksum: str | None) -> Fetched:
    """Download ``url`` into ``scratch`` (once per build) and check ``checksum`` when given."""
    key = sha256_hex(url.encode())[:32]
    target = scratch / "url" / key / url_filename(url)
    done = target.with_name(target.name + ".sha256")
    if not done.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = _download(url, target)
        done.write_text(digest)
    digest = done.read_text()
    if checksum:
        algorithm, _, want = checksum.partition(":")
        got = digest if algorithm == "sha256" else f"{algorithm}:{_file_hash(target, algorithm)}"
        if got != f"{algorithm}:{want}":
            raise ContextError(f"the download of {url} has the digest {got}, not the --checksum {checksum}.")
    return Fetched(target, digest)


def _download(url: str, target: Path) -> str:
    # Imported here: only ADD of a URL downloads (start-up of the cached path).
    import email.utils
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "builder"})
    hasher = StreamSha256()
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as response, target.open("wb") as out:
            while chunk := response.read(_CHUNK):
                hasher.update(chunk)
                out.write(chunk)
            modified = response.headers.get("Last-Modified")
    except urllib.error.HTTPError as exc:
        raise ContextError(
            f"ADD could not download {url}: the server answered {exc.code} {exc.reason}."
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ContextError(f"ADD could not download {url}: {reason}.") from None
    target.chmod(0o600)
    if modified:
        try:
            when = email.utils.parsedate_to_datetime(modified).timestamp()
            os.utime(target, (when, when))
        except (TypeError, ValueError):
            pass  # a malformed date: keep the download time, as BuildKit does
    return "sha256:" + hasher.hexdigest()


def _file_hash(path: Path, algorithm: str) -> str:
    import hashlib  # only ADD --checksum with sha384 or sha512 needs it (start-up time)

    hasher = hashlib.new(algorithm)
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def fetch_git(source: GitSource, scratch: Path, *, keep_git_dir: bool, checksum: str | None) -> Fetched:
    """Clone ``source`` into ``scratch`` (once per build) at its ref; the digest is the commit."""
    key = sha256_hex(repr((source, keep_git_dir)).encode())[:32]
    checkout = scratch / "git" / key
    done = checkout.with_name(key + ".commit")
    if not done.is_file():
        import shutil  # only a git source needs it (start-up of the cached path)

        shutil.rmtree(checkout, ignore_errors=True)
        checkout.parent.mkdir(parents=True, exist_ok=True)
        commit = _clone(source, checkout)
        if not keep_git_dir:
            shutil.rmtree(checkout / ".git")
        done.write_text(commit)
    commit = done.read_text()
    want = checksum or source.checksum
    if want and not commit.startswith(want):
        raise ContextError(
            f"{source.remote} at {source.ref or 'HEAD'} is commit {commit}, not the --checksum {want}."
        )
    return Fetched(checkout, commit)


def _clone(source: GitSource, checkout: Path) -> str:
    _git(["clone", "--quiet", "--no-checkout", "--", source.remote, str(checkout)], source)
    commit = ""
    candidates = [f"origin/{source.ref}", source.ref] if source.ref else ["HEAD"]
    for candidate in candidates:
        found = _git(
            ["rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}"], source, checkout, check=False
        )
        if found:
            commit = found
            break
    if not commit:
        raise ContextError(f"the Git repository {source.remote} has no branch, tag or commit {source.ref!r}.")
    _git(["checkout", "--quiet", "--detach", commit], source, checkout)
    return commit


def _git(args: list[str], source: GitSource, cwd: Path | None = None, *, check: bool = True) -> str:
    """Run git with no configuration but ours: no prompts, no hooks, no local-file transports."""
    import subprocess  # only a git source runs it (start-up time of every build)

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_ALLOW_PROTOCOL": "http:https:git:ssh",
        "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
    }
    env |= {k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy", "no_proxy")}
    argv = ["git", "-c", "core.hooksPath=/dev/null", "-c", "advice.detachedHead=false", *args]
    try:
        result = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=_GIT_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise ContextError(
            f"ADD of the Git repository {source.remote} needs git, which is not installed."
        ) from None
    except subprocess.TimeoutExpired:
        raise ContextError(
            f"git did not finish fetching {source.remote} in {_GIT_TIMEOUT} seconds."
        ) from None
    if result.returncode != 0 and check:
        detail = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise ContextError(f"git could not fetch {source.remote}: {detail.removeprefix('fatal: ')}.")
    return result.stdout.strip() if result.returncode == 0 else ""
