"""Packed batches and device_map: a sample's rows never depend on how it was batched or where the model sits.

Float32 on CPU, so "the same rows" is tight: top-k ids identical, log-probs within one float16 rounding step,
logsumexp within 1e-5. The GPU counterparts (bf16 speed, float32 packed == alone, a real 2-device split) are in
tests/test_gpu.py and bench/gpu_packing.py.
"""

import dataclasses
from collections import Counter

import accelerate
import numpy as np
import pytest
import torch
import transformers.masking_utils

import kd_core.teacher
from kd_core.config import TeacherConfig
from kd_core.inference import _packed_batches, _padded_batches, has_plain_head, run_teacher
from kd_core.teacher import Teacher, execution_device, load_teacher, packing_works

TOP_K = 16
MAX_LENGTH = 96


@pytest.fixture(scope="module")
def teacher(small_teacher_dir) -> Teacher:
    """The small teacher, packing as load_teacher turns it on when teacher.PACK_SEQUENCES is set."""
    teacher = load_teacher(TeacherConfig(model=str(small_teacher_dir), device="cpu"))
    return dataclasses.replace(teacher, packing=packing_works(teacher.model, teacher.device))


@pytest.fixture(scope="module")
def texts(corpus_texts):
    """60 real docstrings: every tenth whole (cut at MAX_LENGTH tokens), the others cut to spread shorter lengths
    (so that rows hold several)."""
    texts = [t for t in corpus_texts if t.strip()][:60]
    return [t if i % 10 == 0 else t[: 5 + (i * 53) % 250] for i, t in enumerate(texts)]


def run(teacher, texts, first=0, **kw):
    """texts as samples first, first + 1, ..."""
    args = {"top_k": TOP_K, "max_length": MAX_LENGTH, "batch_tokens": 4 * MAX_LENGTH} | kw
    return list(run_teacher(teacher, list(enumerate(texts, first)), **args))


def same_rows(a, b, fields=("topk_indices",)):
    """a and b hold the same values: `fields` identical, log-probs within one float16 step, lse within 1e-5."""
    for x, y in zip(a, b, strict=True):
        assert x.sample_index == y.sample_index
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        for name in fields:
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
        if x.topk_logprobs is not None:  # a float16 step is at most 2**-10 of the value
            np.testing.assert_allclose(np.float32(x.topk_logprobs), np.float32(y.topk_logprobs), rtol=2**-10, atol=0)
        np.testing.assert_allclose(x.logsumexp, y.logsumexp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("width", [None, 96])
def test_best_fit_packs_every_sample_once_within_its_row(width):
    # Long-tailed like text: median 10 of at most 96, a few at the cap.
    lengths = np.minimum(96, np.ceil(np.random.default_rng(0).lognormal(np.log(10), 1.0, size=300))).astype(int).tolist()
    layouts = list(_packed_batches(lengths, 4 * 96, width=width))
    assert sorted(j for lay in layouts for j in lay.samples) == list(range(300))  # each sample exactly once
    for lay in layouts:
        assert 1 <= lay.height <= 4 * 96 // lay.width and (width is None or lay.width == width)
        assert lay.lengths == [lengths[j] for j in lay.samples]
        taken = np.zeros((lay.height, lay.width), dtype=int)
        for n, (b, t) in zip(lay.lengths, lay.slots):
            assert t + n <= lay.width  # a sample never spans two rows
            taken[b, t : t + n] += 1
        assert taken.max() == 1  # no two samples overlap
    if width is None:  # rows as long as the longest sample still waiting: rows of short samples are short
        assert [lay.width for lay in layouts] == sorted((lay.width for lay in layouts), reverse=True)
        assert layouts[-1].width < 96
    computed = sum(lay.height * lay.width for lay in layouts)
    padded = sum(lay.height * lay.width for lay in _padded_batches(lengths, 4 * 96))
    assert sum(lengths) / computed > (0.98 if width else 0.95) > 0.9 > sum(lengths) / padded  # padding wastes more


def test_probe_turns_packing_on_only_where_the_model_keeps_samples_apart(small_teacher_dir, teacher, monkeypatch):
    monkeypatch.setattr(kd_core.teacher, "PACK_SEQUENCES", True)
    assert load_teacher(TeacherConfig(model=str(small_teacher_dir), device="cpu")).packing
    # transformers without packed-sequence detection: the second sample of a row attends to the first.
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert not packing_works(teacher.model, teacher.device)


def test_packed_rows_equal_padded_rows_and_the_sample_alone(teacher, texts):
    lengths = [len(teacher.tokenize(t, MAX_LENGTH)) for t in texts]
    assert max(lengths) == MAX_LENGTH and min(lengths) < MAX_LENGTH // 4
    layouts = list(_packed_batches(lengths, 4 * MAX_LENGTH))
    shared = sum(c > 1 for lay in layouts for c in Counter(b for b, _ in lay.slots).values())
    assert shared >= 5  # rows that hold several samples
    packed = run(teacher, texts)
    same_rows(packed, run(dataclasses.replace(teacher, packing=False), texts))
    same_rows(packed[:8], [run(teacher, [t], first=i)[0] for i, t in enumerate(texts[:8])])  # each alone
    for r in packed[:8]:  # and against the full model's own float32 logits
        with torch.no_grad():
            logits = teacher.model(torch.from_numpy(r.input_ids.astype(np.int64))[None]).logits[0]
        ref = logits.log_softmax(-1).gather(-1, torch.from_numpy(r.topk_indices.astype(np.int64)))
        np.testing.assert_allclose(np.float32(r.topk_logprobs), ref.numpy(), rtol=2**-10, atol=1e-6)


def test_sampled_draws_unchanged_by_packing(teacher, texts):
    packed = run(teacher, texts[:30], mode="sampled", draws=32)
    padded = run(dataclasses.replace(teacher, packing=False), texts[:30], mode="sampled", draws=32)
    same_rows(packed, padded, fields=("sampled_ids", "sampled_counts"))


def test_device_map_auto_loads_and_runs_on_cpu(small_teacher_dir, teacher, texts):
    spread = load_teacher(TeacherConfig(model=str(small_teacher_dir), device="cpu", device_map="auto"))
    assert spread.device == torch.device("cpu") and packing_works(spread.model, spread.device)
    spread.packing = True
    assert {p.device.type for p in spread.model.parameters()} == {"cpu"}
    same_rows(run(spread, texts[:20]), run(teacher, texts[:20]))


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
    offloaded = dataclasses.replace(teacher, model=model, device=device, packing=packing_works(model, device))
    assert offloaded.packing
    same_rows(run(offloaded, texts[:20]), run(teacher, texts[:20]))
