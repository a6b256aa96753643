"""kd_core.store's versions on a local directory and on S3 (moto): the latest pointer and pruning of old versions."""

import logging
import threading
import time

import pytest
from s3helpers import bucket, build, moto_endpoint, overrides  # noqa: F401

from kd_core import io
from kd_core.build import validate
from kd_core.errors import AlreadyPublished
from kd_core.merge import merge, published
from kd_core.shard import plan, run_shard
from kd_core.store import Store


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
    store = Store(root, opts)
    k = {name: name * 16 for name in "abcde"}  # keys as version_key makes them: 16 hex digits
    assert store.latest_key() is None
    for day, name in enumerate("abcd", start=1):
        publish(root, opts, k[name], day)
    io.write_text_atomic(io.join(root, "versions", k["e"], "cache.h5"), "another run, still building", opts)
    store.set_latest(k["b"])  # latest need not be the newest (a config went back to an older one)

    # Old complete versions, newest first: d, c, a. Keep one.
    assert store.prune(1) == [k["c"], k["a"]]
    assert remaining(root, opts) == [k["b"], k["d"], k["e"]]
    assert store.prune(0) == [k["d"]]
    assert remaining(root, opts) == [k["b"], k["e"]]
    assert store.latest_key() == k["b"]
    assert io.read_json(io.join(root, "latest.json"), opts) == {"version": k["b"],
                                                                 "path": f"versions/{k['b']}/cache.h5"}


class _Seen(logging.Handler):
    """Sets an event when a log record's message contains `text`."""

    def __init__(self, text: str):
        super().__init__(logging.INFO)
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_two_configs_publishing_at_once_with_keep_0_leave_latest_readable(tmp_path, small_teacher_dir, corpus_path,
                                                                         monkeypatch):
    """Run A pauses between its manifest and latest.json while run B (another config) publishes and prunes with
    output.keep_versions=0. Before the publish lock, B deleted A's version, then A pointed latest at it and deleted
    B's: both caches gone. Now B waits for A, and latest always names a complete version."""
    uri = str(tmp_path / "out")
    small = {"dataset": {"max_samples": 20}, "run": {"num_shards": 1, "part_samples": 20},
             "output": {"keep_versions": 0}}
    a = validate("demo", overrides(small_teacher_dir, corpus_path, uri, **small))
    b = validate("demo", overrides(small_teacher_dir, corpus_path, uri, cache={"top_k": 4}, **small))
    records = {c.key: [run_shard(c, s) for s in plan(c).shards]
               for c in (a, b)}

    paused, resume = threading.Event(), threading.Event()
    real_set_latest = Store.set_latest

    def set_latest_pausing_a(self, key):
        if key == a.key and not resume.is_set():
            paused.set()
            resume.wait(60)
        real_set_latest(self, key)

    monkeypatch.setattr(Store, "set_latest", set_latest_pausing_a)
    b_waits = _Seen("waiting for another run to finish the publishing step")
    logging.getLogger("kd_core.locks").addHandler(b_waits)
    logging.getLogger("kd_core.locks").setLevel(logging.INFO)
    errors = []

    def merge_in_a_thread(config):
        try:
            merge(config, records[config.key])
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    try:
        run_a = threading.Thread(target=merge_in_a_thread, args=(a,))
        run_a.start()
        assert paused.wait(60), "run A never reached latest.json"
        run_b = threading.Thread(target=merge_in_a_thread, args=(b,))
        run_b.start()
        deadline = time.monotonic() + 60
        while run_b.is_alive() and not b_waits.event.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        resume.set()
        run_a.join(60)
        run_b.join(60)
    finally:
        resume.set()
        logging.getLogger("kd_core.locks").removeHandler(b_waits)
    assert not errors, errors
    assert b_waits.event.is_set(), "run B published while run A was between its manifest and latest.json"
    latest = Store(uri).latest_key()
    assert latest == b.key
    assert (tmp_path / "out" / "versions" / latest / "manifest.json").exists()
    assert (tmp_path / "out" / "versions" / latest / "cache.h5").exists()
    assert remaining(uri, {}) == [latest]  # keep_versions=0: A's version pruned once B was latest


