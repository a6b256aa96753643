"""How fast a student's data loader gets samples out of a cache. Prints a table.

    python bench/bench_reader.py                          # builds the cache once under --work (~2 min on 2 cores)
    python bench/bench_reader.py --modes random,stream    # some rows only

The cache is built once by the real pipeline (validate, estimate, plan, run_shard, merge) with the demo teacher
(@demo/teacher: vocab 4096, so uint16 ids) over the demo corpus (stdlib docstrings), top-k = 64, max_length 512,
and reused while its settings match. Rows, each in a fresh process (so memory is that mode's own):

  file order        CacheDataset[i] for i = 0, 1, 2, ...
  random order      CacheDataset[i] over a seeded permutation (what DataLoader(shuffle=True) does)
  loader wN         DataLoader(CacheDataset, shuffle=True, batch_size=8, num_workers=N), samples as returned
  streaming         StreamingCacheDataset, one epoch
  s3 random         CacheDataset over s3:// (moto's server on loopback, in its own process, each request delayed
                    by --latency-ms), random order, its parts cached locally (CacheDataset's part cache)
  s3 stream         StreamingCacheDataset over the same s3:// copy

Columns: samples/s and tokens/s (tokens = rows of the samples returned), read amplification = bytes decompressed
/ bytes of the samples returned (as stored; from the reader's counters: the chunks each read decompressed),
RSS = peak resident memory of the reading process (the largest worker's for loader rows), GETs = S3 requests.
Each row reads for about --seconds, or one epoch, whichever ends first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

MODES = ("file", "random", "loader1", "loader2", "loader4", "stream", "s3random", "s3stream")


def build_cache(work: Path, samples: int, top_k: int, max_length: int) -> str:
    """The cache under work/local (built once per settings); its output.uri."""
    from kd_core.build import validate
    from kd_core.estimate import estimate
    from kd_core.merge import merge
    from kd_core.shard import plan, run_shard

    uri = str(work / f"local-{samples}-{top_k}-{max_length}")
    if (Path(uri) / "latest.json").exists():
        return uri
    config = validate("demo", {
        "dataset": {"max_samples": samples}, "cache": {"top_k": top_k, "max_length": max_length},
        "output": {"uri": uri}, "run": {"num_shards": 2, "part_samples": max(1, samples // 8)},
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


def sample_bytes(sample: dict) -> int:
    """Bytes of one sample as stored (k=64 top-k, uint16 ids: 4 + 128 + 128 + 4 per token)."""
    from kd_core.h5cache.format import row_bytes, row_layout

    return len(sample["input_ids"]) * row_bytes(row_layout(sample["topk_indices"].shape[-1], 65536))


def with_rss(batch):
    """DataLoader collate that keeps the samples and adds the worker's peak RSS."""
    return batch, peak_rss_mib()


def read_mode(mode: str, uri: str, opts: dict | None, seconds: float) -> dict:
    """Read in one mode for about `seconds`; the row's figures."""
    import numpy as np
    from torch.utils.data import DataLoader

    from kd_core.dataset import CacheDataset, StreamingCacheDataset

    samples = tokens = stored = 0
    rss = 0.0
    started = time.perf_counter()
    stats = None
    if mode in ("file", "random", "s3random"):
        ds = CacheDataset(uri, opts)
        order = range(len(ds)) if mode == "file" else np.random.default_rng(0).permutation(len(ds))
        for i in order:
            s = ds[int(i)]
            samples, tokens, stored = samples + 1, tokens + len(s["input_ids"]), stored + sample_bytes(s)
            if time.perf_counter() - started > seconds:
                break
        stats = getattr(ds, "stats", None)
    elif mode.startswith("loader"):
        ds = CacheDataset(uri, opts)
        loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=int(mode[6:]), collate_fn=with_rss,
                            generator=__import__("torch").Generator().manual_seed(0))
        for batch, worker_rss in loader:
            rss = max(rss, worker_rss)
            for s in batch:
                samples, tokens, stored = samples + 1, tokens + len(s["input_ids"]), stored + sample_bytes(s)
            if time.perf_counter() - started > seconds:
                break
    else:  # stream, s3stream
        for s in StreamingCacheDataset(uri, opts, seed=0):
            samples, tokens, stored = samples + 1, tokens + len(s["input_ids"]), stored + sample_bytes(s)
            if time.perf_counter() - started > seconds:
                break
    elapsed = time.perf_counter() - started
    out = {"samples": samples, "tokens": tokens, "seconds": elapsed, "rss": max(rss, peak_rss_mib())}
    if stats is not None and stats.get("bytes_returned"):
        out["amplification"] = stats["bytes_decompressed"] / stats["bytes_returned"]
    out["stored"] = stored
    return out


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
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--modes", default=",".join(MODES))
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
    uri = build_cache(args.work, args.samples, args.top_k, args.max_length)
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

    print("| reader | samples | samples/s | tokens/s | read amplification | RSS MiB | GETs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
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
                  f"{row['tokens'] / row['seconds']:,.0f} | {amp} | {row['rss']:.0f} | {gets} |")
    finally:
        if server is not None:
            server.kill()


if __name__ == "__main__":
    main()
