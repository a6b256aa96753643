"""Check cached rows against the teacher recomputed one sample at a time, without batching or padding.

The reference is the teacher's body run alone on the sample in `dtype` (float32 by default: a float32 copy of
the teacher is made when it was loaded in another dtype, twice its float32 size in memory, briefly), and its
output layer in float64 on those hidden states (the model's own logits for models that post-process them). For a
teacher spread over devices by device_map, load it with teacher.dtype=float32 and pass that instead: no copy.

What is exact: the pipeline's head is float32 on the body's hidden states (kd_core.inference.Float32Head), so a
float32 teacher's cache matches at float16-rounding tolerances. A bf16 teacher's body still runs in bf16 and its
GEMM kernels depend on the batch's shape, so its rows move by bf16 rounding of the hidden states with the batch:
check such a cache with dtype=teacher.dtype and tolerances that fit that dtype (kd-cache verify does).

Sampled rows (sampled_ids, sampled_counts) are checked for their layout (counts sum to N, ids distinct and
ascending, padding only at the end), for draws the sampler can never make (an id the reference gives
probability < IMPOSSIBLE), draw by draw, and by a chi-square test of all draws against the reference
probabilities (kd_core.sampling.FitAccumulator): `ok` needs its p-value above `alpha` (a correct cache fails with
probability at most alpha). Draw by draw: the draws are seeded by (sample_index, position, draw), so they are
drawn again from the reference and compared; a stored draw may differ from its redraw only where the reference's
CDF, moved by what the dtype explains (log-probs off by at most `draw_tol` move it by at most
expm1(draw_tol) of mass), crosses the draw's target (kd_core.sampling.draw_ranges). The draws come from float32
logits, not from fp16 storage, so draw_tol is the logits' own tolerance: 1e-3 for float32 (the body's kernels
vary by far less), 5e-2 for a bf16 body (kd-cache verify's half-precision tolerances). A count moved from one id
to another is caught unless that one draw sat within the tolerance of the boundary between the two ids. A sampled
cache stores no logsumexp (its loss needs none): the redraw is what ties its rows to the teacher.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kd_core.config import TeacherConfig
from kd_core.errors import CacheFileError
from kd_core.sampling import CDF_SCALE, FitAccumulator, FitReport, draw_ranges, explained
from kd_core.inference import has_plain_head
from kd_core.teacher import Teacher

# A drawn id whose reference probability is below this cannot have come from the sampler (it never draws
# p < 2**-40); the margin leaves room for a bf16 body's rounding.
IMPOSSIBLE = 1e3 / CDF_SCALE
_HEAD_ROWS = 256  # rows per float64 head chunk: 256 x V x 8 bytes


@dataclass
class VerifyReport:
    """Worst-case errors of stored rows against the recomputed reference, and the tolerances `ok` uses."""

    samples: int = 0
    positions: int = 0
    max_logprob_error: float = 0.0  # max |stored - reference| log-prob over stored entries
    max_logsumexp_error: float = 0.0
    topk_mismatches: int = 0  # positions whose stored ids are not the reference's top-k (ties aside)
    logprob_outliers: int = 0  # stored entries off by more than rtol * |reference| + atol
    rtol: float = 2e-3  # fp16 keeps 11 significant bits: rounding is <= 2**-11 * |x|, well inside 2e-3
    atol: float = 1e-3
    lse_tol: float = 1e-2
    # Sampled rows only:
    layout_errors: int = 0  # rows whose counts do not sum to N, or ids not distinct ascending / padding misplaced
    impossible_draws: int = 0  # drawn ids the reference gives probability < IMPOSSIBLE
    draw_mismatches: int = 0  # rows whose draws are not the seeded redraw, beyond the flips the tolerance explains
    fit: FitReport | None = None  # chi-square of all draws against the reference probabilities
    alpha: float = 1e-6
    draw_tol: float = 1e-3  # log-prob error of the logits the draws were made from (see the module docstring)

    @property
    def ok(self) -> bool:
        sampled_ok = self.fit is None or (
            self.layout_errors == 0 and self.impossible_draws == 0 and self.draw_mismatches == 0
            and self.fit.p_value > self.alpha
        )
        return (
            self.logprob_outliers == 0
            and self.max_logsumexp_error <= self.lse_tol
            and self.topk_mismatches == 0
            and sampled_ok
        )


def teacher_to_verify(attrs: dict[str, Any], model: str | None = None,
                      trust_remote_code: bool = False) -> TeacherConfig:
    """The teacher to recompute a cache with: its model and revision from the cache's attributes (unless `model`
    is given), and trust_remote_code only from the caller, never from the file (a cache may be crafted)."""
    recorded = attrs.get("teacher_model")
    if model is None and not isinstance(recorded, str):
        raise CacheFileError("the cache names no teacher (attribute teacher_model); pass --teacher MODEL.")
    revision = None if model is not None else attrs.get("teacher_revision")
    return TeacherConfig(model=model or recorded, revision=revision if isinstance(revision, str) else None,
                         trust_remote_code=trust_remote_code)


def _get(row: Any, name: str) -> np.ndarray | None:
    value = row.get(name) if isinstance(row, dict) else getattr(row, name, None)
    return None if value is None else np.asarray(value)


def reference_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(1, L) tokens -> (L, V) float32 logits: the body in its dtype, the plain linear head in float64."""
    if not has_plain_head(model):
        return model(input_ids=tokens, use_cache=False).logits[0].float()
    head = model.get_output_embeddings()
    weight = head.weight.double()  # (V, H), once per sample
    # Under device_map the body's output comes back on its last layer's device, not necessarily the head's.
    hidden = model.base_model(input_ids=tokens, use_cache=False).last_hidden_state[0].to(weight.device).double()
    bias = head.bias.double() if head.bias is not None else None
    return torch.cat([torch.nn.functional.linear(h, weight, bias).float() for h in hidden.split(_HEAD_ROWS)])


