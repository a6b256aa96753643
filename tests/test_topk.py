"""Top-k + logsumexp (kd_core.topk): the torch path against a float64 sort, and the fused Triton kernels against
the torch path (in Triton's interpreter on CPU; tests/test_gpu.py runs them compiled on a GPU)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_core import topk
from kd_core.topk import fused_plan, topk_by_key, topk_logprobs, torch_topk_logprobs

ROOT = Path(__file__).resolve().parent.parent


def reference(x: torch.Tensor, k: int):
    """(n, V) -> ids (n, k) by a float64 (value desc, id asc) sort in numpy, log-probs and logsumexp in float64."""
    x64 = x.double()
    ids = np.lexsort((np.arange(x.shape[1])[None].repeat(len(x), 0), -x64.numpy()), axis=-1)[:, :k]
    lse = x64.logsumexp(-1)
    ids = torch.from_numpy(ids)
    return ids, x64.gather(1, ids) - lse[:, None], lse


def hard_logits(vocab: int, seed: int = 0) -> torch.Tensor:
    """Rows that stress the tie rules: random, bf16-rounded (many ties), a 40-way tie at the top, 72 tied ids
    straddling rank k, -0.0 next to 0.0, some -inf, all -inf but a few, one value everywhere, few distinct values,
    all -inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, vocab, generator=g) * 3
    x[1] = (x[1] * 2).to(torch.bfloat16).float()
    x[2, 100:140] = 9.0
    x[3, ::7] = x[3].max() + 1
    x[4] = 0.0
    x[4, vocab // 2:] = -0.0
    x[5, ::3] = -float("inf")
    x[6] = -float("inf")
    x[6, [5, vocab - 1, 17]] = torch.tensor([1.0, 1.0, -2.0])
    x[7] = 1.5
    x[8] = (torch.randn(vocab, generator=g) * 0.01).to(torch.bfloat16).float()  # few distinct values
    x[9] = -float("inf")  # no finite logit: logsumexp -inf, log-probs NaN (-inf - -inf), ids 0..k-1
    return x


@pytest.mark.parametrize("vocab,k", [(500, 8), (3000, 64), (3000, 17), (70, 64)])
def test_torch_path_matches_a_float64_sort(vocab, k):
    x = hard_logits(vocab)
    ids, logprobs, lse = torch_topk_logprobs(x, k)
    ref_ids, ref_logprobs, ref_lse = reference(x, k)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(topk_by_key(x, k)[1], ref_ids)  # the key the fused kernels use orders the same way
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)
    finite = ref_logprobs.isfinite()
    torch.testing.assert_close(logprobs.double()[finite], ref_logprobs[finite], rtol=0, atol=1e-5)
    assert torch.equal(logprobs.isneginf(), ref_logprobs.isneginf())
    assert torch.equal(logprobs.isnan(), ref_logprobs.isnan())  # the all -inf row
    # A (…, V) input keeps its leading shape, and a chunked run gives the same numbers.
    ids3, logprobs3, lse3 = topk_logprobs(x.view(2, 5, vocab), k, chunk_rows=3)
    assert ids3.shape == (2, 5, k) and lse3.shape == (2, 5)
    assert torch.equal(ids3.view(10, k), ids) and torch.equal(lse3.view(10), lse)


def test_fused_plan_sizes():
    assert fused_plan(32_000, 64) == {"KP": 64, "GROUP": 64, "SUB": 8, "n_groups": 500, "GROUPS_P2": 512,
                                      "BLOCK": 4096}
    assert fused_plan(151_936, 64) == {"KP": 64, "GROUP": 128, "SUB": 16, "n_groups": 1187, "GROUPS_P2": 2048,
                                       "BLOCK": 4096}
    assert fused_plan(70, 17)["KP"] == 32 and fused_plan(70, 17)["GROUPS_P2"] == 32  # fewer groups than KP


# The fused kernels in Triton's interpreter (numpy on CPU tensors): the same program text the GPU compiles.
# A subprocess, because TRITON_INTERPRET is read when the kernels are defined. Slow (about 1 s a row at k=64).
_INTERPRETED = """
import sys, torch
from kd_core import topk
from kd_core.topk import fused_topk_logprobs, torch_topk_logprobs
from tests.test_topk import hard_logits
worst = 0.0
for case in sys.argv[1:]:
    if case == "self_check":
        continue
    vocab, k, dtype, max_group_keys, variant = (case + ",2048,").split(",")[:5]
    topk.MAX_GROUP_KEYS = int(max_group_keys)  # a small value: the larger groups of large vocabularies
    topk.THRESHOLD = variant != "rankings"  # the default: by a threshold, tie-heavy rows by the rankings
    x = hard_logits(int(vocab), seed=int(vocab)).to(getattr(torch, dtype))
    fused, torch_path = fused_topk_logprobs(x, int(k)), torch_topk_logprobs(x, int(k))
    assert torch.equal(fused[0], torch_path[0]), case
    step = 2.0**-23 * torch_path[2].abs().clamp_min(1.0).nan_to_num(1.0)  # one float32 step at the lse's size
    for a, b, size in zip(fused[1:], torch_path[1:], (step[:, None], step)):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), case
        finite = a.isfinite()
        worst = max(worst, ((a - b).abs() / size)[finite].max().item())
assert worst <= 16, worst  # two float32 sums of V terms in different orders
if "self_check" in sys.argv:
    topk.self_check(torch.device("cpu"), 3000, 10)  # what topk_logprobs runs once per device, V and k on CUDA
print("fused == torch path; log-probs and logsumexp differ by at most", worst, "float32 steps")
"""
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs triton (its interpreter runs on CPU)")


def interpret(*cases: str) -> None:
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED, *cases], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fused == torch path" in done.stdout


@needs_triton
def test_fused_kernels_equal_the_torch_path_in_the_interpreter():
    # V, k, dtype[, at most that many groups[, variant]]: a partial last tile and group, k not a power of two,
    # bf16 logits read as they are, groups of 256 ids (sub-groups of 32) as at larger vocabularies, the three
    # rankings for every row (the step-down path); and the self-check topk_logprobs runs on CUDA.
    interpret("500,8,float32", "500,8,bfloat16", "3000,17,float32", "9000,5,float32", "3000,8,float32,16",
              "3000,17,float32,2048,rankings", "self_check")


@needs_triton
@pytest.mark.slow
def test_fused_kernels_equal_the_torch_path_in_the_interpreter_at_k64():
    interpret("3000,64,float32", "70,64,float32",  # the second has fewer groups (2) and ids (70) than KP
              "9000,64,float32,2048,rankings")


def test_a_failing_fused_path_steps_down_to_the_rankings_then_to_torch(monkeypatch):
    monkeypatch.setattr(topk, "THRESHOLD", True)
    monkeypatch.setattr(topk, "_fused_disabled", False)
    with pytest.warns(UserWarning, match="selecting by the three rankings"):
        topk._fused_failed(RuntimeError("no"))
    assert not topk.THRESHOLD and not topk._fused_disabled
    with pytest.warns(UserWarning, match="using torch.topk"):
        topk._fused_failed(RuntimeError("no"))
    assert topk._fused_disabled
