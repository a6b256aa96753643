"""Caches on S3 (moto's server on loopback): publish, read back, idempotent re-runs, no secrets anywhere, locks."""

import logging
import os
import time

import pytest
from s3helpers import (  # noqa: F401
    SECRET_KEY, ACCESS_KEY, assert_same_arrays, bucket, build, cache_attrs_text, listing, moto_endpoint, overrides,
    read_arrays, s3_options,
)

from kd_core import h5cache, io, locks
from kd_core.build import validate
from kd_core.h5cache import CacheReader, verify_file
from kd_core.merge import merge, published
from kd_core.shard import plan, run_shard


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, small_teacher_dir, corpus_path):
    """The arrays of the same run written to a local directory in one go (run.part_samples larger than a shard)."""
    uri = str(tmp_path_factory.mktemp("reference") / "out")
    build(validate("demo", overrides(small_teacher_dir, corpus_path, uri, run={"part_samples": 1000})))
    return read_arrays(uri)


def test_s3_run_publishes_a_complete_verified_cache_and_no_secret(
    tmp_path, bucket, moto_endpoint, small_teacher_dir, corpus_path, local_reference, caplog, monkeypatch
):
    caplog.set_level(logging.DEBUG, logger="kd_core")
    staging = tmp_path / "staging"
    monkeypatch.setenv("KD_CACHE_STAGING", str(staging))
    uri = f"s3://{bucket}/kd/run1"
    # Credentials come from the environment (the moto fixture's AWS variables); an option nobody listed as safe is
    # recorded masked. (Credentials in storage_options are refused: tests/test_secrets.py.)
    opts = {**s3_options(moto_endpoint), "max_concurrency": 3}
    config = validate("demo", overrides(small_teacher_dir, corpus_path, uri, output={"storage_options": opts}))
    manifest = build(config)
    assert list(staging.iterdir()) == []  # every staged file published, no empty kd-cache-staging/<key> left

    store, key = config.store, config.key
    parts = [f"versions/{key}/{f.name}" for f in manifest.parts]
    assert listing(uri, opts) == sorted(["latest.json", f"versions/{key}/cache.h5", f"versions/{key}/manifest.json",
                                         *parts])
    assert len(parts) == 6 and all("/parts/shard-0000" in p for p in parts)
    assert io.read_json(f"{uri}/latest.json", opts) == {"version": key, "path": f"versions/{key}/cache.h5"}
    # The manifest describes the published bytes: sizes and checksums of every file it lists.
    fs, _ = io.filesystem(uri, opts)
    for file in manifest.files:
        local = tmp_path / file.name.replace("/", "_")
        fs.get_file(io.filesystem(store.version_file(key, file.name), opts)[1], str(local))
        assert local.stat().st_size == file.bytes and io.file_digest(local)[0] == file.sha256
        if file.name != "cache.h5":
            verify_file(local, expect=file.model_dump())  # every byte of every part, against its counts
    with CacheReader(uri, opts) as reader:
        assert len(reader) == manifest.num_samples and reader.num_tokens == manifest.num_tokens
        assert reader.file_bytes == manifest.file_bytes
    # Parts read in order give the same bytes as one uninterrupted pass.
    assert_same_arrays(read_arrays(uri, opts), local_reference)

    everything = [fs.cat(p).decode("latin-1") for p in fs.find(f"{bucket}/kd")]
    for text in [*everything, cache_attrs_text(uri, opts), manifest.model_dump_json(), caplog.text]:
        assert SECRET_KEY not in text and ACCESS_KEY not in text
    recorded = manifest.config["output"]["storage_options"]
    assert recorded["endpoint_url"] == moto_endpoint and recorded["max_concurrency"] == "***"


def test_rerun_is_idempotent_and_loads_no_teacher(bucket, moto_endpoint, small_teacher_dir, corpus_path, monkeypatch):
    uri = f"s3://{bucket}/kd"
    opts = s3_options(moto_endpoint)
    config = validate("demo", overrides(small_teacher_dir, corpus_path, uri, output={"storage_options": opts}))
    shards = plan(config).shards
    records = [run_shard(config, s) for s in shards]

    def no_teacher(*a, **k):
        raise AssertionError("a complete shard must not load the teacher")

    monkeypatch.setattr("kd_core.teacher.load_teacher", no_teacher)
    assert [run_shard(config, s) for s in shards] == records  # complete shards: skipped
    assert [len(r.parts) for r in records] == [3, 3]
    manifest = merge(config, records)
    assert published(config) == manifest


def test_reader_opens_s3_with_blocks_and_cache(bucket, moto_endpoint, small_teacher_dir, corpus_path):
    uri = f"s3://{bucket}/kd"
    opts = s3_options(moto_endpoint)
    build(validate("demo", overrides(small_teacher_dir, corpus_path, uri, output={"storage_options": opts})))
    with CacheReader(uri, opts) as reader:
        reader[len(reader) - 1]
        f = next(iter(reader._open_files.values())).fileobj
        assert f.blocksize == io.READ_BLOCK_BYTES and type(f.cache).__name__ == "BlockCache"


def test_second_run_on_a_locked_shard_refuses(tmp_path, small_teacher_dir, corpus_path, bucket, moto_endpoint):
    opts = s3_options(moto_endpoint)
    config = validate("demo", overrides(small_teacher_dir, corpus_path, f"s3://{bucket}/kd",
                                                 output={"storage_options": opts}))
    store, key = config.store, config.key
    shard = plan(config).shards[0]
    with locks.LeaseLock(store.shard_lock_uri(key, shard), shard.name, opts):  # "another run" holds shard 0
        with pytest.raises(locks.LockedError, match="another run is writing shard-00000-of-00002"):
            run_shard(config, shard)
        with pytest.raises(locks.LockedError):
            locks.LeaseLock(store.shard_lock_uri(key, shard), shard.name, opts).acquire()
    assert not io.exists(store.shard_lock_uri(key, shard), opts)  # released
    assert not io.exists(store.shard_record(key, shard), opts)  # and the refused run wrote nothing


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


