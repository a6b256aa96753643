"""Knowledge-distillation losses against a cached teacher: top-k, sampled, and the full-vocabulary reference.

A cache stores, per position, either the teacher's top-k token ids and log-probabilities at temperature 1, or
(sampled mode) the distinct ids of N draws from the teacher at temperature 1 and how often each was drawn (see
DESIGN.md, "Cache format"). :func:`topk_kd_loss` and :func:`sampled_kd_loss` train a student from those;
:func:`full_kd_loss` is the full-vocabulary reference for when the teacher's logits are at hand.

All three measure the forward KL divergence KL(p_teacher || q_student) per position, in float32, or an estimate
of it (each docstring says exactly which), and share these conventions:

* Shapes: B batch, T sequence, V vocabulary, k (or m) cached entries per position. Row t is the distribution of
  the token at t+1; the caller passes the student's logits for the same rows.
* A position counts when ``mask`` (B, T) is True there (None: everywhere) and the cache holds a teacher
  distribution there. Padding as :func:`kd_core.dataset.pad_collate` writes it (top-k log-probs all -inf,
  sampled counts all 0) holds none, so it counts for nothing even when the caller forgets the mask. Positions
  that do not count may hold any values (garbage ids, NaN, huge logits); they contribute exactly 0 to the loss
  and to the gradient.
* The other mode's fields are refused (ValueError naming the right loss): top-k log-probs are floats <= 0 and
  draw counts are >= 0, so a sampled batch given to :func:`topk_kd_loss` (integer or positive "log-probs") or a
  top-k batch given to :func:`sampled_kd_loss` (negative "counts") is caught where a position counts.
* ``reduction``: "mean" is the sum over counted positions divided by their count (0 when there are none), "sum"
  is the plain sum, "none" returns (B, T) with zeros where a position does not count.
* Memory: the cached losses work through the rows in chunks of about CHUNK_BYTES of float32 logits and recompute
  each chunk in the backward pass, saving only their inputs. Beyond the student's logits, peak memory is the
  gradient (the logits' size and dtype, which any loss must return) plus one chunk's float32 working set;
  no (B, T, V) float32 copy is ever made.
"""

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

TAILS = ("bucket", "renormalize", "ignore")
REDUCTIONS = ("mean", "sum", "none")
# Stored log-probs are fp16: one that underflowed to -inf is read as the most negative fp16 value, whose
# probability is exactly 0 in float32 (as it is at any temperature below ~600) but stays finite under softmax.
LOGPROB_FLOOR = torch.finfo(torch.float16).min
# Float32 logits per chunk of rows. Small enough that a chunk's few float32 temporaries stay far below the logits
# of a real batch (16k tokens x 152k vocabulary is 9.7 GB in bf16); large enough that a GPU stays busy.
CHUNK_BYTES = 64 << 20


