"""Teacher inference: exact against the teacher run alone in float32, padding-invariant, in input order."""

import numpy as np
import pytest
import torch

from kd_core.config import TeacherConfig
from kd_core.errors import ConfigError
from kd_core.inference import Batch, InferenceStats, SampleRows, run_teacher, topk_logprobs
from kd_core.teacher import load_teacher, teacher_vocab_size
from kd_core.verify import verify_rows

TOP_K = 16
MAX_LENGTH = 96


def fp16_close(a, b) -> bool:
    """Equal within float16 rounding of the stored values (the tolerance verify_rows uses)."""
    return bool(np.all(np.abs(np.float32(a) - np.float32(b)) <= 2e-3 * np.abs(np.float32(b)) + 1e-3))


@pytest.fixture(scope="module")
def teachers(teacher_dir, small_teacher_dir):
    """{'vocab70k': teacher larger than its tokenizer, 'small': vocab == tokenizer}, float32 on CPU.

    The 70k teacher never learned to predict ids past its tokenizer, so output rows 66000.. are made scaled
    copies of the trained rows 0..999: they then win top-k places, and the test sees ids that need uint32.
    """
    big = load_teacher(TeacherConfig(model=str(teacher_dir), device="cpu"))
    with torch.no_grad():
        weight = big.model.get_output_embeddings().weight  # (V, H)
        weight[66000:67000] = weight[:1000] * 1.5
    return {"vocab70k": big, "small": load_teacher(TeacherConfig(model=str(small_teacher_dir), device="cpu"))}


@pytest.fixture(scope="module")
def texts(corpus_texts):
    """40 real docstrings of spread lengths (some truncated at MAX_LENGTH), no blanks."""
    return [t for t in corpus_texts if t.strip()][:40]


def right_padded(samples: list[list[int]]) -> Batch:
    """One sample per row, right-padded with 0: the unpacked Batch."""
    width = max(map(len, samples))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in samples])  # (B, T)
    rows = torch.cat([b * width + torch.arange(len(s)) for b, s in enumerate(samples)])
    position = torch.cat([torch.arange(len(s)) for s in samples])
    return Batch(ids, rows, torch.zeros_like(rows), position)


def run(teacher, texts, **kw) -> list[SampleRows]:
    args = {"top_k": TOP_K, "max_length": MAX_LENGTH, "batch_tokens": 4 * MAX_LENGTH} | kw
    return list(run_teacher(teacher, list(enumerate(texts)), **args))


@pytest.mark.parametrize("name", ["vocab70k", "small"])
def test_rows_match_teacher_alone_in_float32(teachers, texts, name):
    teacher = teachers[name]
    rows = run(teacher, texts, batch_tokens=3 * MAX_LENGTH)
    assert [r.sample_index for r in rows] == list(range(len(texts)))
    assert teacher.vocab_size == (70000 if name == "vocab70k" else len(teacher.tokenizer))
    for r in rows:
        assert r.input_ids.dtype == np.uint32 and r.topk_indices.dtype == np.uint32
        assert r.topk_logprobs.dtype == np.float16 and r.logsumexp.dtype == np.float32
        assert r.input_ids.tolist() == teacher.tokenize(texts[r.sample_index], MAX_LENGTH)
        with torch.no_grad():
            logits = teacher.model(torch.from_numpy(r.input_ids.astype(np.int64))[None]).logits[0].float()
        ref = logits.log_softmax(-1)  # (L, V)
        ids = torch.from_numpy(r.topk_indices.astype(np.int64))
        assert ids.shape == (len(r.input_ids), TOP_K)
        # Same top-k set, ties aside: every stored id is at least as likely as the k-th best, within rounding.
        kth = ref.topk(TOP_K, dim=-1).values[:, -1:]  # (L, 1)
        at_stored = ref.gather(-1, ids)  # (L, k)
        assert bool((at_stored >= kth - 1e-5).all())
        assert fp16_close(r.topk_logprobs, at_stored.numpy())
        assert np.all(np.diff(np.float32(r.topk_logprobs), axis=-1) <= 1e-3)  # best first
        assert np.abs(r.logsumexp - torch.logsumexp(logits, -1).numpy()).max() <= 1e-2
    if name == "vocab70k":  # ids above uint16's range survive the pipeline's int32/uint32 path
        assert max(int(r.topk_indices.max()) for r in rows) > 65535


def test_padding_never_changes_a_sample(teachers, texts):
    teacher = teachers["vocab70k"]
    short, mid, long = texts[1][:60], texts[0][:200], texts[2]
    assert len(teacher.tokenize(short, MAX_LENGTH)) < len(teacher.tokenize(mid, MAX_LENGTH)) < MAX_LENGTH
    assert len(teacher.tokenize(long, MAX_LENGTH)) == MAX_LENGTH
    alone = run(teacher, [mid])[0]
    # One batch each time: mid is right-padded next to the longer sample, and pads the shorter one.
    for group in ([long, mid, short], [short, mid, long], [mid, long], [short, mid]):
        rows = run(teacher, group, batch_tokens=len(group) * MAX_LENGTH)
        batched = rows[group.index(mid)]
        np.testing.assert_array_equal(batched.topk_indices, alone.topk_indices)
        assert fp16_close(batched.topk_logprobs, alone.topk_logprobs)
        np.testing.assert_allclose(batched.logsumexp, alone.logsumexp, rtol=1e-5, atol=1e-5)