def test_four_shards_under_a_small_object_limit_write_every_object_once_to_its_final_key(
    bucket, moto_endpoint, small_teacher_dir, corpus_path, local_reference, monkeypatch
):
    """No object over output.max_object_bytes, parts split to stay under it, and publishing is PUTs (or multipart
    uploads) to final keys: no server-side copy, no temporary key moved into place. Every S3 call is counted."""
    import s3fs

    calls = []
    real_call = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        calls.append((method, kwargs.get("Key", "")))
        return await real_call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    uri, opts, limit = f"s3://{bucket}/kd", s3_options(moto_endpoint), 1 << 16
    config = validate("demo", overrides(small_teacher_dir, corpus_path, uri, run={"num_shards": 4, "part_samples": 15},
                                                 output={"storage_options": opts, "max_object_bytes": limit}))
    manifest = build(config)

    methods = {method for method, _ in calls}
    assert not methods & {"copy_object", "upload_part_copy"}, methods  # no server-side copy, hence no move
    written = [key for method, key in calls if method in ("put_object", "create_multipart_upload")]
    assert not [k for k in written if any(s in k for s in (".tmp", ".uploading", ".partial", ".staged"))], written
    data = [k for k in written if k.endswith(".h5")]
    assert len(data) == len(set(data)) == len(manifest.files)  # each part file and the index written once
    deleted = [key for method, key in calls if method in ("delete_object", "delete_objects") and "/versions/" in key]
    assert not deleted, deleted

    fs, root = io.filesystem(uri, opts)
    sizes = {path: info["size"] for path, info in fs.find(root, detail=True).items()}
    assert max(sizes.values()) <= limit, sizes
    assert len(manifest.parts) > 4, "the shards' 15-sample parts are split into more files"
    assert_same_arrays(read_arrays(uri, opts), local_reference)


def test_a_multipart_upload_goes_to_its_final_key_with_the_etag_computed_locally(bucket, moto_endpoint, tmp_path):
    opts = s3_options(moto_endpoint)
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(33 << 20))  # over two 16 MiB parts: a 3-part multipart upload
    assert io.upload_part_bytes(local.stat().st_size) == 16 << 20
    expected = io.file_digest(local, 16 << 20)[1]
    stamp = io.publish_file(local, f"s3://{bucket}/x/big.bin", opts)
    assert stamp["etag"] == expected and stamp["etag"].endswith('-3"')
    assert listing(f"s3://{bucket}", opts) == ["x/big.bin"]
    assert not local.exists()  # the staged copy is deleted once the upload is confirmed


def test_upload_part_size_keeps_any_s3_object_within_10000_parts():
    for size in (0, 5 << 20, 4 << 30, 488 << 30, 5 << 40):
        part = io.upload_part_bytes(size)
        assert part >= 5 << 20 and part % (1 << 20) == 0 and -(-size // part) <= 10_000 and part <= 5 << 30


def test_cache_dataset_and_the_streaming_reader_on_s3_equal_the_local_copy(
    bucket, moto_endpoint, small_teacher_dir, corpus_path, tmp_path
):
    """CacheDataset("s3://...") through the manifest; the streaming reader splits files over ranks x workers,
    every sample once per epoch, in a seeded order; export makes one self-contained file of the same arrays."""
    import h5py
    import torch

    from kd_core.dataset import CacheDataset, StreamingCacheDataset

    uri, opts = f"s3://{bucket}/kd", s3_options(moto_endpoint)
    config = validate("demo", overrides(small_teacher_dir, corpus_path, uri, output={"storage_options": opts}))
    build(config)
    local = tmp_path / "local"
    fs, _ = io.filesystem(uri, opts)
    fs.get(f"{bucket}/kd/", str(local), recursive=True)  # a plain copy of the whole output
    remote, copied = CacheDataset(uri, opts), CacheDataset(str(local))
    assert len(remote) == len(copied) == 58
    for i in (0, 17, 57):
        a, b = remote[i], copied[i]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    seen = []
    for rank in range(2):
        stream = StreamingCacheDataset(uri, opts, seed=3, shuffle_buffer=8, rank=rank, world_size=2)
        seen.append([int(s["sample_index"]) for s in stream])
    assert sorted(seen[0] + seen[1]) == sorted(int(copied[i]["sample_index"]) for i in range(len(copied)))
    again = [int(s["sample_index"]) for s in StreamingCacheDataset(uri, opts, seed=3, shuffle_buffer=8, rank=0,
                                                                   world_size=2)]
    assert again == seen[0] and seen[0] != sorted(seen[0])  # seeded, and shuffled

    summary = h5cache.export_cache(uri, tmp_path / "one.h5", opts)
    assert summary["num_samples"] == 58
    with h5py.File(tmp_path / "one.h5") as f:
        exported = {name: f[name][:] for name in ("input_ids", "offsets", "sample_index", "topk_indices",
                                                   "topk_logprobs", "logsumexp")}
    assert_same_arrays(exported, read_arrays(str(local)))
    (tmp_path / "moved.h5").write_bytes((tmp_path / "one.h5").read_bytes())  # self-contained: no other file needed
    assert_same_arrays(read_arrays(str(tmp_path / "moved.h5")), exported)
