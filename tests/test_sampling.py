"""Sampled mode's draws and the float32 head: reproducible per (row, position), distributed as the teacher's softmax.

The statistical tests use a fixed seed (the hash of the keys), so they are deterministic; each asserts a
chi-square p-value above ALPHA, so with keys chosen at random a correct sampler would fail one of them with
probability at most ALPHA (1e-4; the test is conservative, see FitReport).
"""

import numpy as np
import pytest
import torch

from kd_core.errors import CacheFileError
from kd_core.inference import Batch, Float32Head, RowSpec, Forward, run_teacher
from kd_core.topk import topk_by_key, topk_lowest_id
from kd_core.sampling import FitAccumulator, distinct_counts, random_bits, sample_ids, sample_rows

ALPHA = 1e-4
N = 64


def keys(n, sample=7, start=0):
    return torch.full((n,), sample, dtype=torch.int64), torch.arange(start, start + n, dtype=torch.int64)


def test_random_bits_pinned_range_and_independent_of_shape():
    bits = random_bits(*keys(3, sample=2**40 + 5), draws=4)  # (3, 4)
    assert bits.dtype == torch.int64 and bool((bits >= 0).all()) and bool((bits < 2**62).all())
    # Pinned: changing the hash changes every sampled cache's bytes (and the version key must change with it).
    assert bits[0, :2].tolist() == random_bits(*keys(1, sample=2**40 + 5), draws=2)[0].tolist()
    assert random_bits(torch.tensor([0]), torch.tensor([0]), 2).tolist() == [[2796351292301235023, 3374880867190376578]]
    assert len(set(bits.flatten().tolist())) == 12  # no collisions across positions and draws
    # Bits are uniform: each of the 62 is set about half the time over 20k draws.
    many = random_bits(*keys(5000, sample=3), draws=4).flatten()
    freq = torch.stack([(many >> b) & 1 for b in range(62)]).double().mean(1)
    assert float((freq - 0.5).abs().max()) < 0.02  # 5.6 sigma at n=20000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draws_do_not_depend_on_batching_order_or_chunking(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(12, 3000, generator=g) * 3).to(dtype).float()  # (n, V)
    lse = logits.logsumexp(-1)
    sample_index = torch.arange(12) // 4 + 100
    position = torch.arange(12) % 4
    whole = sample_rows(logits, lse, sample_index, position, N)
    perm = torch.randperm(12, generator=g)
    shuffled = sample_rows(logits[perm], lse[perm], sample_index[perm], position[perm], N)
    pieces = [sample_rows(logits[i:i + 5], lse[i:i + 5], sample_index[i:i + 5], position[i:i + 5], N)
              for i in range(0, 12, 5)]
    for a, b in zip(whole, shuffled):
        assert torch.equal(a[perm], b)
    for a, b in zip(whole, zip(*pieces)):
        assert torch.equal(a, torch.cat(b))
    # Another key draws something else.
    other = sample_rows(logits, lse, sample_index + 1, position, N)
    assert not torch.equal(whole[0], other[0])


def test_draws_survive_an_ulp_change_of_the_logits():
    """Another batch's padding can move a logit by an ulp: the draws must not change with it."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(200, 3000, generator=g) * 3
    nudged = torch.nextafter(logits, torch.where(torch.rand(logits.shape, generator=g) < 0.5, -1e9, 1e9))
    a = sample_ids(logits, logits.logsumexp(-1), *keys(200), N)
    b = sample_ids(nudged, nudged.logsumexp(-1), *keys(200), N)
    assert float((a != b).double().mean()) < 1e-3


def test_distinct_counts_layout():
    ids = torch.tensor([[5, 3, 5, 9, 3, 5], [2, 2, 2, 2, 2, 2]])
    distinct, counts = distinct_counts(ids)
    assert distinct.tolist() == [[3, 5, 9, 0, 0, 0], [2, 0, 0, 0, 0, 0]]
    assert counts.tolist() == [[2, 3, 1, 0, 0, 0], [6, 0, 0, 0, 0, 0]]


def test_draws_match_float32_probabilities_chi_square():
    """One distribution, 400 rows x 64 draws: the per-id counts fit the float32 softmax (p > ALPHA)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g) * 2  # (V,) a spread of probabilities, 1e-4 .. 0.3
    rows = logits.expand(400, 50).contiguous()
    ids = sample_ids(rows, rows.logsumexp(-1), *keys(400), N)  # (400, N)
    observed = torch.bincount(ids.flatten(), minlength=50).double()
    expected = torch.softmax(logits.double(), -1) * ids.numel()
    well = expected >= 5  # the rest pooled into one cell
    stat = float(((observed - expected)[well] ** 2 / expected[well]).sum()
                 + (observed[~well].sum() - expected[~well].sum()) ** 2 / expected[~well].sum())
    dof = int(well.sum())  # cells (well + 1 pooled) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))
    assert p_value > ALPHA, (stat, dof)


