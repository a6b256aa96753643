"""Full disks: a lock file appears whole or not at all, and the error names the disk that is full."""

import errno
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from s3helpers import bucket, moto_endpoint, overrides, s3_options  # noqa: F401
from s3helpers import build as run_build

from kd_core import h5cache, io, locks
from kd_core.build import validate
from kd_core.errors import StorageError
from kd_core.merge import merge
from kd_core.shard import plan, run_shard

ROOT = Path(__file__).resolve().parents[1]


def test_a_lock_that_cannot_be_written_leaves_no_file_and_blocks_no_one(tmp_path):
    """ENOSPC while writing a lock once left an empty lock file: a damaged lock, held for a whole lease (98 s in
    the report) by nobody. Here the write fails for real: the process may not grow any file (RLIMIT_FSIZE 0)."""
    lock = tmp_path / "work" / "shard.lock"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        from kd_core import locks
        try:
            locks.LeaseLock({str(lock)!r}, "shard-0").acquire()
        except OSError as e:
            sys.exit(3)
        sys.exit(0)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert not lock.exists() and list(lock.parent.iterdir()) == []  # no lock, no temporary file
    started = time.monotonic()
    with locks.LeaseLock(str(lock), "shard-0"):
        assert time.monotonic() - started < 5 and locks.read_holder(str(lock)).damaged is False


def test_create_exclusive_still_refuses_an_existing_lock(tmp_path):
    uri = str(tmp_path / "x.lock")
    assert io.create_exclusive(uri, "first") and not io.create_exclusive(uri, "second")
    assert Path(uri).read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["x.lock"]


def test_a_full_output_disk_is_named_not_staging(tmp_path, small_teacher_dir, corpus_path, monkeypatch):
    """The merge of a local run once blamed KD_CACHE_STAGING for a full output disk."""
    monkeypatch.setenv("KD_CACHE_STAGING", str(tmp_path / "staging"))
    uri = str(tmp_path / "out")
    config = validate("demo", overrides(small_teacher_dir, corpus_path, uri,
                                                 dataset={"max_samples": 10}, run={"num_shards": 1}))
    shards = [run_shard(config, s) for s in plan(config).shards]

    def index_on_a_full_disk(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(h5cache, "write_index", index_on_a_full_disk)
    with pytest.raises(StorageError) as e:
        merge(config, shards)
    message = str(e.value)
    assert message.startswith(f"no space left on the disk holding the output directory (output.uri) {uri} (")
    assert "KD_CACHE_STAGING" not in message and "choose an output.uri on a larger disk" in message


@pytest.mark.parametrize("fuller", ["output", "staging"])
def test_without_a_file_name_the_fuller_of_two_disks_is_named(fuller, tmp_path, monkeypatch):
    """HDF5 reports ENOSPC without a file name: the disk with less room is the one named."""
    paths = {"output": tmp_path / "out", "staging": tmp_path / "staging"}
    monkeypatch.setattr(io, "_usage", lambda p: (1 if p == paths["output"] else 2, 10 if p == paths[fuller] else 10**12))
    with pytest.raises(StorageError) as e, io.disk_full_is_fatal(**paths):
        raise OSError("Can't synchronously write data (file write failed: errno = 28)")
    assert str(e.value).startswith(f"no space left on the disk holding {io._DISKS[fuller][0]} {paths[fuller]} (")


def test_a_staged_file_is_deleted_after_its_upload_and_after_a_failed_one(bucket, moto_endpoint, tmp_path, monkeypatch):
    """Runs to S3 once kept every staged part file in KD_CACHE_STAGING: a worker's disk filled at scale."""
    monkeypatch.setattr(io, "RETRY_DELAYS", (0.01,))
    opts = s3_options(moto_endpoint)
    staged = tmp_path / "part.h5"
    staged.write_bytes(b"payload")
    io.publish_file(staged, f"s3://{bucket}/x/part.h5", opts)
    assert not staged.exists() and io.read_text(f"s3://{bucket}/x/part.h5", opts) == "payload"

    fs, _ = io.filesystem(f"s3://{bucket}/x.bin", opts)
    monkeypatch.setattr(fs, "put_file", lambda *a, **k: (_ for _ in ()).throw(ConnectionResetError("reset")))
    staged.write_bytes(b"payload 2")
    with pytest.raises(StorageError, match="still failing after 2 attempts"):
        io.publish_file(staged, f"s3://{bucket}/x/part2.h5", opts)
    assert not staged.exists()


@pytest.mark.parametrize("outcome", ["published", "an upload failed"])
def test_a_run_to_s3_leaves_nothing_in_staging(outcome, bucket, moto_endpoint, small_teacher_dir, corpus_path,
                                               tmp_path, monkeypatch):
    """Staged part files were never deleted, and an empty kd-cache-staging/<key> was left by every run."""
    staging = tmp_path / "staging"
    monkeypatch.setenv("KD_CACHE_STAGING", str(staging))
    monkeypatch.setattr(io, "RETRY_DELAYS", (0.01,))
    opts = s3_options(moto_endpoint)
    b = validate("demo", overrides(small_teacher_dir, corpus_path, f"s3://{bucket}/kd",
                                   output={"storage_options": opts}, dataset={"max_samples": 30}))
    if outcome == "published":
        run_build(b)
    else:
        fs, _ = io.filesystem(f"s3://{bucket}/kd", b.store.options)
        real_put, calls = fs.put_file, []

        def second_upload_fails(*a, **k):
            calls.append(a)
            if len(calls) >= 2:
                raise ConnectionResetError("reset")
            return real_put(*a, **k)

        monkeypatch.setattr(fs, "put_file", second_upload_fails)
        with pytest.raises(StorageError, match="still failing"):
            run_build(b)
    assert [p for p in staging.rglob("*")] == []
