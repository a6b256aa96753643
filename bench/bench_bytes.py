"""Where a cache's bytes go: stored bytes per token of every dataset (h5py's storage size over the version's part
files), the entries per row of a sampled cache, and the file total. Prints a table.

    python bench/bench_bytes.py OUT_URI [OUT_URI ...]      # caches already built (an output.uri or a version)
    python bench/bench_bytes.py --test-teacher-70k         # builds the 70k-vocabulary test teacher and its top-64 cache

The second form rebuilds what tests/conftest.py's `teacher_dir` is (a tiny untrained Llama whose 70,000-row output
layer needs uint32 ids) over the first 300 stdlib docstrings (kd_core.demo.build_corpus), max_length 128, and
caches its exact top-64 through the pipeline (~1 min on 2 cores), under --work (reused).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h5py  # noqa: E402

from kd_core import io  # noqa: E402
from kd_core.build import validate  # noqa: E402
from kd_core.merge import merge, published  # noqa: E402
from kd_core.shard import plan, run_shard  # noqa: E402
from kd_core.h5cache import CacheReader  # noqa: E402


def stored_bytes(uri: str) -> tuple[dict[str, int], int, int, int]:
    """({dataset: stored bytes over the part files}, tokens, entries, file bytes of the version)."""
    sizes: dict[str, int] = {}
    with CacheReader(uri) as reader:
        for file in reader.files:
            with h5py.File(io.local_path(file), "r") as f:
                for name, dataset in f.items():
                    sizes[name] = sizes.get(name, 0) + dataset.id.get_storage_size()
        tokens, file_bytes = reader.num_tokens, reader.file_bytes
    return sizes, tokens, _entries(uri), file_bytes


def _entries(uri: str) -> int:
    """Entries (distinct ids drawn, over all rows) of a sampled cache; 0 for a top-k one."""
    with CacheReader(uri) as reader:
        total = 0
        for file in reader.files:
            with h5py.File(io.local_path(file), "r") as f:
                total += f["sampled_counts"].shape[0] if "sampled_counts" in f else 0
    return total


def build_test_teacher_cache(work: Path) -> str:
    """tests/conftest.py's 70k-vocabulary teacher and its top-64 cache of 300 docstrings (reused under work)."""
    import pyarrow.parquet as pq

    from kd_core.demo import build_corpus, build_teacher, train_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer, teacher = work / "corpus.parquet", work / "tokenizer", work / "teacher-70k"
    if not corpus.exists():
        build_corpus(corpus, max_docs=300)
    if not tokenizer.exists():
        train_tokenizer(pq.read_table(corpus).column("text").to_pylist(), tokenizer, vocab_size=1000)
    if not teacher.exists():
        build_teacher(tokenizer, teacher, vocab_size=70000, hidden_size=32, num_layers=1)
    out = work / "top64"
    config = validate("testing", {
        "teacher": {"model": str(teacher), "device": "cpu", "dtype": "float32", "batch_tokens": 4096},
        "dataset": {"name": "parquet", "data_files": str(corpus), "split": "train", "streaming": True,
                    "max_samples": 300},
        "cache": {"top_k": 64, "max_length": 128}, "output": {"uri": str(out)}, "run": {"num_shards": 1},
    })
    if published(config) is None:
        merge(config, [run_shard(config, shard) for shard in plan(config).shards])
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uris", nargs="*")
    parser.add_argument("--test-teacher-70k", action="store_true")
    parser.add_argument("--work", default="./out/bench-bytes")
    args = parser.parse_args()
    uris = list(args.uris) + ([build_test_teacher_cache(Path(args.work))] if args.test_teacher_70k else [])
    print("| cache | tokens | entries per row | dataset | B/token |")
    print("|---|---:|---:|---|---:|")
    for uri in uris:
        sizes, tokens, entries, file_bytes = stored_bytes(uri)
        per_row = f"{entries / tokens:.1f}" if entries else "-"
        for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
            print(f"| {uri} | {tokens:,} | {per_row} | {name} | {size / tokens:.2f} |")
        print(f"| {uri} | {tokens:,} | {per_row} | **every file of the version** | **{file_bytes / tokens:.1f}** |")


if __name__ == "__main__":
    main()