def test_fit_accumulator_accepts_right_draws_and_rejects_biased_ones():
    """Many rows, each its own distribution (a trained teacher's shape: peaked head, long tail)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(600, 2000, generator=g) * 2.5  # (n, V)
    logits[:, :5] += 6  # a few likely ids per row
    probs = torch.softmax(logits.double(), -1)
    ids, counts = sample_rows(logits, logits.logsumexp(-1), *keys(600), N)
    right = FitAccumulator()
    right.add(probs, ids, counts)
    report = right.report()
    assert report.draws == 600 * N and report.dof >= 5
    assert report.p_value > ALPHA, report
    # Draws from the top-64 renormalised (the tail cut off) are caught.
    cut = logits.clone()
    cut[cut < cut.topk(64, -1).values[:, -1:]] = -float("inf")
    wrong = FitAccumulator()
    wrong.add(probs, *sample_rows(cut, cut.logsumexp(-1), *keys(600), N))
    assert wrong.report().p_value < 1e-6


def test_topk_ties_go_to_the_lowest_id():
    x = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0]])
    values, ids = topk_lowest_id(x, 4)
    assert ids.tolist() == [[1, 3, 2, 4]] and values.tolist() == [[3.0, 3.0, 2.0, 2.0]]
    # A tie group larger than the candidates (TIE_SLACK): the exact path, same answer as the key-based top-k.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 500, generator=g)
    x[1, 100:140] = 9.0  # 40 ids tie at the top, k = 8
    x[3, ::7] = x[3].max() + 1  # 72 tied ids straddle rank k
    x[4] = 0.0  # -0.0 and 0.0 are equal
    x[4, 250:] = -0.0
    values, ids = topk_lowest_id(x, 8)
    exact_values, exact_ids = topk_by_key(x, 8)
    assert torch.equal(ids, exact_ids) and torch.equal(values, exact_values)
    assert ids[1].tolist() == list(range(100, 108)) and ids[3].tolist() == list(range(0, 56, 7))
    assert ids[4].tolist() == list(range(8))
    # Against a reference (value desc, id asc) sort in numpy, on bf16-rounded logits full of ties.
    y = (torch.randn(40, 300, generator=g) * 2).to(torch.bfloat16).float()
    ref = np.lexsort((np.arange(300)[None].repeat(40, 0), -y.numpy()), axis=-1)[:, :16]
    assert np.array_equal(topk_lowest_id(y, 16)[1].numpy(), ref)


def test_float32_head_is_exact_on_bf16_hidden_states():
    """The float32 head on bf16 hidden states equals a float64 head on the same numbers to float32 rounding;
    the bf16 head does not (its logits are rounded to bf16)."""
    g = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(256, 5000, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(torch.randn(5000, 256, generator=g) * 0.2)
    hidden = (torch.randn(64, 256, generator=g) * 4).to(torch.bfloat16)  # (n, H)
    with torch.no_grad():
        ref = hidden.double() @ head.weight.double().T  # (n, V)
        ours, native = Float32Head(head)(hidden), head(hidden).double()
    assert ours.dtype == torch.float32
    tol = 64 * 2**-24 * (hidden.double().abs() @ head.weight.double().abs().T)  # float32 accumulation bound
    assert bool(((ours.double() - ref).abs() <= tol).all())
    assert float((native - ref).abs().max()) > 100 * float((ours.double() - ref).abs().max())


def test_sampled_rows_through_the_teacher(small_teacher_dir, corpus_texts):
    """run_teacher in sampled mode: counts sum to N, rows independent of batching, draws fit the teacher."""
    from kd_core.config import TeacherConfig
    from kd_core.teacher import load_teacher

    teacher = load_teacher(TeacherConfig(model=str(small_teacher_dir), device="cpu"))
    texts = [(i, t) for i, t in enumerate(corpus_texts[:40]) if t.strip()]
    args = dict(mode="sampled", draws=N, max_length=96)
    rows = list(run_teacher(teacher, texts, batch_tokens=4 * 96, **args))
    alone = list(run_teacher(teacher, texts[5:8], batch_tokens=96, **args))  # other batches, other padding
    fit = FitAccumulator()
    for r in rows:
        assert r.topk_indices is None and r.sampled_ids.dtype == np.uint32 and r.sampled_counts.dtype == np.uint16
        assert r.sampled_ids.shape == r.sampled_counts.shape and r.sampled_ids.shape[0] == len(r.input_ids)
        assert (r.sampled_counts.sum(-1) == N).all()
        assert ((r.sampled_counts > 0).sum(-1) == r.sampled_counts.shape[1]).any()  # no all-padding column
        with torch.no_grad():
            logits = teacher.model(torch.from_numpy(r.input_ids.astype(np.int64))[None]).logits[0].float()
        np.testing.assert_allclose(r.logsumexp, logits.logsumexp(-1).numpy(), rtol=1e-5, atol=1e-5)
        fit.add(torch.softmax(logits.double(), -1), torch.from_numpy(r.sampled_ids.astype(np.int64)),
                torch.from_numpy(r.sampled_counts.astype(np.int64)))
    for a in alone:
        b = next(r for r in rows if r.sample_index == a.sample_index)
        np.testing.assert_array_equal(a.sampled_ids, b.sampled_ids)
        np.testing.assert_array_equal(a.sampled_counts, b.sampled_counts)
    report = fit.report()
    assert report.draws == N * sum(len(r.input_ids) for r in rows)
    assert report.p_value > ALPHA, report


def test_forward_sampled_equals_rows_from_full_logits(small_teacher_dir):
    """The head-on-real-rows path and the full-logits path give the same draws (same float32 logits)."""
    from kd_core.config import TeacherConfig
    from kd_core.teacher import load_teacher

    model = load_teacher(TeacherConfig(model=str(small_teacher_dir), device="cpu")).model
    forward = Forward(model, RowSpec(mode="sampled", draws=N))
    batch = Batch(
        input_ids=torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]),  # (B, T) right-padded
        rows=torch.tensor([0, 1, 2, 3, 4, 5]),
        sample_index=torch.tensor([3, 3, 3, 3, 8, 8]),
        position=torch.tensor([0, 1, 2, 3, 0, 1]),
    )
    with torch.inference_mode():
        split = forward(batch)
        forward.split = False
        full = forward(batch)
    assert torch.equal(split[0], full[0]) and torch.equal(split[1], full[1])
    assert bool((split[1].sum(-1) == N).all())


def test_verify_rows_accepts_sampled_rows_and_flags_wrong_ones(small_teacher_dir, corpus_texts):
    from kd_core.config import TeacherConfig
    from kd_core.teacher import load_teacher
    from kd_core.verify import verify_rows

    teacher = load_teacher(TeacherConfig(model=str(small_teacher_dir), device="cpu"))
    texts = [(i, t) for i, t in enumerate(corpus_texts[:30]) if t.strip()]
    rows = list(run_teacher(teacher, texts, mode="sampled", draws=N, max_length=64, batch_tokens=256))
    stored = [{k: v for k, v in vars(r).items() if k != "logsumexp"} for r in rows]  # what a sampled cache holds
    good = verify_rows(teacher, stored, draws=N)
    assert good.ok and good.layout_errors == 0 and good.impossible_draws == 0 and good.fit.p_value > 1e-6
    assert good.draw_mismatches == 0  # verify redraws the rows: no logsumexp needed to tie them to the teacher

    def edited(fn):
        out = [dict(r) for r in stored]
        for d in out:
            d["sampled_ids"], d["sampled_counts"] = fn(d["sampled_ids"].copy(), d["sampled_counts"].copy())
        return verify_rows(teacher, out, draws=N)

    def extra_draw(ids, counts):
        counts[0, 0] += 1
        return ids, counts

    assert edited(extra_draw).layout_errors >= 1

    def most_likely_only(ids, counts):  # every draw moved to the row's most drawn id: a biased cache
        best = counts.argmax(-1)
        ids = ids[np.arange(len(ids)), best][:, None]
        return ids, np.full_like(counts[:, :1], N)

    biased = edited(most_likely_only)
    assert biased.layout_errors == 0 and not biased.ok and biased.fit.p_value < 1e-6

    def least_likely(ids, counts):  # an id the teacher never gives mass to (the reference's argmin)
        return np.full_like(ids, 3), counts

    assert edited(least_likely).layout_errors > 0  # repeated ids are not distinct


# -- the format -------------------------------------------------------------------------------------------------

def random_sampled(n, draws, vocab, seed=0, max_len=40):
    """Samples as run_teacher yields them in sampled mode: (L, m) ids ascending, counts summing to N, 0 = padding."""
    from types import SimpleNamespace

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(1, max_len))
        drawn = np.sort(rng.zipf(1.3, size=(L, draws)) % vocab, axis=1)  # peaked, like a teacher
        ids, counts = (t.numpy() for t in distinct_counts(torch.from_numpy(drawn)))
        width = int((counts > 0).sum(-1).max())
        out.append(SimpleNamespace(sample_index=5 * i + 2, input_ids=rng.integers(0, vocab, L).astype(np.uint32),
                                   logsumexp=rng.normal(size=L).astype(np.float32), topk_indices=None,  # not stored
                                   topk_logprobs=None, sampled_ids=ids[:, :width].astype(np.uint32),
                                   sampled_counts=counts[:, :width].astype(np.uint16)))
    return out


@pytest.mark.parametrize("draws, vocab, max_bytes", [(64, 1000, 60_000), (300, 70000, 300_000)])
def test_sampled_parts_and_index_round_trip(tmp_path, draws, vocab, max_bytes):
    """Split parts + the virtual index: stock h5py sees the whole cache, CacheReader gives back (L, m) arrays."""
    import h5py

    from kd_core import h5cache
    from kd_core.h5cache import CacheReader
    from kd_core.dataset import CacheDataset, pad_collate

    samples = random_sampled(120, draws, vocab)
    closed = []
    with h5cache.SplitWriter(lambda i: tmp_path / "v" / "parts" / f"part-{i:04d}.h5", max_bytes,
                               lambda path, summary: closed.append((path, summary)), top_k=0, vocab_size=vocab,
                               attrs={}, samples=draws) as writer:
        for s in samples:
            writer.append_rows(s)
    assert len(closed) >= 2 and max(p.stat().st_size for p, _ in closed) <= max_bytes
    for path, summary in closed:
        h5cache.verify_file(path, expect=summary)
    entries = [h5cache.index_entry(path, f"parts/{path.name}", summary) for path, summary in closed]
    h5cache.write_index(tmp_path / "v" / "cache.h5", entries, attrs={"mode": "sampled", "samples": draws,
                                                                       "vocab_size": vocab})
    with h5py.File(tmp_path / "v" / "cache.h5") as index:  # stock h5py: the whole cache, entries included
        assert set(index) == {"input_ids", "offsets", "sample_index", "sampled_offsets", "sampled_id_gaps",
                              "sampled_counts"}  # no logsumexp, no row lengths: rows follow from the counts
        offsets, entry_offsets = index["offsets"][:], index["sampled_offsets"][:]
        assert index["sampled_id_gaps"].is_virtual and index["sampled_id_gaps"].dtype == h5cache.index_dtype(vocab)
        assert index["sampled_counts"].dtype == h5cache.count_dtype(draws)
        assert entry_offsets[-1] == index["sampled_counts"].shape[0]
        counts = index["sampled_counts"][:].astype(np.int64)
        per_sample = np.add.reduceat(counts, entry_offsets[:-1])  # every sample has rows, so entries
        np.testing.assert_array_equal(per_sample, np.diff(offsets) * draws)
        whole = {name: index[name][:] for name in ("sample_index", "input_ids")}
    np.testing.assert_array_equal(whole["sample_index"], [s.sample_index for s in samples])
    # A version's index is read through its manifest only; exported, the parts become one self-contained file.
    with pytest.raises(CacheFileError, match="manifest.json: is missing"):
        CacheReader(tmp_path / "v" / "cache.h5")
    h5cache.export([path for path, _ in closed], tmp_path / "one.h5", {"mode": "sampled", "samples": draws,
                                                                     "vocab_size": vocab})
    with CacheReader(tmp_path / "one.h5") as reader:
        assert reader.samples == draws and reader.top_k is None and reader.info().mode == "sampled"
        for i in (0, 37, len(samples) - 1):
            got, want = reader[i], samples[i]
            assert set(got) == {"sample_index", "input_ids", "sampled_ids", "sampled_counts"}
            np.testing.assert_array_equal(got["sampled_ids"], want.sampled_ids)
            np.testing.assert_array_equal(got["sampled_counts"], want.sampled_counts)
        assert reader.read_all()["sampled_offsets"][-1] == entry_offsets[-1]
    ds = CacheDataset(str(tmp_path / "one.h5"))
    batch = pad_collate([ds[0], ds[1], ds[2]])
    assert batch["sampled_counts"].shape == batch["sampled_ids"].shape
    assert bool((batch["sampled_counts"].sum(-1)[batch["attention_mask"]] == draws).all())
    assert int(batch["sampled_counts"].sum(-1)[~batch["attention_mask"]].sum()) == 0  # padded rows: no draws


def test_sampled_writer_refuses_rows_that_do_not_sum_to_n(tmp_path):
    from kd_core.h5cache import CacheWriter

    sample = random_sampled(1, 16, 100)[0]
    sample.sampled_counts[0, 0] += 1
    with pytest.raises(ValueError, match="sum to 16"):
        with CacheWriter(tmp_path / "c.h5", top_k=0, vocab_size=100, attrs={}, samples=16) as writer:
            writer.append_rows(sample)
    assert not list(tmp_path.iterdir())  # nothing left behind


@pytest.fixture(scope="module")
def sampled_cache(small_teacher_dir, corpus_path, tmp_path_factory):
    """A sampled cache made by the pipeline (no Prefect): 12 samples, N draws per row."""
    from s3helpers import build, overrides

    from kd_core.build import validate

    out = tmp_path_factory.mktemp("sampled-verify") / "out"
    build(validate("demo", overrides(small_teacher_dir, corpus_path, str(out), dataset={"max_samples": 12},
                                     cache={"mode": "sampled", "samples": N}, run={"num_shards": 1})))
    return out


def test_verify_redraws_the_seeded_draws_and_catches_small_count_edits(sampled_cache, small_teacher_dir):
    """A count moved from one drawn id to another of the same row keeps the layout valid and the chi-square happy
    (a total variation of 1/N on a few rows passed verify); the draws are seeded, so verify draws them again from
    the recomputed teacher and compares, allowing only the flips the dtype's tolerance explains."""
    from kd_core.h5cache import CacheReader
    from kd_core.config import TeacherConfig
    from kd_core.teacher import load_teacher
    from kd_core.verify import verify_rows

    teacher = load_teacher(TeacherConfig(model=str(small_teacher_dir), device="cpu"))  # float32, as the cache
    with CacheReader(str(sampled_cache)) as reader:
        rows = [reader[i] for i in range(6)]
    clean = verify_rows(teacher, rows, draws=N)
    assert clean.ok and clean.draw_mismatches == 0, clean
    edited = [{k: np.array(v, copy=True) for k, v in row.items()} for row in rows]
    for row in edited[:3]:
        counts = row["sampled_counts"]  # (L, m)
        fits = ((counts > 0).sum(-1) >= 2) & (counts.max(-1) >= 2)  # (L,) two distinct ids, one drawn twice
        t = int(np.argmax(fits))
        assert fits[t]
        donor = int(np.argmax(counts[t]))
        taker = int(next(j for j in np.flatnonzero(counts[t] > 0) if j != donor))
        counts[t, donor] -= 1
        counts[t, taker] += 1
    report = verify_rows(teacher, edited, draws=N)
    assert report.layout_errors == 0 and report.impossible_draws == 0 and report.fit.p_value > report.alpha, report
    assert report.draw_mismatches == 3 and not report.ok, report


