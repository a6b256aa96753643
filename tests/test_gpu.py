"""Checks that need a CUDA GPU (skipped elsewhere; CI has none). Run them on a GPU machine with

    python -m pytest -q --noconftest tests/test_gpu.py

(--noconftest: they need only torch and kd_core.inference, not the session fixtures.)
"""

import pytest
import torch

from kd_core.inference import Float32Head, RowSpec, row_results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("vocab", [32_000, 151_936])
def test_float32_head_on_bf16_hidden_states_matches_a_float64_head(vocab):
    """The cached logits are the bf16 teacher's own to float32 precision: a float64 head on the same bf16 hidden
    states and weights is the reference (every product of two bf16 numbers is exact in float32 and float64)."""
    torch.manual_seed(0)
    rows, hidden_size = 2048, 1536
    head = torch.nn.Linear(hidden_size, vocab, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(head.weight, std=0.5 / hidden_size**0.5)
    hidden = (torch.randn(rows, hidden_size, device="cuda") * 8).bfloat16()  # logits spread over about +-20

    reference = hidden.double() @ head.weight.double().t()  # (n, V) float64
    logits = Float32Head(head)(hidden)  # (n, V) float32
    assert logits.dtype == torch.float32
    error = (logits.double() - reference).abs().max().item()
    bf16_error = (head(hidden).double() - reference).abs().max().item()  # what a plain bf16 head stores
    assert error < 1e-4 and error < bf16_error / 100, (error, bf16_error)

    # Top-k and logsumexp from those logits: the float64 reference's, up to float32 rounding; ties by lowest id.
    ids, logprobs, lse = row_results(logits, RowSpec(top_k=64), torch.zeros(rows, dtype=torch.long, device="cuda"),
                                     torch.arange(rows, device="cuda"))
    ref_lse = reference.logsumexp(-1)
    ref_logprobs = reference.gather(1, ids.long()) - ref_lse[:, None]
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4
    assert (logprobs.double() - ref_logprobs).abs().max().item() < 1e-2  # stored as float16
    kth = (reference - ref_lse[:, None]).topk(64, dim=-1).values[:, -1:]
    assert (ref_logprobs >= kth - 1e-5).all()  # every stored id is in the reference's top 64
    print(f"vocab {vocab}: float32 head max |error| {error:.2e} (bf16 head {bf16_error:.2e})")
