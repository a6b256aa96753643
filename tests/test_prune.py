"""Pruning deletes only what it owns: directories under versions/ whose name is a key and whose own manifest names
that same key; never a path taken from inside a file, never latest's, never one a merge is publishing."""

import pytest
from s3helpers import bucket, moto_endpoint  # noqa: F401

from kd_core import io
from kd_core.store import Store

K = {name: name * 16 for name in "abcdef"}  # valid keys: 16 hex digits


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "out"))
    name, endpoint = request.getfixturevalue("bucket"), request.getfixturevalue("moto_endpoint")
    return Store(f"s3://{name}/kd", {"endpoint_url": endpoint})


def version(store, directory, day, key=None):
    """A complete version as merge leaves it, in versions/<directory>/, its manifest naming `key`."""
    io.write_text_atomic(store.version_file(directory, "cache.h5"), "not really hdf5", store.options)
    io.write_json_atomic(store.manifest(directory), {"key": key or directory,
                                                     "published_at": f"2026-01-{day:02d}T02:00:00+00:00"},
                         store.options)


def left(store):
    fs, path = io.filesystem(store.versions_dir, store.options)
    fs.invalidate_cache()
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def test_a_manifest_edited_to_name_a_newer_version_does_not_get_that_version_deleted(store):
    """Prune once deleted versions/<the key written inside an old manifest>: the newest old version went."""
    version(store, K["a"], 1)
    version(store, K["b"], 2, key=K["c"])  # edited by hand (or by anyone who can write the bucket)
    version(store, K["c"], 3)
    version(store, K["d"], 4)
    store.set_latest(K["d"])
    assert store.prune(1) == [K["a"]]  # keeps c (the newest old one); b names another key: not its to judge
    assert left(store) == [K["b"], K["c"], K["d"]]


def test_a_manifest_naming_a_path_outside_never_deletes_it(tmp_path):
    store = Store(str(tmp_path / "out"))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    version(store, K["a"], 1, key="../../victim")
    version(store, K["b"], 2)
    store.set_latest(K["b"])
    assert store.prune(0) == []
    assert (victim / "precious.txt").read_text() == "keep me" and left(store) == [K["a"], K["b"]]


@pytest.mark.parametrize("renamed_to", ["backup-of-a", K["e"]])
def test_a_version_directory_renamed_by_hand_is_left_alone_and_publishing_goes_on(store, renamed_to):
    """A renamed version directory once made the next publish fail with a traceback after latest.json moved."""
    version(store, renamed_to, 1, key=K["a"])  # versions/<a>/ as renamed: its manifest still names a
    version(store, K["b"], 2)
    store.set_latest(K["b"])
    assert store.prune(0) == []
    assert left(store) == sorted([renamed_to, K["b"]])

