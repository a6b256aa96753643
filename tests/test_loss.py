"""kd_core.loss: the top-k KD loss against the full-vocabulary reference, its tail options, masking, fp16, grads."""

import pytest
import torch
import torch.nn.functional as F

from kd_core.loss import full_kd_loss, topk_kd_loss


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
    same = topk_kd_loss(teacher, *cache(teacher, k), mask=mask, temperature=temperature, reduction="none")
    assert same.abs().max() < 1e-6
    other = topk_kd_loss(student, *cache(teacher, k), mask=mask, temperature=temperature, reduction="none")
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
    logprobs[0, 1] = -70000.0  # every entry negligible: the tail holds everything
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
    torch.testing.assert_close(topk_kd_loss(student, indices, logprobs, temperature=tau, reduction="none"), want)


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
