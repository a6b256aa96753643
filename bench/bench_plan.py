"""Shard planning at scale: time to plan from parquet footers, and source rows decoded by all shards together,
against the old plan (every shard streams from row 0 and skips to its start: row `start` costs `start` decodes).

    .venv/bin/python bench/bench_plan.py [--files 400] [--groups 4] [--group-rows 1000] [--shards 64,512]

Writes the parquet files once under --work (tiny rows: planning reads footers only, so row size does not matter).
"""

import argparse
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kd_core import data
from kd_core.config import DatasetConfig


def write(root: Path, files: int, groups: int, group_rows: int) -> str:
    root.mkdir(parents=True, exist_ok=True)
    rows = groups * group_rows
    for f in range(files):
        path = root / f"part-{f:05d}.parquet"
        if not path.exists():
            pq.write_table(pa.table({"text": [f"row {i}" for i in range(f * rows, (f + 1) * rows)]}), path,
                           row_group_size=group_rows)
    return str(root / "*.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-rows", type=int, default=1000)
    parser.add_argument("--shards", default="64,512")
    parser.add_argument("--work", default="/tmp/kd-bench-plan")
    args = parser.parse_args()
    pattern = write(Path(args.work) / f"{args.files}x{args.groups}x{args.group_rows}", args.files, args.groups,
                    args.group_rows)
    total = args.files * args.groups * args.group_rows
    samples = total * 15 // 16
    print(f"{args.files} files x {args.groups} row groups x {args.group_rows:,} rows = {total:,} rows; "
          f"max_samples={samples:,}")
    print("| shards | plan seconds | rows read (footers plan) | extra per shard | rows read (skip from row 0) |")
    print("|---:|---:|---:|---:|---:|")
    for shards in map(int, args.shards.split(",")):
        cfg = DatasetConfig(name="parquet", data_files=pattern, streaming=True, max_samples=samples)
        started = time.perf_counter()
        plan = data.plan(cfg, shards)
        seconds = time.perf_counter() - started
        rows_read = sum(s.rows_read for s in plan.shards)
        skipping = sum(s.stop for s in plan.shards)  # the old plan: shard i decodes rows [0, stop_i)
        print(f"| {shards} | {seconds:.2f} | {rows_read:,} | {(rows_read - samples) / shards:,.0f} | {skipping:,} |")


if __name__ == "__main__":
    main()
