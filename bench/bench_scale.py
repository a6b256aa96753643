"""What the output layout costs at scale: merge time and index size against samples and tokens, and how fast a
student's reader gets samples from a local disk and from S3 (moto's server on loopback).

    .venv/bin/python bench/bench_scale.py [--samples 4000 16000 64000] [--reader-samples 4000]

Versions are synthetic (random top-k rows, no teacher): parts are written and published exactly as run_shard
publishes them (SplitWriter, io.publish_file, typed records), then timed through kd_core.merge. Prints two tables.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from kd_core import h5cache, io
from kd_core.build import Build
from kd_core.merge import merge
from kd_core.shard import plan_parts
from kd_core.config import load_config
from kd_core.data import ShardSpec, split_rows
from kd_core.records import FileRecord, PartRecord, Provenance, ShardRecord
from kd_core.source import ResolvedDataset, ResolvedSource, ResolvedTeacher

SHARDS = 4
TOP_K, VOCAB = 16, 32000


class Rows:
    def __init__(self, sample_index: int, mean_length: int, rng: np.random.Generator):
        length = int(rng.integers(mean_length // 2, mean_length * 3 // 2 + 1))  # lengths vary, as in real text
        self.sample_index = sample_index
        self.input_ids = rng.integers(0, VOCAB, length).astype(np.uint32)
        self.topk_indices = rng.integers(0, VOCAB, (length, TOP_K)).astype(np.uint16)
        self.topk_logprobs = -np.sort(rng.exponential(2.0, (length, TOP_K)), axis=1).astype(np.float16)
        self.logsumexp = rng.normal(size=length).astype(np.float32)


def synthetic_version(uri: str, samples: int, tokens: int, part_samples: int, opts: dict | None = None):
    """A Build whose shards are written as run_shard writes them; its shard records."""
    config = load_config("testing", {"output": {"uri": uri, "storage_options": opts or {}, "max_bytes": None},
                                     "dataset": {"max_samples": samples}, "cache": {"top_k": TOP_K},
                                     "run": {"num_shards": SHARDS, "part_samples": part_samples}})
    synthetic = ResolvedSource(  # nothing is read from a source: the rows are made up
        teacher=ResolvedTeacher(model=config.teacher.model, revision=None, sha=None, fingerprint="synthetic"),
        dataset=ResolvedDataset(name="synthetic", config=None, split="train", revision=None, sha=None,
                                builder="synthetic", files=None))
    build, rng = Build.of(config, synthetic), np.random.default_rng(0)
    store, key = build.store, build.key
    build_id = store.build_id(key)
    provenance = Provenance(format_version=1, vocab_size=VOCAB, top_k=TOP_K, tokenizer="synthetic",
                            teacher_dtype="float32")
    scratch = Path(tempfile.mkdtemp(prefix="kd-bench-"))
    shards = []
    for index, (start, stop) in enumerate(split_rows(samples, SHARDS)):
        shard = ShardSpec(index=index, world_size=SHARDS, start=start, stop=stop, rows_read=stop - start)
        parts = []
        for p, (a, b) in enumerate(plan_parts(shard, part_samples)):
            files: list[FileRecord] = []

            def publish(path, summary, p=p, files=files):
                name, size = store.part_name(shard, p, len(files)), Path(path).stat().st_size
                stamp = store.publish_file(path, store.version_file(key, name))
                files.append(FileRecord(name=name, bytes=size, num_samples=summary["num_samples"], num_tokens=summary["num_tokens"],
                                        checksums=summary["checksums"], **stamp))

            local = (lambda f, p=p: io.local_path(store.part_file(key, shard, p, f))) if io.is_local(uri) else \
                (lambda f, p=p: scratch / f"{shard.name}-{p}-{f}.h5")
            with h5cache.SplitWriter(local, config.output.max_object_bytes, publish, top_k=TOP_K,
                                       vocab_size=VOCAB, attrs={}) as writer:
                for row in range(a, b):
                    writer.append_rows(Rows(row, tokens, rng))
            parts.append(PartRecord(part=p, start=a, stop=b, num_samples=b - a,
                                    num_tokens=sum(f.num_tokens for f in files),
                                    skipped_empty=0, seconds=0.0, provenance=provenance, files=files,
                                    build_id=build_id))
        record = ShardRecord.from_parts(shard, parts)
        store.write_record(store.shard_record(key, shard), record)
        shards.append(record)
    return build, shards


def counted_s3_calls():
    """A list that collects the name of every S3 call s3fs makes from now on."""
    import s3fs

    calls, real = [], s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        calls.append(method)
        return await real(self, method, *args, **kwargs)

    s3fs.S3FileSystem._call_s3 = counting
    return calls


def start_moto() -> tuple[str, dict]:
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("bench")
    return endpoint, {"endpoint_url": endpoint}


def merge_table(sample_counts: list[int], endpoint_opts: dict) -> None:
    print("| target | samples | tokens/sample | part files | merge s | S3 requests | index bytes | index / version |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    calls = counted_s3_calls()
    # (target, samples, mean tokens per sample, samples per part): samples, tokens and files varied one at a time
    mid = sample_counts[len(sample_counts) // 2]
    cases = [("local", n, 16, 500) for n in sample_counts] + [("local", mid, 64, 500), ("local", mid, 16, 125)]
    cases += [("moto", n, 16, 500) for n in sample_counts[:2]] + [("moto", sample_counts[0], 16, 125)]
    for target, n, tokens, part_samples in cases:
        root = tempfile.mkdtemp(prefix="kd-bench-out-") if target == "local" else f"s3://bench/m{n}-{tokens}-{part_samples}"
        opts = None if target == "local" else endpoint_opts
        config, shards = synthetic_version(root, n, tokens, part_samples=part_samples, opts=opts)
        calls.clear()
        started = time.perf_counter()
        manifest = merge(config, shards)
        seconds = time.perf_counter() - started
        requests = len(calls) if target == "moto" else "-"
        print(f"| {target} | {n:,} | {tokens} | {len(manifest.parts)} | {seconds:.2f} | {requests} | "
              f"{manifest.index.bytes:,} | {100 * manifest.index.bytes / manifest.file_bytes:.2f}% |")


def reader_table(samples: int, endpoint_opts: dict) -> None:
    from kd_core.dataset import CacheDataset, StreamingCacheDataset

    print()
    print("| target | reader | samples | seconds | samples/s | MB/s (stored) |")
    print("|---|---|---:|---:|---:|---:|")
    for target in ("local", "moto"):
        root = tempfile.mkdtemp(prefix="kd-bench-read-") if target == "local" else "s3://bench/reader"
        opts = None if target == "local" else endpoint_opts
        config, shards = synthetic_version(root, samples, 256, part_samples=samples // 16, opts=opts)
        manifest = merge(config, shards)
        picks = np.random.default_rng(1).permutation(samples)[:300]
        ds = CacheDataset(root, opts)
        started = time.perf_counter()
        for i in picks:
            ds[int(i)]
        seconds = time.perf_counter() - started
        print(f"| {target} | CacheDataset, random access | {len(picks):,} | {seconds:.2f} | {len(picks) / seconds:,.0f} | - |")
        started = time.perf_counter()
        count = sum(1 for _ in StreamingCacheDataset(root, opts, seed=0))
        seconds = time.perf_counter() - started
        print(f"| {target} | StreamingCacheDataset, one epoch | {count:,} | {seconds:.2f} | {count / seconds:,.0f} | "
              f"{manifest.file_bytes / 1e6 / seconds:.0f} |")
        done = h5cache.export_cache(root, Path(tempfile.mkdtemp(prefix="kd-bench-export-")) / "one.h5", opts)
        print(f"| {target} | kd-cache export (chunks copied) | {done['num_samples']:,} | {done['seconds']:.2f} | "
              f"{done['num_samples'] / done['seconds']:,.0f} | {done['bytes'] / 1e6 / done['seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[4000, 16000, 64000])
    parser.add_argument("--reader-samples", type=int, default=4000)
    args = parser.parse_args()
    _, opts = start_moto()
    merge_table(args.samples, opts)
    reader_table(args.reader_samples, opts)


if __name__ == "__main__":
    main()