def test_rows_follow_from_the_counts_and_damage_is_refused():
    """Row lengths are not stored: entry e is in row (draws before e) // N. Counts whose rows do not each sum to N
    (a damaged or foreign file) are an error, never rows read out of place."""
    from kd_core.h5cache.format import pack_sampled, unpack_sampled

    ids = np.array([[2, 7, 0], [1, 3, 9], [5, 0, 0]])
    counts = np.array([[3, 1, 0], [1, 1, 2], [4, 0, 0]])
    packed = pack_sampled(ids, counts, samples=4, vocab_size=10)
    assert set(packed) == {"sampled_id_gaps", "sampled_counts"}
    assert packed["sampled_id_gaps"].tolist() == [2, 5, 1, 2, 6, 5]
    got_ids, got_counts = unpack_sampled(packed["sampled_id_gaps"], packed["sampled_counts"], rows=3, samples=4)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_counts, counts)
    gaps = packed["sampled_id_gaps"]
    for bad, rows in (([3, 2, 1, 1, 1, 4], 3),  # same total, but row 0 would hold 5 draws
                      ([3, 1, 1, 1, 2, 4], 4),  # one row short
                      ([3, 1, 1, 1, 2, 3], 3),  # one draw short
                      ([4, 0, 1, 1, 2, 4], 3)):  # a zero count
        with pytest.raises(ValueError, match="sum to 4"):
            unpack_sampled(gaps, np.array(bad), rows=rows, samples=4)
