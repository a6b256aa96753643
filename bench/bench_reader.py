"""How fast a student's data loader gets samples out of a cache. Prints a table.

    python bench/bench_reader.py                          # builds the cache once under --work (~2 min on 2 cores)
    python bench/bench_reader.py --modes random,stream    # some rows only

The cache is built once by the real pipeline (validate, estimate, plan, run_shard, merge) with the demo teacher
(@demo/teacher: vocab 4096, so uint16 ids) over the demo corpus (stdlib docstrings), top-k = 64, max_length 512,
and reused while its settings match. Rows, each in a fresh process (so memory is that mode's own):

  file order        CacheDataset[i] for i = 0, 1, 2, ...
  random order      CacheDataset[i] over a seeded permutation (what DataLoader(shuffle=True) does)
  grouped           CacheDataset[i] in EpochSampler(file_starts=ds.file_starts()) order: random within groups of
                    16 files (the files a reader keeps open), the groups one after another
  loader wN         DataLoader(CacheDataset, shuffle=True, batch_size=8, num_workers=N, collate_fn=pad_collate)
  tokens wN         the same with batch_sampler=TokenBatchSampler(lengths, max_tokens=4096): batches of similar
                    lengths, so little padding to build and hand over
  streaming         StreamingCacheDataset, epoch after epoch (set_epoch)
  s3random          CacheDataset over s3:// (moto's server on loopback, in its own process, each request delayed
                    by --latency-ms), random order, its parts downloaded whole into an empty local part cache
  s3ranged          the same with cache_bytes=0: parts read in place by ranged GETs (fsspec's block cache)
  s3 stream         StreamingCacheDataset over the same s3:// copy

Columns: samples/s and tokens/s (wall clock; tokens = rows of the samples returned), tokens/CPU-s (per second of
the reading process's own CPU time, the workers' for loader rows: what one unshared core would do, so it holds on
a busy machine), read amplification = bytes decompressed / bytes of the samples returned (as stored; from
CacheReader.stats(): every chunk the reads inflated, whole; the reader keeps each dataset's last two chunks, so a
small cache read again is not flattered by a chunk cache), files opened = part files the reader opened (again
after MAX_OPEN others pushed one out: several ms each), RSS = peak resident memory of the reading process (the
largest worker's for loader rows), GETs = requests the S3 server answered. A local row reads for about --seconds, epoch after epoch (a
new order each), timed from its dataset's first read: opening a cache (manifest, listing) is a fixed cost, not
throughput; the loader and tokens rows are timed from before their dataset opens, the workers' start included.
An S3 row reads one epoch at most, timed from opening, so its downloads count.

Then the layout table: the same rows rewritten by CacheWriter into one file per layout: 1 MiB chunks (what files
without a max_length get, and every file before sample-sized chunks) and sample-sized chunks
(h5cache.format.token_chunk_rows of --max-length, or of each --layout-lengths value), each coded as the writer did
before (zlib, level 1, uint16 ids unshuffled), with libdeflate at level 6 and the ids still unshuffled, and as it
does now (libdeflate 6, uint16 ids shuffled or not per group of chunks, whichever is smaller); --layouts times
each: write speed (raw bytes in per second, wall; CPU seconds per GB, the compression pool's threads included),
stored bytes per token, and each file read in this process: random order, file order (CacheReader) and front to
back (iter_samples, what StreamingCacheDataset uses), in tokens per CPU-second. The writes go round the layouts
--layouts times and each column is their median, so a shared machine's drift falls on every layout alike.

--workers adds where a DataLoader worker's CPU time goes, in one process with one torch thread (as a worker
has): reading a batch's samples, pad_collate, and sending the batch as a worker's queue does (torch copies each
tensor into a new shared-memory segment), for random batches of 8 and TokenBatchSampler's.

--inflate adds where the floor is: per dataset, h5py reading the part files whole, zlib / zlib-ng / libdeflate
inflating their raw chunks, and the reader's RawColumn; then the tokens per CPU-second of reading everything whole
(no per-sample reader beats it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

MODES = ("file", "random", "grouped", "loader1", "loader2", "loader4", "tokens2", "stream", "s3random", "s3ranged",
         "s3stream")


def build_cache(work: Path, samples: int, top_k: int, max_length: int, parts: int = 8) -> str:
    """The cache under work/local, in about `parts` part files (built once per settings); its output.uri."""
    from kd_core.build import validate
    from kd_core.estimate import estimate
    from kd_core.merge import merge
    from kd_core.shard import plan, run_shard

    uri = str(work / (f"local-{samples}-{top_k}-{max_length}" + (f"-{parts}parts" if parts != 8 else "")))
    if (Path(uri) / "latest.json").exists():
        return uri
    config = validate("demo", {
        "dataset": {"max_samples": samples}, "cache": {"top_k": top_k, "max_length": max_length},
        "output": {"uri": uri}, "run": {"num_shards": 2, "part_samples": max(1, samples // parts)},
        "teacher": {"device": "cpu"},
    })
    estimate(config)
    records = [run_shard(config, shard) for shard in plan(config).shards]
    merge(config, records)
    return uri


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def with_rss(samples):
    """DataLoader collate: pad_collate's batch, the worker's id, peak RSS and read counters."""
    from torch.utils.data import get_worker_info

    from kd_core.dataset import pad_collate

    batch, worker = pad_collate(samples), get_worker_info()
    stats = {**worker.dataset.stats(), "cpu": time.process_time()} if worker else None
    return batch, peak_rss_mib(), worker.id if worker else 0, stats


def read_mode(mode: str, uri: str, opts: dict | None, seconds: float) -> dict:
    """Read in one mode for about `seconds`; the row's figures."""
    import numpy as np
    from torch.utils.data import DataLoader

    from kd_core.dataset import CacheDataset, StreamingCacheDataset
    from kd_core.samplers import EpochSampler

    samples = tokens = 0
    rss = 0.0
    started, cpu_started = time.perf_counter(), time.process_time()
    stats = None
    epochs = 1 if mode.startswith("s3") else 1 << 30  # local rows: epoch after epoch, until `seconds` have passed
    if mode in ("file", "random", "grouped", "s3random", "s3ranged"):
        scratch = tempfile.mkdtemp(prefix="kd-bench-parts-")  # an empty part cache: the first read of each downloads
        ds = CacheDataset(uri, opts, cache_dir=scratch, cache_bytes=0 if mode == "s3ranged" else 1 << 30)
        if not mode.startswith("s3"):  # a local row measures reading, not opening the cache (its manifest, listing)
            started, cpu_started = time.perf_counter(), time.process_time()
        for epoch in range(epochs):
            if mode == "file":
                order = range(len(ds))
            elif mode == "grouped":  # random within groups of the files a reader keeps open
                order = EpochSampler(len(ds), seed=epoch, file_starts=ds.file_starts())
            else:
                order = np.random.default_rng(epoch).permutation(len(ds))
            for i in order:
                s = ds[int(i)]
                samples, tokens = samples + 1, tokens + len(s["input_ids"])
                if time.perf_counter() - started > seconds:
                    break
            if time.perf_counter() - started > seconds:
                break
        stats = ds.stats()
        shutil.rmtree(scratch, ignore_errors=True)
    elif mode.startswith(("loader", "tokens")):
        from kd_core.samplers import TokenBatchSampler

        ds = CacheDataset(uri, opts)
        workers = int(mode[6:])
        batches = (dict(batch_size=8, shuffle=True, generator=__import__("torch").Generator().manual_seed(0))
                   if mode.startswith("loader") else dict(batch_sampler=TokenBatchSampler(ds.lengths(), max_tokens=4096)))
        loader = DataLoader(ds, num_workers=workers, collate_fn=with_rss, persistent_workers=workers > 0, **batches)
        per_worker = {}
        while time.perf_counter() - started <= seconds:  # epoch after epoch; the workers' start is in the first
            for batch, worker_rss, worker, worker_stats in loader:
                rss, per_worker[worker] = max(rss, worker_rss), worker_stats
                samples, tokens = samples + len(batch["input_ids"]), tokens + int(batch["attention_mask"].sum())
                if time.perf_counter() - started > seconds:
                    break
        stats = {k: sum(w[k] for w in per_worker.values()) for k in ("bytes_decompressed", "bytes_returned", "cpu")}
    else:  # stream, s3stream
        ds = StreamingCacheDataset(uri, opts, seed=0)
        if not mode.startswith("s3"):
            started, cpu_started = time.perf_counter(), time.process_time()
        for epoch in range(epochs):
            ds.set_epoch(epoch)
            for s in ds:
                samples, tokens = samples + 1, tokens + len(s["input_ids"])
                if time.perf_counter() - started > seconds:
                    break
            if time.perf_counter() - started > seconds:
                break
    elapsed = time.perf_counter() - started
    cpu = (stats or {}).get("cpu") or time.process_time() - cpu_started  # loader rows: the workers' CPU time
    out = {"samples": samples, "tokens": tokens, "seconds": elapsed, "cpu": cpu, "rss": max(rss, peak_rss_mib())}
    if stats is not None and stats.get("bytes_returned"):
        out["amplification"] = stats["bytes_decompressed"] / stats["bytes_returned"]
    if stats is not None and "files_opened" in stats:
        out["opened"] = stats["files_opened"]
    return out


