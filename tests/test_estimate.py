"""`kd-cache estimate`: always the numbers (size, teacher FLOPs, GPU hours), even for a cache that does not fit,
with no output target needed; `validate` and `run` refuse that same cache."""

import json
from pathlib import Path

import pytest

from flows import cli
from kd_core import storage
from kd_core.config import TeacherConfig, override_strings
from kd_core.teacher import load_teacher, teacher_num_parameters


def _args(small_teacher_dir, corpus_path, uri, **extra) -> list[str]:
    return override_strings({
        "teacher": {"model": str(small_teacher_dir), "batch_tokens": 2048},
        "dataset": {"name": "parquet", "data_files": str(corpus_path), "streaming": True, "max_samples": 300},
        "cache": {"top_k": 8, "max_length": 64},
        "output": {"uri": uri, **extra},
        "run": {"num_shards": 4},
    })


def test_estimate_prints_its_numbers_for_a_cache_that_does_not_fit_and_validate_refuses(
        small_teacher_dir, corpus_path, tmp_path, capsys):
    over = _args(small_teacher_dir, corpus_path, str(tmp_path / "out"), max_bytes=10_000)
    assert cli.main(["estimate", "--profile", "testing", "--json", *over]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["fits"] is False and est["reason"].startswith("output.max_bytes: the cache is expected to take")
    assert est["expected_bytes"] > 10_000 and est["expected_tokens"] > 0 and est["upper_bound_bytes"] > 0
    params = teacher_num_parameters(TeacherConfig(model=str(small_teacher_dir)))
    assert est["teacher_parameters"] == params
    assert est["teacher_flops"] == pytest.approx(2 * params * est["expected_tokens"])
    h100 = est["teacher_flops"] / (989e12 * storage.MEASURED_MFU) / 3600
    assert est["gpu_hours"]["H100"] == pytest.approx(h100) and set(est["gpu_hours"]) >= {"H100", "A100", "L4"}
    assert est["gpu_hours"]["L4"] > est["gpu_hours"]["A100"] > est["gpu_hours"]["H100"]
    assert est["wall_hours"]["H100"] == pytest.approx(h100 / 4)
    assert "MFU" in est["gpu_hours_assumption"]

    assert cli.main(["validate", "--profile", "testing", *over]) == 2
    assert "kd-cache validate: output.max_bytes: the cache is expected to take" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_estimate_needs_no_output_target(small_teacher_dir, corpus_path, capsys):
    """A placeholder bucket (none reachable here) does not stop the estimate; validate checks the target."""
    over = _args(small_teacher_dir, corpus_path, "s3://placeholder-bucket-kd-cache/run1")
    assert cli.main(["estimate", "--profile", "testing", *over]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "yes" in out and "GPU hours" in out and "free space at the target" in out


def test_parameter_count_from_the_config_matches_the_loaded_model(small_teacher_dir):
    config = TeacherConfig(model=str(small_teacher_dir))
    model = load_teacher(config).model
    assert teacher_num_parameters(config) == sum(p.numel() for p in model.parameters())


def test_projection_stops_a_cache_the_estimate_underrated_after_one_part_and_the_run_resumes(
        small_teacher_dir, corpus_path, tmp_path, caplog):
    """The estimate's compression model can be low for an unseen teacher: the first real part is checked."""
    from s3helpers import overrides

    from kd_core.build import validate
    from kd_core.errors import StorageError
    from kd_core.shard import plan, run_shard

    uri = str(tmp_path / "out")
    limited = validate("demo", overrides(small_teacher_dir, corpus_path, uri, output={"max_bytes": 20_000}))
    shard = plan(limited).shards[0]
    with pytest.raises(StorageError, match=r"output\.max_bytes: stopped at shard-00000-of-00002's first part: its "
                                           r"real size .* projects the cache at .*, over the limit of 20\.0 KB"):
        run_shard(limited, shard)
    # The part is not complete: a resumed run redoes it.
    assert not Path(limited.store.part_record(limited.key, shard, 0)).exists()

    # The limit raised: the same cache (output settings are not part of its key) runs, and records its projection.
    caplog.set_level("INFO", logger="kd_core")
    config = validate("demo", overrides(small_teacher_dir, corpus_path, uri))
    assert config.key == limited.key
    record = run_shard(config, shard)
    projected = record.parts[0].projected_cache_bytes
    assert [p.projected_cache_bytes for p in record.parts[1:]] == [None, None]
    shard_bytes = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*.h5"))  # half of the 60 samples
    assert projected == pytest.approx(2 * shard_bytes, rel=0.5)
    assert "cache projected at" in caplog.text


def test_free_space_is_checked_against_the_cache_once():
    """Parts go straight to their final keys and the merge copies no token data: 1x the expected size fits."""
    est = storage.estimate(num_samples=1000, max_length=512, top_k=8, vocab_size=4096, probe_lengths=[300])
    roomy = storage.estimate(num_samples=1000, max_length=512, top_k=8, vocab_size=4096, probe_lengths=[300],
                             free_bytes=est.expected_bytes * 3 // 2)
    assert storage.does_not_fit(roomy) is None
    tight = storage.estimate(num_samples=1000, max_length=512, top_k=8, vocab_size=4096, probe_lengths=[300],
                             free_bytes=est.expected_bytes - 1)
    assert storage.does_not_fit(tight).startswith("output.uri: the target has ")


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_the_upper_bound_holds_from_one_sample_up(mode, small_teacher_dir, corpus_path, tmp_path):
    """Every byte the run leaves at the target (parts, index, manifest, latest.json) against the printed bound, at
    sizes where the fixed overheads dominate (one sample: 70.9 KB against a bound of 51.2 KB before they counted)
    and with many small part files; max_length 16 so that nearly every sample reaches it, as the bound assumes."""
    from kd_core.build import validate
    from kd_core.estimate import estimate
    from s3helpers import build

    for samples, shards in ((1, 1), (2, 2), (9, 2), (40, 3)):
        out = tmp_path / f"{mode}-{samples}"
        config = validate("testing", {
            "teacher": {"model": str(small_teacher_dir), "batch_tokens": 2048},
            "dataset": {"name": "parquet", "data_files": str(corpus_path), "streaming": True, "max_samples": samples},
            "cache": {"mode": mode, "top_k": 8, "samples": 16, "max_length": 16},
            "output": {"uri": str(out)}, "run": {"num_shards": shards, "part_samples": 4},
        })
        bound = estimate(config).upper_bound_bytes
        build(config)
        written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        assert written <= bound, (mode, samples, written, bound)


def test_a_topk_estimate_says_what_the_sampled_mode_would_take():
    """kd-cache estimate prints, beside a top-k estimate, the sampled mode's (N = 64) for the same probe: the same
    number a sampled-mode estimate gives."""
    probe = dict(num_samples=1000, max_length=512, top_k=64, vocab_size=32000, probe_lengths=[300, 500, 90])
    topk, sampled = storage.estimate(**probe), storage.estimate(**probe, samples=storage.SAMPLED_DEFAULT_DRAWS)
    assert topk.sampled_expected_bytes == sampled.expected_bytes == sampled.sampled_expected_bytes
    assert sampled.expected_bytes < topk.expected_bytes / 1.5  # with m = 46 assumed: a confident teacher draws fewer
    assert topk.as_dict()["sampled_expected_bytes"] == sampled.expected_bytes
    rows = dict(topk.rows())
    assert storage.human_bytes(sampled.expected_bytes) in rows["sampled mode instead (cache.mode=sampled cache.samples=64)"]
