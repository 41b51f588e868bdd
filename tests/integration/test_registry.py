"""Pull and push against a real registry (Debian's docker-registry), checked with skopeo and umoci."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from builder.credentials import Credentials, RegistryOptions, load_credentials
from builder.digest import sha256_digest
from builder.errors import RegistryError
from builder.images import host_arch
from builder.oci import INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, canonical_json
from builder.registry import RegistryClient
from builder.store import Store
from tests.conftest import Result, run_builder
from tests.integration.conftest import USERS
from tests.registry import Registry, docker_config, free_port

pytestmark = pytest.mark.integration


def skopeo(*args: str) -> str:
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def remote_manifest(registry: Registry, name: str) -> dict:
    return json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{name}"))


def assert_one_clean_error(result: Result, message: str) -> None:
    """Exit status 1 and one error line, the last, holding ``message``; no traceback."""
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [result.stderr.splitlines()[-1]], result.stderr
    assert message in errors[0]
    assert "Traceback" not in result.stderr


def test_push_is_read_back_by_skopeo_and_unpacked_by_umoci(
    tmp_path: Path, store: Path, registry: Registry
) -> None:
    pushed = run_builder("push", "busybox:latest", f"{registry.host}/base:1", root=store).stdout.strip()

    inspected = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{registry.host}/base:1"))
    assert inspected["Digest"] == pushed
    assert inspected["Architecture"] == host_arch()
    copy = tmp_path / "copy"
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/base:1", f"oci:{copy}:back")
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{copy}:back", str(bundle)], check=True, capture_output=True
    )
    assert (bundle / "rootfs" / "bin" / "busybox").is_file()


def test_push_heads_before_upload_and_mounts_across_repositories(store: Path, registry: Registry) -> None:
    first = run_builder("push", "busybox:latest", f"{registry.host}/team/a:1", root=store)
    assert first.stderr.count(" uploaded (") == 2, first.stderr  # config and layer
    again = run_builder("push", "busybox:latest", f"{registry.host}/team/a:2", root=store)
    assert again.stderr.count(" exists") == 2, again.stderr
    assert " uploaded (" not in again.stderr
    other = run_builder("push", "busybox:latest", f"{registry.host}/team/b:1", root=store)
    assert other.stderr.count(" mounted from team/a") == 2, other.stderr
    assert remote_manifest(registry, "team/b:1") == remote_manifest(registry, "team/a:1")


def test_from_a_registry_image_pulls_once_and_reuses_the_layers(
    tmp_path: Path, store: Path, registry: Registry
) -> None:
    run_builder("push", "busybox:latest", f"{registry.host}/base:1", root=store)
    fresh = tmp_path / "fresh"
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {registry.host}/base:1\nRUN echo pulled > /p\n")
    first = run_builder("build", "-t", "app:1", str(context), root=fresh)
    assert f"pulling {registry.host}/base:1" in first.stderr
    config = json.loads(run_builder("inspect", f"{registry.host}/base:1", root=fresh).stdout)["config"]
    base_layer = config["rootfs"]["diff_ids"][0]
    assert (fresh / "snapshots" / base_layer[7:] / "bin" / "busybox").is_file()
    refreshed = run_builder("build", "--pull", "-t", "app:1", str(context), root=fresh)
    assert f"pulling {registry.host}/base:1" in refreshed.stderr, "--pull asks the registry again"

    registry.stop()  # the next build must not need the registry: the image and its snapshot are here
    (context / "Dockerfile").write_text(f"FROM {registry.host}/base:1\nRUN echo again > /a\n")
    second = run_builder("build", str(context), root=fresh)
    assert "pulling" not in second.stderr
    assert [p.name for p in (fresh / "snapshots").iterdir()].count(base_layer[7:]) == 1


def test_a_tampered_blob_is_rejected_and_nothing_is_stored(
    tmp_path: Path, store: Path, registry: Registry
) -> None:
    run_builder("push", "busybox:latest", f"{registry.host}/base:1", root=store)
    layer = remote_manifest(registry, "base:1")["layers"][0]["digest"]
    data = registry.blob_data(layer)
    original = data.read_bytes()
    data.write_bytes(original[:-8] + bytes(8))  # same size, other content

    fresh = tmp_path / "fresh"
    result = run_builder("pull", f"{registry.host}/base:1", root=fresh, check=False)
    assert_one_clean_error(result, f"digest mismatch: the blob {layer}")
    assert run_builder("images", "-q", root=fresh).stdout == ""
    assert not (fresh / "blobs" / "sha256" / layer[7:]).exists()
    assert list((fresh / "tmp").glob("blob-*")) == []


def _push_index(store: Path, registry: Registry, busybox_layout: Path) -> tuple[str, str, str]:
    """An index at multi:1 with the host's busybox and a copy claiming another architecture.

    Returns (index digest, host manifest digest, other manifest digest)."""
    run_builder("push", "busybox:latest", f"{registry.host}/multi:base", root=store)
    client = RegistryClient(registry.host, "multi", insecure=True, push=True)
    host_manifest = client.get_manifest("base")
    manifest = host_manifest.document()
    config = json.loads((busybox_layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes())
    other_arch = "arm64" if host_arch() != "arm64" else "amd64"
    config_bytes = canonical_json({**config, "architecture": other_arch})
    config_file = store / "other-config.json"
    config_file.write_bytes(config_bytes)
    client.put_blob(config_file, sha256_digest(config_bytes), len(config_bytes))
    other = {
        **manifest,
        "config": {**manifest["config"], "digest": sha256_digest(config_bytes), "size": len(config_bytes)},
    }
    other_digest = client.put_manifest("other", MANIFEST_MEDIA_TYPE, canonical_json(other))
    entries = [
        {"mediaType": MANIFEST_MEDIA_TYPE, "digest": other_digest, "size": len(canonical_json(other)),
         "platform": {"os": "linux", "architecture": other_arch}},
        {"mediaType": MANIFEST_MEDIA_TYPE, "digest": host_manifest.digest, "size": len(host_manifest.data),
         "platform": {"os": "linux", "architecture": host_arch()}},
    ]  # fmt: skip
    index = canonical_json({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": entries})
    index_digest = client.put_manifest("1", INDEX_MEDIA_TYPE, index)
    client.close()
    return index_digest, host_manifest.digest, other_digest


def test_an_index_resolves_to_the_host_platform_or_the_one_asked_for(
    tmp_path: Path, store: Path, registry: Registry, busybox_layout: Path
) -> None:
    index_digest, host_digest, other_digest = _push_index(store, registry, busybox_layout)
    fresh = tmp_path / "fresh"
    assert run_builder("pull", f"{registry.host}/multi:1", root=fresh).stdout.strip() == host_digest
    other_arch = "arm64" if host_arch() != "arm64" else "amd64"
    chosen = run_builder("pull", "--platform", f"linux/{other_arch}", f"{registry.host}/multi:1", root=fresh)
    assert chosen.stdout.strip() == other_digest
    missing = run_builder(
        "pull", "--platform", "linux/s390x", f"{registry.host}/multi:1", root=fresh, check=False
    )
    assert_one_clean_error(
        missing, f"has no image for linux/s390x; it has linux/{other_arch}, linux/{host_arch()}"
    )

    by_digest = tmp_path / "by-digest"
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {registry.host}/multi@{index_digest}\nRUN echo ok > /ok\n")
    run_builder("build", "-t", "pinned:1", str(context), root=by_digest)
    again = run_builder("build", "-t", "pinned:1", str(context), root=by_digest)
    assert "pulling" not in again.stderr, "the stored index resolves without the registry"


def test_docker_media_types_pull_and_push_unchanged(
    store: Path, registry: Registry, busybox_layout: Path
) -> None:
    skopeo("copy", "--dest-tls-verify=false", "--format", "v2s2", f"oci:{busybox_layout}:latest",
           f"docker://{registry.host}/dock:1")  # fmt: skip
    pulled = run_builder("pull", f"{registry.host}/dock:1", root=store).stdout.strip()
    stored = json.loads(run_builder("inspect", f"{registry.host}/dock:1", root=store).stdout)["manifest"]
    assert stored["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    pushed = run_builder(
        "push", f"{registry.host}/dock:1", f"{registry.host}/dock2:1", root=store
    ).stdout.strip()
    assert pushed == pulled
    assert remote_manifest(registry, "dock2:1")["mediaType"] == stored["mediaType"]


def test_token_auth_with_credentials_from_docker_config(
    tmp_path: Path, store: Path, token_registry: Registry
) -> None:
    user, password = next(iter(USERS.items()))
    env = docker_config(tmp_path / "docker", token_registry.host, user, password)
    run_builder("push", "busybox:latest", f"{token_registry.host}/secure/app:1", root=store, env=env)
    fresh = tmp_path / "fresh"
    run_builder("pull", f"{token_registry.host}/secure/app:1", root=fresh, env=env)
    assert token_registry.token_server is not None
    seen = token_registry.token_server.requests
    assert any(r["user"] == user and "repository:secure/app:pull,push" in r["scope"] for r in seen), seen

    anonymous = run_builder(
        "push", "busybox:latest", f"{token_registry.host}/secure/app:2", root=store, check=False
    )
    assert_one_clean_error(anonymous, f"auth refused: {token_registry.host} requires a login")
    wrong = docker_config(tmp_path / "wrong", token_registry.host, user, "not-the-password")
    refused = run_builder("pull", f"{token_registry.host}/secure/app:1", root=fresh, env=wrong, check=False)
    assert_one_clean_error(refused, f"auth refused: the token service of {token_registry.host} refused")


def test_basic_auth(tmp_path: Path, store: Path, basic_registry: Registry) -> None:
    user, password = next(iter(USERS.items()))
    env = docker_config(tmp_path / "docker", basic_registry.host, user, password)
    run_builder("push", "busybox:latest", f"{basic_registry.host}/app:1", root=store, env=env)
    assert remote_manifest_with_login(basic_registry, "app:1", user, password)["schemaVersion"] == 2

    anonymous = run_builder("pull", f"{basic_registry.host}/app:1", root=tmp_path / "anon", check=False)
    assert_one_clean_error(anonymous, f"auth refused: {basic_registry.host} requires a login")
    wrong = docker_config(tmp_path / "wrong", basic_registry.host, user, "nope")
    refused = run_builder(
        "pull", f"{basic_registry.host}/app:1", root=tmp_path / "anon", env=wrong, check=False
    )
    assert_one_clean_error(refused, f"auth refused: {basic_registry.host} did not accept the credentials")


def remote_manifest_with_login(registry: Registry, name: str, user: str, password: str) -> dict:
    raw = skopeo(
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        f"{user}:{password}",
        f"docker://{registry.host}/{name}",
    )
    return json.loads(raw)


def test_an_unknown_image_is_one_sentence(tmp_path: Path, registry: Registry) -> None:
    result = run_builder("pull", f"{registry.host}/nothing:here", root=tmp_path / "s", check=False)
    assert_one_clean_error(result, f"the image {registry.host}/nothing:here is not in the registry")


def test_a_registry_that_is_down_is_one_sentence(tmp_path: Path) -> None:
    host = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = run_builder("pull", f"{host}/base:1", root=tmp_path / "s", check=False)
    assert_one_clean_error(result, f"cannot connect to {host} (Connection refused)")


def test_an_artifact_is_an_unsupported_media_type(tmp_path: Path, registry: Registry) -> None:
    client = RegistryClient(registry.host, "artifact", insecure=True, push=True)
    blob = tmp_path / "config.json"
    blob.write_bytes(b"{}")
    client.put_blob(blob, sha256_digest(b"{}"), 2)
    config = {
        "mediaType": "application/vnd.example.config.v1+json",
        "digest": sha256_digest(b"{}"),
        "size": 2,
    }
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "config": config, "layers": []}
    client.put_manifest("1", MANIFEST_MEDIA_TYPE, canonical_json(manifest))
    client.close()
    result = run_builder("pull", f"{registry.host}/artifact:1", root=tmp_path / "s", check=False)
    assert_one_clean_error(result, "unsupported media type: the config of")
    assert run_builder("images", "-q", root=tmp_path / "s").stdout == ""


def test_chunked_upload_round_trips_through_the_store(tmp_path: Path, registry: Registry) -> None:
    source = Store.open(tmp_path / "source")
    data = bytes(range(256)) * 4099  # not a multiple of the chunk size
    digest = source.write_blob(data)
    with RegistryClient(registry.host, "chunks", insecure=True, push=True, chunk_size=64 << 10) as client:
        client.put_blob(source.blob_path(digest), digest, len(data))
        assert client.has_blob(digest)
        target = Store.open(tmp_path / "target")
        client.get_blob_to(target, digest, len(data))
    assert target.read_blob(digest) == data


# -- a flaky server, for the retries --------------------------------------------------------


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first ``failures`` requests, then a manifest."""

    failures = 0
    seen: ClassVar[list[str]] = []
    body = canonical_json({"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "config": {}, "layers": []})

    def do_GET(self) -> None:
        type(self).seen.append(self.path)
        if len(self.seen) <= self.failures:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", MANIFEST_MEDIA_TYPE)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky() -> Iterator[tuple[str, type[_Flaky]]]:
    handler = type("Handler", (_Flaky,), {"seen": [], "failures": 2})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_port}", handler
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_5xx_answers_are_retried_with_backoff(flaky: tuple[str, type[_Flaky]]) -> None:
    host, handler = flaky
    with RegistryClient(host, "repo", insecure=True, backoff=(0.01, 0.01, 0.01)) as client:
        manifest = client.get_manifest("1")
    assert manifest.digest == sha256_digest(handler.body)
    assert len(handler.seen) == 3


def test_retries_give_up_with_one_sentence(flaky: tuple[str, type[_Flaky]]) -> None:
    host, handler = flaky
    with (
        RegistryClient(host, "repo", insecure=True, backoff=(0.01,)) as client,
        pytest.raises(RegistryError, match=r"answered 503 Service Unavailable\.$"),
    ):
        client.get_manifest("1")
    assert len(handler.seen) == 2


def test_loopback_and_named_registries_use_plain_http() -> None:
    options = RegistryOptions(insecure=("registry.internal:5000",))
    for host in ("localhost:5000", "127.0.0.1:5000", "127.1.2.3", "[::1]:5000", "registry.internal:5000"):
        assert options.is_insecure(host), host
    assert not options.is_insecure("registry.example:5000")
    assert RegistryClient("registry.example", "app").base == "https://registry.example"
    assert RegistryClient("docker.io", "library/busybox").base == "https://registry-1.docker.io"


def test_credentials_come_from_the_docker_config(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": "aHViOnB3"},  # hub:pw
                    "registry.example:5000": {"username": "u", "password": "p"},
                }
            }
        )
    )
    assert load_credentials("docker.io", config) == Credentials("hub", "pw")
    assert load_credentials("registry.example:5000", config) == Credentials("u", "p")
    assert load_credentials("other.example", config) is None
    assert load_credentials("docker.io", tmp_path / "missing.json") is None
