"""examples/: the student-training example runs on a real cache and its loss falls."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from s3helpers import build

from kd_core.build import validate

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_student.py"
HF_EXAMPLE = EXAMPLE.with_name("train_hf.py")


def build_cache(tmp_path_factory, teacher_dir, corpus_path, cache: dict) -> str:
    """A cache of 24 docstrings by the small teacher, built through the pipeline's steps; its output.uri."""
    out = tmp_path_factory.mktemp("example_cache")
    over = {
        "teacher": {"model": str(teacher_dir), "batch_tokens": 2048},
        "dataset": {"name": "parquet", "data_files": str(corpus_path), "streaming": True, "max_samples": 24},
        "cache": {"max_length": 64, **cache},
        "output": {"uri": str(out)},
    }
    build(validate("testing", over))
    return str(out)


@pytest.fixture(scope="module")
def topk_cache(small_teacher_dir, corpus_path, tmp_path_factory) -> str:
    return build_cache(tmp_path_factory, small_teacher_dir, corpus_path, {"top_k": 8})


@pytest.fixture(scope="module")
def sampled_cache(small_teacher_dir, corpus_path, tmp_path_factory) -> str:
    return build_cache(tmp_path_factory, small_teacher_dir, corpus_path, {"mode": "sampled", "samples": 16})


def run_example(*args: str, example: Path = EXAMPLE) -> list[float]:
    """Run the example as a user does; return the loss it printed at every step."""
    logging = ["--log-every", "1"] if example == EXAMPLE else []
    run = subprocess.run(
        [sys.executable, str(example), *args, *logging, "--threads", "1"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return [float(x) for x in re.findall(r"loss (\S+)", run.stdout)]


@pytest.mark.parametrize("extra", [[], ["--ce-weight", "0.5", "--tail", "renormalize"]])
def test_example_trains_a_student_from_a_topk_cache(topk_cache, tmp_path, extra):
    losses = run_example(topk_cache, "--steps", "12", "--batch-size", "4", "--out", str(tmp_path / "student"), *extra)
    assert len(losses) == 12
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns from the cache
    assert (tmp_path / "student" / "config.json").exists()


def test_example_trains_a_student_from_a_sampled_cache(sampled_cache):
    losses = run_example(sampled_cache, "--steps", "12", "--batch-size", "4")
    assert len(losses) == 12
    assert sum(losses[-3:]) < sum(losses[:3])


@pytest.mark.parametrize("extra", [[], ["--pad-vocab-to", "64", "--max-tokens", "256"]])
def test_hf_trainer_recipe_trains_a_student_from_a_topk_cache(topk_cache, tmp_path, extra):
    """Trainer + KDCollator + KDTrainer.compute_loss; a student vocabulary padded past the teacher's; token batches."""
    losses = run_example(topk_cache, "--steps", "12", "--batch-size", "4", "--out", str(tmp_path / "student"), *extra,
                         example=HF_EXAMPLE)
    assert len(losses) == 12
    assert sum(losses[-3:]) < sum(losses[:3])
    assert (tmp_path / "student" / "config.json").exists()


def test_hf_trainer_recipe_trains_a_student_from_a_sampled_cache(sampled_cache):
    losses = run_example(sampled_cache, "--steps", "12", "--batch-size", "4", example=HF_EXAMPLE)
    assert len(losses) == 12
    assert sum(losses[-3:]) < sum(losses[:3])
