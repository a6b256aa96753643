"""The five steps end to end: a real run over a real corpus, checked against the teacher recomputed in float32."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from s3helpers import assert_same_arrays, build, read_arrays
from s3helpers import overrides as small_run

import kd_core
from kd_core import io
from kd_core import teacher as teacher_module
from kd_core.build import validate, version_key
from kd_core.h5cache import CacheReader
from kd_core.config import TeacherConfig, load_config
from kd_core.errors import CacheFileError
from kd_core.estimate import estimate
from kd_core.merge import published
from kd_core.shard import plan, run_shard
from kd_core.store import resolve
from kd_core.teacher import load_teacher


def overrides(teacher_dir, corpus_path, out, **extra):
    base = {
        "teacher": {"model": str(teacher_dir), "batch_tokens": 2048},
        "dataset": {"name": "parquet", "data_files": str(corpus_path), "streaming": True, "max_samples": 40},
        "cache": {"top_k": 8, "max_length": 64},
        "output": {"uri": str(out)},
        "run": {"num_shards": 3},
    }
    for section, values in extra.items():
        base[section].update(values)
    return base


def run_steps(profile, over):
    """validate, then the pipeline as the flow runs it locally; with the storage estimate for comparisons."""
    config = validate(profile, over)
    return config, estimate(config), build(config)


def reference(model, input_ids, k):
    """The teacher alone in float32 on one sample: full log-probs (L, V), top-k ids and log-probs (L, k), lse (L,)"""
    with torch.no_grad():
        logits = model(torch.as_tensor(input_ids)[None]).logits[0].float()  # (L, V)
    logprobs = logits.log_softmax(-1)
    top = logprobs.topk(k, dim=-1)
    return logprobs.numpy(), top.indices.numpy(), top.values.numpy(), logits.logsumexp(-1).numpy()


def test_cache_matches_the_teacher_in_float32(teacher_dir, corpus_path, corpus_texts, tmp_path):
    """vocab 70000 > tokenizer: uint32 ids; three shards merged back in sample order; empty rows skipped."""
    config, est, manifest = run_steps("testing", overrides(teacher_dir, corpus_path, tmp_path))
    teacher = load_teacher(TeacherConfig(model=str(teacher_dir), dtype="float32", device="cpu"))
    with h5py.File(resolve(str(tmp_path)).index_uri) as index:  # stock h5py, through the index
        assert index["topk_indices"].dtype == np.uint32 and index["topk_indices"].is_virtual
        stock = {name: index[name][:] for name in index}
    assert_same_arrays(stock, read_arrays(str(tmp_path)))  # the same arrays as the parts read one by one
    with CacheReader(str(tmp_path)) as reader:
        assert len(reader) == 38 == manifest.num_samples  # 40 rows, rows 3 and 7 hold no text
        assert manifest.skipped_empty == 2
        assert [reader[i]["sample_index"] for i in range(len(reader))] == [i for i in range(40) if i not in (3, 7)]
        saw_big_id = False
        for i in range(len(reader)):
            row = reader[i]
            text = corpus_texts[row["sample_index"]]
            want_ids = teacher.tokenizer(text, truncation=True, max_length=64)["input_ids"]
            np.testing.assert_array_equal(row["input_ids"], want_ids)
            full, ids, logprobs, lse = reference(teacher.model, want_ids, 8)
            np.testing.assert_allclose(row["logsumexp"], lse, atol=1e-2)
            np.testing.assert_allclose(row["topk_logprobs"], logprobs, rtol=2e-3, atol=1e-3)
            # Top-k sets equal, ties aside: an id that differs must tie (in float32) with the k-th log-prob.
            for t, (got, want) in enumerate(zip(row["topk_indices"], ids)):
                for extra in set(got) - set(want):
                    assert abs(full[t, extra] - logprobs[t, -1]) < 1e-4
            saw_big_id |= bool((row["topk_indices"] > 65535).any())
        assert saw_big_id
        attrs = reader.attrs
    assert attrs["teacher_model"] == str(teacher_dir) and attrs["vocab_size"] == 70000
    assert attrs["top_k"] == 8 and attrs["max_length"] == 64 and attrs["max_samples"] == 40
    assert json.loads(attrs["config"])["dataset"]["data_files"] == str(corpus_path)


def test_estimate_is_within_25_percent_of_the_real_file(small_teacher_dir, teacher_dir, corpus_path, tmp_path):
    for name, teacher in (("small", small_teacher_dir), ("big-vocab", teacher_dir)):
        over = overrides(teacher, corpus_path, tmp_path / name, dataset={"max_samples": 120},
                         cache={"top_k": 16, "max_length": 128})
        _, est, manifest = run_steps("testing", over)
        assert est.upper_bound_bytes >= manifest.file_bytes
        assert abs(est.expected_bytes - manifest.file_bytes) <= 0.25 * manifest.file_bytes, (name, est, manifest)
        assert abs(est.expected_tokens - manifest.num_tokens) <= 0.1 * manifest.num_tokens


def test_the_seed_figure_is_fixed():
    from kd_core.storage import upper_bound_bytes

    # 1M samples x 2048 tokens x top-64 at 6 bytes per entry (uint32 id + fp16) is ~786 GB, not 768 MB.
    entries = 1_000_000 * 2048 * 64 * 6
    assert entries == 786_432_000_000
    bound = upper_bound_bytes(num_samples=1_000_000, max_length=2048, top_k=64, vocab_size=151_936)
    assert entries < bound < entries * 1.03  # plus input ids, logsumexp, offsets


def test_rerun_with_the_same_inputs_is_up_to_date(small_teacher_dir, corpus_path, tmp_path):
    over = overrides(small_teacher_dir, corpus_path, tmp_path, run={"num_shards": 1})
    config, _, manifest = run_steps("testing", over)
    assert published(config) == manifest
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_budget_exceeded_fails_in_estimate(small_teacher_dir, corpus_path, tmp_path):
    from kd_core.errors import StorageError

    config = validate("testing", overrides(small_teacher_dir, corpus_path, tmp_path, output={"max_bytes": 1000}))
    with pytest.raises(StorageError, match=r"output\.max_bytes: the cache is expected to take .* over the limit of 1\.0 KB"):
        estimate(config)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_kd_cache_run_demo_profile(tmp_path):
    """The README's main commands, on the demo profile, from a fresh working directory: run, verify (against the
    teacher in float32), inspect, export. Nothing is left behind but ./out (the cache and the export) and no
    scratch in the staging root."""
    work, staging = tmp_path / "work", tmp_path / "staging"
    work.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "KD_CACHE_STAGING": str(staging)}
    out = work / "out" / "demo"  # the demo profile's output.uri, ./out/demo
    cli = [sys.executable, "-m", "flows.cli"]

    def kd_cache(*args, timeout=300):
        return subprocess.run([*cli, *args], env=env, cwd=work, capture_output=True, text=True, timeout=timeout)

    done = kd_cache("run", "--profile", "demo", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote" in done.stdout and "200 samples" in done.stdout
    verify = kd_cache("verify", "./out/demo", "--samples", "6")
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr[-2000:]
    with h5py.File(resolve(str(out)).index_uri) as f:
        assert f.attrs["num_samples"] == 200 and f["topk_logprobs"].shape[1] == 16
    inspect = kd_cache("inspect", "./out/demo")
    assert inspect.returncode == 0 and "samples     200" in inspect.stdout
    assert kd_cache("export", "./out/demo", "./out/demo.h5").returncode == 0
    assert [p.name for p in work.iterdir()] == ["out"] and sorted(p.name for p in (work / "out").iterdir()) == [
        "demo", "demo.h5"]
    assert not staging.exists() or list(staging.iterdir()) == []


def test_guard_refuses_before_anything_is_touched(tmp_path, monkeypatch):
    """The max_samples guard fires before the teacher's config, the dataset or the output are touched."""
    import kd_core.teacher

    monkeypatch.setattr(kd_core.teacher, "teacher_vocab_size", lambda cfg: pytest.fail("teacher touched"))
    monkeypatch.setattr("kd_core.data.load_source", lambda cfg: pytest.fail("dataset touched"))
    from kd_core.errors import ConfigError

    with pytest.raises(ConfigError, match="dataset.max_samples is required"):
        validate("testing", {"dataset": {"max_samples": None}, "output": {"uri": str(tmp_path / "o")}})
    assert not (tmp_path / "o").exists()
    cli = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "testing", "dataset.max_samples=null",
                          f"output.uri={tmp_path / 'o'}"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2
    assert cli.stderr.startswith("kd-cache run: dataset.max_samples is required") and "Traceback" not in cli.stderr
    assert not (tmp_path / "o").exists()


