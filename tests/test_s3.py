"""Caches on S3 (moto's server on loopback): publish, read back, idempotent re-runs, no secrets anywhere, locks."""

import json
import logging
import os
import time

import pytest
from s3helpers import (  # noqa: F401
    SECRET_KEY, ACCESS_KEY, assert_same_arrays, bucket, build, cache_attrs_text, listing, moto_endpoint, overrides,
    read_arrays, s3_options,
)

from kd_core import io, locks, pipeline
from kd_core.cachefile import CacheReader, verify_file


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, small_teacher_dir, corpus_path):
    """The arrays of the same run written to a local directory in one go (run.part_samples larger than a shard)."""
    uri = str(tmp_path_factory.mktemp("reference") / "out")
    build(pipeline.validate("demo", overrides(small_teacher_dir, corpus_path, uri, run={"part_samples": 1000})))
    return read_arrays(uri)


def test_s3_run_publishes_a_complete_verified_cache_and_no_secret(
    tmp_path, bucket, moto_endpoint, small_teacher_dir, corpus_path, local_reference, caplog
):
    caplog.set_level(logging.DEBUG, logger="kd_core")
    uri = f"s3://{bucket}/kd/run1"
    # Credentials passed explicitly too (as a user might): they must be masked wherever the config is recorded.
    opts = {**s3_options(moto_endpoint), "key": ACCESS_KEY, "secret": SECRET_KEY}
    config = pipeline.validate("demo", overrides(small_teacher_dir, corpus_path, uri, output={"storage_options": opts}))
    manifest = build(config)

    key = config.content_key()
    assert listing(uri, opts) == ["latest.json", f"versions/{key}/cache.h5", f"versions/{key}/manifest.json"]
    assert io.read_json(f"{uri}/latest.json", opts) == {"version": key, "path": f"versions/{key}/cache.h5"}
    # The manifest describes the published bytes: counts and per-dataset checksums match a fresh verification.
    with CacheReader(pipeline.resolve_cache_uri(uri, opts), opts) as reader:
        assert len(reader) == manifest["num_samples"] and reader.num_tokens == manifest["num_tokens"]
        assert reader.file_bytes == manifest["file_bytes"]
        assert reader[5]["input_ids"].shape[0] == reader.offsets[6] - reader.offsets[5]
    fs, path = io.filesystem(f"{uri}/versions/{key}/cache.h5", opts)
    fs.get_file(path, str(tmp_path / "copy.h5"))
    assert verify_file(tmp_path / "copy.h5")["checksums"] == manifest["checksums"]
    # Parts merged in order give the same bytes as one uninterrupted pass.
    assert_same_arrays(read_arrays(uri, opts), local_reference)

    everything = [fs.cat(p).decode("latin-1") for p in fs.find(f"{bucket}/kd")]
    for text in [*everything, cache_attrs_text(uri, opts), json.dumps(manifest), caplog.text]:
        assert SECRET_KEY not in text and ACCESS_KEY not in text
    assert manifest["config"]["output"]["storage_options"]["secret"] == "***"


def test_rerun_is_idempotent_and_loads_no_teacher(bucket, moto_endpoint, small_teacher_dir, corpus_path, monkeypatch):
    uri = f"s3://{bucket}/kd"
    opts = s3_options(moto_endpoint)
    config = pipeline.validate("demo", overrides(small_teacher_dir, corpus_path, uri, output={"storage_options": opts}))
    shards = pipeline.plan(config).shards
    records = [pipeline.run_shard(config, s) for s in shards]

    def no_teacher(*a, **k):
        raise AssertionError("a complete shard must not load the teacher")

    monkeypatch.setattr("kd_core.teacher.load_teacher", no_teacher)
    assert [pipeline.run_shard(config, s) for s in shards] == records  # complete shards: skipped
    assert [len(r["parts"]) for r in records] == [3, 3]
    manifest = pipeline.merge(config, records)
    assert pipeline.published(config) == manifest


def test_reader_opens_s3_with_blocks_and_cache(bucket, moto_endpoint, small_teacher_dir, corpus_path):
    uri = f"s3://{bucket}/kd"
    opts = s3_options(moto_endpoint)
    build(pipeline.validate("demo", overrides(small_teacher_dir, corpus_path, uri, output={"storage_options": opts})))
    f, size = io.open_for_read(pipeline.resolve_cache_uri(uri, opts), opts)
    try:
        assert size > 0 and f.blocksize == io.READ_BLOCK_BYTES and type(f.cache).__name__ == "BlockCache"
    finally:
        f.close()


def test_second_run_on_a_locked_shard_refuses(tmp_path, small_teacher_dir, corpus_path, bucket, moto_endpoint):
    opts = s3_options(moto_endpoint)
    config = pipeline.validate("demo", overrides(small_teacher_dir, corpus_path, f"s3://{bucket}/kd",
                                                 output={"storage_options": opts}))
    layout, shard = pipeline.Layout(config), pipeline.plan(config).shards[0]
    with locks.LeaseLock(layout.shard_lock(shard), shard.name, opts):  # "another run" holds shard 0
        with pytest.raises(locks.LockedError, match="another run is writing shard-00000-of-00002"):
            pipeline.run_shard(config, shard)
        with pytest.raises(locks.LockedError):
            locks.LeaseLock(layout.shard_lock(shard), shard.name, opts).acquire()
    assert not io.exists(layout.shard_lock(shard), opts)  # released
    assert not io.exists(layout.shard_record(shard), opts)  # and the refused run wrote nothing


@pytest.mark.parametrize("held", [
    {"host": "elsewhere", "pid": 1, "expires": 0},          # another host, lease expired
    {"host": None, "pid": 2 ** 22 + 7, "expires": 1e12},    # this host, holder process dead (kill -9)
])
def test_a_dead_holders_lock_is_taken_over(tmp_path, held):
    import socket

    uri = str(tmp_path / "work" / "x.lock")
    held = {**held, "host": held["host"] or socket.gethostname(), "token": "old", "what": "x"}
    io.write_json_atomic(uri, held)
    with locks.LeaseLock(uri, "x") as lock:
        assert io.read_json(uri)["token"] == lock.owner["token"]
    assert not os.path.exists(uri)


def test_lease_is_refreshed_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "REFRESH_SECONDS", 0.05)
    uri = str(tmp_path / "x.lock")
    with locks.LeaseLock(uri, "x"):
        first = io.read_json(uri)["expires"]
        time.sleep(0.3)
        assert io.read_json(uri)["expires"] > first


@pytest.mark.parametrize("content", ['{"host": "h", "pid": "x", "token": 1, "expires": "soon"}', '{"pid": 1}',
                                     '[1, 2]', 'not json at all', ''])
def test_a_damaged_lock_file_is_held_for_a_lease_then_taken_over(tmp_path, content):
    """A lock file with wrong types or missing keys once crashed with TypeError/KeyError."""
    uri = tmp_path / "work" / "x.lock"
    uri.parent.mkdir()
    uri.write_text(content)
    with pytest.raises(locks.LockedError, match=r"another run is writing x of this cache right now \(a damaged lock"):
        locks.LeaseLock(str(uri), "x").acquire()
    assert locks.is_held(str(uri))
    written = time.time() - 2 * locks.LEASE_SECONDS  # last written two leases ago: its writer is gone
    os.utime(uri, (written, written))
    assert not locks.is_held(str(uri))
    with locks.LeaseLock(str(uri), "x") as lock:
        assert io.read_json(str(uri))["token"] == lock.owner["token"]
    assert not uri.exists()
