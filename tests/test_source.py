"""kd_core.source: what a build reads, resolved without reading data, changes exactly when the source does."""

import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import constants
from s3helpers import bucket, moto_endpoint  # noqa: F401

from kd_core import source
from kd_core.config import DatasetConfig, TeacherConfig
from kd_core.errors import ConfigError


def write(path, texts):
    pq.write_table(pa.table({"text": texts}), path)


def dataset(glob):
    return DatasetConfig(name="parquet", data_files=str(glob), split="train")


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write(d / "a.parquet", [f"doc {i}" for i in range(30)])
    write(d / "b.parquet", [f"more {i}" for i in range(10)])
    return d


def test_an_untouched_source_resolves_to_the_same_digest(files):
    cfg = dataset(files / "*.parquet")
    first = source.resolve_dataset(cfg)
    assert first.builder == "parquet" and [os.path.basename(p) for p in first.paths] == ["a.parquet", "b.parquet"]
    assert all(f.bytes == os.path.getsize(f.path) and "footer=" in f.fingerprint for f in first.files)
    assert source.resolve_dataset(cfg) == first


@pytest.mark.parametrize("change", ["rewritten with other documents", "rows appended", "a file added to the glob"])
def test_each_change_of_the_files_changes_the_resolution(change, files):
    cfg = dataset(files / "*.parquet")
    before = source.resolve_dataset(cfg)
    a = files / "a.parquet"
    if change == "rewritten with other documents":
        write(a, [f"DOC {i}" for i in range(30)])
    elif change == "rows appended":
        write(a, [f"doc {i}" for i in range(40)])
    else:
        write(files / "c.parquet", ["new"])
    after = source.resolve_dataset(cfg)
    assert after != before
    if change == "a file added to the glob":
        assert after.files[:2] == before.files and len(after.files) == 3
        return
    with pytest.raises(source.SourceChanged, match="a.parquet changed while this build was running"):
        source.check_unchanged([before.files[0]], "shard-00000-of-00001")


def test_check_unchanged_passes_an_untouched_file_and_names_a_deleted_one(files):
    resolved = source.resolve_dataset(dataset(files / "*.parquet"))
    source.check_unchanged(resolved.files, "shard")
    (files / "b.parquet").unlink()
    with pytest.raises(source.SourceChanged, match="b.parquet changed .*it is gone"):
        source.check_unchanged(resolved.files, "shard")


def test_a_local_teacher_directory_is_fingerprinted_by_its_contents(tmp_path, small_teacher_dir):
    """Copies agree (a deployed shard on another host checks its own copy); changed weights do not."""
    from safetensors.torch import load_file, save_file

    teacher, copy = tmp_path / "teacher", tmp_path / "copy"
    shutil.copytree(small_teacher_dir, teacher)
    shutil.copytree(small_teacher_dir, copy)
    os.utime(copy / "config.json", ns=(1, 1))  # another host's copy: other mtimes, same bytes
    before = source.resolve_teacher(TeacherConfig(model=str(teacher)))
    assert before.sha is None and before.fingerprint == source.resolve_teacher(TeacherConfig(model=str(copy))).fingerprint
    source.check_teacher_unchanged(before)
    weights = next(p for p in teacher.iterdir() if p.suffix == ".safetensors")
    tensors = load_file(weights)
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1  # one weight of one middle tensor, same file size
    save_file(tensors, weights, metadata={"format": "pt"})
    assert source.resolve_teacher(TeacherConfig(model=str(teacher))).fingerprint != before.fingerprint
    with pytest.raises(source.SourceChanged, match="teacher.model: the files of .* changed"):
        source.check_teacher_unchanged(before)


def test_a_large_file_is_sampled_across_its_length(tmp_path, monkeypatch):
    """Weights files are not read whole: a change anywhere longer than the stride still shows."""
    monkeypatch.setattr(source, "WHOLE_FILE_BYTES", 1 << 16)
    big = tmp_path / "model.safetensors"
    data = bytearray(os.urandom(8 << 20))
    big.write_bytes(data)
    first = source._file_digest(str(big))
    data[(4 << 20):(4 << 20) + (256 << 10)] = os.urandom(256 << 10)  # a 256 KiB tensor in the middle changed
    big.write_bytes(data)
    assert source._file_digest(str(big)) != first


def fake_hub_snapshot(cache, repo, sha, files, ref="main"):
    """A Hugging Face cache entry as `from_pretrained` leaves it: snapshots/<sha>/..., refs/<ref> naming it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / sha
    shutil.copytree(files, snap, dirs_exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(sha)


def test_an_unset_hub_revision_resolves_to_the_commit_main_names_now_offline(tmp_path, small_teacher_dir, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert constants.is_offline_mode()  # conftest: the cache is what a from_pretrained would load
    old, new = "a" * 40, "b" * 40
    fake_hub_snapshot(cache, "kdtest/tiny", old, small_teacher_dir)
    cfg = TeacherConfig(model="kdtest/tiny")
    assert source.resolve_teacher(cfg).sha == old
    fake_hub_snapshot(cache, "kdtest/tiny", new, small_teacher_dir)  # main moved upstream, then was downloaded
    assert source.resolve_teacher(cfg).sha == new
    assert source.resolve_teacher(TeacherConfig(model="kdtest/tiny", revision=old)).sha == old  # a sha is itself
    with pytest.raises(ConfigError, match="teacher.revision: cannot resolve 'kdtest/other'"):
        source.resolve_teacher(TeacherConfig(model="kdtest/other"))


def test_the_digest_covers_what_was_resolved_not_the_revision_asked_for(files):
    ds = source.resolve_dataset(dataset(files / "*.parquet"))
    teacher = source.ResolvedTeacher(model="org/m", revision=None, sha="a" * 40, fingerprint=None)
    same = source.ResolvedSource(teacher=teacher.model_copy(update={"revision": "a" * 40}), dataset=ds)
    moved = source.ResolvedSource(teacher=teacher.model_copy(update={"sha": "b" * 40}), dataset=ds)
    assert source.ResolvedSource(teacher=teacher, dataset=ds).digest() == same.digest() != moved.digest()


def test_an_object_is_fingerprinted_by_its_etag_from_one_listing(bucket, moto_endpoint, tmp_path, monkeypatch):
    """On S3 the fingerprint is what the store says about the content (ETag), from one listing: no data read."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)  # data_files take their options from the environment
    s3fs.S3FileSystem.clear_instance_cache()
    local = tmp_path / "a.parquet"
    write(local, [f"doc {i}" for i in range(30)])
    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint)
    fs.put_file(str(local), f"{bucket}/data/a.parquet")
    fs.put_file(str(local), f"{bucket}/data/b.parquet")
    paths = [f"s3://{bucket}/data/a.parquet", f"s3://{bucket}/data/b.parquet"]
    before = source.fingerprint_files(paths)
    assert [f.bytes for f in before] == [local.stat().st_size] * 2
    assert all(f.fingerprint.startswith("etag=") and "footer" not in f.fingerprint for f in before)
    write(local, [f"DOC {i}" for i in range(30)])  # rewritten in place with other documents
    fs.put_file(str(local), f"{bucket}/data/a.parquet")
    after = source.fingerprint_files(paths)
    assert after[0] != before[0] and after[1] == before[1]
    with pytest.raises(source.SourceChanged, match="a.parquet changed while this build was running"):
        source.check_unchanged(before, "shard-00000-of-00001")
    s3fs.S3FileSystem.clear_instance_cache()
