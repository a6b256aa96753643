"""Faults against a real S3 API (moto's server on loopback): kill -9 mid-shard, corrupt parts, endpoint down,
output budget exceeded. Each must cost at most a part of redone work and never publish a partial cache."""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs
from s3helpers import (  # noqa: F401
    assert_same_arrays, bucket, build, listing, moto_endpoint, overrides, read_arrays, reference_arrays, s3_options,
    start_moto,
)

from kd_core import h5cache, io, storage
from kd_core.build import validate
from kd_core.errors import CacheFileError, StorageError
from kd_core.estimate import estimate
from kd_core.merge import merge
from kd_core.shard import plan, run_shard
from tasks.teacher_inference import _not_a_user_error

# Runs the pipeline in a child process, a little slowed down (50 ms per sample) so that the test can kill it
# while a shard is half done.
DRIVER = """
import json, sys, time
from kd_core import h5cache
from kd_core.build import validate
from kd_core.estimate import estimate
from kd_core.merge import merge
from kd_core.shard import plan, run_shard
real_append = h5cache.CacheWriter.append_rows
def slow_append(self, rows):
    time.sleep(0.05)
    real_append(self, rows)
h5cache.CacheWriter.append_rows = slow_append
config = validate("demo", json.loads(sys.argv[1]))
estimate(config)
merge(config, [run_shard(config, s) for s in plan(config).shards])
"""


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before it could be killed"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)


@pytest.mark.slow  # ~15 s: a child process imports torch and transformers before it can be killed
def test_kill_9_mid_shard_then_rerun_resumes_and_matches_a_clean_run(
    bucket, moto_endpoint, small_teacher_dir, corpus_path, reference_arrays, monkeypatch
):
    uri = f"s3://{bucket}/kd"
    opts = s3_options(moto_endpoint)
    over = overrides(small_teacher_dir, corpus_path, uri, output={"storage_options": opts})
    config = validate("demo", over)
    store, key = config.store, config.key
    shard0 = plan(config).shards[0]
    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint)

    def part_done(index: int) -> bool:
        fs.invalidate_cache()
        return fs.exists(io.filesystem(store.part_record(key, shard0, index), opts)[1])

    proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(over)], env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: part_done(1), timeout=120, proc=proc)  # shard 0: 2 of 3 parts done, the third running
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()

    # Nothing at the output looks complete: no latest, no manifest, no shard record; part files only at their
    # final names (written once), and every complete part has its record.
    files = listing(uri, opts)
    assert not [f for f in files if not f.startswith(("work/", f"versions/{key}/parts/"))], files
    assert f"work/{key}/{shard0.name}.json" not in files
    records_done = [f for f in files if f.startswith(f"work/{key}/{shard0.name}/part-")]
    assert len(records_done) >= 2, files
    done_before = {f for f in files if f.endswith(".h5")}

    published = []
    real_publish = io.publish_file
    monkeypatch.setattr(io, "publish_file", lambda local, dest, o=None: (published.append(dest), real_publish(local, dest, o))[1])
    manifest = build(config)  # the re-run, on this host: the dead run's shard lock is taken over at once

    redone = {d.removeprefix(f"{uri}/") for d in published if "/part-" in d}
    complete_before = {f"versions/{key}/{store.part_name(shard0, i)}" for i in range(len(records_done))}
    assert not redone & complete_before, "a complete part was computed again"
    assert len(redone) == 6 - len(records_done)
    assert listing(uri, opts) == sorted(["latest.json", f"versions/{key}/cache.h5",
                                         f"versions/{key}/manifest.json",
                                         *(f"versions/{key}/{f.name}" for f in manifest.parts)])
    assert done_before <= set(listing(uri, opts))
    assert_same_arrays(read_arrays(uri, opts), reference_arrays)


