"""The cache-key recipe, pinned: a change here costs every user their cache (STYLE.md), so it
must be deliberate, with CACHE_RECIPE bumped."""

from __future__ import annotations

from builder.cachekey import CACHE_RECIPE, base_key, explain_miss, step_fields, step_key
from builder.mounts import Mount
from builder.plan import CopyStep, RunStep

PARENT = "sha256:" + "1" * 64
RUN = RunStep(
    argv=("/bin/sh", "-c", "make"),
    env=(("PATH", "/usr/bin:/bin"), ("HOME", "/root")),
    user="",
    workdir="/src",
    network="default",
    line=7,
    created_by="RUN /bin/sh -c make",
    mounts=(Mount(type="cache", target="/root/.cache", id="pip", sharing="locked"),),
)


def test_step_fields_are_every_semantic_field_as_json() -> None:
    assert step_fields(RUN) == {
        "argv": ("/bin/sh", "-c", "make"),
        "env": (("PATH", "/usr/bin:/bin"), ("HOME", "/root")),
        "user": "",
        "workdir": "/src",
        "network": "default",
        "mounts": (
            {
                "type": "cache",
                "target": "/root/.cache",
                "source": "",
                "from_stage": None,
                "from_image": None,
                "readonly": False,
                "id": "pip",
                "sharing": "locked",
                "required": False,
                "mode": None,
                "uid": None,
                "gid": None,
                "size": None,
                "env": None,
            },
        ),
        "security": "sandbox",
        "files": (),
    }


def test_where_a_step_is_written_is_not_part_of_its_key() -> None:
    moved = RunStep(**{**step_fields(RUN), "line": 99, "created_by": "RUN make"})  # type: ignore[arg-type]
    assert step_fields(moved) == step_fields(RUN)


def test_keys_are_pinned() -> None:
    """The digests builder-cache-v1 has given since its first release (computed then from
    dataclasses.asdict; the Structs of today must give the same)."""
    assert CACHE_RECIPE == "builder-cache-v1"
    assert base_key(["sha256:" + "2" * 64]) == (
        "sha256:0acbe78ee021172a42de313c8faad49f3f042f2c020ae8cdaedf5fd874c46dc7"
    )
    key = step_key(PARENT, "RunStep", step_fields(RUN), {"epoch": None})
    assert key.digest == "sha256:10d97f56ae3e0a59267cc48d946c34631142fe7b5528d0aa63779dc44b5ec228"


def test_a_miss_is_explained_by_the_field_that_changed() -> None:
    copy = CopyStep(
        sources=("app.conf",),
        dest="/etc/",
        from_stage=None,
        from_image=None,
        chown=None,
        chmod=None,
        inline=(),
        line=3,
        created_by="COPY app.conf /etc/",
    )
    before = step_key(PARENT, "CopyStep", step_fields(copy), {"epoch": None})
    after = step_key(PARENT, "CopyStep", {**step_fields(copy), "chmod": "644"}, {"epoch": None})
    assert explain_miss(after, before.to_json()) == "--chmod changed"
    assert explain_miss(after, None) == "no earlier build of this step"
