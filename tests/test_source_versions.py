"""The source is part of the version: a changed source makes a new version (never "up to date", never mixed), an
untouched one stays up to date, and every file of a version carries the build id its manifest names."""

import shutil

import h5py
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import constants
from s3helpers import build as run_build

from kd_core import io, source
from kd_core.build import validate
from kd_core.merge import published
from kd_core.shard import plan, run_shard
from kd_core.store import Store
from kd_core.teacher import load_tokenizer


def write(path, texts):
    pq.write_table(pa.table({"text": texts}), path)


@pytest.fixture
def data(tmp_path, corpus_texts):
    """Two parquet files of real docstrings (30 + 10 rows) under data/, read through the glob data/*.parquet."""
    texts = [t for t in corpus_texts if t.strip()]
    d = tmp_path / "data"
    d.mkdir()
    write(d / "a.parquet", texts[:30])
    write(d / "b.parquet", texts[30:40])
    return d, texts


def settings(small_teacher_dir, glob, uri, **extra):
    base = {"teacher": {"model": str(small_teacher_dir), "batch_tokens": 2048, "device": "cpu"},
            "dataset": {"name": "parquet", "data_files": str(glob), "split": "train", "streaming": False,
                        "max_samples": None},
            "cache": {"top_k": 4, "max_length": 24}, "output": {"uri": uri},
            "run": {"num_shards": 2, "part_samples": 10}}
    for section, values in extra.items():
        base[section] = {**base[section], **values}
    return base


def first_tokens(uri, manifest):
    with h5py.File(io.local_path(Store(uri).index(manifest.key))) as f:
        return f["input_ids"][: f["offsets"][1]].tolist()


@pytest.mark.parametrize("change", ["rewritten in place with other documents", "rows appended",
                                    "a file added to the glob"])
def test_a_changed_source_makes_a_new_version_and_an_untouched_one_is_up_to_date(
        change, tmp_path, data, small_teacher_dir):
    """Each change once left the next run "up to date", serving the old documents (30 of 40 rows, ...)."""
    d, texts = data
    uri = str(tmp_path / "out")
    first = validate("demo", settings(small_teacher_dir, d / "*.parquet", uri))
    old = run_build(first)
    again = validate("demo", settings(small_teacher_dir, d / "*.parquet", uri))
    assert again.key == first.key and published(again) is not None  # the nightly no-op

    if change == "rewritten in place with other documents":
        write(d / "a.parquet", texts[100:130])
        expected_rows, first_text = 40, texts[100]
    elif change == "rows appended":
        write(d / "a.parquet", texts[:30] + texts[200:210])
        expected_rows, first_text = 50, texts[0]
    else:
        write(d / "c.parquet", texts[250:255])
        expected_rows, first_text = 45, texts[0]
    changed = validate("demo", settings(small_teacher_dir, d / "*.parquet", uri))
    assert changed.key != first.key and published(changed) is None
    new = run_build(changed)
    assert Store(uri).latest_key() == changed.key and new.num_samples == expected_rows
    assert new.source == changed.source and new.source.digest() != old.source.digest()
    tokenizer = load_tokenizer(changed.config.teacher)
    assert first_tokens(uri, new) == tokenizer(first_text, truncation=True, max_length=24)["input_ids"]


