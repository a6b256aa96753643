"""teacher.device_map: the rows do not depend on where the model sits.

Accelerate returns only the root module's output on the input device, so the body's hidden states come back on
its last layer's device while the batch's rows sit on the first; an offloaded module keeps its weights on "meta".
Float32 on CPU, so "the same rows" is tight: top-k ids identical, log-probs within one float16 rounding step,
logsumexp within 1e-5. A real 2-device split (GPU and CPU, both ways) is in tests/test_gpu.py.
"""

import dataclasses

import accelerate
import numpy as np
import pytest
import torch

from kd_core.config import TeacherConfig
from kd_core.inference import has_plain_head, run_teacher
from kd_core.teacher import Teacher, execution_device, load_teacher

TOP_K = 16
MAX_LENGTH = 96


@pytest.fixture(scope="module")
def teacher(small_teacher_dir) -> Teacher:
    return load_teacher(TeacherConfig(model=str(small_teacher_dir), device="cpu"))


@pytest.fixture(scope="module")
def texts(corpus_texts):
    """20 real docstrings: every tenth whole (cut at MAX_LENGTH tokens), the others cut to spread lengths."""
    texts = [t for t in corpus_texts if t.strip()][:20]
    return [t if i % 10 == 0 else t[: 5 + (i * 53) % 250] for i, t in enumerate(texts)]


def run(teacher, texts):
    return list(run_teacher(teacher, list(enumerate(texts)), top_k=TOP_K, max_length=MAX_LENGTH,
                            batch_tokens=4 * MAX_LENGTH))


def same_rows(a, b):
    """a and b hold the same values: ids identical, log-probs within one float16 step, lse within 1e-5."""
    for x, y in zip(a, b, strict=True):
        assert x.sample_index == y.sample_index
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.topk_indices, y.topk_indices)
        # a float16 step is at most 2**-10 of the value
        np.testing.assert_allclose(np.float32(x.topk_logprobs), np.float32(y.topk_logprobs), rtol=2**-10, atol=0)
        np.testing.assert_allclose(x.logsumexp, y.logsumexp, rtol=0, atol=1e-5)


def test_device_map_auto_loads_and_runs_on_cpu(small_teacher_dir, teacher, texts):
    spread = load_teacher(TeacherConfig(model=str(small_teacher_dir), device="cpu", device_map="auto"))
    assert spread.device == torch.device("cpu")
    assert {p.device.type for p in spread.model.parameters()} == {"cpu"}
    same_rows(run(spread, texts), run(teacher, texts))


def test_offloaded_embedding_and_head_run_where_accelerate_executes_them(small_teacher_dir, teacher, texts, tmp_path):
    """device_map with modules offloaded to disk: their weights sit on "meta" and a hook loads them where they
    run. Inputs go to the embedding's execution device; the head cannot be read, so the model's own runs."""
    model = load_teacher(TeacherConfig(model=str(small_teacher_dir), device="cpu")).model
    device_map = {"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "disk"}
    model = accelerate.dispatch_model(model, device_map, main_device="cpu", offload_dir=str(tmp_path))
    assert model.get_input_embeddings().weight.device.type == "meta"  # really offloaded
    assert model.get_output_embeddings().weight.device.type == "meta"
    device = execution_device(model.get_input_embeddings())
    assert device == torch.device("cpu") and not has_plain_head(model)
    same_rows(run(dataclasses.replace(teacher, model=model, device=device), texts), run(teacher, texts))
