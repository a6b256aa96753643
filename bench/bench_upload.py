"""Benchmark: how long the device idles while a shard's files go to S3 (moto's server on loopback).

The real shard path, kd_core.shard.run_shard, over one shard of several parts, writing to s3://bench/... on a moto
ThreadedMotoServer started here (no network), once per publishing mode:

  per-part    what run_shard did before the background publisher (replayed here by per_part_run_parts): one
              run_teacher call per part, each file closed and uploaded, and each record written, by the caller, in
              turn: the device waits for every upload, and for each part's first window to fill.
  sync        background_files=0: one run_teacher pass over the parts, but each file is closed and uploaded, and
              its part record written, by the thread
              that takes the teacher's rows; the device thread stops once its one-window output queue is full.
  background  background_files=1 (the default): close, upload and record on a background thread while the
              teacher runs on; the teacher waits only when storage falls more than one file behind.

moto's server runs in its own process. --throttle-mbps slows each upload to that many MB/s (a sleep of size / rate before the real upload), to stand
for a real bucket's bandwidth: loopback moto alone is faster than S3 from one GPU host.

What is measured (bench/devicetime.py, around each batch's inference.Forward call):
  busy     the sum over batches of the device's work on the batch: the forward, the float32 head and the
           top-k / logsumexp. On CUDA: elapsed time between two torch.cuda.Event recorded on the compute stream
           before and after each batch is queued, so it is the GPU's own time. On CPU: perf_counter around the
           (synchronous) forward on the device thread.
  before   from run_shard's start to the first batch's launch (host clock; the device is idle then, so it starts
           the batch at once): teacher load, the reader's seek, the first window's tokenizing (the fill).
  gaps     idle between the first batch's start and the last one's end (span - busy): the device had nothing
           queued, because the device thread was blocked on its queues (its output full while the caller waits on
           storage; its input empty while a window fills) or preparing the next batch on the host. This is the
           idle that uploads can cause while there is still work to compute.
  after    wall - before - span: after the last batch, the files still to close and upload and their records
           (at least the last file's: nothing is left to compute behind it).
  idle     wall - busy = before + gaps + after, also as a % of wall time.
The teacher is a Llama built from config with random weights (no hub, no training: the timing does not depend
on its values; its near-flat distributions compress less than a trained teacher's, so there are more bytes to
upload per token), with a byte-level BPE tokenizer trained here on the corpus; the text is the standard
library's docstrings and module sources.

    # CPU, tiny teacher (the defaults; about 4 minutes on 2 shared cores)
    python bench/bench_upload.py --device cpu
    # CUDA, ~330M Llama in bf16: storage (100 MB/s throttle + moto) keeps up with it (under a minute on an H200)
    python bench/bench_upload.py --device cuda --model-size 300m --samples 4000 --part-samples 1000 \\
        --max-length 2048 --batch-tokens 16384 --throttle-mbps 100 --modes background,per-part --budget-s 50
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import uuid
from pathlib import Path

for _name, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("DO_NOT_TRACK", "1"),
                      ("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                      ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_name, _value)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from devicetime import device_timeline  # noqa: E402

import kd_core.shard  # noqa: E402
from kd_core import data, h5cache, io  # noqa: E402
from kd_core.build import validate  # noqa: E402
from kd_core.demo import stdlib_docstrings, train_tokenizer  # noqa: E402
from kd_core.inference import InferenceStats, run_teacher  # noqa: E402
from kd_core.teacher import load_teacher  # noqa: E402

SIZES = {  # Llama shapes, tied embeddings
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=4096),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, vocab_size=32000),
    "300m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16, vocab_size=32000),
}
MODES = {"per-part": 0, "sync": 0, "background": 1}  # background_files of each mode


def write_corpus(path: Path, samples: int) -> list[str]:
    """Docstrings (short to medium) and module sources (long), shuffled, repeated to `samples` rows, as parquet."""
    pool = list(stdlib_docstrings(200))
    root = Path(sysconfig.get_paths()["stdlib"])
    pool += [p.read_text(errors="replace") for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts]
    random.Random(0).shuffle(pool)
    texts = [pool[i % len(pool)] for i in range(samples)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=1024)
    return texts


def build_teacher(args, texts: list[str], out: Path) -> None:
    """A tokenizer trained on the corpus and a randomly initialised Llama, saved where load_teacher reads them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SIZES[args.model_size]
    train_tokenizer(texts[:2000], out, shape["vocab_size"])
    config = LlamaConfig(**shape, max_position_embeddings=args.max_length, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    with torch.device(args.device):  # initialised where it runs: seconds on a GPU, not a minute on the CPU
        LlamaForCausalLM(config).to(dtype_of(args)).save_pretrained(out)


def dtype_of(args) -> torch.dtype:
    return torch.bfloat16 if args.device == "cuda" else torch.float32


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on loopback in a process of its own (as a real store would be: its request handling does
    not compete with the teacher for this process's GIL), with a bucket "bench"; (process, endpoint)."""
    import s3fs

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir("bench")
            return server, endpoint
        except Exception:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto's server did not start on {endpoint}") from None
            time.sleep(0.2)


def config_for(args, teacher: Path, corpus: Path, endpoint: str, prefix: str, samples: int):
    return validate("demo", {
        "teacher": {"model": str(teacher), "device": args.device, "dtype": str(dtype_of(args)).removeprefix("torch."),
                    "batch_tokens": args.batch_tokens},
        "dataset": {"name": "parquet", "data_files": str(corpus), "split": "train", "text_column": "text",
                    "streaming": True, "max_samples": samples},
        "cache": {"top_k": args.top_k, "max_length": args.max_length},
        "output": {"uri": f"s3://bench/{prefix}", "storage_options": {"endpoint_url": endpoint}},
        "run": {"num_shards": 1, "part_samples": args.part_samples},
    })


class Throttle:
    """io.publish_file slowed to `mbps` MB/s; records each upload's seconds."""

    def __init__(self, mbps: float):
        self.mbps, self.seconds, self.real = mbps, [], io.publish_file

    def __call__(self, local, uri, storage_options=None):
        started = time.perf_counter()
        if self.mbps:
            time.sleep(os.path.getsize(local) / (self.mbps * 1e6))
        stamp = self.real(local, uri, storage_options)
        self.seconds.append(time.perf_counter() - started)
        return stamp


def per_part_run_parts(build, shard, todo, done, lock, progress, background_files):
    """kd_core.shard.run_parts as it was before the one-pass, background version (the baseline): a run_teacher call
    per part, then its files closed and uploaded and its record written, all on the caller's thread."""
    config = build.config
    teacher = load_teacher(config.teacher)
    provenance = kd_core.shard.part_provenance(build, shard, teacher, done)
    texts = data.iter_texts(config.dataset, shard, todo[0][0], shard.stop)
    stats, out = InferenceStats(), []
    staging = build.store.staging_dir(build.key) / shard.name
    staging.mkdir(parents=True, exist_ok=True)
    for index, (start, stop) in enumerate(todo, start=len(done)):
        started, skipped = time.perf_counter(), stats.skipped_empty
        part = kd_core.shard.Part(build, shard, lock, provenance, index, start, stop, staging,
                                  projects=index == len(done), parts=len(done) + len(todo),
                                  build_id=build.store.build_id(build.key))
        with h5cache.SplitWriter(part.local_path, config.output.max_object_bytes, part.publish,
                                   top_k=config.cache.top_k, vocab_size=teacher.vocab_size, attrs={}) as writer:
            for rows in run_teacher(teacher, itertools.islice(texts, stop - start), top_k=config.cache.top_k,
                                    max_length=config.cache.max_length, batch_tokens=config.teacher.batch_tokens,
                                    stats=stats):
                writer.append_rows(rows)
        part.write_record(stats.skipped_empty - skipped, time.perf_counter() - started, out)
    return out


def run_mode(args, mode: str, teacher: Path, corpus: Path, endpoint: str, throttle: Throttle) -> dict:
    config = config_for(args, teacher, corpus, endpoint, f"{mode}-{uuid.uuid4().hex[:6]}", args.samples)
    shard = kd_core.shard.plan(config).shards[0]
    throttle.seconds = []
    if args.device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    real_run_parts = kd_core.shard.run_parts
    if mode == "per-part":
        kd_core.shard.run_parts = per_part_run_parts
    try:
        with device_timeline(cuda=args.device == "cuda") as timeline:
            record = kd_core.shard.run_shard(config, shard, background_files=MODES[mode])
    finally:
        kd_core.shard.run_parts = real_run_parts
    wall = time.perf_counter() - started
    busy, span, longest = timeline.seconds()
    before = timeline.first_launch - started
    return {"mode": mode, "wall": wall, "tokens": record.num_tokens, "busy": busy, "gaps": span - busy,
            "longest": longest, "before": before, "after": wall - before - span, "upload": sum(throttle.seconds),
            "files": sum(len(p.files) for p in record.parts), "parts": len(record.parts),
            "mb": sum(f.bytes for p in record.parts for f in p.files) / 1e6, "batches": len(timeline.batches)}


def table(rows: list[dict]) -> str:
    head = ("| mode | wall s | tok/s | device busy s | device idle s (% of wall) | before first batch s "
            "| gaps between batches s (longest) | after last batch s | uploads s (sum) | parts / files / MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        idle = r["wall"] - r["busy"]
        lines.append(f"| {r['mode']} | {r['wall']:.2f} | {r['tokens'] / r['wall']:,.0f} | {r['busy']:.2f} | "
                     f"{idle:.2f} ({100 * idle / r['wall']:.0f}%) | {r['before']:.2f} | {r['gaps']:.2f} "
                     f"({r['longest']:.3f}) | {r['after']:.2f} | {r['upload']:.2f} | "
                     f"{r['parts']} / {r['files']} / {r['mb']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--part-samples", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-tokens", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--throttle-mbps", type=float, default=0.25, help="upload rate per file, MB/s (0: moto's own)")
    parser.add_argument("--modes", default="background,per-part,sync")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="skip a mode that would end past this")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kd-bench-upload-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KD_CACHE_STAGING", str(workdir / "staging"))
    started = time.perf_counter()
    corpus, teacher = workdir / "corpus.parquet", workdir / "teacher"
    texts = write_corpus(corpus, args.samples)
    build_teacher(args, texts, teacher)
    server, endpoint = start_moto()
    throttle = Throttle(args.throttle_mbps)
    io.publish_file = throttle  # the store publishes through the module attribute
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), "
          f"model {args.model_size} {str(dtype_of(args)).removeprefix('torch.')}, {args.samples} samples in parts of "
          f"{args.part_samples}, max_length {args.max_length}, batch_tokens {args.batch_tokens}, k {args.top_k}, "
          f"upload throttle {args.throttle_mbps or 'off'} MB/s, moto at {endpoint}; setup {time.perf_counter() - started:.1f} s")
    # Warm-up (not reported): CUDA context, kernels, the compiled logsumexp, moto's first requests.
    warm = config_for(args, teacher, corpus, endpoint, "warmup", min(args.samples, args.part_samples, 256))
    kd_core.shard.run_shard(warm, kd_core.shard.plan(warm).shards[0])
    rows = []
    for mode in args.modes.split(","):
        elapsed = time.perf_counter() - started
        if rows and elapsed + max(r["wall"] for r in rows) > args.budget_s:
            print(f"{mode}: skipped, {elapsed:.0f} s spent of --budget-s {args.budget_s:.0f}")
            continue
        try:
            rows.append(run_mode(args, mode, teacher, corpus, endpoint, throttle))
        except Exception:  # fail soft: the other mode still runs
            print(f"{mode}: FAILED\n{traceback.format_exc()}")
    server.terminate()
    server.wait()
    report = table(rows)
    print(report)
    after = next((r for r in rows if r["mode"] == "background"), None)
    for before in (r for r in rows if after is not None and r is not after):
        print(f"{after['mode']} vs {before['mode']}: wall {before['wall']:.2f} -> {after['wall']:.2f} s, device idle "
              f"{before['wall'] - before['busy']:.2f} -> {after['wall'] - after['busy']:.2f} s, gaps between batches "
              f"{before['gaps']:.2f} -> {after['gaps']:.2f} s, after the last batch {before['after']:.2f} -> "
              f"{after['after']:.2f} s")
    for r in rows:  # storage-bound: uploads take longer than the compute they could hide behind
        if r["upload"] > r["busy"]:
            print(f"{r['mode']}: uploads ({r['upload']:.2f} s) outlast the device's work ({r['busy']:.2f} s): the run is "
                  "bound by storage, and files wait for it after the last batch")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], "bench_upload.txt").write_text(report + "\n")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0 if len(rows) == len(args.modes.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