def fake_hub_snapshot(cache, repo, sha, files):
    """A Hugging Face cache entry as from_pretrained leaves it: snapshots/<sha>/..., refs/main naming it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(files, root / "snapshots" / sha, dirs_exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(sha)


def test_an_unset_teacher_revision_follows_main_and_the_build_loads_the_sha_it_resolved(
        tmp_path, data, small_teacher_dir, teacher_dir, monkeypatch):
    """teacher.revision unset means "main", which moves: the key once stayed, and the cache claimed a teacher it
    was not made by."""
    d, _ = data
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    fake_hub_snapshot(cache, "kdtest/tiny", "a" * 40, small_teacher_dir)
    hub = settings("kdtest/tiny", d / "*.parquet", str(tmp_path / "out"))
    before = validate("demo", hub)
    assert before.config.teacher.revision == "a" * 40 and before.source.teacher.revision is None
    fake_hub_snapshot(cache, "kdtest/tiny", "b" * 40, small_teacher_dir)  # main moved upstream, then downloaded
    after = validate("demo", hub)
    assert after.config.teacher.revision == "b" * 40 and after.key != before.key


def test_a_local_teacher_whose_files_change_makes_a_new_version(tmp_path, data, small_teacher_dir):
    d, _ = data
    teacher = tmp_path / "teacher"
    shutil.copytree(small_teacher_dir, teacher)
    before = validate("demo", settings(teacher, d / "*.parquet", str(tmp_path / "out")))
    config = teacher / "config.json"
    config.write_text(config.read_text().replace("{", '{"kd_test_edit": 1, ', 1))  # an edited config
    after = validate("demo", settings(teacher, d / "*.parquet", str(tmp_path / "out")))
    assert after.key != before.key


def build_ids(uri, manifest):
    """The build_id attribute of the index and of every part file of a published version."""
    store = Store(uri)
    ids = []
    for name in [manifest.index.name, *(p.name for p in manifest.parts)]:
        with h5py.File(io.local_path(store.version_file(manifest.key, name))) as f:
            ids.append(f.attrs["build_id"])
    return ids


def test_a_killed_build_whose_source_changed_starts_over_never_mixing(tmp_path, data, small_teacher_dir):
    """Killed mid-build, source changed, re-run: the resume once kept the old parts and published one version
    mixing both states."""
    d, texts = data
    uri = str(tmp_path / "out")
    old = validate("demo", settings(small_teacher_dir, d / "*.parquet", uri))
    run_shard(old, plan(old).shards[0])  # shard 0 complete, shard 1 never ran: killed
    old_id = Store(uri).build_id(old.key)
    write(d / "a.parquet", texts[100:130])
    new = validate("demo", settings(small_teacher_dir, d / "*.parquet", uri))
    assert new.key != old.key
    manifest = run_build(new)
    assert manifest.build_id != old_id and set(build_ids(uri, manifest)) == {manifest.build_id}
    with h5py.File(io.local_path(Store(uri).index(new.key))) as f:
        assert f.attrs["source_digest"] == new.source.digest()
    tokenizer = load_tokenizer(new.config.teacher)
    assert first_tokens(uri, manifest) == tokenizer(texts[100], truncation=True, max_length=24)["input_ids"]


def test_a_source_changing_while_a_shard_runs_stops_it_before_its_next_record(tmp_path, data, small_teacher_dir,
                                                                             monkeypatch):
    d, texts = data
    uri = str(tmp_path / "out")
    b = validate("demo", settings(small_teacher_dir, d / "*.parquet", uri, run={"num_shards": 1}))
    shard = plan(b).shards[0]
    real_write = Store.write_record

    def rewrite_after_the_first_part(self, uri_, record):
        real_write(self, uri_, record)
        if uri_.endswith("part-00000.json"):
            write(d / "a.parquet", texts[100:130])

    monkeypatch.setattr(Store, "write_record", rewrite_after_the_first_part)
    with pytest.raises(source.SourceChanged, match=r"a.parquet changed while this build was running"):
        run_shard(b, shard)
    monkeypatch.setattr(Store, "write_record", real_write)
    assert b.store.read_part(b.key, shard, 0) is not None and b.store.read_part(b.key, shard, 1) is None
    with pytest.raises(source.SourceChanged):  # a resume of the old build refuses before any teacher work
        run_shard(b, shard)


def test_every_file_of_a_version_carries_its_build_id_and_a_resume_keeps_it(tmp_path, data, small_teacher_dir,
                                                                           monkeypatch):
    d, _ = data
    uri = str(tmp_path / "out")
    b = validate("demo", settings(small_teacher_dir, d / "*.parquet", uri))
    shard0, shard1 = plan(b).shards
    run_shard(b, shard0)
    minted = b.store.build_id(b.key)
    assert b.store.read_part(b.key, shard0, 0).build_id == minted
    manifest = run_build(b)  # resumes: shard 0 skipped, shard 1 run
    assert manifest.build_id == minted and set(build_ids(uri, manifest)) == {minted}
    rebuilt = run_build(validate("demo", settings(small_teacher_dir, d / "*.parquet", str(tmp_path / "other"))))
    assert rebuilt.build_id != minted  # another build of the same key elsewhere: another id
