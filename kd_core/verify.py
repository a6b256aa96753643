"""Check cached rows against the teacher recomputed one sample at a time, without batching or padding.

The reference is the plain forward pass `model(input_ids).logits` in float32 by default: a float32 copy of
the teacher is made when it was loaded in another dtype (twice its float32 size in memory, briefly). For a
teacher spread over devices by device_map, load it with teacher.dtype=float32 and pass that instead: no copy.

What a bf16 cache shows: against a float32 reference, the errors are bf16's own (typically 1e-2..1e-1 in
log-prob, and near-ties at the k-th place swap), so `ok` is false under the default fp16-rounding tolerances.
To check the pipeline alone (batching, padding, gathering, rounding), pass dtype=teacher.dtype and
tolerances that fit that dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kd_core.teacher import Teacher

FIELDS = ("input_ids", "topk_indices", "topk_logprobs", "logsumexp")


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

    @property
    def ok(self) -> bool:
        return (
            self.logprob_outliers == 0
            and self.max_logsumexp_error <= self.lse_tol
            and self.topk_mismatches == 0
        )


def _get(row: Any, name: str) -> np.ndarray:
    return np.asarray(row[name] if isinstance(row, dict) else getattr(row, name))


def verify_rows(
    teacher: Teacher,
    rows: Iterable[Any],
    *,
    top_k: int,
    dtype: torch.dtype = torch.float32,
    rtol: float = 2e-3,
    atol: float = 1e-3,
    lse_tol: float = 1e-2,
) -> VerifyReport:
    """Recompute each sample alone and compare. rows: SampleRows, or dicts with the same four arrays.

    A position is a top-k mismatch when a stored id's reference log-prob is below the reference's k-th best
    by more than the tolerance (so ties at the k-th place are not counted), or when an id is stored twice.
    """
    model = teacher.model if teacher.dtype == dtype else copy.deepcopy(teacher.model).to(dtype)
    report = VerifyReport(rtol=rtol, atol=atol, lse_tol=lse_tol)
    with torch.inference_mode():
        for row in rows:
            input_ids, ids, logprobs, lse = (_get(row, name) for name in FIELDS)
            if ids.shape != (len(input_ids), top_k):
                raise ValueError(f"topk_indices has shape {ids.shape}, expected {(len(input_ids), top_k)}")
            tokens = torch.from_numpy(input_ids.astype(np.int64))[None].to(teacher.device)  # (1, L)
            logits = model(input_ids=tokens, use_cache=False).logits[0].float()  # (L, V)
            ref_lse = logits.logsumexp(-1)  # (L,)
            ref = logits - ref_lse[:, None]  # (L, V): one sample, so at most max_length * V floats
            ids = torch.from_numpy(ids.astype(np.int64)).to(ref.device)  # (L, k)
            at_stored = ref.gather(1, ids)  # (L, k) reference log-probs of the stored ids
            stored = torch.from_numpy(logprobs.astype(np.float32)).to(ref.device)  # (L, k)
            err = (stored - at_stored).abs()
            kth = ref.topk(top_k, dim=-1).values[:, -1:]  # (L, 1)
            outside = (at_stored < kth - (rtol * kth.abs() + atol)).any(-1)  # (L,)
            ranked = ids.sort(-1).values
            repeated = (ranked[:, 1:] == ranked[:, :-1]).any(-1)  # (L,)
            lse_err = (torch.from_numpy(lse.astype(np.float32)).to(ref.device) - ref_lse).abs()

            report.samples += 1
            report.positions += len(input_ids)
            report.max_logprob_error = max(report.max_logprob_error, err.max().item())
            report.max_logsumexp_error = max(report.max_logsumexp_error, lse_err.max().item())
            report.topk_mismatches += int((outside | repeated).sum())
            report.logprob_outliers += int((err > rtol * at_stored.abs() + atol).sum())
    return report