def zlib_level_1(data: bytes, level: int) -> bytes:
    """What the writer's chunks were before libdeflate (zlib, level 1): the layout table's "zlib 1" rows."""
    return zlib.compress(data, 1)


def layout_table(uri: str, work: Path, max_lengths: list[int], repeat: int) -> None:
    """The cache's rows rewritten by CacheWriter as one file per layout: 1 MiB chunks (what files without
    max_length get) and sample-sized chunks, each coded as the writer did before (zlib, level 1, ids unshuffled), with
    libdeflate 6 (ids unshuffled), and as it does now (libdeflate 6, uint16 ids shuffled at level 4 or not at 6,
    per group): write speed, size, and reads of each, in-process."""
    from unittest import mock

    import deflate
    import numpy as np

    from kd_core.h5cache import CacheReader, CacheWriter, iter_samples
    from kd_core.h5cache import writer as writer_module

    with CacheReader(uri) as reader:
        arrays, top_k, vocab = reader.read_all(), reader.top_k, reader.vocab_size
    offsets, tokens = arrays["offsets"], int(arrays["offsets"][-1])
    raw = sum(arrays[n].nbytes for n in ("input_ids", "topk_indices", "topk_logprobs", "logsumexp"))
    print(f"\n{tokens:,} tokens rewritten {repeat}x per layout, the layouts in turn (medians); reads in this process, "
          "tokens per CPU-second")
    print("| layout | write MB/s (raw) | write CPU-s per GB | B/token | random tok/CPU-s | random amplification | "
          "file order tok/CPU-s | stream tok/CPU-s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    layouts = [(f"{chunks}, {coder}", length, coder)
               for chunks, length in (("1 MiB chunks", None),
                                      *((f"sample-sized (max_length {n})", n) for n in max_lengths))
               for coder in ("zlib 1", "libdeflate 6, ids unshuffled", "libdeflate 6")]
    paths = {label: work / f"layout-{length}-{coder.replace(' ', '').replace(',', '-')}.h5"
             for label, length, coder in layouts}
    writes: dict[str, list[tuple[float, float]]] = {label: [] for label in paths}  # (wall, CPU) seconds per write
    for _ in range(repeat):  # the layouts in turn, `repeat` rounds: a shared machine's drift falls on all alike
        for label, length, coder in layouts:
            paths[label].unlink(missing_ok=True)
            started, cpu_started = time.perf_counter(), time.process_time()
            with mock.patch.object(deflate, "zlib_compress", zlib_level_1 if coder == "zlib 1" else deflate.zlib_compress), \
                    mock.patch.object(writer_module, "TRIAL_CHUNKS", 1 << 30 if "unshuffled" in coder or "zlib" in coder
                                      else writer_module.TRIAL_CHUNKS), \
                    CacheWriter(paths[label], top_k=top_k, vocab_size=vocab, attrs={}, max_length=length) as writer:
                for s in range(len(offsets) - 1):
                    lo, hi = offsets[s], offsets[s + 1]
                    writer.append(int(arrays["sample_index"][s]), arrays["input_ids"][lo:hi],
                                  arrays["topk_indices"][lo:hi], arrays["topk_logprobs"][lo:hi],
                                  arrays["logsumexp"][lo:hi])
            # CPU: every thread of this process, the compression pool's too
            writes[label].append((time.perf_counter() - started, time.process_time() - cpu_started))
    for label, path in paths.items():
        wall, cpu = (float(np.median([w[k] for w in writes[label]])) for k in (0, 1))
        reads = {}
        for order in ("random", "file"):
            with CacheReader(str(path)) as reader:
                picks = np.random.default_rng(0).permutation(len(reader)) if order == "random" else range(len(reader))
                cpu_started = time.process_time()
                for i in picks:
                    reader[int(i)]
                reads[order] = (tokens / (time.process_time() - cpu_started), reader.stats())
        cpu_started = time.process_time()
        for _ in iter_samples(path):
            pass
        stream = tokens / (time.process_time() - cpu_started)
        stats = reads["random"][1]
        print(f"| {label} | {raw / wall / 1e6:,.0f} | {cpu / (raw / 1e9):,.1f} | "
              f"{path.stat().st_size / tokens:.1f} | {reads['random'][0]:,.0f} | "
              f"{stats['bytes_decompressed'] / stats['bytes_returned']:.2f} | {reads['file'][0]:,.0f} | {stream:,.0f} |")


