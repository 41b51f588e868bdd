from __future__ import annotations

import pytest

from builder.oci import canonical_json, descriptor, format_time, parse_reference


@pytest.mark.parametrize(
    ("text", "full", "familiar"),
    [
        ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36", "busybox:1.36"),
        ("user/app", "docker.io/user/app:latest", "user/app:latest"),
        ("127.0.0.1:5000/base:tag", "127.0.0.1:5000/base:tag", "127.0.0.1:5000/base:tag"),
        ("localhost/app", "localhost/app:latest", "localhost/app:latest"),
        ("quay.io/org/app:v1", "quay.io/org/app:v1", "quay.io/org/app:v1"),
        ("app@sha256:" + "a" * 64, "docker.io/library/app@sha256:" + "a" * 64, "app@sha256:" + "a" * 64),
    ],
)
def test_references_normalise_as_docker_does(text: str, full: str, familiar: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == full
    assert ref.familiar == familiar


@pytest.mark.parametrize("text", ["", "UPPER", "a:b:c", "app@sha256:short", "-lead", "a//b"])
def test_invalid_references_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a valid image reference"):
        parse_reference(text)


def test_canonical_json_is_sorted_and_compact() -> None:
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == b'{"a":[1,{"c":3,"d":2}],"b":1}'


def test_descriptor_of_bytes_has_digest_and_size() -> None:
    desc = descriptor("x/y", b"abc", **{"k": "v"})
    assert desc == {
        "mediaType": "x/y",
        "digest": "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "size": 3,
        "annotations": {"k": "v"},
    }


def test_format_time_is_rfc3339_utc() -> None:
    assert format_time(0) == "1970-01-01T00:00:00Z"
    assert format_time(1700000000.5) == "2023-11-14T22:13:20.500000Z"
