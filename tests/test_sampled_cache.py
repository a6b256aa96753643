"""A sampled cache through the real pipeline: `kd-cache run ... cache.mode=sampled cache.samples=64`, read back with
CacheDataset, its draws tested against the teacher recomputed in float32, inspect and verify on it.

The chi-square tests use the cache's own (deterministic) draws; a correct sampler fails one with probability at
most ALPHA (see kd_core.sampling.FitReport).
"""

import json

import numpy as np
import pytest
import torch
from prefect.testing.utilities import prefect_test_harness

from flows.cli import main
from kd_core.h5cache import CacheReader
from kd_core.config import TeacherConfig, override_strings
from kd_core.dataset import CacheDataset, pad_collate
from kd_core.sampling import FitAccumulator
from kd_core.teacher import load_teacher

ALPHA = 1e-4
N = 64


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness():
        yield


def overrides(small_teacher_dir, corpus_path, out, shards=2, batch_tokens=2048) -> list[str]:
    return override_strings({
        "teacher": {"model": str(small_teacher_dir), "batch_tokens": batch_tokens},
        "dataset": {"name": "parquet", "data_files": str(corpus_path), "streaming": True, "max_samples": 24},
        "cache": {"mode": "sampled", "samples": N, "max_length": 96},
        "output": {"uri": str(out)},
        "run": {"num_shards": shards, "part_samples": 5},
    })


@pytest.fixture(scope="module")
def built(small_teacher_dir, corpus_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("sampled") / "out"
    assert main(["run", "--profile", "testing", *overrides(small_teacher_dir, corpus_path, out)]) == 0
    return out


def test_sampled_cache_reads_back_and_matches_the_teacher(built, small_teacher_dir):
    ds = CacheDataset(str(built))
    assert len(ds) == 22  # 24 rows, 2 of them blank
    teacher = load_teacher(TeacherConfig(model=str(small_teacher_dir), device="cpu"))  # float32
    fit = FitAccumulator()
    for i in range(len(ds)):
        s = ds[i]
        ids, counts = s["sampled_ids"], s["sampled_counts"]  # (L, m)
        assert ids.shape == counts.shape and ids.shape[0] == len(s["input_ids"])
        assert bool((counts.sum(-1) == N).all())
        with torch.no_grad():
            logits = teacher.model(s["input_ids"][None]).logits[0].float()  # (L, V) the teacher alone, float32
        assert "logsumexp" not in s  # the sampled loss needs none; verify redraws the rows instead
        fit.add(torch.softmax(logits.double(), -1), ids, counts)
    report = fit.report()
    assert report.draws == N * sum(len(ds[i]["input_ids"]) for i in range(len(ds)))
    assert report.p_value > ALPHA, report
    batch = pad_collate([ds[0], ds[1], ds[2]])
    assert bool((batch["sampled_counts"].sum(-1) == N * batch["attention_mask"]).all())


def test_inspect_and_verify_understand_a_sampled_cache(built, capsys):
    assert main(["inspect", str(built), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mode"] == "sampled" and info["samples"] == N and info["top_k"] is None
    assert 1 <= info["distinct_ids_per_row"]["mean"] <= N
    assert main(["verify", str(built), "--samples", "6"]) == 0
    out = capsys.readouterr().out
    assert "draws vs the teacher" in out and out.rstrip().endswith("OK")
    assert "logsumexp" not in out  # a sampled cache has none: the redraw ties its rows to the teacher


def test_draws_do_not_depend_on_shards_parts_or_batches(built, small_teacher_dir, corpus_path, tmp_path):
    """One shard and other batches instead of two shards: the same bytes (what makes a resume byte-identical)."""
    other = tmp_path / "other"
    assert main(["run", "--profile", "testing",
                 *overrides(small_teacher_dir, corpus_path, other, shards=1, batch_tokens=200)]) == 0
    with CacheReader(str(built)) as a, CacheReader(str(other)) as b:
        first, second = a.read_all(), b.read_all()
    for name in ("sample_index", "input_ids", "sampled_offsets", "sampled_id_gaps", "sampled_counts"):
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_storage_estimate_knows_the_mode(small_teacher_dir, corpus_path, tmp_path):
    """Upper bound >= the real file, and the expected size near it (m, the distinct ids per row, depends on the
    teacher: the model assumes the middle of the small teachers measured, see kd_core/storage.py)."""
    from kd_core.build import validate
    from kd_core.estimate import estimate
    from kd_core.merge import merge
    from kd_core.shard import plan, run_shard

    over = [*overrides(small_teacher_dir, corpus_path, tmp_path / "out", shards=1),
            "dataset.max_samples=120", "cache.max_length=128", "run.part_samples=1000"]
    config = validate("testing", over)
    est = estimate(config)
    manifest = merge(config, [run_shard(config, s) for s in plan(config).shards])
    assert est.samples == N and est.top_k is None
    assert est.upper_bound_bytes >= manifest.file_bytes
    print(f"sampled N={N}: expected {est.expected_bytes} B, real {manifest.file_bytes} B "
          f"({manifest.bytes_per_token:.1f} B/token)")
    assert abs(est.expected_bytes - manifest.file_bytes) <= 0.25 * manifest.file_bytes, (est, manifest)
