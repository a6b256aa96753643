"""Benchmark: issue 13's goals in one run. Both teachers, one process, one table each, then the goals table.

Teachers, built from config (no hub), bf16 on CUDA, sharing one 32k byte-level BPE tokenizer trained here on
the standard library's text (ids < 32k are valid for the 152k-vocabulary model too):
  110m       Llama: hidden 768, 12 layers, 12 heads, vocab 32000, tied embeddings
  qwen1.5b   Qwen2 shaped like Qwen2.5-1.5B: hidden 1536, intermediate 8960, 28 layers, 12 heads / 2 kv heads,
             vocab 151936, tied embeddings, rope_theta 1e6
Optionally trained for a few steps (--train-steps) so that their distributions are peaked: random-init logits
are flat, the top-k kernel's worst case. The table says which was used (train loss, mean top-k mass).

Rows, per teacher, all on the same texts:
  (a)  bare forward: the batches run_teacher's forward was given in (b0), recorded, then replayed as
       model(input_ids=...).logits (logits made and dropped, synchronised at the end).
       Computed (padded) and real tokens/s.
  (b)  run_teacher + CacheWriter (a real file), (b0) run_teacher with the rows kept in memory, then the writer
       alone on those rows. Real tokens/s over the whole run, and in steady state: from the first batch's
       start to the last one's end on the device's clock (devicetime.py: CUDA events around each batch's
       forward), with the share of that span the device sat idle; this leaves out the fill (host clock: start
       to the first batch, i.e. the first look-ahead window's tokenizing) and the drain (the last batch to the
       last row handed over).
  (c)  naive, on the first --naive-samples samples: pad to max_length, fixed batches, float32 log_softmax over
       (B, T, V), topk, synchronous uncompressed h5py writes.
  Pieces of the largest recorded batch: body, bf16 head vs float32 head (Float32Head) on the same real rows
  (the cost of the float32 head), top-k + logsumexp as run and on the torch path, run_teacher's forward; each
  also per 32k real rows. Also the writer alone and the tokenizer alone (as run_teacher calls it).

    # GPU: the issue's run (about 3 minutes on an H200; prints each table when done, copies to $OUT/bench.txt)
    python bench/bench_inference.py
    # CPU smoke test: tiny teachers of the same two kinds, small sizes (its figures mean nothing)
    python bench/bench_inference.py --device cpu
(docs/PERFORMANCE.md has the runs and what they show.)
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import sysconfig
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from devicetime import device_timeline  # noqa: E402

from kd_core import h5cache, inference  # noqa: E402
from kd_core.demo import build_corpus, train_tokenizer  # noqa: E402
from kd_core.inference import InferenceStats, run_teacher  # noqa: E402
from kd_core.teacher import Teacher  # noqa: E402
from kd_core.topk import torch_topk_logprobs  # noqa: E402

# name -> (transformers config class, full shape, tiny shape for the CPU smoke test); all tie their embeddings
TEACHERS = {
    "110m": ("LlamaConfig",
             dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  vocab_size=32000),
             dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=4096)),
    "qwen1.5b": ("Qwen2Config",
                 dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                      num_key_value_heads=2, vocab_size=151936, rope_theta=1e6),
                 dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=8192, rope_theta=1e6)),
}
GOALS = {"110m": 0.90, "qwen1.5b": 0.95}  # (b)/(a) wanted by issue 13; (b)/(c) >= 4 for both
NAIVE_GOAL = 4.0
BARE = "bare forward (logits for every position, model dtype)"


class Report:
    """Lines printed at once and appended to $OUT/bench.txt (when OUT is set), so a cut-off run keeps its tables."""

    def __init__(self, path: Path | None):
        self.path = path
        if path:
            path.write_text("")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.path:
            with self.path.open("a") as f:
                f.write(line + "\n")


@dataclass
class Call:
    """One batch that run_teacher's forward was given (input_ids, rows, ...), and when (host clock)."""

    batch: inference.Batch
    at: float


@contextmanager
def recording(calls: list[Call]):
    """Record every call of run_teacher's forward (the real batches, as the device thread built them)."""
    original = inference.Forward.__call__

    def call(self, batch):
        calls.append(Call(batch, time.perf_counter()))
        return original(self, batch)

    inference.Forward.__call__ = call
    try:
        yield calls
    finally:
        inference.Forward.__call__ = original


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------- setup


