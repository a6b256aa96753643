"""Benchmark: what the float32 output layer and the per-row work of each cache mode cost, per 1,000 rows.

The pipeline's head runs in float32 on the body's hidden states (kd_core.inference.Float32Head) so that cached
log-probs, logsumexp and draws are the teacher's own logits to float32 precision. This prints, for Qwen2.5-like
head shapes, the time of:
  native head     the model's own lm_head in its dtype (bf16 logits: what the pipeline did before)
  float32 head    Float32Head on the same bf16 hidden states (on CPU: upcast weight, float32 matmul; on CUDA:
                  one bf16 tensor-core matmul with float32 output, torch.mm's out_dtype)
  top-k           row_results in top-k mode (logsumexp + top-k with ties by lowest id) on float32 logits
  sampled         row_results in sampled mode (logsumexp + integer CDF + N draws + distinct/counts)

    python bench/bench_head.py                       # CPU, a few shapes, ~1 minute on 2 cores
    python bench/bench_head.py --device cuda --rows 32768 --vocab 32000 151936 --hidden 2048   # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd_core.inference import Float32Head, RowSpec, row_results  # noqa: E402


def timed_ms(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up (and the float32 weight copy, made once)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--hidden", type=int, nargs="+", default=[896, 1536])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--draws", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, rows {args.rows}; "
          f"ms per 1,000 rows (median of {args.repeat})")
    print(f"| hidden | vocab | native bf16 head | float32 head | ratio | top-{args.top_k} | sampled N={args.draws} |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    per_k = 1000 / args.rows
    keys = torch.zeros(args.rows, dtype=torch.int64, device=device), torch.arange(args.rows, device=device)
    for hidden_size in args.hidden:
        for vocab in args.vocab:
            head = torch.nn.Linear(hidden_size, vocab, bias=False, device=device, dtype=torch.bfloat16)
            hidden = torch.randn(args.rows, hidden_size, device=device, dtype=torch.bfloat16)
            head32 = Float32Head(head)
            with torch.inference_mode():
                logits = head32(hidden)
                native = timed_ms(lambda: head(hidden), device, args.repeat)
                exact = timed_ms(lambda: head32(hidden), device, args.repeat)
                topk = timed_ms(lambda: row_results(logits, RowSpec(top_k=args.top_k), *keys), device, args.repeat)
                sampled = timed_ms(lambda: row_results(logits, RowSpec(mode="sampled", draws=args.draws), *keys),
                                   device, args.repeat)
            print(f"| {hidden_size} | {vocab:,} | {native * per_k:.1f} | {exact * per_k:.1f} | "
                  f"{exact / native:.2f} | {topk * per_k:.1f} | {sampled * per_k:.1f} |")
            head = head32 = logits = None  # frees the device memory (not `del`: the lambdas above close over them)


if __name__ == "__main__":
    main()