def topk_kd_loss(
    student_logits: torch.Tensor,
    topk_indices: torch.Tensor,
    topk_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    tail: str = "bucket",
    reduction: str = "mean",
    *,
    chunk_rows: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    r"""KL from a cached top-k teacher to the student on a coarsened vocabulary; a lower bound or a biased target.

    Let :math:`K` be the k cached ids of a row, :math:`p_i = \exp(\ell_i)` the teacher's probabilities there
    and :math:`s` the student's logits. The top-k support plus one "rest of the vocabulary" outcome is a
    partition of the vocabulary into k+1 outcomes, on which both models have an exact distribution:

    .. math::

        P = (p_1, \dots, p_k,\ m), \quad m = 1 - \sum_{i \in K} p_i \qquad
        Q = (q_1, \dots, q_k,\ q_{rest}), \quad
        \log q_i = s_i - \operatorname{LSE}(s), \quad
        \log q_{rest} = \operatorname{LSE}_{j \notin K}(s_j) - \operatorname{LSE}(s)

    :math:`\log q_{rest}` is a log-sum-exp over the student's logits with the top-k positions set to
    :math:`-\infty` (no cancellation, unlike :math:`\log(1 - \sum_K q_i)`). :math:`m` is only known to the
    absolute precision of the stored probabilities (about 1e-7 in float32, 1e-3 in fp16) and is clamped at 0, as
    rounding can push :math:`\sum_K p_i` slightly above 1. When k = V the bucket is empty and :math:`m = 0`
    exactly. Entries with zero teacher probability (fp16 log-probs that underflowed to :math:`-\infty`) contribute
    0. A row whose entries are all :math:`-\infty` is padding (a real row's top-1 has :math:`p \ge 1/V`).

    ``tail`` picks the divergence. At temperature 1:

    * ``"bucket"`` (default): the KL between the two (k+1)-outcome distributions,

      .. math:: \sum_{i \in K} p_i (\log p_i - \log q_i) + m (\log m - \log q_{rest}).

      A true divergence: :math:`\ge 0`, and 0 iff the student matches the teacher's top-k probabilities and
      tail mass. It is a LOWER BOUND of the full-vocabulary KL, not equal to it (data-processing inequality:
      the KL of the coarsened distributions), grows with k, and equals it exactly only when the rest bucket
      holds at most one token (k >= V - 1). Its gradient pulls the student's tail mass toward m as a whole and
      says nothing about how the student spreads it inside the tail.
    * ``"renormalize"``: the KL between both distributions conditioned on K,
      :math:`\tilde p_i = p_i / \sum_K p_j` and :math:`\tilde q_i = q_i / \sum_K q_j`. Also a divergence, but
      blind to how much mass the student puts outside K, so it is a biased target; exact for k = V.
    * ``"ignore"``: :math:`\sum_{i \in K} p_i (\log p_i - \log q_i)`, the bucket loss without its tail term
      (what many codebases compute). Not a divergence: it can be negative when the student puts more mass on
      K than the teacher does. Exact for k = V.

    Temperature tau: the result is multiplied by tau**2 (Hinton et al., 2015). The cache holds :math:`\ell` at
    tau = 1, which fixes the tempered teacher on K only up to normalisation (:math:`p^\tau_i \propto
    p_i^{1/\tau}`); the tempered mass of the tail depends on its unknown shape, and no stored number (the
    logsumexp included) recovers it. So "bucket" and "ignore" temper the rest bucket as one outcome, on both
    sides alike: they are evaluated on

    .. math:: P^\tau \propto P^{1/\tau}, \qquad Q^\tau \propto Q^{1/\tau},

    i.e. a softmax of the (k+1) "coarse logits" :math:`(\ell_1, \dots, \ell_k, \log m)/\tau` and
    :math:`(s_1, \dots, s_k, \operatorname{LSE}_{j \notin K}(s_j))/\tau`. For k >= V - 1 this is exactly
    standard tempered KD. For k < V - 1 and tau != 1 it is NOT: it treats the tail as if it were one token (for
    tau > 1 this under-weights the teacher's tempered tail, as :math:`\sum_j p_j^{1/\tau} \ge m^{1/\tau}`) and
    magnifies the rounding error of a tiny :math:`m` (1e-7 becomes 3e-4 at tau = 2); it stays a divergence, as
    both models are compared on the same k+1 outcomes. That case warns (UserWarning). "renormalize" is the
    standard tempered KD of the conditioned distributions at any tau.

    Args:
        student_logits: (B, T, V) student logits, any float dtype; computed in float32.
        topk_indices: (B, T, k) int teacher top-k token ids (< V), distinct within a row.
        topk_logprobs: (B, T, k) float teacher log-probs at temperature 1, as stored (fp16 is fine).
        mask: (B, T) bool, True where the position counts. None: every position with a teacher row counts.
        temperature: tau > 0.
        tail: "bucket", "renormalize" or "ignore", see above.
        reduction: "mean", "sum" or "none", see the module docstring.
        chunk_rows: rows per chunk; None picks about CHUNK_BYTES of float32 logits per chunk.
        vocab_size: the teacher's vocabulary (the cache's vocab_size attribute); see _check_vocab for V above or
            below it.

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
    if tail != "renormalize" and temperature != 1.0 and k < V - 1:
        warnings.warn(
            f"topk_kd_loss(tail={tail!r}, temperature={temperature}) with k={k} < V-1 tempers the teacher's tail "
            "as one token: not standard tempered KD (see its docstring); use temperature=1 or tail='renormalize'",
            UserWarning,
            stacklevel=2,
        )
    has_teacher = (topk_logprobs > float("-inf")).any(-1)  # (B, T): False on padding
    counted = _full_mask(student_logits, mask) & has_teacher  # (B, T)
    _refuse_counts(topk_logprobs, counted)
    _check_vocab(V, vocab_size, topk_indices, counted.unsqueeze(-1))
    row_loss = _topk_row_loss(k < V, temperature, tail)
    loss = _chunked(row_loss, student_logits, counted, chunk_rows, topk_indices, topk_logprobs)  # (B, T)
    return _reduce(loss, counted, reduction)


def sampled_kd_loss(
    student_logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    sampled_counts: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    *,
    chunk_rows: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    r"""Random-sampling KD ("Sparse Logit Sampling", Anshumann et al., ACL 2025): an unbiased full-KL gradient.

    A sampled cache holds, per row, the distinct ids :math:`j` of N draws from the teacher's softmax at
    temperature 1 and their counts :math:`c_j` (:math:`\sum_j c_j = N`). Their empirical distribution
    :math:`\hat p_j = c_j / N` is an unbiased estimate of the teacher's full distribution:
    :math:`E[\hat p] = p` on every token of the vocabulary, the tail included. The student's
    :math:`\log q = \operatorname{log\_softmax}(s)` is over the FULL vocabulary (a softmax restricted to the
    drawn ids would make the estimate biased). The loss of a row is

    .. math:: \operatorname{KL}(\hat p \,\|\, q) = \sum_j \hat p_j (\log \hat p_j - \log q_j)
              = H(\hat p, q) - H(\hat p),

    a divergence (:math:`\ge 0`, 0 iff the student equals the empirical distribution), whose gradient with
    respect to the student's logits is that of the cross-entropy :math:`H(\hat p, q)`, :math:`q - \hat p`
    (the entropy :math:`H(\hat p)` does not depend on the student). Its expectation over the draws is
    :math:`q - p`, exactly the gradient of the full-vocabulary forward KL(p || q): the estimator is
    unbiased in the gradient, with a variance that falls as 1/N. Its VALUE is not an unbiased estimate of
    KL(p || q): :math:`E[\operatorname{KL}(\hat p \| q)] = \operatorname{KL}(p \| q) + H(p) - E[H(\hat p)]`,
    an overestimate by the entropy the finite sample misses (0 for a one-hot teacher; at most :math:`H(p)`,
    and large when the teacher's entropy is near or above log N). Use it for training; measure KL on held-out
    data with the teacher's full logits (:func:`full_kd_loss`).

    Temperature: in the paper, the draws come from a proposal distribution and importance weights
    :math:`p_j / \text{proposal}_j` make the target unbiased for the teacher at temperature 1; with the teacher
    itself as the proposal (its choice, and what cache.mode=sampled stores) every weight is 1 and the target is
    :math:`c / N`. A tempered teacher :math:`p^{1/\tau} / Z_\tau` cannot be estimated from such draws without
    the teacher's probabilities, which the cache does not store, and tempering :math:`\hat p` is biased. So
    the sampled loss is defined at temperature 1 only, as in the paper's distillation: any other value is
    refused (ValueError) rather than silently computing a different objective.

    Args:
        student_logits: (B, T, V) student logits, any float dtype; computed in float32.
        sampled_ids: (B, T, m) int distinct drawn token ids (< V); ids where the count is 0 are ignored.
        sampled_counts: (B, T, m) int (or float) draw counts, >= 0; count 0 is padding. Rows may have different
            totals N; a row whose counts are all 0 is padding and does not count.
        mask: (B, T) bool, True where the position counts. None: every position with draws counts.
        temperature: must be 1.0, see above (kept for the same call shape as :func:`topk_kd_loss`).
        reduction: "mean", "sum" or "none", see the module docstring.
        chunk_rows: rows per chunk; None picks about CHUNK_BYTES of float32 logits per chunk.
        vocab_size: the teacher's vocabulary (the cache's vocab_size attribute); see _check_vocab.

    Returns:
        A float32 scalar, or (B, T) for reduction="none".
    """
    _check(student_logits, mask, temperature, reduction)
    if temperature != 1.0:
        raise ValueError(
            f"sampled_kd_loss: temperature must be 1.0, got {temperature}: the cache's draws are at temperature 1 "
            "and a tempered teacher cannot be estimated from them without bias (see the docstring)"
        )
    B, T, V = student_logits.shape
    m = sampled_ids.shape[-1]
    if sampled_ids.shape != (B, T, m) or sampled_counts.shape != (B, T, m):
        raise ValueError(
            f"sampled_ids and sampled_counts must both be (B, T, m) with B, T = {B}, {T}, "
            f"got {tuple(sampled_ids.shape)} and {tuple(sampled_counts.shape)}"
        )
    _refuse_logprobs(sampled_counts, _full_mask(student_logits, mask))
    has_teacher = (sampled_counts > 0).any(-1)  # (B, T): False on padding
    counted = _full_mask(student_logits, mask) & has_teacher  # (B, T)
    _check_vocab(V, vocab_size, sampled_ids, counted.unsqueeze(-1) & (sampled_counts > 0))
    loss = _chunked(_sampled_row_loss, student_logits, counted, chunk_rows, sampled_ids, sampled_counts)  # (B, T)
    return _reduce(loss, counted, reduction)


def full_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Full-vocabulary forward KL, the reference the cached losses approximate.

    .. math::

        \tau^2 \sum_{v=1}^{V} p^\tau_v (\log p^\tau_v - \log q^\tau_v), \quad
        p^\tau = \operatorname{softmax}(z / \tau), \quad q^\tau = \operatorname{softmax}(s / \tau)

    Not chunked: it takes the teacher's (B, T, V) logits, so memory is the caller's choice already.

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


# ------------------------------------------------------------------------------------------ per-row losses
# Each takes one chunk: s (b, t, V) float32 student logits, keep (b, t) bool, then the chunk's cache rows, and
# returns (b, t) float32 with 0 where keep is False. Rows that do not count are overwritten with harmless values
# first, so that garbage there (NaN, out-of-range ids, 3e38 logits) cannot reach the gradient as 0 * NaN.

RowLoss = Callable[..., torch.Tensor]


def _topk_row_loss(has_tail: bool, temperature: float, tail: str) -> RowLoss:
    def row_loss(s: torch.Tensor, keep: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        off = ~keep.unsqueeze(-1)  # (b, t, 1)
        s = s.masked_fill(off, 0.0)  # (b, t, V)
        index = indices.long().masked_fill(off, 0)  # (b, t, k)
        t_topk = logprobs.float().clamp_min(LOGPROB_FLOOR).masked_fill(off, 0.0)  # (b, t, k)
        s_topk = s.gather(-1, index)  # (b, t, k)
        if tail == "renormalize":
            log_p = F.log_softmax(t_topk / temperature, dim=-1)  # (b, t, k)
            log_q = F.log_softmax(s_topk / temperature, dim=-1)  # (b, t, k)
        else:
            # When k = V the rest bucket is empty: its mass is 0, not float32 rounding noise.
            tail_mass = (1.0 - t_topk.exp().sum(-1, keepdim=True)).clamp_min(0.0) * has_tail  # (b, t, 1)
            s_rest = s.scatter(-1, index, float("-inf")).logsumexp(-1, keepdim=True)  # (b, t, 1)
            t_coarse = torch.cat([t_topk, tail_mass.log()], dim=-1)  # (b, t, k+1)
            s_coarse = torch.cat([s_topk, s_rest.masked_fill(off, 0.0)], dim=-1)  # (b, t, k+1)
            log_p = F.log_softmax(t_coarse / temperature, dim=-1)  # (b, t, k+1)
            log_q = F.log_softmax(s_coarse / temperature, dim=-1)  # (b, t, k+1)
            if tail == "ignore":
                log_p, log_q = log_p[..., :-1], log_q[..., :-1]  # (b, t, k)
        return (_kl(log_p, log_q) * temperature**2).masked_fill(~keep, 0.0)  # (b, t)

    return row_loss


def _sampled_row_loss(s: torch.Tensor, keep: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    off = ~keep.unsqueeze(-1)  # (b, t, 1)
    counts = counts.float().clamp_min(0.0).masked_fill(off, 0.0)  # (b, t, m)
    p_hat = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)  # (b, t, m): c / N, 0 on padding
    index = ids.long().masked_fill(off | (counts == 0), 0)  # (b, t, m): padding ids may be anything
    log_q = F.log_softmax(s.masked_fill(off, 0.0), dim=-1).gather(-1, index)  # (b, t, m)
    log_p_hat = torch.where(p_hat > 0, p_hat, 1.0).log()  # (b, t, m): log 1 = 0 where p_hat = 0
    return torch.where(p_hat > 0, p_hat * (log_p_hat - log_q), 0.0).sum(-1).masked_fill(~keep, 0.0)  # (b, t)


# -------------------------------------------------------------------------------------------- chunking


class _ChunkedRows(torch.autograd.Function):
    """Apply row_loss to (B, T, V) logits chunk by chunk; in backward, recompute each chunk and fill the gradient.

    Saves only its inputs (no copies), so beyond the logits the forward pass holds one chunk's float32
    temporaries and the backward pass the (B, T, V) gradient in the logits' dtype plus one chunk's temporaries.
    Chunks are index views (a batch slice and a sequence slice), so sliced logits such as logits[:, :-1] are
    never copied whole.
    """

    @staticmethod
    def forward(ctx, row_loss: RowLoss, chunk_rows: int, logits: torch.Tensor, keep: torch.Tensor, *cache):
        out = torch.zeros(keep.shape, dtype=torch.float32, device=logits.device)  # (B, T)
        for rows in _chunks(*keep.shape, chunk_rows):
            out[rows] = row_loss(logits[rows].float(), keep[rows], *(c[rows] for c in cache))
        ctx.row_loss, ctx.chunk_rows = row_loss, chunk_rows
        ctx.save_for_backward(logits, keep, *cache)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, keep, *cache = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # (B, T, V), the logits' dtype
        for rows in _chunks(*keep.shape, ctx.chunk_rows):
            if not keep[rows].any():
                continue  # padding only: its gradient is exactly 0
            with torch.enable_grad():
                s = logits[rows].detach().float().requires_grad_(True)  # (b, t, V)
                loss = ctx.row_loss(s, keep[rows], *(c[rows] for c in cache))  # (b, t)
                (g,) = torch.autograd.grad(loss, s, grad_out[rows])
            grad[rows] = g.to(grad.dtype)
        return None, None, grad, None, *(None for _ in cache)


def _chunks(B: int, T: int, chunk_rows: int) -> list[tuple[slice, slice]]:
    """(batch slice, sequence slice) pairs of about chunk_rows positions each, covering (B, T) once."""
    if T <= chunk_rows:
        step = chunk_rows // T
        return [(slice(b, min(b + step, B)), slice(0, T)) for b in range(0, B, step)]
    return [(slice(b, b + 1), slice(t, min(t + chunk_rows, T))) for b in range(B) for t in range(0, T, chunk_rows)]


def _chunked(
    row_loss: RowLoss, student_logits: torch.Tensor, counted: torch.Tensor, chunk_rows: int | None, *cache
) -> torch.Tensor:
    """Per-position loss (B, T) of row_loss over (B, T, V) logits and (B, T, ...) cache tensors, in chunks."""
    if chunk_rows is None:
        chunk_rows = CHUNK_BYTES // (4 * student_logits.shape[-1])
    return _ChunkedRows.apply(row_loss, max(1, int(chunk_rows)), student_logits, counted, *cache)


# ------------------------------------------------------------------------------------------------ shared


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) over the last dim, with 0 log 0 = 0: (..., n) -> (...)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def _reduce(loss: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Zero positions of (B, T) `loss` that do not count, then reduce: mean over counted positions, sum, or none."""
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


def _check_vocab(V: int, vocab_size: int | None, ids: torch.Tensor, real: torch.Tensor) -> None:
    """Student logits (.., V) against the teacher's vocabulary. Wider (V > vocab_size: embedding rows padded to a
    multiple of 64 or 128, as in Qwen and Llama checkpoints) is accepted as is: the extra columns are ids the
    teacher gives probability 0, so they stay in the student's softmax and the loss moves mass off them (the
    full-vocabulary KL with p = 0 there). Narrower is refused: the teacher's ids past V have no student logit.
    vocab_size None: the ids the loss would use (`real`, broadcast over `ids`) are checked against V instead."""
    if vocab_size is not None:
        if V < vocab_size:
            raise ValueError(f"student_logits has {V} columns, fewer than the teacher's vocabulary of {vocab_size}: "
                             "the student must cover every teacher id (a wider, padded vocabulary is fine)")
        return
    used = ids.masked_select(real.expand_as(ids))
    if used.numel() and (top := int(used.max())) >= V:
        raise ValueError(f"student_logits has {V} columns, but the cache holds teacher id {top}: the student's "
                         "vocabulary is narrower than the teacher's (a wider, padded vocabulary is fine)")


# A log-probability is <= 0 (fp16 rounding keeps it so); a draw count that is not padding is >= 1.
_MAX_LOGPROB = 1e-3


def _refuse_counts(topk_logprobs: torch.Tensor, counted: torch.Tensor) -> None:
    """ValueError when (B, T, k) `topk_logprobs` are a sampled cache's counts: integers, or floats above 0 where a
    position counts. One host sync (a sampled batch would otherwise train on garbage without a word)."""
    if topk_logprobs.is_floating_point() and not bool(((topk_logprobs > _MAX_LOGPROB) & counted.unsqueeze(-1)).any()):
        return
    seen = topk_logprobs.dtype if not topk_logprobs.is_floating_point() else "values above 0"
    raise ValueError(f"topk_kd_loss: topk_logprobs must be log-probabilities (floats <= 0), got {seen}: this looks "
                     "like a sampled cache's sampled_ids / sampled_counts; use sampled_kd_loss(student_logits, "
                     "batch['sampled_ids'], batch['sampled_counts'], mask=...) for a cache made with cache.mode=sampled")


def _refuse_logprobs(sampled_counts: torch.Tensor, keep: torch.Tensor) -> None:
    """ValueError when (B, T, m) `sampled_counts` are a top-k cache's log-probs: negative where a position counts
    (every row would read as padding and the loss be a silent 0). One host sync."""
    if not bool(((sampled_counts < 0) & keep.unsqueeze(-1)).any()):
        return
    raise ValueError("sampled_kd_loss: sampled_counts must be draw counts (>= 0), got negative values: this looks "
                     "like a top-k cache's topk_indices / topk_logprobs; use topk_kd_loss(student_logits, "
                     "batch['topk_indices'], batch['topk_logprobs'], mask=...) for a cache made with cache.mode=topk")


def _check(student_logits: torch.Tensor, mask: torch.Tensor | None, temperature: float, reduction: str) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be (B, T, V), got shape {tuple(student_logits.shape)}")
    if mask is not None and mask.shape != student_logits.shape[:2]:
        raise ValueError(f"mask must be (B, T) = {tuple(student_logits.shape[:2])}, got {tuple(mask.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
