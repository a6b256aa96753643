"""Checks that need a CUDA GPU (skipped elsewhere; CI has none). Run them on a GPU machine with

    python -m pytest -q --noconftest tests/test_gpu.py

(--noconftest: they need only torch, triton and kd_core, not the session fixtures.)
"""

import copy
import dataclasses

import accelerate
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kd_core import topk
from kd_core.inference import Float32Head, RowSpec, row_results, run_teacher
from kd_core.teacher import Teacher, execution_device

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


def tie_heavy_logits(rows: int, vocab: int) -> torch.Tensor:
    """(rows, V) float32 on the GPU: random rows, and rows that stress the tie rules (every 16 rows: bf16-rounded
    narrow values, a 100-way tie at the top, ~V/97 ids tied across rank k, -inf for 2/3 of the ids, -0.0 and 0.0)."""
    g = torch.Generator(device="cuda").manual_seed(vocab)
    x = torch.randn(rows, vocab, device="cuda", generator=g) * 4
    x[1::4] = (x[1::4] * 0.1).bfloat16().float()  # many exact ties around rank k
    x[2::8, 1000:1100] = 30.0
    x[3::8, ::97] = x[3::8].amax(-1, keepdim=True) + 1
    x[5::16, vocab // 3:] = -float("inf")
    x[7::16] = -0.0
    x[7::16, ::5] = 0.0  # -0.0 == 0.0: ties by id
    return x


def mismatches(a: torch.Tensor, b: torch.Tensor) -> str:
    """Which rows of two (n, k) id tensors differ: count, row numbers mod 16 (the pattern), the first one."""
    bad = (a != b).any(-1).nonzero().squeeze(1).tolist()
    if not bad:
        return "none"
    r = bad[0]
    return (f"{len(bad)} rows, row % 16 in {sorted({i % 16 for i in bad})}, first row {r}: "
            f"{a[r, :12].tolist()} vs {b[r, :12].tolist()}")


@pytest.mark.parametrize("vocab", [32_000, 151_936])
def test_fused_topk_equals_the_torch_path_and_a_float64_sort(vocab):
    """The fused Triton kernels (kd_core.topk), both selections, against the torch path and a float64 stable sort
    (ties by lowest id): ids identical, log-probs and logsumexp to float32 rounding."""
    rows, k = 3000, 64
    x = tie_heavy_logits(rows, vocab)
    torch_ids, torch_logprobs, torch_lse = topk.torch_topk_logprobs(x, k, chunk_rows=512)
    # + 0.0 makes -0.0 into 0.0: a CUDA sort orders floats by their bits, so -0.0 would sort below 0.0.
    x64 = x.double() + 0.0
    ref = x64.sort(dim=-1, descending=True, stable=True)  # stable: equal values stay in ascending id order
    ref_lse = x64.logsumexp(-1)
    ref_logprobs = ref.values[:, :k] - ref_lse[:, None]
    ulp = torch.finfo(torch.float32).eps * ref_lse.abs().clamp_min(1.0)  # one float32 step at the lse's size
    failures, default = [], topk.THRESHOLD
    for threshold in (True, False):
        topk.THRESHOLD = threshold
        try:
            ids, logprobs, lse = topk.fused_topk_logprobs(x, k)
        finally:
            topk.THRESHOLD = default
        lse_error = ((lse.double() - ref_lse).abs() / ulp).max().item()
        logprob_error = (logprobs.double() - ref_logprobs).abs().max().item()
        vs_torch = max((lse - torch_lse).abs().max().item(), (logprobs - torch_logprobs).abs().max().item())
        report = (f"vocab {vocab}, {'threshold' if threshold else 'rankings'}: ids vs torch path: "
                  f"{mismatches(ids, torch_ids)}; vs float64 sort: {mismatches(ids, ref.indices[:, :k])}; lse error vs "
                  f"float64 {lse_error:.2f} float32 steps; max |log-prob error| {logprob_error:.2e}; "
                  f"max |fused - torch| {vs_torch:.2e}")
        print(report)
        if not (torch.equal(ids, torch_ids) and torch.equal(ids, ref.indices[:, :k]) and lse_error <= 8
                and logprob_error < 2e-5 and vs_torch < 2e-5):
            failures.append(report)
    torch_error = ((torch_lse.double() - ref_lse).abs() / ulp).max().item()
    print(f"vocab {vocab}, torch path: ids vs float64 sort: {mismatches(torch_ids, ref.indices[:, :k])}; "
          f"lse error {torch_error:.2f} float32 steps")
    assert not failures, failures
    # And through topk_logprobs, the entry point the pipeline calls: the fused path, not a silent fallback.
    assert torch.equal(topk.topk_logprobs(x[:100], k)[0], ids[:100]) and not topk._fused_disabled


class ByteTokenizer:
    """A text's UTF-8 bytes as its ids: a teacher without tokenizer files."""

    def __call__(self, texts, truncation=True, max_length=None):
        return {"input_ids": [list(t.encode())[:max_length] for t in texts]}


def random_teacher(device: str = "cuda") -> Teacher:
    """A random float32 Llama (4 layers, untied head), byte-tokenized, on `device`."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval().to(device)
    device = torch.device(device)
    return Teacher(model, ByteTokenizer(), device, torch.float32, 512)


def texts(count: int = 40) -> list[str]:
    """Random printable texts of 3 to 400 bytes."""
    rng = np.random.default_rng(0)
    return ["".join(map(chr, rng.integers(32, 127, size=n))) for n in rng.integers(3, 400, size=count)]


def rows_of(teacher: Teacher, **kw) -> list:
    return list(run_teacher(teacher, list(enumerate(texts())), top_k=16, max_length=256, batch_tokens=1024, **kw))


def assert_same_rows(a: list, b: list) -> None:
    """Float32 on two devices or layouts: log-probs (sorted, best first) within a float16 step, lse within 1e-4;
    ids equal but where float32 rounding swaps two near-equal logits (at most 0.1% of rows)."""
    mismatched = total = 0
    for x, y in zip(a, b, strict=True):
        assert x.sample_index == y.sample_index
        np.testing.assert_allclose(np.float32(x.topk_logprobs), np.float32(y.topk_logprobs), rtol=2**-10, atol=1e-5)
        np.testing.assert_allclose(x.logsumexp, y.logsumexp, rtol=0, atol=1e-4)
        mismatched += int((x.topk_indices != y.topk_indices).any(-1).sum())
        total += len(x.topk_indices)
    assert mismatched <= total // 1000, (mismatched, total)


def split_teacher(reference: Teacher, first: str, second: str) -> Teacher:
    """The reference's model on two devices: embedding and the first half of the layers on `first`, the rest with
    the norm and the head on `second` (accelerate runs each where it sits: main_device cpu offloads nothing)."""
    model = copy.deepcopy(reference.model).cpu()
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first,
                  "model.layers.1": first, "model.layers.2": second, "model.layers.3": second,
                  "model.norm": second, "lm_head": second}
    model = accelerate.dispatch_model(model, device_map, main_device="cpu")
    assert model.model.layers[3].mlp.up_proj.weight.device == torch.device(second)
    device = execution_device(model.get_input_embeddings())
    assert device == torch.device(first)
    return dataclasses.replace(reference, model=model, device=device)


@pytest.mark.parametrize("first, second", [("cuda:0", "cpu"), ("cpu", "cuda:0")])
def test_device_map_split_equals_one_device(first, second):
    """A 2-way split on one GPU. The body's output comes back on `second` while the batch's rows are on `first`;
    the results must equal the one-device model's."""
    reference = random_teacher()
    assert_same_rows(rows_of(split_teacher(reference, first, second)), rows_of(reference))


def test_verify_on_a_split_teacher():
    """kd-cache verify's reference on a teacher split over two devices: the hidden states go to the head."""
    from kd_core.verify import verify_rows  # imports the config (pydantic): here, so the tests above need none

    reference = random_teacher()
    report = verify_rows(split_teacher(reference, "cuda:0", "cpu"), rows_of(reference)[:8], top_k=16)
    assert report.ok, report


def test_device_map_auto_through_load_teacher(tmp_path):
    """teacher.device_map=auto as a run loads it (accelerate places the model on this machine's GPUs): the rows
    equal those of the same model placed by hand on one device."""
    from kd_core.config import TeacherConfig  # pydantic: imported here, so the tests above need none
    from kd_core.demo import train_tokenizer
    from kd_core.teacher import load_teacher

    reference = random_teacher()
    train_tokenizer(texts(200), tmp_path, vocab_size=512)
    reference.model.save_pretrained(tmp_path)
    loaded = load_teacher(TeacherConfig(model=str(tmp_path), device_map="auto", dtype="float32"))
    assert loaded.device.type == "cuda" and {p.device.type for p in loaded.model.parameters()} == {"cuda"}
    assert_same_rows(rows_of(loaded), rows_of(dataclasses.replace(reference, tokenizer=loaded.tokenizer)))
