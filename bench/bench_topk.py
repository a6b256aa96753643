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
  scan / select   the fused path's two steps alone (scan: one read, logsumexp and group maxima; select: by a
                  threshold, rows with too many candidates by the three rankings)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
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
    """The fused path's two steps as separate callables (for timing each)."""
    plan = topk.fused_plan(logits.shape[1], k)
    lse, group_max = topk.fused_scan(logits, plan)  # the select step's inputs, computed once
    return (lambda: topk.fused_scan(logits, plan)), (lambda: topk.fused_select(logits, group_max, lse, k, plan))


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
    scale = PER / rows
    began = time.perf_counter()

    def ms(fn):
        return lambda: timed_ms(fn, device, args.repeat) * scale

    deadline = began + args.budget_s if args.budget_s else float("inf")
    if args.sweep and fused_ok:  # compile the variants in other processes while this one compiles the defaults
        compiling = precompile(device, args.vocab, k)
        for vocab in args.vocab:
            try:
                warm = torch.randn(2, vocab, device=device)
                topk.row_logsumexp(warm), topk.fused_topk_logprobs(warm, k)
            except Exception as e:  # noqa: BLE001 - the table's cells will show it
                print(f"warm-up at V={vocab}: {type(e).__name__}: {str(e)[:200]}")
        # Then wait for them: timings taken while other processes compile and launch would be disturbed.
        left = deadline - time.perf_counter() - 20  # inf without --budget-s: wait() takes None for no limit
        done, _ = concurrent.futures.wait(compiling, timeout=max(1.0, left) if left != float("inf") else None)
        failed = [f.exception() for f in done if f.exception()]
        print(f"precompiled {len(done) - len(failed)} of {len(compiling)} sweep variants in "
              f"{time.perf_counter() - began:.0f} s" + (f"; failed e.g. {failed[0]!r}"[:300] if failed else ""))
    print("| vocab | read floor | compiled lse | torch path | fused | fused, chunks | scan | select |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
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
        logits = None  # frees the device memory before the next size (not `del`: the lambdas above close over it)
    for vocab in sorted(kept, reverse=True):  # the largest vocabulary first: it matters most
        print(f"\nsweep at V={vocab:,}, ms per {PER:,} rows\n| variant | ms |\n|---|---:|")
        sweep(kept.pop(vocab), k, ms, deadline)


# Sweep variants, most telling first: (label, module settings of kd_core.topk, what is timed).
VARIANTS = [
    ("select by the three rankings (all rows: the step-down path)", {"THRESHOLD": False}, "fused"),
    ("fused, chunks of a quarter (the pipeline's before)", {}, "chunks0.25"),
    ("threshold select, warps=8", {"THRESHOLD_WARPS": 8}, "select"),
    ("threshold select, chunks of 32 groups", {"THRESHOLD_CHUNK": 32}, "select"),
    ("scan warps=4", {"SCAN_WARPS": 4}, "scan"),
    ("scan warps=16", {"SCAN_WARPS": 16}, "scan"),
    ("fused, chunks x4", {}, "chunks4"),
    ("scan BLOCK=2048 warps=4", {"SCAN_BLOCK": 2048, "SCAN_WARPS": 4}, "scan"),
    ("scan BLOCK=8192 warps=8", {"SCAN_BLOCK": 8192}, "scan"),
]


@contextlib.contextmanager
def settings(values: dict):
    """kd_core.topk's module settings changed for a while (restored after)."""
    saved = {name: getattr(topk, name) for name in values}
    for name, value in values.items():
        setattr(topk, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(topk, name, value)


def _compile(device: str, vocab: int, k: int, values: dict) -> None:
    """In a worker process: run the fused path once on 2 rows so that Triton compiles (and caches on disk) the
    kernels of one variant; the sweep then finds them compiled."""
    with settings(values):
        topk.fused_topk_logprobs(torch.randn(2, vocab, device=device), k)
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def precompile(device: torch.device, vocabs, k: int):
    """Compile every sweep variant in parallel processes (Triton compiles one kernel at a time, several seconds
    each); returns the futures, to wait for before the sweep."""
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                  mp_context=multiprocessing.get_context("spawn"))
    futures = [pool.submit(_compile, str(device), vocab, k, values)
               for vocab in sorted(vocabs, reverse=True) for _, values, what in VARIANTS if not what.startswith("chunks")]
    pool.shutdown(wait=False)
    return futures


def sweep(logits: torch.Tensor, k: int, ms, deadline: float) -> None:
    """The fused path under other tile sizes, warp counts, group sizes and chunk sizes (VARIANTS)."""
    for label, values, what in VARIANTS:
        if time.perf_counter() > deadline:
            print(f"|   {label} | skipped (time budget) |", flush=True)
            continue
        with settings(values):
            if what.startswith("chunks"):
                step = max(1, int(float(what[6:]) * CHUNK_ELEMENTS) // logits.shape[1])
                label = f"fused, chunks of {step} rows"
                fn = lambda: [topk.fused_topk_logprobs(c, k) for c in logits.split(step)]  # noqa: E731
            elif what == "fused":
                fn = lambda: topk.fused_topk_logprobs(logits, k)  # noqa: E731
            else:
                fn = kernels(logits, k)[what == "select"]
            print(f"|   {label} | {soft(ms(fn))} |", flush=True)


if __name__ == "__main__":
    main()