def test_output_in_input_order_across_many_reordered_batches(teachers, texts):
    rng = np.random.default_rng(0)
    indices = rng.permutation(1000)[: len(texts)].tolist()  # sample indices in no particular order
    samples = list(zip(indices, texts))
    stats = InferenceStats()
    rows = list(run_teacher(
        teachers["small"], samples, top_k=TOP_K, max_length=MAX_LENGTH,
        batch_tokens=MAX_LENGTH, window_tokens=6 * MAX_LENGTH, stats=stats,
    ))
    assert [r.sample_index for r in rows] == indices
    assert stats.samples == len(texts) and stats.tokens == sum(len(r.input_ids) for r in rows)
    assert stats.seconds > 0


def test_empty_texts_skipped_and_counted_and_truncation(teachers, texts, corpus_texts, corpus_blank_rows):
    teacher = teachers["small"]
    long_text = max(texts, key=len)
    samples = [(0, ""), (1, "  \n\t"), (2, long_text), (3, None), (4, "x")]
    stats = InferenceStats()
    rows = list(run_teacher(teacher, samples, top_k=TOP_K, max_length=32, batch_tokens=64, stats=stats))
    assert [r.sample_index for r in rows] == [2, 4]
    assert stats.skipped_empty == 3
    assert len(rows[0].input_ids) == 32 and rows[0].topk_logprobs.shape == (32, TOP_K)
    # A sample of a single token gives a single row (its next-token distribution).
    one = list(run_teacher(teacher, [(7, "hello")], top_k=TOP_K, max_length=1, batch_tokens=64))
    assert len(one) == 1 and one[0].topk_indices.shape == (1, TOP_K)
    # The corpus fixture's blank rows are skipped, everything else comes through.
    stats = InferenceStats()
    rows = list(run_teacher(
        teacher, enumerate(corpus_texts[:20]), top_k=4, max_length=16, batch_tokens=64, stats=stats,
    ))
    assert stats.skipped_empty == len(corpus_blank_rows)
    assert [r.sample_index for r in rows] == [i for i in range(20) if i not in corpus_blank_rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_logprobs_chunked_equals_unchunked_reference(dtype):
    logits = (torch.randn(3, 7, 1000, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)  # (B, T, V)
    ids, logprobs, lse = topk_logprobs(logits, 10, chunk_rows=2)
    assert ids.shape == (3, 7, 10) and logprobs.dtype == torch.float32 and lse.shape == (3, 7)
    ref = logits.float().log_softmax(-1)  # (B, T, V)
    torch.testing.assert_close(logprobs, ref.gather(-1, ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(logprobs, ref.topk(10).values, rtol=0, atol=1e-5)  # ties give equal values
    torch.testing.assert_close(lse, logits.float().logsumexp(-1), rtol=0, atol=1e-5)
    unchunked = topk_logprobs(logits, 10, chunk_rows=10**6)
    for a, b in zip(unchunked, (ids, logprobs, lse)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_head_on_real_rows_equals_full_forward(teachers, texts):
    """The lm_head-on-real-rows path gives the rows the full logits give."""
    from kd_core.inference import RowSpec, Forward

    model = teachers["small"].model
    forward = Forward(model, RowSpec(top_k=TOP_K))
    assert forward.split
    batch = right_padded([[5, 6, 7, 8], [9, 10]])
    with torch.inference_mode():
        split = forward(batch)
        forward.split = False
        full = forward(batch)
    for a, b in zip(split, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_verify_rows_passes_correct_rows_and_flags_corrupt_ones(teachers, texts):
    teacher = teachers["vocab70k"]
    rows = run(teacher, texts[:6])
    good = verify_rows(teacher, rows, top_k=TOP_K)
    assert good.ok and good.samples == 6 and good.positions == sum(len(r.input_ids) for r in rows)
    assert good.max_logprob_error < 1e-2 and good.topk_mismatches == 0

    as_dicts = [vars(r).copy() for r in rows]  # the reader's form: dicts of numpy arrays
    as_dicts[2]["topk_logprobs"] = (np.float32(rows[2].topk_logprobs) + 0.05).astype(np.float16)  # shifted
    shifted = verify_rows(teacher, as_dicts, top_k=TOP_K)
    assert not shifted.ok and shifted.max_logprob_error > 0.04 and shifted.topk_mismatches == 0

    as_dicts = [vars(r).copy() for r in rows]
    with torch.no_grad():
        logits = teacher.model(torch.from_numpy(rows[1].input_ids.astype(np.int64))[None]).logits[0]
    swapped = rows[1].topk_indices.copy()
    swapped[3, 0] = int(logits[3].argmin())  # the least likely id in place of the best one
    as_dicts[1]["topk_indices"] = swapped
    assert verify_rows(teacher, as_dicts, top_k=TOP_K).topk_mismatches >= 1

    as_dicts = [vars(r).copy() for r in rows]
    as_dicts[0]["logsumexp"] = rows[0].logsumexp + 0.1
    bad_lse = verify_rows(teacher, as_dicts, top_k=TOP_K)
    assert not bad_lse.ok and bad_lse.max_logsumexp_error > 0.09


def test_teacher_loading_errors_and_vocab(tmp_path, teacher_dir):
    assert teacher_vocab_size(TeacherConfig(model=str(teacher_dir))) == 70000
    with pytest.raises(ConfigError, match=r"teacher\.model: local path .* does not exist"):
        load_teacher(TeacherConfig(model=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match=r"teacher\.model: .*hub id.*network"):
        teacher_vocab_size(TeacherConfig(model="no-such-org/no-such-model"))
    with pytest.raises(ConfigError, match=r"teacher\.model: .*local directory"):
        load_teacher(TeacherConfig(model=str(tmp_path)))