def _run_shards(config):
    return [run_shard(config, s) for s in plan(config).shards]


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "delete"])
def test_a_damaged_part_makes_merge_refuse_naming_it(damage, bucket, moto_endpoint, small_teacher_dir, corpus_path):
    uri = f"s3://{bucket}/kd"
    opts = s3_options(moto_endpoint)
    config = validate("demo", overrides(small_teacher_dir, corpus_path, uri, output={"storage_options": opts}))
    records = _run_shards(config)
    store, key = config.store, config.key
    shard1 = plan(config).shards[1]
    fs, victim = io.filesystem(store.part_file(key, shard1, 1), opts)
    data = fs.cat(victim)
    if damage == "truncate":
        fs.pipe(victim, data[: len(data) // 2])
    elif damage == "corrupt":  # same size, 64 bytes flipped inside the data
        at = int(len(data) * 0.6)
        fs.pipe(victim, data[:at] + bytes(b ^ 0xFF for b in data[at:at + 64]) + data[at + 64:])
    else:
        fs.rm(victim)

    want = {"truncate": "it has .* bytes, its record says", "corrupt": r"its bytes differ from those published \(sha256\)",
            "delete": "the file is missing"}[damage]
    with pytest.raises(CacheFileError, match=f"shard-00001-of-00002 part 1 .* fails verification, so nothing was "
                                             f"published: {want}"):
        merge(config, records)
    assert not [f for f in listing(uri, opts) if not f.startswith(("work/", "versions/" + key + "/parts/"))]


def test_a_damaged_local_part_makes_merge_refuse(tmp_path, small_teacher_dir, corpus_path):
    uri = str(tmp_path / "out")
    config = validate("demo", overrides(small_teacher_dir, corpus_path, uri))
    records = _run_shards(config)
    victim = io.local_path(config.store.part_file(config.key, records[0].shard, 2))
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CacheFileError, match="shard-00000-of-00002 part 2 .* fails verification, so nothing was published"):
        merge(config, records)
    assert not [f for f in listing(uri) if not f.startswith("work/") and "/parts/" not in f]


def test_a_changed_local_part_of_the_same_size_is_caught_by_its_checksum(tmp_path, small_teacher_dir, corpus_path):
    uri = str(tmp_path / "out")
    config = validate("demo", overrides(small_teacher_dir, corpus_path, uri))
    records = _run_shards(config)
    victim = io.local_path(config.store.part_file(config.key, records[1].shard, 0))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the data; the file's mtime changes, so merge reads it whole
    victim.write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match="shard-00001-of-00002 part 0 .* its bytes differ from those published"):
        merge(config, records)


def test_endpoint_down_during_upload_retries_then_fails_clearly_and_publishes_nothing(
    bucket, moto_endpoint, small_teacher_dir, corpus_path, monkeypatch, caplog, tmp_path
):
    monkeypatch.setattr(io, "RETRY_DELAYS", (0.1, 0.2))
    staging = tmp_path / "staging"
    monkeypatch.setenv("KD_CACHE_STAGING", str(staging))
    flaky = start_moto()  # a second endpoint onto the same moto state, to be taken down mid-run
    host, port = flaky.get_host_and_port()
    uri = f"s3://{bucket}/kd"
    flaky_opts = s3_options(f"http://{host}:{port}")
    config = validate("demo", overrides(small_teacher_dir, corpus_path, uri,
                                                 output={"storage_options": flaky_opts}))
    records = _run_shards(config)

    real_write_index = h5cache.write_index

    def index_then_endpoint_dies(*args, **kwargs):
        summary = real_write_index(*args, **kwargs)
        flaky.stop()  # the index is ready locally; its upload meets a dead endpoint
        return summary

    monkeypatch.setattr(h5cache, "write_index", index_then_endpoint_dies)
    caplog.set_level(logging.WARNING, logger="kd_core.io")
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"uploading s3://.*/cache\.h5: still failing after 3 attempts") as e:
        merge(config, records)
    assert "Could not connect to the endpoint" in str(e.value) and time.monotonic() - started < 30
    assert caplog.text.count("retrying in") == 2
    assert list(staging.iterdir()) == []  # the shards' and the merge's local scratch: nothing left, not even dirs

    # Seen through the live endpoint: nothing published, nothing half-uploaded, the parts kept for a re-run.
    opts = s3_options(moto_endpoint)
    files = listing(uri, opts)
    assert files and all(f.startswith("work/") or "/parts/" in f for f in files), files
    monkeypatch.setattr(h5cache, "write_index", real_write_index)
    live = validate("demo", overrides(small_teacher_dir, corpus_path, uri, output={"storage_options": opts}))
    assert merge(live, records).num_samples == sum(r.num_samples for r in records)