def test_four_shards_under_a_small_object_limit_read_by_stock_h5py_match_the_teacher(small_teacher_dir, corpus_path,
                                                                                       tmp_path):
    """The index (cache.h5) is the whole version to stock h5py; its parts stay under output.max_object_bytes."""
    from kd_core.verify import verify_rows

    limit = 1 << 16
    over = overrides(small_teacher_dir, corpus_path, tmp_path, dataset={"max_samples": 60},
                     run={"num_shards": 4, "part_samples": 15}, output={"max_object_bytes": limit})
    config, _, manifest = run_steps("testing", over)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in files) <= limit
    assert len(manifest.parts) > 4  # at least one 15-sample part was split
    index = tmp_path / "versions" / config.key / "cache.h5"
    assert manifest.index.bytes < 0.1 * manifest.file_bytes
    with h5py.File(index) as f:  # stock h5py: virtual datasets over the parts, offsets stored
        offsets, ids = f["offsets"][:], f["input_ids"][:]
        rows = [{name: f[name][offsets[s]:offsets[s + 1]] for name in ("input_ids", "topk_indices", "topk_logprobs",
                                                                          "logsumexp")} for s in range(len(offsets) - 1)]
        assert len(rows) == manifest.num_samples == 58 and len(ids) == manifest.num_tokens
    teacher = load_teacher(TeacherConfig(model=str(small_teacher_dir), dtype="float32", device="cpu"))
    report = verify_rows(teacher, rows, top_k=8)
    assert report.ok and report.samples == 58, report


