"""Knowledge-distillation losses against a cached top-k teacher.

The cache stores, per position, the teacher's top-k token ids and their log-probabilities at temperature 1
(see DESIGN.md, "Cache format"). :func:`topk_kd_loss` trains a student from that cache; :func:`full_kd_loss` is
the full-vocabulary reference for when the teacher's logits are still at hand.

Both compute the forward KL divergence KL(p_teacher || q_student) per position, in float32, and share the
conventions below.

* Shapes: B batch, T sequence, V vocabulary, k cached entries per position. Row t is the distribution of the
  token at t+1; the caller passes the student's logits for the same rows.
* ``mask`` (B, T) bool is True where a position counts. Masked-out positions may hold any finite values
  (padding, garbage indices); they contribute exactly 0 to the loss and to the gradient.
* ``temperature`` tau: both distributions are softened by tau and the loss is multiplied by tau**2 (Hinton et
  al., 2015), so gradient magnitudes stay comparable across temperatures.
* ``reduction``: "mean" is the sum over masked-in positions divided by their count (0 when there are none),
  "sum" is the plain sum, "none" returns (B, T) with zeros at masked-out positions.
"""

import torch
import torch.nn.functional as F

TAILS = ("bucket", "renormalize", "ignore")
REDUCTIONS = ("mean", "sum", "none")
# Stored log-probs are fp16: one that underflowed to -inf is read as the most negative fp16 value, whose
# probability is exactly 0 in float32 (as it is at any temperature below ~600) but stays finite under softmax.
LOGPROB_FLOOR = torch.finfo(torch.float16).min