def test_a_transient_upload_error_is_retried(bucket, moto_endpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(io, "RETRY_DELAYS", (0.01, 0.01))
    opts = s3_options(moto_endpoint)
    fs, _ = io.filesystem(f"s3://{bucket}/x.bin", opts)  # fsspec hands the same instance to publish_file
    calls = []
    real_put = fs.put_file

    def flaky_put(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionResetError("connection reset by peer")
        return real_put(*args, **kwargs)

    monkeypatch.setattr(fs, "put_file", flaky_put)
    local = tmp_path / "x.bin"
    local.write_bytes(b"payload")
    io.publish_file(local, f"s3://{bucket}/x.bin", opts)
    assert len(calls) == 2 and io.read_text(f"s3://{bucket}/x.bin", opts) == "payload"
    assert listing(f"s3://{bucket}", opts) == ["x.bin"]


@pytest.mark.parametrize("limit", ["max_bytes", "free_space"])
def test_over_budget_fails_in_estimate_before_the_teacher_loads(limit, tmp_path, small_teacher_dir, corpus_path,
                                                                monkeypatch):
    def no_teacher(*a, **k):
        raise AssertionError("the teacher must not load")

    monkeypatch.setattr("kd_core.teacher.load_teacher", no_teacher)
    extra = {"output": {"max_bytes": 10_000}} if limit == "max_bytes" else {}
    if limit == "free_space":
        monkeypatch.setattr("kd_core.storage.local_free_bytes", lambda path: 10_000)
    uri = tmp_path / "out"
    config = validate("demo", overrides(small_teacher_dir, corpus_path, str(uri), **extra))
    match = "output.max_bytes: the cache is expected to take" if limit == "max_bytes" else "output.uri: the target has"
    with pytest.raises(StorageError, match=match):
        estimate(config)
    assert not uri.exists()


class _FailedState:
    def __init__(self, error: Exception):
        self.error = error

    def result(self):
        raise self.error


def test_a_full_disk_fails_once_with_one_message_and_leaves_no_partial(tmp_path, small_teacher_dir, corpus_path,
                                                                       monkeypatch):
    """ENOSPC while a part is closed: once retried as transient (three tracebacks) with a .partial left behind."""
    uri = str(tmp_path / "out")
    config = validate("demo", overrides(small_teacher_dir, corpus_path, uri))
    store, key = config.store, config.key
    shard = plan(config).shards[0]
    real_close, closed = h5cache.writer._Column.close, []

    def close_on_a_full_disk(self):  # six columns per part: the second part meets a full disk
        closed.append(self)
        if len(closed) > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_close(self)

    monkeypatch.setattr(h5cache.writer._Column, "close", close_on_a_full_disk)
    with pytest.raises(StorageError, match=r"^no space left on the disk holding .*Fix: free space") as e:
        run_shard(config, shard)
    assert "\n" not in str(e.value)
    files = listing(uri)
    assert not [f for f in files if f.endswith((".partial", ".staged"))], files
    assert not [p for p in Path.cwd().iterdir() if p.name.endswith((".partial", ".h5"))]  # nothing in the cwd
    assert f"work/{key}/{shard.name}/part-00000.json" in files  # the complete part is kept
    assert f"versions/{key}/{store.part_name(shard, 0)}" in files
    assert f"versions/{key}/{store.part_name(shard, 1)}" not in files
    # Not retried: neither by kd_core.io's backoff nor by the teacher-inference task's retry condition.
    hdf5_style = OSError("Can't synchronously write data (file write failed: errno = 28, error message = "
                         "'No space left on device')")
    assert not io._transient(OSError(errno.ENOSPC, "No space left on device")) and not io._transient(hdf5_style)
    assert _not_a_user_error(None, None, _FailedState(e.value)) is False


def test_remote_target_with_too_little_local_staging_fails_in_estimate(bucket, moto_endpoint, small_teacher_dir,
                                                                       corpus_path, tmp_path, monkeypatch):
    """A remote run once found its local staging disk full at merge time, after all the GPU work."""
    monkeypatch.setenv("KD_CACHE_STAGING", str(tmp_path / "staging"))
    monkeypatch.setattr("kd_core.teacher.load_teacher", lambda *a, **k: pytest.fail("the teacher must not load"))
    real_free = storage.local_free_bytes
    monkeypatch.setattr(storage, "local_free_bytes",
                        lambda path: 10_000 if str(path).startswith(str(tmp_path)) else real_free(path))
    opts = s3_options(moto_endpoint)
    config = validate("demo", overrides(small_teacher_dir, corpus_path, f"s3://{bucket}/kd",
                                                 output={"storage_options": opts}))
    with pytest.raises(StorageError, match=r"KD_CACHE_STAGING: the local staging directory .* has 10\.0 KB free"):
        estimate(config)
    assert listing(f"s3://{bucket}/kd", opts) == []
