"""What a kill -9 costs: a clean run, a run killed at about 60% of its parts, and the re-run that resumes it.

    .venv/bin/python bench/bench_resume.py [--samples 600] [--parts 20] [--kill-at 0.6]

Every run is a fresh `python` process calling kd_core's steps (validate, estimate, plan, run_shard, merge), as
a worker would; its wall time includes imports and the teacher load. The teacher is a CPU-sized Llama
(hidden 256, 4 layers, vocab 8000, untrained) over the stdlib-docstring corpus, written to a local directory.
Prints a table; the last column is the re-run's time as a fraction of the clean run's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DRIVER = """
import json, sys
from kd_core.build import validate
from kd_core.estimate import estimate
from kd_core.merge import merge
from kd_core.shard import plan, run_shard
config = validate("demo", json.loads(sys.argv[1]))
estimate(config)
merge(config, [run_shard(config, s) for s in plan(config).shards])
"""


def build_inputs(root: Path) -> tuple[Path, Path]:
    import pyarrow.parquet as pq

    from kd_core.demo import build_corpus, build_teacher, train_tokenizer

    corpus = root / "corpus.parquet"
    build_corpus(corpus, max_docs=2000)
    train_tokenizer(pq.read_table(corpus).column("text").to_pylist(), root / "tokenizer", vocab_size=8000)
    build_teacher(root / "tokenizer", root / "teacher", hidden_size=256, num_layers=4)
    return corpus, root / "teacher"


def run(over: dict, kill_when=None) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(over)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if kill_when is not None and kill_when():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.05)
    if kill_when is None and proc.returncode != 0:
        raise SystemExit(f"run failed with exit code {proc.returncode}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--parts", type=int, default=20, help="parts in the whole run (2 shards)")
    parser.add_argument("--kill-at", type=float, default=0.6, help="fraction of parts complete when killed")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="kd-bench-resume-"))
    corpus, teacher = build_inputs(root)

    def overrides(out: Path) -> dict:
        return {"teacher": {"model": str(teacher), "batch_tokens": 4096, "device": "cpu"},
                "dataset": {"name": "parquet", "data_files": str(corpus), "streaming": True,
                            "max_samples": args.samples},
                "cache": {"top_k": 32, "max_length": 256}, "output": {"uri": str(out)},
                "run": {"num_shards": 2, "part_samples": args.samples // args.parts}}

    clean = run(overrides(root / "clean"))
    out = root / "killed"
    target = round(args.parts * args.kill_at)
    killed = run(overrides(out), kill_when=lambda: len(list(out.glob("work/*/*/part-*.h5"))) >= target)
    done = len(list(out.glob("work/*/*/part-*.h5")))
    rerun = run(overrides(out))
    assert (out / "latest.json").exists()

    rows = [("clean run (s)", f"{clean:.1f}"), ("killed after (s)", f"{killed:.1f}"),
            ("parts complete at the kill", f"{done}/{args.parts} ({done / args.parts:.0%})"),
            ("re-run (s)", f"{rerun:.1f}"), ("re-run / clean", f"{rerun / clean:.2f}")]
    width = max(len(k) for k, _ in rows)
    print(f"{args.samples} samples, 2 shards, {args.parts} parts, top_k 32, max_length 256, CPU")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
