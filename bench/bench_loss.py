"""Peak memory and time of the cached KD losses (forward + backward) against the size of the logits. Prints a table.

    python bench/bench_loss.py                                  # CUDA when present: 16k tokens x 151,936 vocab, bf16
    python bench/bench_loss.py --tokens 2048 --vocab 32000      # a CPU-sized run (float32 logits)

"extra" is the peak memory above what was allocated before the loss ran (the logits and the cache rows), so it
includes the gradient, which is the logits' size and dtype for any loss. On CUDA it is
torch.cuda.max_memory_allocated; on CPU the process's peak resident memory (VmHWM after clear_refs), with glibc
told to mmap every large block so that freed memory leaves the process (the script re-runs itself with
MALLOC_MMAP_THRESHOLD_ set).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from kd_core.loss import full_kd_loss, sampled_kd_loss, topk_kd_loss


def cpu_peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def reset_peak(device: str) -> int:
    """Reset the peak counter; return the current level it is measured from."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return cpu_peak()


def peak(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return cpu_peak()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--tokens", type=int, default=16384 if cuda else 2048)
    parser.add_argument("--vocab", type=int, default=151936 if cuda else 32000)
    parser.add_argument("--k", type=int, default=64, help="top-k entries, and sampled width m")
    parser.add_argument("--naive", action="store_true", help="also the unchunked full_kd_loss (needs 2 x logits)")
    args = parser.parse_args()
    device = "cuda" if cuda else "cpu"
    if device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        return subprocess.run([sys.executable, *sys.argv], env=env).returncode
    dtype = torch.bfloat16 if cuda else torch.float32
    B, T, V, k = 1, args.tokens, args.vocab, args.k
    g = torch.Generator(device).manual_seed(0)
    logits = torch.randn(B, T, V, generator=g, device=device, dtype=dtype).requires_grad_(True)  # (B, T, V)
    ids = torch.randint(V, (B, T, k), generator=g, device=device)
    logprobs = torch.randn(B, T, k, generator=g, device=device).log_softmax(-1)
    counts = torch.randint(0, 3, (B, T, k), generator=g, device=device)
    cases = [
        ("topk_kd_loss bucket", lambda: topk_kd_loss(logits, ids, logprobs)),
        ("topk_kd_loss renormalize", lambda: topk_kd_loss(logits, ids, logprobs, tail="renormalize")),
        ("sampled_kd_loss", lambda: sampled_kd_loss(logits, ids, counts)),
    ]
    if args.naive:
        teacher = torch.randn(B, T, V, generator=g, device=device, dtype=dtype)
        cases.append(("full_kd_loss (unchunked reference)", lambda: full_kd_loss(logits, teacher)))
    size = logits.numel() * logits.element_size()
    print(f"{device}, {torch.cuda.get_device_name() if cuda else os.cpu_count()} ; logits ({B}, {T}, {V}) {dtype}: "
          f"{size / 2**30:.2f} GiB; k = m = {k}\n")
    print("| loss | extra peak GiB | extra / logits | forward + backward ms |")
    print("|---|---:|---:|---:|")
    for name, fn in cases:
        fn().backward()  # warm-up
        logits.grad = None
        base = reset_peak(device)
        start = time.perf_counter()
        fn().backward()
        if cuda:
            torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - start)
        extra = peak(device) - base
        logits.grad = None
        print(f"| {name} | {extra / 2**30:.2f} | {extra / size:.2f} | {ms:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
