"""Benchmark: how much of what the teacher computes is real tokens, padded vs packed batches (host side only).

run_teacher lays each look-ahead window out in padded batches (kd_core.inference.padded_batches: one sample a
row, sorted by length, right-padded); bench/gpu_packing.py's packed_batches fills whole samples best-fit decreasing into rows
instead (position_ids restarting per sample). This prints real tokens / computed positions
(B * T summed over batches) and the attention area (B * T * T, what a materialized mask costs) for each, at
several window sizes, on bench_inference.py's text: the standard library's docstrings and module sources,
shuffled, tokenized by a 32k byte-level BPE trained on them, cut at max_length.

    python bench/bench_packing.py                  # ~1-2 minutes on 2 cores (the tokenizer is trained first)

No GPU needed: these are the layouts the device thread would run; docs/PERFORMANCE.md has the GPU's timings
(bench/gpu_packing.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inference import corpus_pool  # noqa: E402
from gpu_packing import packed_batches  # noqa: E402

from kd_core.demo import train_tokenizer  # noqa: E402
from kd_core.inference import padded_batches  # noqa: E402


def windows(lengths: list[int], window_tokens: int) -> list[list[int]]:
    """Consecutive windows of at least window_tokens tokens, as run_teacher's _windows cuts them."""
    out, window, size = [], [], 0
    for n in lengths:
        window.append(n)
        size += n
        if size >= window_tokens:
            out.append(window)
            window, size = [], 0
    return out + ([window] if window else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-tokens", type=int, default=32768)
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 32, 64], help="window sizes, in batches")
    parser.add_argument("--tokens", type=int, default=8 << 20, help="text to lay out (the pool is cycled)")
    parser.add_argument("--tokenizer-docs", type=int, default=3000)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        pool = corpus_pool(Path(tmp))
        train_tokenizer(pool[: args.tokenizer_docs], Path(tmp) / "tok", 32000)
        tokenizer = AutoTokenizer.from_pretrained(Path(tmp) / "tok")
        pool_lengths = [len(x) for x in tokenizer(pool, truncation=True, max_length=args.max_length)["input_ids"]]
    pool_lengths = [n for n in pool_lengths if n]
    lengths, total = [], 0
    while total < args.tokens:
        n = pool_lengths[len(lengths) % len(pool_lengths)]
        lengths.append(n)
        total += n
    p10, p50, p90 = np.percentile(pool_lengths, [10, 50, 90])
    cut = np.mean(np.array(pool_lengths) == args.max_length)
    print(f"{len(pool_lengths):,} texts, p10/p50/p90 {p10:.0f}/{p50:.0f}/{p90:.0f} tokens, {cut:.0%} cut at "
          f"{args.max_length}; {total:,} tokens laid out; batch_tokens {args.batch_tokens:,}")
    print("| window (batches) | layout | real / computed | batches | attention area vs padded |")
    print("|---:|---|---:|---:|---:|")
    layouts = {
        "padded": lambda w: padded_batches(w, args.batch_tokens),
        "packed": lambda w: packed_batches(w, args.batch_tokens),
        f"packed, rows of {args.max_length}": lambda w: packed_batches(w, args.batch_tokens, args.max_length),
    }
    for size in args.windows:
        area0 = None
        for name, plan in layouts.items():
            computed = batches = area = 0
            for window in windows(lengths, size * args.batch_tokens):
                for lay in plan(window):
                    computed += lay.height * lay.width
                    area += lay.height * lay.width * lay.width
                    batches += 1
            area0 = area0 or area
            print(f"| {size} | {name} | {total / computed:.3f} | {batches:,} | {area / area0:.2f} |")


if __name__ == "__main__":
    main()