def worker_table(uri: str, repeat: int = 3) -> None:
    """Where a DataLoader worker's CPU time goes, per batch: reading its samples (CacheDataset[i]), pad_collate, and
    sending the batch (what a worker's queue does: ForkingPickler with torch's reductions, which copy each tensor
    into a new shared-memory segment for the main process), for random batches of 8 and for TokenBatchSampler's
    batches of similar lengths; each stage in tokens (real, not padding) per CPU-second, medians of `repeat`
    epochs. Padded batches hold 12 B per top-k entry (int64 ids, float32 log-probs), so what a worker sends grows
    with the padding."""
    from multiprocessing.reduction import ForkingPickler

    import numpy as np
    import torch
    import torch.multiprocessing  # noqa: F401  (registers the reductions to shared memory, as DataLoader does)

    from kd_core.dataset import CacheDataset, pad_collate
    from kd_core.samplers import TokenBatchSampler

    # One thread, as in a DataLoader worker: with more, pad_collate's large fills run on OpenMP threads that then
    # spin, and the process's CPU time (every thread's) would double the cost of everything after them.
    torch.set_num_threads(1)
    ds = CacheDataset(uri)
    lengths = ds.lengths()
    print("\n| batches | padded / real tokens | batch KiB per real token | read | pad_collate | send | worker, all |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, epoch_batches in (
            ("shuffle, batch_size 8", lambda e: np.random.default_rng(e).permutation(len(ds) // 8 * 8).reshape(-1, 8)),
            ("TokenBatchSampler(max_tokens=4096)", lambda e: TokenBatchSampler(lengths, max_tokens=4096, seed=e))):
        times = []
        for epoch in range(repeat + 1):  # the first epoch opens the files and lists their chunks: not counted
            cpu = [0.0, 0.0, 0.0]
            tokens = padded = sent = 0
            for batch in epoch_batches(epoch):
                t0 = time.process_time()
                samples = [ds[int(i)] for i in batch]
                t1 = time.process_time()
                padded_batch = pad_collate(samples)
                t2 = time.process_time()
                message = ForkingPickler.dumps(padded_batch)
                t3 = time.process_time()
                cpu = [cpu[0] + t1 - t0, cpu[1] + t2 - t1, cpu[2] + t3 - t2]
                tokens += int(lengths[batch].sum())
                padded += padded_batch["attention_mask"].numel()
                sent += sum(t.nbytes for t in padded_batch.values())
                del message, padded_batch
            if epoch:
                times.append(cpu)
        read, collate, send = np.median(times, axis=0)
        print(f"| {label} | {padded / tokens:.2f} | {sent / tokens / 1024:.2f} | {tokens / read:,.0f} | "
              f"{tokens / collate:,.0f} | {tokens / send:,.0f} | {tokens / (read + collate + send):,.0f} |")


def inflate_table(uri: str, repeat: int = 3) -> None:
    """Where a reader's floor is: per row dataset of the cache's part files, h5py reading it whole (a fresh handle
    per file, so no chunk is cached), zlib / zlib-ng (when installed) / libdeflate inflating its raw chunks alone
    (read_direct_chunk; the shuffle filter not undone), and the reader's RawColumn (chunks fetched, inflated by
    libdeflate, unshuffled), in MB of output per CPU-second; then the tokens per CPU-second of reading every row
    dataset whole through h5py and through RawColumn, which no per-sample reader of these files can beat."""
    import zlib

    import deflate
    import h5py
    import numpy as np

    from kd_core.h5cache import CacheReader
    from kd_core.h5cache.chunks import raw_column
    from kd_core.h5cache.format import row_datasets

    try:
        from zlib_ng import zlib_ng
    except ImportError:  # optional: pip install zlib-ng
        zlib_ng = None
    with CacheReader(uri) as reader:
        files, tokens = [f for f in reader.files], reader.num_tokens
    with h5py.File(files[0]) as first:
        names = list(row_datasets(first))
    print(f"\ninflate: {len(files)} part files read whole {repeat}x; MB of output per CPU-second")
    print("| dataset | raw MB | h5py | zlib | zlib-ng | libdeflate | RawColumn |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    whole_cpu = {"h5py": 0.0, "RawColumn": 0.0}
    libraries = {"zlib": lambda c, n: zlib.decompress(c), "zlib-ng": zlib_ng and (lambda c, n: zlib_ng.decompress(c)),
                 "libdeflate": deflate.zlib_decompress}
    for name in names:
        raw, rate, chunks = 0, {}, []
        for reader_name in ("h5py", "RawColumn"):
            cpu = time.process_time()
            for _ in range(repeat):
                for f in files:
                    with h5py.File(f, rdcc_nbytes=0) as h:
                        d = h[name]
                        rows = d[:] if reader_name == "h5py" else raw_column(d).rows(0, d.shape[0])
                        raw += rows.nbytes if reader_name == "h5py" else 0
            whole_cpu[reader_name] += time.process_time() - cpu
            rate[reader_name] = raw / (time.process_time() - cpu) / 1e6
        for f in files:
            with h5py.File(f) as h:
                d = h[name].id
                size = h[name].dtype.itemsize * int(np.prod(h[name].chunks))
                chunks += [(d.read_direct_chunk(d.get_chunk_info(i).chunk_offset)[1], size) for i in range(d.get_num_chunks())]
        for label, inflate in libraries.items():
            if inflate is None:
                rate[label] = None
                continue
            cpu = time.process_time()
            for _ in range(repeat):
                for c, size in chunks:
                    inflate(c, size)
            rate[label] = raw / (time.process_time() - cpu) / 1e6
        cells = " | ".join("-" if rate[k] is None else f"{rate[k]:,.0f}"
                           for k in ("h5py", "zlib", "zlib-ng", "libdeflate", "RawColumn"))
        print(f"| {name} | {raw / repeat / 1e6:.1f} | {cells} |")
    for reader_name, cpu in whole_cpu.items():
        print(f"{reader_name}, every row dataset whole: {tokens * repeat / cpu:,.0f} tokens per CPU-second")


def serve_s3(latency_ms: float) -> None:
    """Run moto's S3 server here, every request delayed by latency_ms; print the endpoint, serve until killed."""
    import logging

    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    class SlowServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            inner = DomainDispatcherApplication(create_backend_app)

            def app(environ, start_response):
                counter[0] += 1
                time.sleep(latency_ms / 1000)
                return inner(environ, start_response)

            self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    counter = [0]
    server = SlowServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"http://{host}:{port}", flush=True)
    for line in sys.stdin:  # "count": the requests served so far
        print(counter[0], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kd-bench-reader"))
    parser.add_argument("--samples", type=int, default=1200)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--parts", type=int, default=8, help="part files of the cache (more than CacheReader keeps "
                        "open makes random order reopen files, as a large cache does)")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--layout-lengths", type=lambda v: [int(n) for n in v.split(",")],
                        help="the layout table's sample-sized rows: chunks for these max_length values (default: "
                             "--max-length); rows of a longer max_length show its bytes, their amplification is "
                             "that of this cache's shorter samples")
    parser.add_argument("--layouts", type=int, default=3, metavar="REPEAT",
                        help="also the layout table: the rows rewritten REPEAT times per chunking (0: skip it)")
    parser.add_argument("--workers", action="store_true",
                        help="also the worker table: a DataLoader worker's CPU time per batch, read / pad_collate / "
                             "send")
    parser.add_argument("--inflate", action="store_true",
                        help="also the inflate table: h5py, zlib, zlib-ng (if installed), libdeflate and "
                             "RawColumn on the part files' chunks")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--opts", help=argparse.SUPPRESS)
    parser.add_argument("--serve-s3", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_s3:
        return serve_s3(args.latency_ms)
    if args.one:
        print(json.dumps(read_mode(args.one, args.uri, json.loads(args.opts) if args.opts else None, args.seconds)))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    uri = build_cache(args.work, args.samples, args.top_k, args.max_length, args.parts)
    from kd_core.h5cache import CacheReader

    with CacheReader(uri) as reader:
        info = reader.info()
    print(f"cache: {info.num_samples:,} samples, {info.num_tokens:,} tokens ({info.num_tokens / info.num_samples:.0f} "
          f"per sample), k={info.top_k}, {info.bytes_per_token:.1f} B/token on disk, {len(reader.files)} part files")
    modes = [m for m in args.modes.split(",") if m]
    server = endpoint = None
    if any(m.startswith("s3") for m in modes):
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(env)
        server = subprocess.Popen([sys.executable, __file__, "--serve-s3", "--latency-ms", str(args.latency_ms)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        endpoint = server.stdout.readline().strip()
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir("bench")
        fs.put(uri.rstrip("/") + "/", "bench/cache/", recursive=True)

    def requests() -> int:
        server.stdin.write("count\n")
        server.stdin.flush()
        return int(server.stdout.readline())

    print("| reader | samples | samples/s | tokens/s | tokens/CPU-s | read amplification | files opened | RSS MiB | GETs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    try:
        for mode in modes:
            remote = mode.startswith("s3")
            target = "s3://bench/cache" if remote else uri
            opts = {"endpoint_url": endpoint} if remote else None
            before = requests() if remote else 0
            run = subprocess.run([sys.executable, __file__, "--one", mode, "--uri", target, "--opts", json.dumps(opts),
                                  "--seconds", str(args.seconds)], capture_output=True, text=True)
            if run.returncode != 0:
                print(f"| {mode} | failed: {(run.stderr.strip().splitlines() or ['?'])[-1]} |||||")
                continue
            row = json.loads(run.stdout.strip().splitlines()[-1])
            gets = requests() - before if remote else "-"
            amp = f"{row['amplification']:.2f}" if "amplification" in row else "-"
            print(f"| {mode} | {row['samples']:,} | {row['samples'] / row['seconds']:,.0f} | "
                  f"{row['tokens'] / row['seconds']:,.0f} | {row['tokens'] / row['cpu']:,.0f} | {amp} | "
                  f"{row.get('opened', '-')} | {row['rss']:.0f} | {gets} |")
    finally:
        if server is not None:
            server.kill()
    if args.layouts:
        layout_table(uri, args.work, args.layout_lengths or [args.max_length], args.layouts)
    if args.workers:
        worker_table(uri)
    if args.inflate:
        inflate_table(uri)


if __name__ == "__main__":
    main()
