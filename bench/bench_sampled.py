"""Benchmark: how big a sampled cache is, and why: distinct ids per row against the teacher's entropy.

A sampled cache stores, per token, the distinct ids among N draws and their counts, so its size follows the
number of distinct ids per row m, which follows how peaked the teacher is. This builds real caches through the
pipeline (validate, estimate, plan, run_shard, merge: the files `kd-cache run` writes) over the demo corpus, for
each teacher and N, and prints:
  - the teacher's held-out cross-entropy (nats/token, on the same samples: lower = more peaked),
  - m per row: mean and percentiles, and the file's bytes per token (index + parts, as published),
  - the same for a top-k cache of the same samples, for comparison.

Teachers: the demo teacher (@demo/teacher, 200 training steps) and any model directories given with --teacher
(e.g. one trained longer: `python -c "..."` with kd_core.demo.build_teacher(train_steps=2000)).

    python bench/bench_sampled.py                                  # demo teacher, N = 16 and 64, ~2 min on 2 cores
    python bench/bench_sampled.py --teacher /tmp/teacher2000 --samples 200
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd_core.build import validate  # noqa: E402
from kd_core.estimate import estimate  # noqa: E402
from kd_core.merge import merge  # noqa: E402
from kd_core.shard import plan, run_shard  # noqa: E402
from kd_core.dataset import CacheDataset  # noqa: E402
from kd_core.demo import ensure_demo_assets  # noqa: E402


def build(teacher: str, corpus: Path, out: Path, samples: int, cache: list[str]) -> dict:
    config = validate("demo", [f"teacher.model={teacher}", f"dataset.data_files={corpus}",
                                        f"dataset.max_samples={samples}", f"output.uri={out}", "run.num_shards=1",
                                        *cache])
    est = estimate(config)
    manifest = merge(config, [run_shard(config, s) for s in plan(config).shards])
    return {"manifest": manifest, "estimate": est}


def cross_entropy(ds: CacheDataset) -> float:
    """Held-out CE of the teacher on the cached samples, from a top-k cache: -log p(next token) where the next
    token is in the top-k, else a bound from the tail (counted as the k-th log-prob: a lower bound on CE)."""
    total, n = 0.0, 0
    for i in range(len(ds)):
        s = ds[i]
        nxt = s["input_ids"][1:]  # (L-1,) the token each row predicts
        ids, lp = s["topk_indices"][:-1], s["topk_logprobs"][:-1]  # (L-1, k)
        hit = ids == nxt[:, None]
        per = torch.where(hit.any(-1), (lp * hit).sum(-1), lp[:, -1])
        total -= float(per.sum())
        n += len(nxt)
    return total / max(n, 1)


def distinct_stats(ds: CacheDataset) -> tuple[np.ndarray, int]:
    m = np.concatenate([(ds[i]["sampled_counts"] > 0).sum(-1).numpy() for i in range(len(ds))])
    return m, len(m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", nargs="*", default=[], help="model directories besides the demo teacher")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--draws", type=int, nargs="+", default=[16, 64])
    args = parser.parse_args()
    logging.disable(logging.INFO)
    demo = ensure_demo_assets()
    teachers = [("demo teacher", str(demo / "teacher")), *((Path(t).name, t) for t in args.teacher)]
    print(f"{args.samples} demo-corpus samples, max_length 256; B/token = published bytes (index + parts) / tokens")
    print("| teacher | CE (nats) | cache | B/token | estimate B/token | distinct ids per row: mean | p10 | p50 | p90 | max |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, path in teachers:
        with tempfile.TemporaryDirectory() as tmp:
            topk = build(path, demo / "corpus.parquet", Path(tmp) / "topk", args.samples, ["cache.top_k=64"])
            ce = cross_entropy(CacheDataset(str(Path(tmp) / "topk")))
            m = topk["manifest"]
            print(f"| {name} | {ce:.2f} | top-64 | {m.bytes_per_token:.1f} | "
                  f"{topk['estimate'].stored_bytes_per_token:.1f} | | | | | |")
            for n in args.draws:
                out = Path(tmp) / f"sampled{n}"
                run = build(path, demo / "corpus.parquet", out, args.samples,
                            ["cache.mode=sampled", f"cache.samples={n}"])
                m, tokens = distinct_stats(CacheDataset(str(out)))
                p10, p50, p90 = np.percentile(m, [10, 50, 90])
                print(f"| {name} | {ce:.2f} | sampled N={n} | {run['manifest'].bytes_per_token:.1f} | "
                      f"{run['estimate'].stored_bytes_per_token:.1f} | {m.mean():.1f} | {p10:.0f} | {p50:.0f} | "
                      f"{p90:.0f} | {m.max()} |")


if __name__ == "__main__":
    main()
