"""Benchmark: teacher inference + cache writing against the bare forward pass and the naive way.

One run, one teacher, one set of texts:
  (a) bare forward   length-sorted batches under the same token budget, logits made and dropped.
  (b) run_teacher    the real pipeline, writing the cache with kd_core.cachefile.CacheWriter.
  (b0)               run_teacher with the rows kept in memory (the pipeline without a writer); then the
                     writer alone on those rows (how fast it can take them).
  (c) naive          every sample padded to max_length, fixed batch size, float32 log_softmax over (B, T, V),
                     topk, synchronous uncompressed writes (uint32 ids).
Then the stored bytes per token, and what lossless stock-filter settings would give.

Text: the standard library's docstrings and, for long documents, its module sources (a real spread of lengths,
no network). Teacher: a Llama built from config, trained for a few hundred steps on that text so that its
distributions are peaked like a real teacher's, with a byte-level BPE tokenizer trained on the same text.

    # CPU smoke
    python bench/bench_inference.py --model-size tiny --device cpu --samples 400 --max-length 512 --batch-tokens 4096 --window-tokens 16384 --train-steps 30
    # GPU, bf16
    python bench/bench_inference.py --model-size 100m --device cuda --samples 8000 --window-tokens 262144
(docs/PERFORMANCE.md has the runs and what they show.)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd_core import cachefile  # noqa: E402
from kd_core.config import TeacherConfig  # noqa: E402
from kd_core.demo import build_corpus, train_tokenizer  # noqa: E402
from kd_core.inference import InferenceStats, run_teacher  # noqa: E402
from kd_core.teacher import Teacher, load_teacher  # noqa: E402
from kd_core.verify import verify_rows  # noqa: E402

SIZES = {  # Llama shapes, tied embeddings: 100m is ~110M parameters, 1b ~1.0B
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=4096),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),  # TinyLlama-1.1B's shape
}


def corpus(samples: int, workdir: Path, seed: int = 0) -> list[str]:
    """Stdlib docstrings (short to medium) and module sources (many past 2048 tokens), shuffled, deterministic."""
    import pyarrow.parquet as pq

    build_corpus(workdir / "docstrings.parquet")
    pool = pq.read_table(workdir / "docstrings.parquet").column("text").to_pylist()
    root = Path(sysconfig.get_paths()["stdlib"])
    pool += [p.read_text(errors="replace") for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts]
    random.Random(seed).shuffle(pool)
    return [pool[i % len(pool)] for i in range(samples)]


def build_teacher(args, texts: list[str], workdir: Path) -> tuple[Teacher, float]:
    """Tokenizer + Llama from config, briefly trained, saved, then loaded through load_teacher."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shape = dict(SIZES[args.model_size])
    train_tokenizer(texts[: args.tokenizer_docs], workdir / "teacher", shape["vocab_size"])
    tokenizer = AutoTokenizer.from_pretrained(workdir / "teacher")
    config = LlamaConfig(**shape, max_position_embeddings=args.max_length, tie_word_embeddings=True)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = LlamaForCausalLM(config).to(device)
    stream = np.concatenate([np.asarray(x) for x in tokenizer(texts[:2000])["input_ids"]])
    blocks = torch.from_numpy(stream[: len(stream) // 512 * 512].reshape(-1, 512)).to(device)  # (N, 512)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    loss = float("nan")
    for _ in range(args.train_steps):
        batch = blocks[torch.randint(len(blocks), (16,), generator=gen).to(device)]  # (16, 512)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.item()
    model.save_pretrained(workdir / "teacher")
    del model, opt
    teacher = load_teacher(TeacherConfig(model=str(workdir / "teacher"), device=args.device, dtype=args.dtype))
    return teacher, loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def length_sorted_batches(tokenized: list[np.ndarray], batch_tokens: int) -> list[list[np.ndarray]]:
    batches, batch = [], []
    for ids in sorted(tokenized, key=len, reverse=True):
        if batch and (len(batch) + 1) * len(batch[0]) > batch_tokens:
            batches.append(batch)
            batch = []
        batch.append(ids)
    return batches + [batch] if batch else batches


def padded(batch: list[np.ndarray], width: int, device: torch.device) -> torch.Tensor:
    out = torch.zeros((len(batch), width), dtype=torch.int64, pin_memory=device.type == "cuda")  # (B, T)
    for b, ids in enumerate(batch):
        out[b, : len(ids)] = torch.from_numpy(ids)
    return out.to(device, non_blocking=True)


def real_fraction(lengths: list[int], batch_tokens: int, window_tokens: int) -> float:
    """Real tokens over computed (padded) tokens when windows of window_tokens are sorted and batched."""
    from kd_core.inference import _batches

    computed, start = 0, 0
    while start < len(lengths):
        end, size = start, 0
        while end < len(lengths) and size < window_tokens:
            size, end = size + lengths[end], end + 1
        window = [(j, range(lengths[j])) for j in range(start, end)]
        computed += sum(len(b) * lengths[window[b[0]][0]] for b in _batches(window, batch_tokens))
        start = end
    return sum(lengths) / computed


def bench_forward(teacher: Teacher, tokenized: list[np.ndarray], batch_tokens: int) -> float:
    """(a): seconds for the bare forward over length-sorted batches (logits made and dropped)."""
    batches = length_sorted_batches(tokenized, batch_tokens)
    with torch.inference_mode():
        sync(teacher.device)
        start = time.perf_counter()
        for batch in batches:
            teacher.model(input_ids=padded(batch, len(batch[0]), teacher.device), use_cache=False).logits  # noqa: B018
        sync(teacher.device)
    return time.perf_counter() - start


def bench_pipeline(teacher, texts, args, writer, keep: list | None = None) -> dict:
    """(b)/(b0): run_teacher into `writer` (None: rows appended to `keep`). Seconds until the last row
    (this includes the pipeline's fill: the first look-ahead window runs before any row comes out) and with
    the writer's close."""
    stats = InferenceStats()
    start = time.perf_counter()
    rows = run_teacher(teacher, enumerate(texts), top_k=args.top_k, max_length=args.max_length,
                       batch_tokens=args.batch_tokens, stats=stats, window_tokens=args.window_tokens)
    for r in rows:
        if writer is not None:
            writer.append_rows(r)
        else:
            keep.append(r)
    loop_s = time.perf_counter() - start
    if writer is not None:
        writer.close()
    return {"tokens": stats.tokens, "loop_s": loop_s, "total_s": time.perf_counter() - start}


def bench_writer(rows: list, writer) -> float:
    """Seconds for a writer alone to take rows already in memory, close included."""
    start = time.perf_counter()
    for r in rows:
        writer.append_rows(r)
    writer.close()
    return time.perf_counter() - start


def breakdown(teacher: Teacher, tokenized: list[np.ndarray], args) -> list[tuple[str, float]]:
    """Milliseconds per piece of one full batch (the longest samples), medians of 5 after a warm-up."""
    from kd_core import inference

    batch = length_sorted_batches(tokenized, args.batch_tokens)[0]
    x = padded(batch, len(batch[0]), teacher.device)  # (B, T)
    model, k = teacher.model, args.top_k

    def ms(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            sync(teacher.device)
            start = time.perf_counter()
            fn()
            sync(teacher.device)
            times.append((time.perf_counter() - start) * 1e3)
        return float(np.median(times))

    with torch.inference_mode():
        hidden = model.base_model(input_ids=x, use_cache=False).last_hidden_state.flatten(0, 1)  # (N, H)
        logits = model.get_output_embeddings()(hidden)  # (N, V)
        chunks = logits.split(max(1, inference.CHUNK_ELEMENTS // logits.shape[-1]))
        out = [(f"full forward, logits for all {x.numel()} positions (B={len(batch)}, T={x.shape[1]})",
                ms(lambda: model(input_ids=x, use_cache=False).logits)),
               ("body (no lm_head)", ms(lambda: model.base_model(input_ids=x, use_cache=False))),
               ("lm_head on the real rows", ms(lambda: model.get_output_embeddings()(hidden))),
               ("logsumexp, eager float32 upcast", ms(lambda: [inference._logsumexp_float32(c) for c in chunks])),
               ("logsumexp as run (compiled on CUDA)", ms(lambda: [inference._logsumexp(c) for c in chunks])),
               (f"top-{k}, plain torch.topk", ms(lambda: [c.topk(k, dim=-1) for c in chunks]))]
        out.append(("topk_logprobs as run", ms(lambda: inference.topk_logprobs(logits, k))))
        out.append(("run_teacher's forward (body + head on real rows + topk_logprobs)",
                    ms(lambda: inference._Forward(model, inference.RowSpec(top_k=k))(x, torch.arange(x.numel(), device=x.device)))))
    return out


def rates(result: dict, tokens: int) -> tuple[float, float]:
    return tokens / result["loop_s"], tokens / result["total_s"]


def bench_naive(teacher: Teacher, tokenized: list[np.ndarray], args, path: Path) -> float:
    """(c): pad to max_length, fixed batches in input order, fp32 log_softmax on (B, T, V), sync writes."""
    batch_size = max(1, args.batch_tokens // args.max_length)
    k, start = args.top_k, time.perf_counter()
    with h5py.File(path, "w") as f, torch.inference_mode():
        # The format's datasets, with uint32 ids whatever the vocab (the naive layout).
        layout = cachefile.row_layout(k, vocab_size=1 << 32)
        sets = {name: f.create_dataset(name, (0, *tail), maxshape=(None, *tail), dtype=dt, chunks=True)
                for name, (tail, dt) in layout.items()}
        for i in range(0, len(tokenized), batch_size):
            batch = tokenized[i : i + batch_size]
            logits = teacher.model(input_ids=padded(batch, args.max_length, teacher.device), use_cache=False).logits
            logprobs = logits.float().log_softmax(-1)  # (B, T, V) float32
            top, ids = logprobs.topk(k, dim=-1)  # (B, T, k)
            lse = logits.float().logsumexp(-1)  # (B, T)
            top, ids, lse = top.half().cpu().numpy(), ids.cpu().numpy().astype(np.uint32), lse.cpu().numpy()
            for b, tokens in enumerate(batch):
                n = len(tokens)
                for name, data in (("input_ids", tokens), ("topk_indices", ids[b, :n]),
                                   ("topk_logprobs", top[b, :n]), ("logsumexp", lse[b, :n])):
                    sets[name].resize(sets[name].shape[0] + n, axis=0)
                    sets[name][-n:] = data
    return time.perf_counter() - start


def stored_sizes(path: Path) -> dict[str, int]:
    with h5py.File(path, "r") as f:
        return {name: f[name].id.get_storage_size() for name in f}


def sweep(path: Path, rows: int, threads: int) -> list[tuple[str, float, float]]:
    """Bytes per row of /topk_indices and /topk_logprobs under other lossless stock settings (HDF5 stores
    each chunk as deflate(shuffle(chunk)), so zlib on the same bytes gives the stored size)."""
    with h5py.File(path, "r") as f:
        data = {name: f[name][:rows] for name in ("topk_indices", "topk_logprobs")}

    def size(array, chunk_bytes, level, shuffle):
        n = max(1024, chunk_bytes // array[0].nbytes)
        def one(chunk):
            return len(cachefile.encode_chunk(chunk, shuffle, level))
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(one, [array[i : i + n] for i in range(0, len(array), n)])) / len(array)

    settings = [("gzip1 shuffle 1MiB", 1 << 20, 1, True), ("gzip1 no shuffle 1MiB (CacheWriter: ids)", 1 << 20, 1, False),
                ("gzip4 shuffle 1MiB", 1 << 20, 4, True), ("gzip9 shuffle 1MiB", 1 << 20, 9, True),
                ("gzip1 shuffle 4MiB", 1 << 22, 1, True), ("gzip6 shuffle 4MiB", 1 << 22, 6, True),
                ("gzip1 shuffle 64KiB", 1 << 16, 1, True)]
    return [(label, size(data["topk_indices"], cb, lv, sh), size(data["topk_logprobs"], cb, lv, sh))
            for label, cb, lv, sh in settings]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", choices=SIZES, default="tiny")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--batch-tokens", type=int, default=32768)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--window-tokens", type=int, default=None, help="run_teacher's look-ahead (default: its own)")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--tokenizer-docs", type=int, default=3000, help="texts the tokenizer is trained on")
    p.add_argument("--naive-samples", type=int, default=None, help="run (c) on the first N samples only")
    p.add_argument("--sweep-rows", type=int, default=1 << 19)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-inference-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    texts = corpus(args.samples, workdir)
    teacher, loss = build_teacher(args, texts, workdir)
    tokenized = [np.asarray(x, np.int64) for x in teacher.tokenize_many(texts, args.max_length)]
    tokens = sum(map(len, tokenized))
    lengths = np.array(list(map(len, tokenized)))
    params = sum(p.numel() for p in teacher.model.parameters())
    print(f"# setup {time.perf_counter() - t0:.0f} s: {params / 1e6:.0f}M params, vocab {teacher.vocab_size}, "
          f"{teacher.dtype}, {teacher.device} ({torch.cuda.get_device_name() if teacher.device.type == 'cuda' else ''})"
          f", train loss {loss:.2f}; {len(texts)} samples, {tokens} tokens, length p10/p50/p90/max "
          f"{np.percentile(lengths, [10, 50, 90]).astype(int).tolist()}/{lengths.max()}, "
          f"{(lengths == args.max_length).mean():.0%} truncated at {args.max_length}", flush=True)
    window = args.window_tokens or 32 * args.batch_tokens  # run_teacher's default
    print(f"# real/computed tokens: (a) whole set sorted {real_fraction(sorted(lengths), args.batch_tokens, 1 << 62):.3f}"
          f", (b) windows of {window} tokens {real_fraction(lengths.tolist(), args.batch_tokens, window):.3f}"
          f", (c) padded to max_length {tokens / (len(lengths) * args.max_length):.3f}")

    k, vocab, attrs = args.top_k, teacher.vocab_size, {"teacher": args.model_size}
    print("\n| piece of one batch | ms |\n|---|---:|")
    for label, ms in breakdown(teacher, tokenized, args):
        print(f"| {label} | {ms:.2f} |")
    bench_forward(teacher, tokenized[: max(1, len(tokenized) // 20)], args.batch_tokens)  # warm-up
    list(run_teacher(teacher, enumerate(texts[:100]), top_k=k, max_length=args.max_length,
                     batch_tokens=args.batch_tokens))  # warm-up (compiles the logsumexp kernel on CUDA)
    forward_s = bench_forward(teacher, tokenized, args.batch_tokens)
    kept: list = []
    no_writer = bench_pipeline(teacher, texts, args, None, keep=kept)
    alone = tokens / bench_writer(kept, cachefile.CacheWriter(workdir / "alone.h5", top_k=k, vocab_size=vocab, attrs=attrs))
    del kept
    ours = bench_pipeline(teacher, texts, args, cachefile.CacheWriter(
        workdir / "ours.h5", top_k=k, vocab_size=vocab, attrs=attrs))
    naive_tok = tokenized[: args.naive_samples]
    naive_s = bench_naive(teacher, naive_tok, args, workdir / "naive.h5")
    naive_tokens = sum(map(len, naive_tok))

    a, c = tokens / forward_s, naive_tokens / naive_s
    rows = [("(a) bare forward, sorted batches", a, a), ("(b) run_teacher + CacheWriter", *rates(ours, tokens)),
            ("(b0) run_teacher, rows kept in memory", *rates(no_writer, tokens)),
            (f"(c) naive (pad to {args.max_length}, fp32 log_softmax, sync writes)", c, c),
            ("CacheWriter alone, rows from memory", alone, alone)]
    print("\n| step | tok/s until last row | vs (a) | tok/s incl. close | vs (a) |\n|---|---:|---:|---:|---:|")
    for label, loop, total in rows:
        print(f"| {label} | {loop:,.0f} | {loop / a:.2f} | {total:,.0f} | {total / a:.2f} |")
    print(f"\n(b)/(c) = {tokens / ours['loop_s'] / c:.2f} until last row, {tokens / ours['total_s'] / c:.2f} incl. close")

    print("\n| file | bytes/token | topk_indices | topk_logprobs | input_ids | logsumexp | offsets+sample_index |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, path, n in (("(b) CacheWriter", "ours.h5", tokens), ("(c) naive, uncompressed", "naive.h5", naive_tokens)):
        sizes = stored_sizes(workdir / path)
        per = {name: v / n for name, v in sizes.items()}
        print(f"| {label} | {os.path.getsize(workdir / path) / n:.1f} | {per['topk_indices']:.1f} | "
              f"{per['topk_logprobs']:.1f} | {per['input_ids']:.1f} | {per['logsumexp']:.1f} | "
              f"{per.get('offsets', 0) + per.get('sample_index', 0):.2f} |")
    print(f"naive layout by arithmetic: {4 + 4 + 6 * k} B/token (uint32 ids + fp16 log-probs, + input id + lse)")

    print(f"\n| lossless stock setting (first {args.sweep_rows} rows) | topk_indices B/token | "
          "topk_logprobs B/token | sum |")
    print("|---|---:|---:|---:|")
    for label, ids_b, lp_b in sweep(workdir / "ours.h5", args.sweep_rows, os.cpu_count()):
        print(f"| {label} | {ids_b:.1f} | {lp_b:.1f} | {ids_b + lp_b:.1f} |")

    with cachefile.CacheReader(workdir / "ours.h5") as reader:
        sample = [reader[i] for i in range(min(8, len(reader)))]
    for label, dtype in (("float32", torch.float32), (f"{teacher.dtype} (teacher's own)", teacher.dtype)):
        rep = verify_rows(teacher, sample, top_k=k, dtype=dtype)
        print(f"\nverify vs {label} reference, {rep.samples} samples/{rep.positions} positions: max |logprob err| "
              f"{rep.max_logprob_error:.4f}, max |lse err| {rep.max_logsumexp_error:.4f}, top-k mismatches "
              f"{rep.topk_mismatches}, logprob outliers {rep.logprob_outliers}, ok={rep.ok}")


if __name__ == "__main__":
    main()
