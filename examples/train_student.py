"""Train a student from a cache: the offline counterpart of a distillation trainer (the teacher is not loaded).

    kd-cache run --profile demo                                  # writes ./out/demo (about a minute on CPU)
    python examples/train_student.py ./out/demo --steps 20       # top-k cache: topk_kd_loss
    python examples/train_student.py ./out/sampled --ce-weight 0.5   # sampled cache: sampled_kd_loss, mixed with CE

A plain PyTorch loop over CacheDataset + pad_collate: swap in your own model, optimizer or Trainer. The loss is
picked from what the cache holds (top-k or sampled); --ce-weight mixes in the next-token cross-entropy on the
cached tokens. Prints the loss every --log-every steps and, with --out, saves the student with save_pretrained.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from kd_core.dataset import CacheDataset, pad_collate
from kd_core.loss import TAILS, sampled_kd_loss, topk_kd_loss


def kd_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], tail: str) -> torch.Tensor:
    """KD loss of (B, T, V) student logits against the batch's cache rows; row t is the token at t+1 for both."""
    mask = batch["attention_mask"]  # (B, T)
    if "sampled_ids" in batch:
        return sampled_kd_loss(logits, batch["sampled_ids"], batch["sampled_counts"], mask=mask)
    return topk_kd_loss(logits, batch["topk_indices"], batch["topk_logprobs"], mask=mask, tail=tail)


def ce_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy on the cached tokens: logits at t predict input_ids at t+1 (padding ignored)."""
    labels = batch["input_ids"][:, 1:].masked_fill(~batch["attention_mask"][:, 1:], -100)  # (B, T-1)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def build_student(vocab_size: int, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    """A small Llama over the teacher's output vocabulary (the cache's ids index it)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 32),
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def train(
    uri: str,
    *,
    steps: int = 50,
    batch_size: int = 8,
    lr: float = 3e-3,
    ce_weight: float = 0.0,
    tail: str = "bucket",
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    log_every: int = 10,
    out: str | None = None,
) -> list[float]:
    """Train a fresh student for `steps` steps on the cache at uri; return the loss of every step."""
    dataset = CacheDataset(uri)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student = build_student(dataset.reader.vocab_size, hidden, layers, seed).to(device)
    # Autocast to bf16 on CUDA; the losses compute in float32 whatever the logits' dtype.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, collate_fn=pad_collate,
        generator=torch.Generator().manual_seed(seed), drop_last=len(dataset) > batch_size,
    )
    losses: list[float] = []
    start = time.perf_counter()
    student.train()
    while len(losses) < steps:
        for batch in loader:
            batch = {name: value.to(device) for name, value in batch.items()}
            with autocast:
                logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = (1 - ce_weight) * kd_loss(logits, batch, tail)
            if ce_weight > 0:
                loss = loss + ce_weight * ce_loss(logits, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if len(losses) % log_every == 0 or len(losses) == steps:
                print(f"step {len(losses):5d}  loss {losses[-1]:.4f}  ({time.perf_counter() - start:.1f} s)", flush=True)
            if len(losses) == steps:
                break
    if out:
        student.save_pretrained(out)
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", help="an output.uri (its latest version), a version directory or a cache.h5")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ce-weight", type=float, default=0.0, help="weight of next-token CE; 1 - it is KD's")
    parser.add_argument("--tail", choices=TAILS, default="bucket", help="top-k caches only")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--out", help="directory to save the trained student in (save_pretrained)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0.0 <= args.ce_weight <= 1.0:
        parser.error(f"--ce-weight must be in [0, 1], got {args.ce_weight}")
    losses = train(
        args.cache, steps=args.steps, batch_size=args.batch_size, lr=args.lr, ce_weight=args.ce_weight,
        tail=args.tail, hidden=args.hidden, layers=args.layers, seed=args.seed, log_every=args.log_every,
        out=args.out,
    )
    return 0 if all(math.isfinite(x) for x in losses) else 1


if __name__ == "__main__":
    raise SystemExit(main())
