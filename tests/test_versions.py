"""kd_core.versions on a local directory and on S3 (moto): the latest pointer and pruning of old versions."""

import pytest
from s3helpers import bucket, moto_endpoint  # noqa: F401

from kd_core import io, versions


@pytest.fixture(params=["local", "s3"])
def target(request, tmp_path):
    """(output.uri, storage_options) of an empty target."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    name, endpoint = request.getfixturevalue("bucket"), request.getfixturevalue("moto_endpoint")
    return f"s3://{name}/kd", {"endpoint_url": endpoint}


def publish(root, opts, key, day):
    """A complete version as merge leaves it: its file, then its manifest."""
    io.write_text_atomic(io.join(root, "versions", key, "cache.h5"), "not really hdf5", opts)
    io.write_json_atomic(io.join(root, "versions", key, "manifest.json"),
                         {"key": key, "published_at": f"2026-01-{day:02d}T02:00:00+00:00"}, opts)


def remaining(root, opts):
    fs, path = io.filesystem(io.join(root, "versions"), opts)
    fs.invalidate_cache()
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def test_prune_keeps_latest_and_the_newest_old_versions_and_never_an_incomplete_one(target):
    root, opts = target
    assert versions.latest_key(root, opts) is None
    for day, key in enumerate(["a", "b", "c", "d"], start=1):
        publish(root, opts, key, day)
    io.write_text_atomic(io.join(root, "versions", "e", "cache.h5"), "another run, still building", opts)
    versions.set_latest(root, "b", opts)  # latest need not be the newest (a config went back to an older one)

    # Old complete versions, newest first: d, c, a. Keep one.
    assert versions.prune(root, 1, opts) == ["c", "a"]
    assert remaining(root, opts) == ["b", "d", "e"]
    assert versions.prune(root, 0, opts) == ["d"]
    assert remaining(root, opts) == ["b", "e"]
    assert versions.latest_key(root, opts) == "b"
    assert io.read_json(io.join(root, "latest.json"), opts) == {"version": "b", "path": "versions/b/cache.h5"}
