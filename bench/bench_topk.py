"""Benchmark: top-k + logsumexp of float32 logit rows (kd_core.topk), ms per 32,768 rows.

    python bench/bench_topk.py --device cuda                  # V = 32,000 and 151,936, k = 64, 32,768 rows
    python bench/bench_topk.py --device cuda --sweep          # also other tiles, warps and chunk sizes
    python bench/bench_topk.py                                # CPU: small, the torch path only
    TRITON_INTERPRET=1 python bench/bench_topk.py --rows 4 --vocab 1000 --sweep   # CPU: checks this script

Columns (each a median over --repeat runs after a warm-up, CUDA events):
  read floor      logits.sum(-1): one read of the float32 logits, nothing else (the least any top-k can cost)
  compiled lse    the torch path's logsumexp alone (torch.compile)
  torch path      kd_core.topk.torch_topk_logprobs on all rows at once: compiled logsumexp, torch.topk over
                  k + 16 candidates, sort by (value desc, id asc) (what the pipeline ran before the fused path)
  fused           kd_core.topk.fused_topk_logprobs on all rows at once: the two Triton kernels
  fused, chunks   the same over chunks of kd_core.inference.CHUNK_ELEMENTS // V rows, as the pipeline calls it
  scan / select   the fused path's two kernels alone (scan: one read, logsumexp and group maxima; select: the
                  three rankings)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd_core import topk  # noqa: E402
from kd_core.inference import CHUNK_ELEMENTS  # noqa: E402

PER = 32768  # rows the table is scaled to


def timed_ms(fn, device: torch.device, repeat: int) -> float:
    """Median milliseconds of fn() after one warm-up call (which also compiles)."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def kernels(logits: torch.Tensor, k: int):
    """The fused path's two launches as separate callables (for timing each)."""
    n, vocab = logits.shape
    plan = topk.fused_plan(vocab, k)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    group_max = torch.empty(n, plan["n_groups"], dtype=torch.float32, device=logits.device)
    ids = torch.empty(n, k, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(n, k, dtype=torch.float32, device=logits.device)

    def scan():
        topk._scan_rows[(n,)](logits, logits.stride(0), lse, group_max, VOCAB=vocab, N_GROUPS=plan["n_groups"],
                              GROUP=plan["GROUP"], BLOCK=plan["BLOCK"], num_warps=topk._SCAN_WARPS)

    def select():
        topk._select_rows[(n,)](logits, logits.stride(0), group_max, lse, ids, logprobs, k, VOCAB=vocab,
                                N_GROUPS=plan["n_groups"], GROUP=plan["GROUP"], SUB=plan["SUB"],
                                GROUPS_P2=plan["GROUPS_P2"], KP=plan["KP"], num_warps=topk._SELECT_WARPS)
    return scan, select


def soft(fn):
    """Run a measurement; a failure prints its error in the table instead of stopping the run."""
    try:
        return f"{fn():.2f}"
    except Exception as e:  # noqa: BLE001 - a benchmark reports, it does not stop
        return f"failed: {type(e).__name__}: {str(e)[:120]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=None, help="default 32768 on CUDA, 256 on CPU")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sweep", action="store_true", help="time the fused kernels' tile/warp choices too")
    parser.add_argument("--budget-s", type=float, default=None, help="skip sweep items after this many seconds")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows, k = args.rows or (PER if device.type == "cuda" else 256), args.top_k
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # Off CUDA the kernels run only in Triton's interpreter (TRITON_INTERPRET=1): a check of this script, not a timing.
    fused_ok = topk.triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    print(f"{name}, torch {torch.__version__}, triton {getattr(topk.triton, '__version__', None)}, {rows} rows, "
          f"k={k}; ms per {PER:,} rows, median of {args.repeat}")
    print("| vocab | read floor | compiled lse | torch path | fused | fused, chunks | scan | select |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    scale = PER / rows
    began = time.perf_counter()

    def ms(fn):
        return lambda: timed_ms(fn, device, args.repeat) * scale

    kept = {}
    for vocab in args.vocab:
        logits = torch.randn(rows, vocab, device=device) * 4  # (n, V) float32, as Float32Head gives
        step = max(1, CHUNK_ELEMENTS // vocab)
        cells = [soft(ms(lambda: logits.sum(-1))), soft(ms(lambda: topk.row_logsumexp(logits))),
                 soft(ms(lambda: topk.torch_topk_logprobs(logits, k, chunk_rows=rows)))]
        if fused_ok:
            scan, select = kernels(logits, k)
            cells += [soft(ms(lambda: topk.fused_topk_logprobs(logits, k))),
                      soft(ms(lambda: [topk.fused_topk_logprobs(c, k) for c in logits.split(step)])),
                      soft(ms(scan)), soft(ms(select))]
        else:
            cells += ["n/a (needs CUDA and triton)"] + [""] * 3
        print(f"| {vocab:,} | " + " | ".join(cells) + " |", flush=True)
        if args.sweep and fused_ok:
            kept[vocab] = logits
        del logits
    deadline = began + args.budget_s if args.budget_s else float("inf")
    for vocab in sorted(kept, reverse=True):  # the largest vocabulary first: it matters most
        print(f"\nsweep at V={vocab:,}, ms per {PER:,} rows\n| variant | ms |\n|---|---:|")
        sweep(kept.pop(vocab), k, ms, deadline)


def sweep(logits: torch.Tensor, k: int, ms, deadline: float) -> None:
    """The fused path under other tile sizes, warp counts and chunk sizes (module defaults restored after)."""
    saved = (topk._SCAN_BLOCK, topk._SCAN_WARPS, topk._SELECT_WARPS, topk._MAX_GROUP_KEYS, topk._ONE_KERNEL,
             topk._ONE_WARPS)

    def row(label, fn):
        cell = "skipped (time budget)" if time.perf_counter() > deadline else soft(fn)
        print(f"|   {label} | {cell} |", flush=True)

    try:
        for times in (4, 16):  # the pipeline's chunks (kd_core.inference.CHUNK_ELEMENTS) made larger
            step = max(1, times * CHUNK_ELEMENTS // logits.shape[1])
            row(f"fused, chunks of {step} rows", ms(lambda: [topk.fused_topk_logprobs(c, k) for c in logits.split(step)]))
        topk._ONE_KERNEL = True
        for warps in (8, 4, 16):
            topk._ONE_WARPS = warps
            row(f"fused as one kernel, warps={warps}", ms(lambda: topk.fused_topk_logprobs(logits, k)))
        topk._ONE_KERNEL, topk._ONE_WARPS = saved[4:]
        for block, warps in ((4096, 4), (4096, 16), (2048, 4), (2048, 8), (8192, 8), (8192, 16)):
            topk._SCAN_BLOCK, topk._SCAN_WARPS = block, warps
            row(f"scan BLOCK={block} warps={warps}", ms(kernels(logits, k)[0]))
        topk._SCAN_BLOCK, topk._SCAN_WARPS = saved[:2]
        for warps in (4, 16, 2):
            topk._SELECT_WARPS = warps
            row(f"select warps={warps}", ms(kernels(logits, k)[1]))
        topk._SELECT_WARPS = saved[2]
        for keys in (1024, 4096):  # other group sizes: at 151,936, groups of 256 and of 64 ids
            topk._MAX_GROUP_KEYS = keys
            group = topk.fused_plan(logits.shape[1], k)["GROUP"]
            row(f"fused, groups of {group} ids", ms(lambda: topk.fused_topk_logprobs(logits, k)))
    finally:
        (topk._SCAN_BLOCK, topk._SCAN_WARPS, topk._SELECT_WARPS, topk._MAX_GROUP_KEYS, topk._ONE_KERNEL,
         topk._ONE_WARPS) = saved


if __name__ == "__main__":
    main()