def verify_rows(
    teacher: Teacher,
    rows: Iterable[Any],
    *,
    top_k: int | None = None,
    dtype: torch.dtype = torch.float32,
    rtol: float = 2e-3,
    atol: float = 1e-3,
    lse_tol: float = 1e-2,
    draws: int | None = None,
    alpha: float = 1e-6,
    draw_tol: float = 1e-3,
) -> VerifyReport:
    """Recompute each sample alone and compare. rows: SampleRows, or the reader's dicts of arrays.

    Top-k rows (top_k given): a position is a top-k mismatch when a stored id's reference log-prob is below the
    reference's k-th best by more than the tolerance (so ties at the k-th place are not counted), or when an id
    is stored twice. Sampled rows (draws given): see the module docstring.
    """
    model = teacher.model if teacher.dtype == dtype else copy.deepcopy(teacher.model).to(dtype)
    report = VerifyReport(rtol=rtol, atol=atol, lse_tol=lse_tol, alpha=alpha, draw_tol=draw_tol)
    fit = FitAccumulator() if draws is not None else None
    with torch.inference_mode():
        for row in rows:
            input_ids, lse = _get(row, "input_ids"), _get(row, "logsumexp")  # lse: None in a sampled cache
            tokens = torch.from_numpy(input_ids.astype(np.int64))[None].to(teacher.device)  # (1, L)
            logits = reference_logits(model, tokens)  # (L, V) float32
            ref_lse = logits.logsumexp(-1)  # (L,)
            ref = logits - ref_lse[:, None]  # (L, V): one sample, so at most max_length * V floats
            if fit is None:
                _check_topk(report, row, ref, top_k)
            else:
                _check_sampled(report, fit, row, ref, draws)
            if lse is not None:  # a sampled cache stores none
                lse_err = (torch.from_numpy(lse.astype(np.float32)).to(ref.device) - ref_lse).abs()
                report.max_logsumexp_error = max(report.max_logsumexp_error, lse_err.max().item())
            report.samples += 1
            report.positions += len(input_ids)
    if fit is not None:
        report.fit = fit.report()
    return report


def _check_topk(report: VerifyReport, row: Any, ref: torch.Tensor, top_k: int) -> None:
    ids, logprobs = _get(row, "topk_indices"), _get(row, "topk_logprobs")
    rtol, atol = report.rtol, report.atol
    if ids.shape != (len(ref), top_k):
        raise ValueError(f"topk_indices has shape {ids.shape}, expected {(len(ref), top_k)}")
    ids = torch.from_numpy(ids.astype(np.int64)).to(ref.device)  # (L, k)
    at_stored = ref.gather(1, ids)  # (L, k) reference log-probs of the stored ids
    stored = torch.from_numpy(logprobs.astype(np.float32)).to(ref.device)  # (L, k)
    err = (stored - at_stored).abs()
    kth = ref.topk(top_k, dim=-1).values[:, -1:]  # (L, 1)
    outside = (at_stored < kth - (rtol * kth.abs() + atol)).any(-1)  # (L,)
    ranked = ids.sort(-1).values
    repeated = (ranked[:, 1:] == ranked[:, :-1]).any(-1)  # (L,)
    report.max_logprob_error = max(report.max_logprob_error, err.max().item())
    report.topk_mismatches += int((outside | repeated).sum())
    report.logprob_outliers += int((err > rtol * at_stored.abs() + atol).sum())


def _check_sampled(report: VerifyReport, fit: FitAccumulator, row: Any, ref: torch.Tensor, draws: int) -> None:
    ids = torch.from_numpy(_get(row, "sampled_ids").astype(np.int64)).to(ref.device)  # (L, m)
    counts = torch.from_numpy(_get(row, "sampled_counts").astype(np.int64)).to(ref.device)  # (L, m)
    if ids.shape != counts.shape or len(ids) != len(ref):
        raise ValueError(f"sampled_ids {tuple(ids.shape)} / sampled_counts {tuple(counts.shape)} do not fit "
                         f"{len(ref)} rows")
    real = counts > 0  # (L, m)
    ascending = ((ids[:, 1:] > ids[:, :-1]) | ~real[:, 1:]).all(-1)  # (L,) distinct ids, ascending
    packed = (real[:, :-1] | ~real[:, 1:]).all(-1) & real[:, 0]  # (L,) padding only after the real entries
    in_vocab = ((ids < ref.shape[-1]) | ~real).all(-1)
    report.layout_errors += int((~(ascending & packed & in_vocab) | (counts.sum(-1) != draws)).sum())
    probs = ref.exp()  # (L, V)
    at_drawn = probs.gather(1, ids.clamp(max=ref.shape[-1] - 1))  # (L, m)
    report.impossible_draws += int(((at_drawn < IMPOSSIBLE) & real).sum())
    fit.add(probs, ids.clamp(max=ref.shape[-1] - 1), counts)
    # The seeded draws again, from the reference. Log-probs off by at most draw_tol move each p by at most
    # p * expm1(draw_tol), so the CDF anywhere by at most expm1(draw_tol).
    slack = torch.full((len(ref),), math.expm1(report.draw_tol), dtype=torch.float64, device=ref.device)  # (L,)
    position = torch.arange(len(ref), device=ref.device)
    sample_index = torch.full_like(position, int(_get(row, "sample_index")))
    # exp(ref - 0) is the sampler's exp(logits - lse): ref is that same difference, in float32.
    drawn, lo, hi = draw_ranges(ref, torch.zeros_like(slack), sample_index, position, draws, slack)
    report.draw_mismatches += int((~explained(ids, counts, drawn, lo, hi)).sum())