def corpus_pool(workdir: Path, seed: int = 0) -> list[str]:
    """Stdlib docstrings (short to medium) and module sources (many past 2048 tokens), shuffled, deterministic."""
    import pyarrow.parquet as pq

    build_corpus(workdir / "docstrings.parquet")
    pool = pq.read_table(workdir / "docstrings.parquet").column("text").to_pylist()
    root = Path(sysconfig.get_paths()["stdlib"])
    pool += [p.read_text(errors="replace") for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts]
    random.Random(seed).shuffle(pool)
    return pool


def texts_for(pool: list[str], pool_ids: list[np.ndarray], tokens: int) -> tuple[list[str], list[np.ndarray]]:
    """Texts cycled from the pool until they hold `tokens` tokens, with their ids (the pool is tokenized once)."""
    texts, ids, total = [], [], 0
    while total < tokens:
        j = len(texts) % len(pool)
        texts.append(pool[j])
        ids.append(pool_ids[j])
        total += len(pool_ids[j])
    return texts, ids


def build_teacher(name: str, args, tokenizer, pool_ids: list[np.ndarray]) -> tuple[Teacher, float]:
    """The teacher from config, on the device; optionally trained briefly in bf16 autocast, then cast."""
    import transformers

    kind, full, tiny = TEACHERS[name]
    config = getattr(transformers, kind)(**(tiny if args.tiny else full), tie_word_embeddings=True,
                                         max_position_embeddings=max(args.max_length, 4096),
                                         attn_implementation="sdpa")
    device = torch.device(args.device)
    torch.manual_seed(0)
    with device:
        model = getattr(transformers, kind.replace("Config", "ForCausalLM"))(config)  # float32 master weights
    loss = float("nan")
    if args.train_steps:
        stream = np.concatenate(pool_ids[:2000])
        blocks = torch.from_numpy(stream[: len(stream) // 512 * 512].reshape(-1, 512)).to(device)  # (n, 512)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(args.train_steps):
            batch = blocks[torch.randint(len(blocks), (16,), generator=gen).to(device)]  # (16, 512)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(input_ids=batch, labels=batch).loss
            out.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss = out.item()
        del opt, blocks
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(dtype).eval()
    return Teacher(model=model, tokenizer=tokenizer, device=device, dtype=dtype,
                   vocab_size=model.get_output_embeddings().weight.shape[0]), loss


# ------------------------------------------------------------------------------------------------- steps


@dataclass
class Run:
    """One timed step: real (and computed) tokens, seconds; for pipeline runs the forward's calls (host clock)
    and the device's own busy time and span (devicetime.py: CUDA events around each batch's forward)."""

    real: int
    seconds: float
    computed: int = 0
    calls: list[Call] = field(default_factory=list)
    start: float = 0.0
    last_row: float = 0.0
    busy: float = float("nan")  # s: the sum of every batch's forward on the device
    span: float = float("nan")  # s: from the first batch's start to the last one's end, device clock

    @property
    def rate(self) -> float:
        return self.real / self.seconds

    @property
    def fill(self) -> float:
        return self.calls[0].at - self.start if self.calls else float("nan")

    @property
    def drain(self) -> float:
        return self.last_row - self.calls[-1].at if self.calls else float("nan")

    @property
    def steady(self) -> float:
        """Real tokens/s from the first batch's start to the last one's end on the device: no fill, no drain."""
        return self.real / self.span

    @property
    def idle(self) -> float:
        """Fraction of the span that the device waited between batches (on the tokenizer, the caller, ...)."""
        return 1 - self.busy / self.span


def bench_pipeline(teacher: Teacher, texts: list[str], args, writer=None, keep: list | None = None) -> Run:
    """(b)/(b0): run_teacher into `writer` (or rows appended to `keep`); seconds until the writer is closed."""
    stats, calls = InferenceStats(), []
    with device_timeline(cuda=teacher.device.type == "cuda") as timeline, recording(calls):
        start = time.perf_counter()
        for rows in run_teacher(teacher, enumerate(texts), top_k=args.top_k, max_length=args.max_length,
                                batch_tokens=args.batch_tokens, stats=stats, window_tokens=args.window_tokens):
            writer.append_rows(rows) if writer is not None else keep.append(rows)
        last_row = time.perf_counter()
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - start
    busy, span, _ = timeline.seconds()
    return Run(stats.tokens, seconds, calls=calls, start=start, last_row=last_row, busy=busy, span=span)


def bench_forward(teacher: Teacher, calls: list[Call]) -> Run:
    """(a): the recorded batches through the bare model, logits made and dropped."""
    model = teacher.model
    real = computed = 0
    with torch.inference_mode():
        sync(teacher.device)
        start = time.perf_counter()
        for call in calls:
            batch = call.batch
            model(input_ids=batch.input_ids, use_cache=False).logits  # noqa: B018
            real, computed = real + len(batch.rows), computed + batch.input_ids.numel()
        sync(teacher.device)
    return Run(real, time.perf_counter() - start, computed=computed)


def bench_tokenizer(tokenizer, texts: list[str], max_length: int) -> Run:
    """The tokenizer alone as run_teacher's tokenizer thread calls it (Teacher.tokenize_many, a chunk a call)."""
    chunk, start, real = inference.TOKENIZE_CHUNK, time.perf_counter(), 0
    for i in range(0, len(texts), chunk):
        real += sum(map(len, tokenizer(texts[i : i + chunk], truncation=True, max_length=max_length)["input_ids"]))
    return Run(real, time.perf_counter() - start)


def bench_writer(rows: list, writer) -> Run:
    start = time.perf_counter()
    for r in rows:
        writer.append_rows(r)
    writer.close()
    return Run(sum(len(r.input_ids) for r in rows), time.perf_counter() - start)


def padded(batch: list[np.ndarray], width: int, device: torch.device) -> torch.Tensor:
    out = torch.zeros((len(batch), width), dtype=torch.int64)  # (B, T), right-padded with 0
    for b, ids in enumerate(batch):
        out[b, : len(ids)] = torch.from_numpy(ids)
    return out.to(device)


def bench_naive(teacher: Teacher, tokenized: list[np.ndarray], args, path: Path) -> Run:
    """(c): pad to max_length, fixed batches in input order, fp32 log_softmax on (B, T, V), sync writes."""
    batch_size = max(1, args.batch_tokens // args.max_length)
    k, start = args.top_k, time.perf_counter()
    with h5py.File(path, "w") as f, torch.inference_mode():
        layout = h5cache.row_layout(k, vocab_size=1 << 32)  # the format's datasets, uint32 ids whatever the vocab
        sets = {name: f.create_dataset(name, (0, *tail), maxshape=(None, *tail), dtype=dt, chunks=True)
                for name, (tail, dt) in layout.items()}
        for i in range(0, len(tokenized), batch_size):
            batch = tokenized[i : i + batch_size]
            logits = teacher.model(input_ids=padded(batch, args.max_length, teacher.device), use_cache=False).logits
            logprobs = logits.float().log_softmax(-1)  # (B, T, V) float32
            top, ids = logprobs.topk(k, dim=-1)  # (B, T, k)
            lse = (logits[..., :1].float() - logprobs[..., :1]).squeeze(-1)  # (B, T): logit - log p = logsumexp
            del logits, logprobs
            top, ids, lse = top.half().cpu().numpy(), ids.cpu().numpy().astype(np.uint32), lse.cpu().numpy()
            for b, tokens in enumerate(batch):
                n = len(tokens)
                for name, data in (("input_ids", tokens), ("topk_indices", ids[b, :n]),
                                   ("topk_logprobs", top[b, :n]), ("logsumexp", lse[b, :n])):
                    sets[name].resize(sets[name].shape[0] + n, axis=0)
                    sets[name][-n:] = data
    return Run(sum(map(len, tokenized)), time.perf_counter() - start)


def pieces(teacher: Teacher, batch: inference.Batch, args) -> dict[str, float]:
    """Milliseconds per piece of one recorded batch, medians of --repeat after a warm-up."""
    model, device = teacher.model, teacher.device
    ids, rows = batch.input_ids, batch.rows
    head = model.get_output_embeddings()
    head32 = inference.Float32Head(head)
    spec = inference.RowSpec(top_k=args.top_k)
    step = max(1, inference.CHUNK_ELEMENTS // head.out_features)  # rows per chunk, as Forward takes them

    def ms(fn) -> float:
        fn()
        times = []
        for _ in range(args.repeat):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append((time.perf_counter() - start) * 1e3)
        return float(np.median(times))

    with torch.inference_mode():
        def body():
            return model.base_model(input_ids=ids, use_cache=False).last_hidden_state

        hidden = body().flatten(0, 1).index_select(0, rows)  # (N, H): the real rows
        chunks = hidden.split(step)
        logits = head32(chunks[0])  # (step, V) float32: top-k timed on the first chunk's logits, once per chunk
        zeros = torch.zeros(len(logits), dtype=torch.int64, device=device)
        forward = inference.Forward(model, spec)
        return {
            BARE:
                ms(lambda: model(input_ids=ids, use_cache=False).logits),
            "body": ms(body),
            "bf16 head on the real rows": ms(lambda: [head(h) for h in chunks]),
            "float32 head on the real rows": ms(lambda: [head32(h) for h in chunks]),
            "top-k + logsumexp as run": ms(lambda: [inference.row_results(logits[: len(h)], spec, zeros[: len(h)],
                                                                          zeros[: len(h)]) for h in chunks]),
            "top-k + logsumexp, torch path (no fused kernel)":
                ms(lambda: [torch_topk_logprobs(logits[: len(h)], args.top_k, len(h)) for h in chunks]),
            "run_teacher's forward as run": ms(lambda: forward(batch)),
        }


def top_mass(rows: list, limit: int = 1 << 17) -> float:
    """Mean probability mass of a row's top-k over the first `limit` rows: how peaked the teacher is."""
    taken, total = [], 0
    for r in rows:
        if total >= limit:
            break
        taken.append(r.topk_logprobs)
        total += len(r.topk_logprobs)
    return float(np.exp(np.concatenate(taken).astype(np.float32)).sum(-1).mean())  # (n, k) -> mean over rows


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- teacher


def measure(teacher: Teacher, name: str, texts: list[str], tokenized: list[np.ndarray], args, workdir: Path,
            report: Report) -> dict:
    """Every timed step for one teacher, in an order that keeps memory low (the kept rows go before (b))."""
    k, vocab = args.top_k, teacher.vocab_size
    # Warm-up: kernels, the allocator, any compiled kernel on run_teacher's own path.
    warm: list[Call] = []
    start = time.perf_counter()
    with recording(warm):
        list(run_teacher(teacher, enumerate(texts[: max(1, len(texts) // 50)]), top_k=k, max_length=args.max_length,
                         batch_tokens=args.batch_tokens, window_tokens=args.window_tokens))
    bench_forward(teacher, warm[:3])
    del warm
    kept: list = []
    r = {"warm_s": time.perf_counter() - start, "b0": bench_pipeline(teacher, texts, args, keep=kept)}
    r["a"] = bench_forward(teacher, r["b0"].calls)
    r["mass"] = top_mass(kept)
    r["alone"] = bench_writer(kept, h5cache.CacheWriter(workdir / f"{name}-alone.h5", top_k=k, vocab_size=vocab,
                                                          attrs={"teacher": name}))
    del kept
    free(teacher.device)
    r["b"] = bench_pipeline(teacher, texts, args, writer=h5cache.CacheWriter(
        workdir / f"{name}.h5", top_k=k, vocab_size=vocab, attrs={"teacher": name}))
    r["bytes_per_token"] = os.path.getsize(workdir / f"{name}.h5") / r["b"].real
    free(teacher.device)
    try:
        r["c"] = bench_naive(teacher, tokenized[: args.naive_samples[name]], args, workdir / f"{name}-naive.h5")
    except Exception as e:  # e.g. out of memory on a small GPU: the rest of the table stands
        report(f"(c) naive failed: {type(e).__name__}: {e}")
        r["c"] = Run(0, float("nan"))
    free(teacher.device)
    r["batch"] = max((call.batch for call in r["b0"].calls), key=lambda batch: len(batch.rows))
    r["ms"] = pieces(teacher, r["batch"], args)
    r["head_cost"] = r["ms"]["float32 head on the real rows"] - r["ms"]["bf16 head on the real rows"]
    return r


def table(name: str, r: dict, tokenizer_run: Run, args, report: Report) -> None:
    a, b, b0, c = r["a"], r["b"], r["b0"], r["c"]
    report(f"\nreal/computed tokens in the pipeline's batches: {a.real / a.computed:.3f}; window "
           f"{args.window_tokens or 32 * args.batch_tokens:,} tokens, batch_tokens {args.batch_tokens:,}, "
           f"k={args.top_k}; mean top-{args.top_k} mass {r['mass']:.3f}; cache {r['bytes_per_token']:.1f} B/token")
    report("\n| step | real tok/s | vs (a) | steady real tok/s | vs (a) | device idle in steady | fill s | drain s "
           "| seconds |")
    report("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    report(f"| (a) bare forward, the pipeline's batches ({a.computed / a.seconds:,.0f} computed tok/s) | "
           f"{a.rate:,.0f} | 1.00 | | | | | | {a.seconds:.1f} |")
    for label, run in (("(b) run_teacher + CacheWriter, close included", b), ("(b0) run_teacher, rows kept", b0)):
        report(f"| {label} | {run.rate:,.0f} | {run.rate / a.rate:.3f} | {run.steady:,.0f} | "
               f"{run.steady / a.rate:.3f} | {run.idle:.1%} | {run.fill:.2f} | {run.drain:.2f} | {run.seconds:.1f} |")
    report(f"| (c) naive: pad to {args.max_length}, fp32 log_softmax, sync writes ({args.naive_samples[name]} "
           f"samples) | {c.rate:,.0f} | {c.rate / a.rate:.3f} | | | | | | {c.seconds:.1f} |")
    for label, run in (("CacheWriter alone, rows from memory", r["alone"]),
                       ("tokenizer alone, as run_teacher calls it", tokenizer_run)):
        report(f"| {label} | {run.rate:,.0f} | {run.rate / a.rate:.2f} | | | | | | {run.seconds:.1f} |")
    report(f"\n(b)/(c) = {b.rate / c.rate:.2f} whole run, {b.steady / c.rate:.2f} steady")

    ids, rows, ms = r["batch"].input_ids, r["batch"].rows, r["ms"]
    report(f"\n| piece of the largest batch ({tuple(ids.shape)}, {len(rows):,} real rows) | ms | per 32k rows |")
    report("|---|---:|---:|")
    for label, value in ms.items():
        report(f"| {label} | {value:.2f} | {value * 32768 / len(rows):.2f} |")
    report(f"cost of the float32 head: {r['head_cost']:+.2f} ms a batch "
           f"({ms['float32 head on the real rows'] / ms['bf16 head on the real rows']:.2f}x the bf16 head, "
           f"{r['head_cost'] / ms[BARE]:+.1%} of the bare forward)")


def bench_teacher(name: str, args, corpus: tuple, tokenizer_run: Run, workdir: Path, report: Report) -> dict:
    """Build one teacher, measure, print its table; returns the figures the goals table needs."""
    t0 = time.perf_counter()
    tokenizer, pool, pool_ids = corpus
    texts, tokenized = texts_for(pool, pool_ids, args.tokens[name])
    teacher, loss = build_teacher(name, args, tokenizer, pool_ids)
    built = time.perf_counter() - t0
    params = sum(p.numel() for p in teacher.model.parameters())
    lengths = np.array(list(map(len, tokenized)))
    device_name = torch.cuda.get_device_name(teacher.device) if teacher.device.type == "cuda" else "cpu"
    report(f"\n## {name}: {params / 1e6:,.1f}M parameters, vocab {teacher.vocab_size:,}, {teacher.dtype}, "
           f"{device_name}; {len(texts):,} samples, {lengths.sum():,} tokens (p10/p50/p90 "
           f"{'/'.join(map(str, np.percentile(lengths, [10, 50, 90]).astype(int)))}, "
           f"{(lengths == args.max_length).mean():.0%} cut at {args.max_length}); "
           + (f"trained {args.train_steps} steps, loss {loss:.2f}" if args.train_steps else "random init (flat logits)"))
    result = measure(teacher, name, texts, tokenized, args, workdir, report)
    table(name, result, tokenizer_run, args, report)
    report(f"({name} took {time.perf_counter() - t0:.0f} s: build {built:.0f} s, warm-up {result['warm_s']:.0f} s)")
    del teacher
    free(torch.device(args.device))
    return result


def goals(results: dict[str, dict], report: Report) -> None:
    """The issue's goals: measured, met or missed, and how far."""
    report("\n## Goals (issue 13)\n\n| goal | measured | met | how far |\n|---|---|---|---|")
    for name, r in results.items():
        a, b, c, want = r["a"], r["b"], r["c"], GOALS[name]
        for label, got in (("whole run", b.rate / a.rate), ("steady", b.steady / a.rate)):
            report(f"| {name}: (b)/(a) >= {want} ({label}) | {got:.3f} | {'yes' if got >= want else 'no'} | "
                   f"{got - want:+.3f} |")
        got = b.rate / c.rate
        report(f"| {name}: (b)/(c) >= {NAIVE_GOAL:g} | {got:.2f} | {'yes' if got >= NAIVE_GOAL else 'no'} | "
               f"{got - NAIVE_GOAL:+.2f} |")
        report(f"| {name}: tokens/s stated | (b) {b.rate:,.0f} real tok/s ({b.steady:,.0f} steady); (a) "
               f"{a.rate:,.0f} real, {a.computed / a.seconds:,.0f} computed | yes | |")
        report(f"| {name}: cost of the float32 head | {r['head_cost']:+.2f} ms a batch, "
               f"{r['head_cost'] / r['ms'][BARE]:+.1%} of the bare "
               "forward | yes | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--teachers", nargs="+", choices=TEACHERS, default=list(TEACHERS))
    p.add_argument("--tokens", nargs="+", default=[], metavar="NAME=N",
                   help="tokens per teacher (default 110m=7e6 qwen1.5b=2.5e6 on CUDA, 20000 each on CPU)")
    p.add_argument("--naive-samples", nargs="+", default=[], metavar="NAME=N",
                   help="samples for (c) (default 110m=800 qwen1.5b=300 on CUDA, 16 on CPU)")
    p.add_argument("--max-length", type=int, default=None, help="default 2048 (512 on CPU)")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--batch-tokens", type=int, default=None, help="default 32768 (4096 on CPU)")
    p.add_argument("--window-tokens", type=int, default=None, help="run_teacher's look-ahead (default: its own)")
    p.add_argument("--train-steps", type=int, default=None, help="default 30 on CUDA, 0 on CPU")
    p.add_argument("--tokenizer-docs", type=int, default=None, help="texts the tokenizer learns from (3000; CPU 300)")
    p.add_argument("--repeat", type=int, default=5, help="timings per piece (median)")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    cpu = args.device == "cpu"
    args.tiny = cpu  # the CPU run is a smoke test: tiny teachers of the same two kinds
    args.max_length = args.max_length or (512 if cpu else 2048)
    args.batch_tokens = args.batch_tokens or (4096 if cpu else 32768)
    args.train_steps = (0 if cpu else 30) if args.train_steps is None else args.train_steps
    args.tokenizer_docs = args.tokenizer_docs or (300 if cpu else 3000)
    defaults = ({n: 20000 for n in TEACHERS}, {n: 16 for n in TEACHERS}) if cpu else \
        ({"110m": 7_000_000, "qwen1.5b": 2_500_000}, {"110m": 800, "qwen1.5b": 300})
    args.tokens = defaults[0] | {k: int(float(v)) for k, v in (s.split("=") for s in args.tokens)}
    args.naive_samples = defaults[1] | {k: int(v) for k, v in (s.split("=") for s in args.naive_samples)}

    report = Report(Path(os.environ["OUT"]) / "bench.txt" if os.environ.get("OUT") else None)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-inference-"))
    (workdir / "tokenizer").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from transformers import AutoTokenizer

    pool = corpus_pool(workdir)[: 1000 if args.tiny else None]  # the smoke test needs few texts
    train_tokenizer(pool[: args.tokenizer_docs], workdir / "tokenizer", 4096 if args.tiny else 32000)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    pool_ids = [np.asarray(x, np.int64) for x in tokenizer(pool, truncation=True, max_length=args.max_length)["input_ids"]]
    # The tokenizer alone, as run_teacher's thread calls it, on about 1M tokens of text (both teachers share it).
    tokenizer_run = bench_tokenizer(tokenizer, texts_for(pool, pool_ids, min(1 << 20, max(args.tokens.values())))[0],
                                    args.max_length)
    report(f"# bench_inference: torch {torch.__version__}, {args.device}, max_length {args.max_length}, "
           f"k={args.top_k}; {len(pool):,} distinct texts, {sum(map(len, pool_ids)):,} tokens after truncation; "
           f"tokenizer alone (as run_teacher calls it) {tokenizer_run.rate:,.0f} tok/s on {os.cpu_count()} cores; "
           f"setup {time.perf_counter() - t0:.0f} s")
    results = {}
    for name in args.teachers:
        try:
            results[name] = bench_teacher(name, args, (tokenizer, pool, pool_ids), tokenizer_run, workdir, report)
        except Exception:  # one teacher failing still leaves the other's table
            report(f"\n## {name} FAILED\n" + traceback.format_exc())
            free(torch.device(args.device))
    goals(results, report)
    report(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