def topk_kd_loss(
    student_logits: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    tail: str = "bucket",
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Forward KL from a cached top-k teacher to the student, with the teacher's tail mass handled explicitly.

    Let :math:`K` be the k cached ids of a row, :math:`p_i = \exp(\ell_i)` the teacher's probabilities there
    and :math:`s` the student's logits. The top-k support plus one "rest of the vocabulary" outcome is a
    partition of the vocabulary into k+1 outcomes, on which both models have an exact distribution:

    .. math::

        P = (p_1, \dots, p_k,\ m), \quad m = 1 - \sum_{i \in K} p_i \qquad
        Q = (q_1, \dots, q_k,\ q_{rest}), \quad
        \log q_i = s_i - \operatorname{LSE}(s), \quad
        \log q_{rest} = \operatorname{LSE}_{j \notin K}(s_j) - \operatorname{LSE}(s)

    :math:`\log q_{rest}` is a log-sum-exp over the student's logits with the top-k positions set to
    :math:`-\infty` (no cancellation, unlike :math:`\log(1 - \sum_K q_i)`; it costs one (B, T, V) float32
    copy of the logits, which "renormalize" does without). The cache has no such luxury:
    :math:`m` is only known to the absolute precision of the stored probabilities (about 1e-7 in float32,
    1e-3 in fp16), and is clamped at 0, as rounding can push :math:`\sum_K p_i` slightly above 1. When k = V
    the bucket is empty and :math:`m = 0` exactly. Entries with zero teacher probability (e.g. fp16 log-probs
    that underflowed to :math:`-\infty`, read as the most negative fp16 value) contribute 0.

    ``tail`` picks the divergence:

    * ``"bucket"`` (default): the KL between the two (k+1)-outcome distributions,

      .. math:: \sum_{i \in K} p_i (\log p_i - \log q_i) + m (\log m - \log q_{rest}).

      A true divergence: :math:`\ge 0`, and 0 iff the student matches the teacher's top-k probabilities and
      tail mass. It lower-bounds the full-vocabulary KL (data-processing inequality), grows with k, and equals
      it exactly when the rest bucket holds at most one token (k >= V - 1).
    * ``"renormalize"``: the KL between both distributions conditioned on K,
      :math:`\tilde p_i = p_i / \sum_K p_j` and :math:`\tilde q_i = q_i / \sum_K q_j`. Also a divergence, but
      blind to how much mass the student puts outside K, so it is a biased target; exact for k = V.
    * ``"ignore"``: :math:`\sum_{i \in K} p_i (\log p_i - \log q_i)`, the bucket loss without its tail term
      (what many codebases compute). Not a divergence: it can be negative when the student puts more mass on
      K than the teacher does. Exact for k = V.

    Temperature: the cache holds :math:`\ell` at tau = 1, which fixes the tempered teacher on K only up to
    normalisation (:math:`p^\tau_i \propto p_i^{1/\tau}`); the tempered mass of the tail depends on its
    unknown shape. So the rest bucket is tempered as one outcome, on both sides alike: the losses above are
    evaluated on

    .. math:: P^\tau \propto P^{1/\tau}, \qquad Q^\tau \propto Q^{1/\tau},

    i.e. a softmax of the (k+1) "coarse logits" :math:`(\ell_1, \dots, \ell_k, \log m)/\tau` and
    :math:`(s_1, \dots, s_k, \operatorname{LSE}_{j \notin K}(s_j))/\tau`, and multiplied by tau**2. On K this
    is exactly softmax(logits / tau) up to normalisation; for tau = 1 or k >= V - 1 it is exactly standard
    tempered KD. For k < V - 1 and tau != 1 it treats the tail as if it were one token (for tau > 1 this
    under-weights the teacher's tempered tail, as :math:`\sum_j p_j^{1/\tau} \ge m^{1/\tau}`), but both models
    are compared on the same k+1 outcomes, so "bucket" stays a divergence. For tau > 1 it also magnifies the
    rounding error of a tiny :math:`m` (1e-7 becomes 3e-4 at tau = 2). "renormalize" needs no tail and is
    exact at any tau.

    Args:
        student_logits: (B, T, V) student logits, any float dtype; computed in float32.
        topk_indices: (B, T, k) int teacher top-k token ids (< V), distinct within a row.
        topk_logprobs: (B, T, k) float teacher log-probs at temperature 1, as stored (fp16 is fine).
        mask: (B, T) bool, True where the position counts. None: every position counts.
        temperature: tau > 0.
        tail: "bucket", "renormalize" or "ignore", see above.
        reduction: "mean", "sum" or "none", see the module docstring.

    Returns:
        A float32 scalar, or (B, T) for reduction="none".
    """
    _check(student_logits, mask, temperature, reduction)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    B, T, V = student_logits.shape
    k = topk_indices.shape[-1]
    if topk_indices.shape != (B, T, k) or topk_logprobs.shape != (B, T, k) or k > V:
        raise ValueError(
            f"topk_indices and topk_logprobs must both be (B, T, k) = ({B}, {T}, k <= {V}), "
            f"got {tuple(topk_indices.shape)} and {tuple(topk_logprobs.shape)}"
        )
    mask = _full_mask(student_logits, mask)  # (B, T)
    keep = mask.unsqueeze(-1)  # (B, T, 1)

    # Masked-out rows may hold anything: replace them with harmless values before any arithmetic.
    index = topk_indices.long().masked_fill(~keep, 0)  # (B, T, k)
    t_topk = topk_logprobs.float().clamp_min(LOGPROB_FLOOR).masked_fill(~keep, 0.0)  # (B, T, k)
    s_all = student_logits.float()  # (B, T, V)
    s_topk = s_all.gather(-1, index).masked_fill(~keep, 0.0)  # (B, T, k)

    if tail == "renormalize":
        log_p = F.log_softmax(t_topk / temperature, dim=-1)  # (B, T, k)
        log_q = F.log_softmax(s_topk / temperature, dim=-1)  # (B, T, k)
    else:
        # When k = V the rest bucket is empty: its mass is 0, not float32 rounding noise.
        tail_mass = (1.0 - t_topk.exp().sum(-1, keepdim=True)).clamp_min(0.0) * (k < V)  # (B, T, 1)
        s_rest = s_all.scatter(-1, index, float("-inf")).logsumexp(-1, keepdim=True)  # (B, T, 1)
        t_coarse = torch.cat([t_topk, tail_mass.log()], dim=-1)  # (B, T, k+1)
        s_coarse = torch.cat([s_topk, s_rest.masked_fill(~keep, 0.0)], dim=-1)  # (B, T, k+1)
        log_p = F.log_softmax(t_coarse / temperature, dim=-1)  # (B, T, k+1)
        log_q = F.log_softmax(s_coarse / temperature, dim=-1)  # (B, T, k+1)
        if tail == "ignore":
            log_p, log_q = log_p[..., :k], log_q[..., :k]  # (B, T, k)

    loss = _kl(log_p, log_q) * temperature**2  # (B, T)
    return _reduce(loss, mask, reduction)


def full_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Full-vocabulary forward KL, the reference :func:`topk_kd_loss` approximates.

    .. math::

        \tau^2 \sum_{v=1}^{V} p^\tau_v (\log p^\tau_v - \log q^\tau_v), \quad
        p^\tau = \operatorname{softmax}(z / \tau), \quad q^\tau = \operatorname{softmax}(s / \tau)

    Args:
        student_logits: (B, T, V) student logits s, any float dtype; computed in float32.
        teacher_logits: (B, T, V) teacher logits z (or log-probs), any float dtype.
        mask: (B, T) bool, True where the position counts. None: every position counts.
        temperature: tau > 0.
        reduction: "mean", "sum" or "none", see the module docstring.

    Returns:
        A float32 scalar, or (B, T) for reduction="none".
    """
    _check(student_logits, mask, temperature, reduction)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must match student_logits {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    mask = _full_mask(student_logits, mask)  # (B, T)
    keep = mask.unsqueeze(-1)  # (B, T, 1)
    log_p = F.log_softmax(teacher_logits.float().masked_fill(~keep, 0.0) / temperature, dim=-1)  # (B, T, V)
    log_q = F.log_softmax(student_logits.float().masked_fill(~keep, 0.0) / temperature, dim=-1)  # (B, T, V)
    loss = _kl(log_p, log_q) * temperature**2  # (B, T)
    return _reduce(loss, mask, reduction)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) over the last dim, with 0 log 0 = 0: (B, T, n) -> (B, T)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def _reduce(loss: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Zero masked-out positions of (B, T) `loss`, then reduce: mean over counted positions, sum, or none."""
    loss = loss.masked_fill(~mask, 0.0)  # (B, T)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / mask.sum().clamp_min(1)


def _full_mask(student_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    return mask.bool()


def _check(student_logits: torch.Tensor, mask: torch.Tensor | None, temperature: float, reduction: str) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be (B, T, V), got shape {tuple(student_logits.shape)}")
    if mask is not None and mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask must be (B, T) = {tuple(student_logits.shape[:2])}, got {tuple(mask.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
