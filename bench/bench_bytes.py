"""Where a cache's bytes go: stored bytes per token of every dataset (h5py's storage size over the version's part
files), the entries per row of a sampled cache, and the file total. Prints a table.

    python bench/bench_bytes.py OUT_URI [OUT_URI ...]      # caches already built (an output.uri or a version)
    python bench/bench_bytes.py --test-teacher-70k         # builds the 70k-vocabulary test teacher and its top-64 cache
    python bench/bench_bytes.py --sampled-codings OUT_URI  # also: a sampled cache's gaps and counts coded other ways
    python bench/bench_bytes.py --ids-coding 64,512 OUT_URI  # also: a top-k cache's rows rewritten, ids both ways

The second form rebuilds what tests/conftest.py's `teacher_dir` is (a tiny untrained Llama whose 70,000-row output
layer needs uint32 ids) over the first 300 stdlib docstrings (kd_core.demo.build_corpus), max_length 128, and
caches its exact top-64 through the pipeline (~1 min on 2 cores), under --work (reused).

--sampled-codings: for each sampled cache, its id gaps and counts re-coded in 1 MiB chunks as the writer does
(shuffle, then deflate), by zlib's run-length strategy at level 1 (what the writer uses), zlib's default strategy,
and libdeflate at levels 6, 9 and 12 (compressing MB/s beside each); and the gaps of ids renumbered by how often
this cache draws them (the most drawn id 0, ...; ranks sorted per row, then gapped): what a file storing a
frequency order beside its gaps would take, at best (the order is this cache's own).

--ids-coding MAX_LENGTHS: for each top-k cache with uint16 ids, its part files' rows rewritten by CacheWriter
with the chunks of each max_length, the ids stored unshuffled (the writer before the trials) and as the writer
stores them now (shuffled or not per group of chunks, h5cache.writer.encode_chunks): every file's bytes per token.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deflate  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402

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


def sampled_codings(uri: str) -> None:
    """The --sampled-codings table of one sampled cache (see the module's docstring)."""
    arrays: dict[str, list[np.ndarray]] = {"sampled_id_gaps": [], "sampled_counts": []}
    with CacheReader(uri) as reader:
        tokens, draws, vocab = reader.num_tokens, reader.samples, reader.vocab_size
        for file in reader.files:
            with h5py.File(io.local_path(file), "r") as f:
                for name in arrays:
                    arrays[name].append(f[name][:])
    gaps, counts = (np.concatenate(arrays[name]) for name in arrays)  # (E,), (E,)
    # Ids back from the gaps (a row's ids ascending, its first gap the id itself), then renumbered by frequency.
    row = (np.cumsum(counts.astype(np.int64)) - 1) // draws  # (E,) the entry's row over the whole cache
    first = np.r_[True, row[1:] != row[:-1]]
    running = np.cumsum(gaps.astype(np.int64))
    ids = running - np.maximum.accumulate(np.where(first, running - gaps, 0))  # (E,)
    rank = np.empty(vocab, np.int64)
    rank[np.argsort(-np.bincount(ids, minlength=vocab), kind="stable")] = np.arange(vocab)
    ranks = rank[ids][np.lexsort((rank[ids], row))]  # (E,) ascending per row
    renumbered = np.where(first, ranks, np.r_[0, np.diff(ranks)]).astype(gaps.dtype)

    def run_length(data: bytes, level: int = 1) -> bytes:
        stream = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, zlib.Z_RLE)
        return stream.compress(data) + stream.flush()

    coders = {"zlib run-length 1": run_length, "zlib 1": lambda d: zlib.compress(d, 1),
              **{f"libdeflate {n}": (lambda d, n=n: deflate.zlib_compress(d, n)) for n in (6, 9, 12)}}
    print(f"\n{uri}: {tokens:,} tokens, N = {draws}, {len(gaps) / tokens:.1f} entries per row; B/token (MB/s)")
    print("| dataset | " + " | ".join(coders) + " |")
    print("|---|" + "---:|" * len(coders))
    for name, values in (("sampled_id_gaps", gaps), ("sampled_counts", counts), ("gaps of frequency ranks", renumbered)):
        step = (1 << 20) // values.dtype.itemsize
        chunks = [np.ascontiguousarray(values[i:i + step].view(np.uint8).reshape(-1, values.dtype.itemsize).T).tobytes()
                  for i in range(0, len(values), step)]  # shuffled, as the writer stores them
        cells = []
        for code in coders.values():
            started = time.process_time()
            size = sum(len(code(chunk)) for chunk in chunks)
            cells.append(f"{size / tokens:.2f} ({values.nbytes / (time.process_time() - started) / 1e6:.0f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


def ids_coding(uri: str, max_lengths: list[int]) -> None:
    """The --ids-coding rows of one top-k cache (see the module's docstring)."""
    from unittest import mock

    from kd_core.h5cache import CacheWriter
    from kd_core.h5cache import writer as writer_module

    with CacheReader(uri) as reader:
        files, top_k, vocab = reader.files, reader.top_k, reader.vocab_size
    out = Path(tempfile.mkdtemp(prefix="kd-ids-coding-"))
    try:
        for max_length in max_lengths:
            sizes = {}
            for label, trials in (("unshuffled", 1 << 30), ("now", writer_module.TRIAL_CHUNKS)):
                stored = tokens = 0
                for file in files:
                    with CacheReader(file) as part:
                        arrays = part.read_all()
                    offsets = arrays["offsets"]
                    with mock.patch.object(writer_module, "TRIAL_CHUNKS", trials), \
                            CacheWriter(out / "f.h5", top_k=top_k, vocab_size=vocab, attrs={}, max_length=max_length) as w:
                        for s in range(len(offsets) - 1):
                            lo, hi = offsets[s], offsets[s + 1]
                            w.append(int(arrays["sample_index"][s]), *(arrays[n][lo:hi] for n in
                                     ("input_ids", "topk_indices", "topk_logprobs", "logsumexp")))
                    stored += (out / "f.h5").stat().st_size
                    tokens += int(offsets[-1])
                sizes[label] = stored / tokens
            print(f"| {uri} | max_length {max_length} | {sizes['unshuffled']:.2f} | {sizes['now']:.2f} | "
                  f"{(sizes['now'] / sizes['unshuffled'] - 1) * 100:+.1f}% |")
    finally:
        shutil.rmtree(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uris", nargs="*")
    parser.add_argument("--test-teacher-70k", action="store_true")
    parser.add_argument("--work", default="./out/bench-bytes")
    parser.add_argument("--sampled-codings", action="store_true", help="also the codings table of sampled caches")
    parser.add_argument("--ids-coding", type=lambda v: [int(n) for n in v.split(",")], metavar="MAX_LENGTHS",
                        help="also: each top-k cache's rows rewritten with these max_lengths' chunks, ids both ways")
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
    for uri in uris if args.sampled_codings else []:
        if _entries(uri):
            sampled_codings(uri)
    if args.ids_coding:
        print("\n| cache | chunks | B/token, ids unshuffled | B/token, now | change |\n|---|---|---:|---:|---:|")
        for uri in uris:
            if not _entries(uri):
                ids_coding(uri, args.ids_coding)


if __name__ == "__main__":
    main()
