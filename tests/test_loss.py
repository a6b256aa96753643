"""kd_core.loss: the cached KD losses against the full-vocabulary reference: tails, sampling, masking, padding,
fp16, gradients, chunking and memory."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from kd_core.dataset import pad_collate
from kd_core.loss import full_kd_loss, sampled_kd_loss, topk_kd_loss


def make(B=2, T=5, V=32, seed=0, scale=3.0):
    """Random student and teacher logits (B, T, V) and a mask (B, T) with some positions off (never all)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64).float() * scale
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64).float() * scale
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    return student, teacher, mask


def cache(teacher_logits, k):
    """What the cache stores: the teacher's top-k ids (best first) and their log-probs at temperature 1."""
    logprobs, indices = F.log_softmax(teacher_logits.float(), dim=-1).topk(k, dim=-1)  # (B, T, k)
    return indices, logprobs


@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 5, 32), (3, 7, 101), (2, 4, 1000)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bucket_with_k_equal_v_is_full_kl(shape, reduction):
    student, teacher, mask = make(*shape, seed=sum(shape))
    got = topk_kd_loss(student, *cache(teacher, shape[-1]), mask=mask, reduction=reduction)
    want = full_kd_loss(student, teacher, mask=mask, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tail", ["renormalize", "ignore"])
def test_every_tail_is_exact_with_k_equal_v(tail):
    student, teacher, mask = make(V=50)
    got = topk_kd_loss(student, *cache(teacher, 50), mask=mask, tail=tail)
    torch.testing.assert_close(got, full_kd_loss(student, teacher, mask=mask), rtol=1e-5, atol=1e-5)


def test_bucket_grows_monotonically_to_full_kl():
    student, teacher, mask = make(V=40, seed=1)
    full = full_kd_loss(student, teacher, mask=mask, reduction="none")
    per_k = torch.stack(
        [topk_kd_loss(student, *cache(teacher, k), mask=mask, reduction="none") for k in range(1, 41)]
    )  # (V, B, T)
    # Splitting the bucket refines the partition, so the KL can only grow (data-processing inequality).
    assert (per_k.diff(dim=0) >= -1e-5).all()
    assert (per_k <= full + 1e-5).all()
    # With one token left the bucket is that token: exact.
    torch.testing.assert_close(per_k[-2], full, rtol=1e-5, atol=1e-5)
    assert (full - per_k[0]).sum() > 0.1  # and k = 1 really loses something


@pytest.mark.parametrize("k", [1, 4, 16, 63, 64])
def test_bucket_is_zero_when_student_is_teacher_and_positive_otherwise(k):
    student, teacher, mask = make(V=64, seed=k)
    same = topk_kd_loss(teacher, *cache(teacher, k), mask=mask, reduction="none")
    assert same.abs().max() < 1e-6
    other = topk_kd_loss(student, *cache(teacher, k), mask=mask, reduction="none")
    assert (other >= 0).all() and (other[mask] > 0).all()


# Not k = V - 1: there the tail is a single unlikely token, known only to float32 rounding (~1e-7), which a
# temperature above 1 magnifies (see the docstring).
@pytest.mark.parametrize("k", [1, 4, 16, 64])
@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_tempered_bucket_is_zero_when_student_is_teacher_and_positive_otherwise(k, temperature):
    student, teacher, mask = make(V=64, seed=k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # k < V - 1: not standard tempered KD, but still a divergence
        same = topk_kd_loss(teacher, *cache(teacher, k), mask=mask, temperature=temperature, reduction="none")
        other = topk_kd_loss(student, *cache(teacher, k), mask=mask, temperature=temperature, reduction="none")
    assert same.abs().max() < 1e-6
    assert (other >= 0).all() and (other[mask] > 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
def test_masked_positions_do_not_matter(tail, temperature):
    student, teacher, mask = make(B=3, T=6, V=30, seed=2)
    indices, logprobs = cache(teacher, 8)
    off = ~mask.unsqueeze(-1)  # (B, T, 1)
    want = topk_kd_loss(student, indices, logprobs, mask=mask, temperature=temperature, tail=tail)
    noisy = student.masked_fill(off, 3e38).requires_grad_(True)  # overflows once divided by tau < 1
    got = topk_kd_loss(
        noisy,
        indices.masked_fill(off, -1),  # padding ids, out of range
        logprobs.masked_fill(off, float("nan")),
        mask=mask,
        temperature=temperature,
        tail=tail,
    )
    torch.testing.assert_close(got, want)
    got.backward()
    assert torch.isfinite(noisy.grad).all() and (noisy.grad[~mask] == 0).all()


def test_masked_positions_do_not_matter_in_full_kd_loss():
    student, teacher, mask = make(seed=2)
    off = ~mask.unsqueeze(-1)
    noisy_student, noisy_teacher = student.masked_fill(off, 3e38), teacher.masked_fill(off, float("nan"))
    got = full_kd_loss(noisy_student, noisy_teacher, mask=mask, temperature=0.5)
    torch.testing.assert_close(got, full_kd_loss(student, teacher, mask=mask, temperature=0.5))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_false_mask_gives_zero(reduction):
    student, teacher, _ = make()
    student.requires_grad_(True)
    none = torch.zeros(student.shape[:2], dtype=torch.bool)
    loss = topk_kd_loss(student, *cache(teacher, 4), mask=none, reduction=reduction)
    assert loss.item() == 0.0
    loss.backward()
    assert (student.grad == 0).all()
    assert full_kd_loss(student, teacher, mask=none, reduction=reduction).item() == 0.0


def test_mean_is_sum_over_counted_positions():
    student, teacher, mask = make(seed=3)
    args = (student, *cache(teacher, 8))
    per_pos = topk_kd_loss(*args, mask=mask, reduction="none")
    assert (per_pos[~mask] == 0).all()
    torch.testing.assert_close(topk_kd_loss(*args, mask=mask, reduction="sum"), per_pos.sum())
    torch.testing.assert_close(topk_kd_loss(*args, mask=mask), per_pos.sum() / mask.sum())
    torch.testing.assert_close(topk_kd_loss(*args), topk_kd_loss(*args, mask=torch.ones_like(mask)))


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
def test_fp16_stored_logprobs_stay_close(tail):
    student, teacher, mask = make(B=4, T=16, V=500, seed=4)
    indices, logprobs = cache(teacher, 64)
    want = topk_kd_loss(student, indices, logprobs, mask=mask, tail=tail)
    got = topk_kd_loss(student, indices, logprobs.half().float(), mask=mask, tail=tail)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0)


def test_underflowed_and_overfull_teacher_stays_finite():
    student, teacher, _ = make(V=20, seed=5)
    student.requires_grad_(True)
    indices, logprobs = cache(teacher, 6)
    logprobs = logprobs.clone()
    logprobs[..., -2:] = float("-inf")  # fp16 underflow of the smallest entries
    logprobs[0, 0] = torch.tensor([-1e-4, -0.5, -1.0, -2.0, float("-inf"), float("-inf")])  # sums above 1
    logprobs[0, 1] = -70000.0  # every entry underflows in fp16: that is padding (a real top-1 has p >= 1/V)
    for tail in ["bucket", "renormalize", "ignore"]:
        loss = topk_kd_loss(student, indices, logprobs.half(), tail=tail)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("k", [5, 24])
@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
def test_gradient_is_finite_and_only_on_counted_positions(k, tail):
    student, teacher, mask = make(V=24, seed=6)
    student = student.to(torch.bfloat16).requires_grad_(True)
    loss = topk_kd_loss(student, *cache(teacher, k), mask=mask, tail=tail)
    assert loss.dtype == torch.float32
    loss.backward()
    grad = student.grad.float()  # (B, T, V)
    assert torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()
    assert (grad[mask].abs().sum(-1) > 0).all()


def test_bucket_gradient_with_k_equal_v_is_full_gradient():
    student, teacher, mask = make(V=16, seed=7)
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    topk_kd_loss(a, *cache(teacher, 16), mask=mask, temperature=2.0).backward()
    full_kd_loss(b, teacher, mask=mask, temperature=2.0).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_bucket_by_hand():
    student, teacher, _ = make(B=1, T=3, V=10, seed=8)
    indices, logprobs = cache(teacher, 3)
    p = logprobs.exp()  # (B, T, k)
    log_q = F.log_softmax(student, dim=-1)  # (B, T, V)
    log_q_k = log_q.gather(-1, indices)
    m = 1 - p.sum(-1)
    q_rest = 1 - log_q_k.exp().sum(-1)
    want = (p * (logprobs - log_q_k)).sum(-1) + m * (m.log() - q_rest.log())
    torch.testing.assert_close(topk_kd_loss(student, indices, logprobs, reduction="none"), want)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_renormalize_is_kl_of_renormalised_distributions(temperature):
    student, teacher, mask = make(V=30, seed=9)
    indices, logprobs = cache(teacher, 5)
    p = F.softmax(teacher.gather(-1, indices) / temperature, dim=-1)  # (B, T, k)
    q = F.softmax(student.gather(-1, indices) / temperature, dim=-1)
    want = temperature**2 * (p * (p.log() - q.log())).sum(-1) * mask
    kwargs = dict(mask=mask, temperature=temperature, tail="renormalize", reduction="none")
    torch.testing.assert_close(topk_kd_loss(student, indices, logprobs, **kwargs), want)
    # Blind to the student's mass outside the top-k: shifting it does not change the loss.
    outside = torch.ones_like(student).scatter(-1, indices, 0.0) * 5.0
    torch.testing.assert_close(topk_kd_loss(student + outside, indices, logprobs, **kwargs), want)


def test_ignore_is_bucket_without_tail_term_and_can_be_negative():
    student, teacher, _ = make(B=1, T=4, V=12, seed=10)
    indices, logprobs = cache(teacher, 4)
    p = logprobs.exp()
    log_q_k = F.log_softmax(student, dim=-1).gather(-1, indices)
    want = (p * (logprobs - log_q_k)).sum(-1)
    torch.testing.assert_close(topk_kd_loss(student, indices, logprobs, tail="ignore", reduction="none"), want)
    # A student that piles its mass on the teacher's top-k "beats" the teacher: not a divergence.
    greedy = torch.full_like(student, -20.0).scatter(-1, indices, logprobs + 1.0)
    assert (topk_kd_loss(greedy, indices, logprobs, tail="ignore", reduction="none") < 0).all()
    assert (topk_kd_loss(greedy, indices, logprobs, tail="bucket", reduction="none") > 0).all()


@pytest.mark.parametrize("temperature", [2.0, 0.5, 4.0])
def test_temperature_with_k_equal_v_is_full_kl_at_that_temperature(temperature):
    student, teacher, mask = make(B=2, T=6, V=48, seed=11)
    for tail in ["bucket", "renormalize", "ignore"]:
        got = topk_kd_loss(student, *cache(teacher, 48), mask=mask, temperature=temperature, tail=tail)
        want = full_kd_loss(student, teacher, mask=mask, temperature=temperature)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_temperature_lumps_the_tail_into_one_tempered_outcome():
    student, teacher, _ = make(B=1, T=3, V=20, seed=12)
    indices, logprobs = cache(teacher, 4)
    tau = 2.0
    log_q = F.log_softmax(student, dim=-1)
    t_coarse = torch.cat([logprobs, (1 - logprobs.exp().sum(-1, keepdim=True)).log()], -1)  # (B, T, k+1)
    log_q_k = log_q.gather(-1, indices)
    s_coarse = torch.cat([log_q_k, (1 - log_q_k.exp().sum(-1, keepdim=True)).log()], -1)  # (B, T, k+1)
    p, q = F.softmax(t_coarse / tau, dim=-1), F.softmax(s_coarse / tau, dim=-1)
    want = tau**2 * (p * (p.log() - q.log())).sum(-1)
    with pytest.warns(UserWarning, match="not standard tempered KD"):
        got = topk_kd_loss(student, indices, logprobs, temperature=tau, reduction="none")
    torch.testing.assert_close(got, want)


def test_no_temperature_warning_where_the_tempered_loss_is_standard():
    student, teacher, mask = make(V=16, seed=14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        topk_kd_loss(student, *cache(teacher, 4), temperature=2.0, tail="renormalize")
        topk_kd_loss(student, *cache(teacher, 15), temperature=2.0)  # k >= V - 1: exact
        topk_kd_loss(student, *cache(teacher, 4), temperature=1.0)


def test_full_kd_loss_matches_torch_kl_div():
    student, teacher, _ = make(seed=13)
    want = F.kl_div(F.log_softmax(student / 3, -1), F.log_softmax(teacher / 3, -1), log_target=True, reduction="none")
    got = full_kd_loss(student, teacher, temperature=3.0, reduction="none")
    torch.testing.assert_close(got, 9 * want.sum(-1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tail": "sampled"}, "tail"),
        ({"reduction": "batchmean"}, "reduction"),
        ({"temperature": 0.0}, "temperature"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, "mask"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    student, teacher, _ = make()
    with pytest.raises(ValueError, match=match):
        topk_kd_loss(student, *cache(teacher, 4), **kwargs)


def test_mismatched_cache_shapes_raise():
    student, teacher, _ = make(V=8)
    indices, logprobs = cache(teacher, 4)
    with pytest.raises(ValueError, match="topk_indices"):
        topk_kd_loss(student, indices, logprobs[..., :3])
    with pytest.raises(ValueError, match="teacher_logits"):
        full_kd_loss(student, teacher[..., :7])


# ------------------------------------------------------------------------------------------ sampled loss


def draw(teacher_logits, n, seed):
    """What a sampled cache stores: n draws per row from softmax(teacher), as distinct ids and counts (B, T, m).

    m is the largest number of distinct ids in any row; shorter rows are padded with count 0 and a garbage id.
    """
    B, T, V = teacher_logits.shape
    g = torch.Generator().manual_seed(seed)
    probs = F.softmax(teacher_logits.double(), dim=-1).view(B * T, V)
    draws = torch.multinomial(probs, n, replacement=True, generator=g)  # (B*T, n)
    counts = torch.zeros(B * T, V, dtype=torch.long).scatter_add_(1, draws, torch.ones_like(draws))  # (B*T, V)
    m = int((counts > 0).sum(-1).max())
    top_counts, ids = counts.topk(m, dim=-1)  # (B*T, m): distinct ids first, then count-0 padding
    ids = ids.masked_fill(top_counts == 0, V + 7)  # padding ids are garbage, even out of range
    return ids.view(B, T, m), top_counts.view(B, T, m)


@pytest.mark.parametrize("V, n", [(5, 1), (8, 4), (12, 16)])
def test_sampled_gradient_is_unbiased_for_the_full_kl_gradient(V, n):
    """Mean over S seeds of the sampled loss's gradient -> the full KL gradient, within 5 standard errors."""
    S, T = 4000, 3
    student, teacher, _ = make(B=1, T=T, V=V, seed=20 + V, scale=1.5)
    # Every seed is one batch row: S independent draws of each of the T positions, one call.
    s_rep = student.expand(S, T, V).clone().requires_grad_(True)
    t_rep = teacher.expand(S, T, V)
    ids, counts = draw(t_rep, n, seed=V)
    sampled_kd_loss(s_rep, ids, counts, reduction="sum").backward()
    mean_grad = s_rep.grad.mean(0)  # (T, V)
    ref = student.clone().requires_grad_(True)
    full_kd_loss(ref, teacher, reduction="sum").backward()
    # Per seed and position the gradient is q - counts/N, whose variance is p (1 - p) / N per token.
    p = F.softmax(teacher[0], dim=-1)  # (T, V)
    tol = 5 * (p * (1 - p) / (n * S)).sqrt() + 1e-6  # (T, V)
    assert ((mean_grad - ref.grad[0]).abs() <= tol).all()
    # The test has the power to see a bias: a softmax restricted to the drawn ids (a common shortcut) fails it.
    s_biased = s_rep.detach().clone().requires_grad_(True)
    drawn = torch.zeros_like(s_biased, dtype=torch.bool).scatter_(-1, ids.clamp_max(V - 1), counts > 0)
    restricted = F.log_softmax(s_biased.masked_fill(~drawn, float("-inf")), dim=-1)  # (S, T, V)
    p_hat = torch.zeros_like(s_biased).scatter_add_(-1, ids.clamp_max(V - 1), counts.float()) / n
    (-(p_hat * restricted.masked_fill(~drawn, 0.0)).sum()).backward()
    if n < V:  # with as many draws as tokens or more, most rows see every token and the bias is tiny
        assert ((s_biased.grad.mean(0) - ref.grad[0]).abs() > tol).any()


def test_sampled_loss_is_kl_of_the_empirical_distribution():
    student, teacher, mask = make(B=2, T=5, V=20, seed=21)
    ids, counts = draw(teacher, 16, seed=1)
    p_hat = torch.zeros_like(student).scatter_add_(-1, ids.clamp_max(19), counts.float()) / 16  # (B, T, V)
    log_q = F.log_softmax(student, dim=-1)
    want = torch.where(p_hat > 0, p_hat * (p_hat.log() - log_q), 0.0).sum(-1) * mask
    torch.testing.assert_close(sampled_kd_loss(student, ids, counts, mask=mask, reduction="none"), want)
    # When the counts are exactly N p, the sampled loss is the full KL, value and gradient.
    p = torch.tensor([[[8, 4, 2, 1, 1, 0]]]) / 16.0  # (1, 1, 6)
    s = torch.randn(1, 1, 6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    ids6, counts6 = torch.arange(6).view(1, 1, 6), (p * 16).long()
    got = sampled_kd_loss(s, ids6, counts6)
    (g_got,) = torch.autograd.grad(got, s)
    want_full = full_kd_loss(s, p.clamp_min(1e-30).log())
    (g_want,) = torch.autograd.grad(want_full, s)
    torch.testing.assert_close(got, want_full)
    torch.testing.assert_close(g_got, g_want)


def test_sampled_loss_is_zero_at_the_empirical_distribution_and_positive_otherwise():
    student, teacher, _ = make(B=2, T=4, V=30, seed=22)
    ids, counts = draw(teacher, 64, seed=2)
    p_hat = torch.zeros_like(student).scatter_add_(-1, ids.clamp_max(29), counts.float()) / 64
    at_p_hat = p_hat.clamp_min(1e-30).log()  # (B, T, V)
    assert sampled_kd_loss(at_p_hat, ids, counts, reduction="none").abs().max() < 1e-5
    assert (sampled_kd_loss(student, ids, counts, reduction="none") > 0).all()


def test_sampled_loss_conventions():
    student, teacher, mask = make(B=3, T=6, V=25, seed=23)
    ids, counts = draw(teacher, 12, seed=3)
    per_pos = sampled_kd_loss(student, ids, counts, mask=mask, reduction="none")
    assert per_pos.dtype == torch.float32 and (per_pos[~mask] == 0).all()
    torch.testing.assert_close(sampled_kd_loss(student, ids, counts, mask=mask, reduction="sum"), per_pos.sum())
    torch.testing.assert_close(sampled_kd_loss(student, ids, counts, mask=mask), per_pos.sum() / mask.sum())
    # Masked-out positions may hold garbage; bf16 logits and int32 / float counts are accepted.
    off = ~mask.unsqueeze(-1)
    noisy = student.masked_fill(off, 3e38).to(torch.bfloat16).requires_grad_(True)
    got = sampled_kd_loss(noisy, ids.masked_fill(off, -5).int(), counts.float().masked_fill(off, float("nan")), mask=mask)
    want = sampled_kd_loss(student.to(torch.bfloat16).float(), ids, counts, mask=mask)
    torch.testing.assert_close(got, want)
    got.backward()
    assert torch.isfinite(noisy.grad.float()).all() and (noisy.grad[~mask] == 0).all()


def test_sampled_loss_refuses_temperature_and_bad_shapes():
    student, teacher, _ = make(V=10)
    ids, counts = draw(teacher, 8, seed=4)
    with pytest.raises(ValueError, match="temperature must be 1.0"):
        sampled_kd_loss(student, ids, counts, temperature=2.0)
    with pytest.raises(ValueError, match="sampled_ids"):
        sampled_kd_loss(student, ids, counts[..., :1])
    with pytest.raises(ValueError, match="reduction"):
        sampled_kd_loss(student, ids, counts, reduction="batchmean")


# ----------------------------------------------------------------------------------------------- padding


def padded_topk_batch(V=40, k=6, lengths=(5, 2, 7), seed=30):
    """A pad_collate batch of real top-k rows, plus student logits that are NOT neutral on the pad rows."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, L in enumerate(lengths):
        indices, logprobs = cache(torch.randn(1, L, V, generator=g) * 3, k)
        samples.append(
            {
                "input_ids": torch.randint(V, (L,), generator=g),
                "topk_indices": indices[0],
                "topk_logprobs": logprobs[0].half(),
                "logsumexp": torch.zeros(L),
                "sample_index": torch.tensor(i),
            }
        )
    batch = pad_collate(samples)
    student = torch.randn(len(lengths), max(lengths), V, generator=g) * 3  # (B, T, V)
    return batch, student


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_topk_pad_rows_count_for_nothing_without_a_mask(tail, reduction):
    batch, student = padded_topk_batch()
    pad = ~batch["attention_mask"]
    assert pad.any()
    losses, grads = [], []
    for mask in (batch["attention_mask"], None):
        s = student.clone().requires_grad_(True)
        loss = topk_kd_loss(s, batch["topk_indices"], batch["topk_logprobs"], mask=mask, tail=tail, reduction=reduction)
        loss.sum().backward()
        losses.append(loss.detach())
        grads.append(s.grad)
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0])
    assert (grads[1][pad] == 0).all()  # exactly: the old default measured 0.029 here
    assert (grads[1][~pad].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sampled_pad_rows_count_for_nothing_without_a_mask(reduction):
    student, teacher, mask = make(B=3, T=6, V=25, seed=31)
    ids, counts = draw(teacher, 16, seed=5)
    counts = counts.masked_fill(~mask.unsqueeze(-1), 0)  # padding: counts 0 (ids left as they were)
    losses, grads = [], []
    for m in (mask, None):
        s = student.clone().requires_grad_(True)
        loss = sampled_kd_loss(s, ids, counts, mask=m, reduction=reduction)
        loss.sum().backward()
        losses.append(loss.detach())
        grads.append(s.grad)
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0])
    assert (grads[1][~mask] == 0).all() and (grads[1][mask].abs().sum(-1) > 0).all()


# ---------------------------------------------------------------------------------------- chunks, memory


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 16, 1000])
def test_chunking_does_not_change_loss_or_gradient(chunk_rows):
    student, teacher, mask = make(B=3, T=7, V=50, seed=40)
    cases = [
        (topk_kd_loss, cache(teacher, 8), {"tail": "bucket"}),
        (topk_kd_loss, cache(teacher, 8), {"tail": "renormalize", "temperature": 2.0}),
        (sampled_kd_loss, draw(teacher, 16, seed=6), {}),
    ]
    for loss_fn, target, kwargs in cases:
        results = []
        for rows in (None, chunk_rows):
            s = student.clone().requires_grad_(True)
            # Sliced logits, as logits[:, :-1] of a model: not contiguous, must not be copied whole.
            wide = torch.cat([s, s[:, :1]], dim=1)[:, :-1]
            loss = loss_fn(wide, *target, mask=mask, reduction="none", chunk_rows=rows, **kwargs)
            (loss * torch.arange(loss.numel()).view_as(loss)).sum().backward()  # distinct weight per position
            results.append((loss.detach(), s.grad))
        torch.testing.assert_close(results[1][0], results[0][0])
        torch.testing.assert_close(results[1][1], results[0][1])


def test_nothing_logits_sized_is_saved_for_backward():
    """Autograd keeps the logits themselves (no copy) and nothing else of their size: no (B, T, V) float32 copy."""
    B, T, V = 2, 64, 4096
    student, teacher, _ = make(B=B, T=T, V=V, seed=41)
    logits = student.to(torch.bfloat16).requires_grad_(True)
    targets = {"topk": cache(teacher, 16), "sampled": draw(teacher, 32, seed=7)}
    for name, loss_fn in (("topk", topk_kd_loss), ("sampled", sampled_kd_loss)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = loss_fn(logits, *targets[name], chunk_rows=16)
        big = [t for t in saved if t.numel() * t.element_size() >= logits.numel() * logits.element_size() / 8]
        assert all(t.data_ptr() == logits.data_ptr() for t in big), [(t.shape, t.dtype) for t in big]
        loss.backward()


PEAK_SCRIPT = r"""
import json, sys, torch
from kd_core.loss import sampled_kd_loss, topk_kd_loss
torch.set_num_threads(1)
B, T, V, k = 4, 512, 8192, 32
g = torch.Generator().manual_seed(0)
logits = torch.randn(B, T, V, generator=g).requires_grad_(True)                     # 64 MiB float32
logprobs, indices = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).topk(k)
counts = torch.randint(0, 3, (B, T, k), generator=g)

def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

out = {"logits": logits.numel() * 4}
for name, fn, target in [("topk", topk_kd_loss, (indices, logprobs)), ("sampled", sampled_kd_loss, (indices, counts))]:
    logits.grad = None
    fn(logits, *target, chunk_rows=64).backward()                                    # warm up, then measure
    logits.grad = None
    reset(); base = hwm()
    fn(logits, *target, chunk_rows=64).backward()
    out[name] = hwm() - base
json.dump(out, sys.stdout)
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_stays_near_the_logits_size():
    """Peak resident memory of forward + backward, measured in a fresh process, above the logits themselves.

    glibc serves allocations above MALLOC_MMAP_THRESHOLD_ with mmap and returns them on free, so resident memory
    tracks what torch holds; VmHWM after clear_refs is the peak since the reset. The gradient (logits' size) is
    unavoidable; one 64-row chunk's float32 temporaries are 2 MiB each.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], env=env, capture_output=True, text=True, check=True)
    peak = json.loads(run.stdout)
    for name in ("topk", "sampled"):
        # The unchunked loss this replaced peaked at 4.0x the logits here (its float32, scatter and saved copies).
        assert peak[name] < 1.3 * peak["logits"], (name, peak)


# ---------------------------------------------------------------- student vocabularies wider or narrower than the teacher's

def padded(student, extra, value):
    """Student logits with `extra` columns of `value` appended: embedding rows padded past the teacher's vocabulary."""
    return torch.cat([student, torch.full((*student.shape[:-1], extra), value)], dim=-1)


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
def test_wider_student_equals_the_teacher_vocabulary_where_padded_rows_have_no_mass(tail):
    """Padded rows at -inf carry no student mass: the loss is the unpadded one; finite ones are pushed down."""
    student, teacher, mask = make(V=40, seed=5)
    indices, logprobs = cache(teacher, 8)
    want = topk_kd_loss(student, indices, logprobs, mask=mask, tail=tail, vocab_size=40)
    got = topk_kd_loss(padded(student, 24, float("-inf")), indices, logprobs, mask=mask, tail=tail, vocab_size=40)
    assert torch.allclose(got, want, atol=1e-6)
    ids, counts = draw(teacher, 16, seed=1)
    want = sampled_kd_loss(student, ids, counts, mask=mask)
    assert torch.allclose(sampled_kd_loss(padded(student, 24, float("-inf")), ids, counts, mask=mask, vocab_size=40),
                          want, atol=1e-6)
    wide = padded(student, 24, 2.0).requires_grad_()
    sampled_kd_loss(wide, ids, counts, mask=mask, vocab_size=40).backward()
    assert (wide.grad[..., 40:][mask] > 0).all()  # descent lowers the logits of ids the teacher never gives


def test_narrower_student_is_refused_with_one_line():
    student, teacher, mask = make(V=40, seed=6)
    indices, logprobs = cache(teacher, 8)
    with pytest.raises(ValueError, match=r"^student_logits has 30 columns, fewer than the teacher's vocabulary of 40[^\n]*$"):
        topk_kd_loss(student[..., :30], indices.clamp_max(29), logprobs, mask=mask, vocab_size=40)
    ids, counts = draw(teacher, 16, seed=2)
    with pytest.raises(ValueError, match="fewer than the teacher's vocabulary of 40"):
        sampled_kd_loss(student[..., :30], ids.clamp_max(29), counts, mask=mask, vocab_size=40)
    # Without vocab_size: an id the student has no column for is named, not a gather error.
    indices[0, 0, 0] = 35
    with pytest.raises(ValueError, match=r"^student_logits has 30 columns, but the cache holds teacher id \d+[^\n]*$"):
        topk_kd_loss(student[..., :30], indices, logprobs, mask=mask)
    with pytest.raises(ValueError, match="narrower than the teacher's"):
        sampled_kd_loss(student[..., :30], ids, counts, mask=mask)


# ------------------------------------------------------------------------------------ the other mode's fields


def test_topk_loss_refuses_a_sampled_batch():
    """sampled_ids / sampled_counts given to the top-k loss (integer counts, or counts cast to float: >= 1, which
    no log-probability is) are one clear error, not a loss computed on garbage."""
    student, teacher, mask = make(V=12)
    ids, counts = draw(teacher, 8, seed=5)
    ids = ids.clamp(max=11)
    for fed in (counts, counts.float(), counts.half()):
        with pytest.raises(ValueError, match=r"topk_logprobs.*sampled_counts.*sampled_kd_loss"):
            topk_kd_loss(student, ids, fed, mask=mask)


def test_sampled_loss_refuses_a_topk_batch():
    """topk_indices / topk_logprobs given to the sampled loss: log-probs are floats <= 0, never counts; today every
    row reads as padding and the loss is silently 0."""
    student, teacher, mask = make(V=12)
    indices, logprobs = cache(teacher, 4)
    for fed in (logprobs, logprobs.half()):
        with pytest.raises(ValueError, match=r"sampled_counts.*topk_logprobs.*topk_kd_loss"):
            sampled_kd_loss(student, indices, fed, mask=mask)


def test_the_mode_checks_ignore_positions_that_do_not_count():
    """Garbage where the mask is off stays allowed (the module's convention), and pad_collate's padding passes."""
    student, teacher, mask = make(V=12)
    indices, logprobs = cache(teacher, 4)
    topk_kd_loss(student, indices, logprobs.masked_fill(~mask.unsqueeze(-1), 7.0), mask=mask)
    ids, counts = draw(teacher, 8, seed=5)
    sampled_kd_loss(student, ids, counts.float().masked_fill(~mask.unsqueeze(-1), -3.0), mask=mask)