def test_version_key_covers_resolved_dtype_format_and_producer(small_teacher_dir, corpus_path, tmp_path, monkeypatch):
    """An fp32 cache then the same run with teacher.dtype=bfloat16 once said "up to date" (dtype not in the key)."""
    uri = str(tmp_path / "out")
    small = {"dataset": {"max_samples": 20}, "run": {"num_shards": 1}}
    fp32 = validate("demo", small_run(small_teacher_dir, corpus_path, uri, **small))
    assert fp32.config.teacher.dtype == "float32"  # auto resolved on this CPU machine, and recorded so
    build(fp32)
    bf16 = validate("demo", small_run(small_teacher_dir, corpus_path, uri, teacher={"dtype": "bfloat16"},
                                               **small))
    assert bf16.key != fp32.key and published(bf16) is None
    explicit = validate("demo", small_run(small_teacher_dir, corpus_path, uri, teacher={"dtype": "float32"},
                                                   **small))
    assert explicit.key == fp32.key and published(explicit) is not None
    monkeypatch.setattr("kd_core.teacher.torch.cuda.is_available", lambda: True)  # the same profile on a GPU worker
    gpu_worker = load_config("demo", small_run(small_teacher_dir, corpus_path, uri, teacher={"device": "auto"}, **small))
    assert version_key(gpu_worker, bf16.source.digest()) == bf16.key
    monkeypatch.undo()
    key = version_key(fp32.config, fp32.source.digest())
    with monkeypatch.context() as m:
        m.setattr(kd_core, "__version__", "99.0")  # another producer may write other bytes
        assert version_key(fp32.config, fp32.source.digest()) != key
    with monkeypatch.context() as m:
        m.setattr("kd_core.build.FORMAT_VERSION", 2)
        assert version_key(fp32.config, fp32.source.digest()) != key
    assert version_key(fp32.config, fp32.source.digest()) == key and fp32.key == key
    assert version_key(fp32.config, "another source") != key  # the source is part of the version


def test_resume_refuses_parts_made_in_another_dtype(small_teacher_dir, corpus_path, tmp_path, monkeypatch):
    """Killed in fp32 and resumed in bf16 once published one file whose parts differed by up to 0.05 nats."""
    over = small_run(small_teacher_dir, corpus_path, str(tmp_path / "out"), dataset={"max_samples": 20},
                     run={"num_shards": 1})
    config = validate("demo", over)
    shard = plan(config).shards[0]
    real_publish = io.publish_file

    def killed_after_part_0(local, uri, opts=None):
        if "part-00001" in uri:
            raise KeyboardInterrupt  # the worker dies before the second part is published
        return real_publish(local, uri, opts)

    monkeypatch.setattr(io, "publish_file", killed_after_part_0)
    with pytest.raises(KeyboardInterrupt):
        run_shard(config, shard)
    monkeypatch.setattr(io, "publish_file", real_publish)
    real_load = teacher_module.load_teacher
    monkeypatch.setattr(teacher_module, "load_teacher",  # this worker resolves another dtype for the same key
                        lambda cfg: real_load(cfg.model_copy(update={"dtype": "bfloat16"})))
    with pytest.raises(CacheFileError, match=r"made in float32 but this worker loads the teacher in bfloat16"):
        run_shard(config, shard)


def test_inspect_names_the_parts_and_the_index_and_export_writes_one_file(small_teacher_dir, corpus_path, tmp_path,
                                                                          capsys):
    from flows.cli import main

    config, _, manifest = run_steps("testing", overrides(small_teacher_dir, corpus_path, tmp_path / "out",
                                                         run={"num_shards": 2}))
    version = tmp_path / "out" / "versions" / config.key
    for uri in (tmp_path / "out", version, version / "cache.h5"):  # every URI form names the same cache
        assert main(["inspect", str(uri)]) == 0
        out = capsys.readouterr().out
        assert "samples     38" in out and f"parts       {len(manifest.parts)} files" in out
        assert "index       cache.h5" in out and manifest.parts[-1].name in out
    assert main(["export", str(tmp_path / "out"), str(tmp_path / "one.h5")]) == 0
    assert "MB/s" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "one.h5")]) == 0
    assert "one self-contained file" in capsys.readouterr().out
    assert_same_arrays(read_arrays(str(tmp_path / "one.h5")), read_arrays(str(tmp_path / "out")))