SMALL = {"dataset": {"max_samples": 20}, "run": {"num_shards": 1, "part_samples": 10}}


def _small_run(tmp_path, small_teacher_dir, corpus_path):
    config = validate("demo", overrides(small_teacher_dir, corpus_path, str(tmp_path / "out"), **SMALL))
    return config, config.store, config.key


def test_a_same_config_run_meeting_its_version_published_neither_redoes_nor_overwrites_it(
        tmp_path, small_teacher_dir, corpus_path, monkeypatch):
    """Run B checked "published?" while run A was merging; A then published and cleaned up. B once redid every
    shard and wrote over the live version's files."""
    config, store, key = _small_run(tmp_path, small_teacher_dir, corpus_path)
    shards = plan(config).shards
    shard_records = [run_shard(config, s) for s in shards]  # run A ...
    manifest = merge(config, shard_records)  # ... publishes, and removes work/<key>/
    written = []
    real_publish = io.publish_file
    monkeypatch.setattr(io, "publish_file", lambda *a: written.append(a[1]) or real_publish(*a))
    with pytest.raises(AlreadyPublished, match="was published by another run"):
        run_shard(config, shards[0])  # run B, past its "published?" check
    assert merge(config, shard_records).published_at == manifest.published_at  # B's merge: A's version
    assert written == []


def test_work_left_by_a_kill_between_manifest_and_clean_up_is_removed_by_the_next_run(
        tmp_path, small_teacher_dir, corpus_path, monkeypatch):
    """work/<key>/ once leaked forever: every later run said "up to date" and never removed it."""
    config, store, key = _small_run(tmp_path, small_teacher_dir, corpus_path)
    shard_records = [run_shard(config, s) for s in plan(config).shards]
    real_remove = io.remove

    def killed_before_clean_up(uri, opts=None):
        if uri == store.work_dir(key):
            raise KeyboardInterrupt  # kill -9 right after latest.json moved
        real_remove(uri, opts)

    monkeypatch.setattr(io, "remove", killed_before_clean_up)
    with pytest.raises(KeyboardInterrupt):
        merge(config, shard_records)
    monkeypatch.setattr(io, "remove", real_remove)
    assert io.exists(store.work_dir(key)) and store.latest_key() == key
    assert published(config) is not None  # the next run: up to date ...
    assert not io.exists(store.work_dir(key))  # ... and the leftover is gone


@pytest.mark.parametrize("damage", ["delete the index", "truncate a part", "a manifest without parts"])
def test_up_to_date_means_the_manifests_files_are_there_with_their_sizes(
        damage, tmp_path, small_teacher_dir, corpus_path, monkeypatch):
    """With cache.h5 deleted, a part truncated or the manifest's parts emptied, runs once said "up to date", exit 0,
    and never rebuilt (the readers refuse such a version)."""
    config, store, key = _small_run(tmp_path, small_teacher_dir, corpus_path)
    manifest = build(config)
    if damage == "a manifest without parts":
        io.write_json_atomic(store.manifest(key), {**manifest.model_dump(mode="json"), "parts": []})
        assert published(config) is None  # not up to date: the version is rebuilt
        rebuilt = build(config)
        assert [p.name for p in rebuilt.parts] == [p.name for p in manifest.parts]
        assert published(config).parts == rebuilt.parts
        return
    victim = io.local_path(store.index(key) if damage == "delete the index"
                           else store.version_file(key, manifest.parts[-1].name))
    if damage == "delete the index":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert published(config) is None  # not up to date: the version is rebuilt
    rebuilt = build(config)
    assert rebuilt.num_samples == manifest.num_samples and published(config) is not None
    assert victim.stat().st_size == (rebuilt.index if damage == "delete the index" else rebuilt.parts[-1]).bytes
