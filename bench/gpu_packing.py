"""Packing experiment: is packing several samples a row faster per real token than padded batches, and exact.

The pipeline runs padded batches (kd_core.inference.padded_batches: one sample a row, length-sorted, SDPA
is_causal, default positions). This lays the same look-ahead window out with packing too, as packed_batches
below does it (whole samples filled
best-fit decreasing into rows, a sample never spanning two, position_ids restarting per sample, from which
transformers builds a block-diagonal causal mask), and measures it. docs/PERFORMANCE.md has the H200 run: packed
was slower (0.86x real tokens/s for 110M, 0.99x for 1.5B with sdpa; flex_attention 0.03x), so the pipeline does
not pack. Two parts, each failing soft (a broken one prints its error and the rest still run):

1. Speed. The bare bf16 forward (`model(input_ids=, position_ids=).logits`, grid() below builds both)
   over one look-ahead window of the default size (32 batches of batch_tokens) laid out as:
     padded sdpa        one sample a row, length-sorted, right-padded: SDPA's is_causal (flash) kernels
     packed sdpa        rows as long as the longest sample not yet placed (so short samples share short rows):
                        transformers' block-diagonal mask, materialized (B, 1, T, T)
     packed T=max sdpa  the same into rows of max_length (static shapes; a dense mask costs T^2 a row)
     packed T=max flex  those batches with attn_implementation="flex_attention" (a BlockMask that skips blocks
                        across samples; compiled per shape, warm-up reported apart), within the time budget
   A stride of the window's batches is timed and scaled to the whole window. Lengths: a synthetic mix like
   bench_inference's stdlib text (p10/p50 ~ 53/114 tokens, 12% cut at max_length). Models from config, random
   init, bf16: a ~110M Llama and a Qwen2.5-1.5B-shaped Qwen2.
2. Exactness. Float32, a 110M-shaped Llama: each sample's logits in packed batches against the sample alone.

    python bench/gpu_packing.py                      # on the GPU machine, < 90 s on an H200
    python bench/gpu_packing.py --device cpu --quick # a smoke test (tiny models; its timings mean nothing)

Writes the printout to $OUT/gpu_packing.txt when OUT is set. bench/bench_packing.py gives the real/computed
fractions of both layouts on the real text (host only).
"""

from __future__ import annotations

import argparse
import bisect
import io
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kd_core.inference import padded_batches  # noqa: E402

MODELS = {  # name -> (config class, config kwargs)
    "llama-110m": ("LlamaConfig", dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12)),
    "qwen2.5-1.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                         tie_word_embeddings=True)),
}
QUICK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000)


@dataclass
class Layout:
    """Where a batch's samples sit in its (height, width) grid: window positions in the order their rows come out,
    each with its length and its slot (row b, first column t)."""

    samples: list[int]
    lengths: list[int]
    slots: list[tuple[int, int]]
    height: int  # B
    width: int  # T


def padded(lengths: list[int], batch_tokens: int) -> Iterator[Layout]:
    """The pipeline's batches (kd_core.inference.padded_batches): sample b in row b from column 0."""
    for batch in padded_batches(lengths, batch_tokens):
        yield Layout(batch.samples, batch.lengths, [(b, 0) for b in range(batch.height)], batch.height, batch.width)


def grid(samples: list[tuple[int, np.ndarray]], layout: Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample_index, tokens) pairs laid out as `layout` says -> input_ids (B, T), position_ids (B, T) restarting
    at 0 for each sample (padding keeps its column), rows (N,): flat indices b*T+t of the real positions."""
    ids = np.zeros((layout.height, layout.width), dtype=np.int64)  # (B, T), padding 0
    positions = np.tile(np.arange(layout.width, dtype=np.int64), (layout.height, 1))  # (B, T)
    rows = []
    for j, n, (b, t) in zip(layout.samples, layout.lengths, layout.slots):
        ids[b, t : t + n] = samples[j][1]
        positions[b, t : t + n] = np.arange(n)
        rows.append(b * layout.width + t + np.arange(n))
    return ids, positions, np.concatenate(rows)


def packed_batches(lengths: list[int], batch_tokens: int, width: int | None = None) -> Iterator[Layout]:
    """Several whole samples a row, filled best-fit decreasing; a sample never spans two rows.

    Rows are `width` long, by default as long as the longest sample not yet placed, so that rows of short samples
    are short too (a materialized mask costs B * T * T); batch_tokens // width rows a batch (at least one). Each
    sample, longest first, goes to the row with the least room that still holds it, a new row while the batch
    has fewer; what fits nowhere waits for a later batch.
    """
    waiting = sorted(range(len(lengths)), key=lambda j: -lengths[j])  # longest first
    while waiting:
        row_length = max(width or 0, lengths[waiting[0]])
        height = max(1, batch_tokens // row_length)
        rows: list[list[int]] = []
        room: list[tuple[int, int]] = []  # (free columns, row number) of the rows not yet full, ascending
        left: list[int] = []
        for i, j in enumerate(waiting):
            k = bisect.bisect_left(room, (lengths[j], -1))  # the tightest row that holds it
            if k < len(room):
                free, r = room.pop(k)
                rows[r].append(j)
            elif len(rows) < height:
                rows.append([j])
                free, r = row_length, len(rows) - 1
            else:
                left.append(j)
                if not room or room[-1][0] < lengths[waiting[-1]]:  # nothing left fits anywhere: stop looking
                    left += waiting[i + 1 :]
                    break
                continue
            if free > lengths[j]:
                bisect.insort(room, (free - lengths[j], r))
        waiting = left
        samples, slots = [], []
        for b, row in enumerate(rows):
            start = 0
            for j in row:
                samples.append(j)
                slots.append((b, start))
                start += lengths[j]
        yield Layout(samples, [lengths[j] for j in samples], slots, len(rows), row_length)


def lengths_mix(tokens: int, max_length: int, seed: int = 0) -> list[int]:
    """Sample lengths summing to about `tokens`: 12% at max_length, the rest lognormal (median ~104, so that the
    whole mix has p10/p50 ~ 53/114 as the stdlib text has)."""
    rng = np.random.default_rng(seed)
    out, total = [], 0
    while total < tokens:
        n = max_length if rng.random() < 0.12 else int(np.clip(rng.lognormal(4.64, 0.56), 1, max_length))
        out.append(n)
        total += n
    return out


def build(name: str, dtype: torch.dtype, device: torch.device, quick: bool, attn: str = "sdpa"):
    import transformers

    cls, kwargs = MODELS[name]
    config = getattr(transformers, cls)(**(kwargs | (QUICK if quick else {})))
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, not the minute a CPU init of 1.5B takes
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def set_attn(model, attn: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    else:
        model.config._attn_implementation = attn
    assert model.config._attn_implementation == attn, model.config._attn_implementation


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def grids(lengths: list[int], layouts: list, vocab: int, device) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The layouts' (input_ids, position_ids) on the device, with random tokens. position_ids None for a row per
    sample (the model's default positions, as the pipeline runs padded batches)."""
    rng = np.random.default_rng(1)
    samples = [(i, rng.integers(0, vocab, size=n)) for i, n in enumerate(lengths)]
    out = []
    for layout in layouts:
        ids, positions, _ = grid(samples, layout)
        one_a_row = all(t == 0 for _, t in layout.slots) and len(layout.slots) == layout.height
        out.append((torch.from_numpy(ids).to(device), None if one_a_row else torch.from_numpy(positions).to(device)))
    return out


def time_layout(model, layouts, batches, device, stride: int, every_shape: bool) -> tuple[float, float]:
    """-> (seconds for the whole window, estimated from every stride-th batch; warm-up seconds). Warm-up: the
    first batch, or one batch of each shape when every_shape (flex_attention compiles per shape)."""
    picked = list(range(0, len(layouts), stride))
    start = time.perf_counter()
    seen = set()
    with torch.inference_mode():
        for i in picked if every_shape else picked[:1]:
            if batches[i][0].shape not in seen:
                seen.add(batches[i][0].shape)
                model(input_ids=batches[i][0], position_ids=batches[i][1], use_cache=False).logits
        sync(device)
        warm = time.perf_counter() - start
        start = time.perf_counter()
        for i in picked:
            model(input_ids=batches[i][0], position_ids=batches[i][1], use_cache=False).logits
        sync(device)
    elapsed = time.perf_counter() - start
    computed = lambda idx: sum(layouts[i].height * layouts[i].width for i in idx)  # noqa: E731
    return elapsed * computed(range(len(layouts))) / computed(picked), warm


_PADDED_SDPA: dict[str, float] = {}


def speed(args, device, deadline: float, attns: tuple[str, ...]) -> None:
    print(f"\n## 1. bare bf16 forward per layout ({'quick, tiny models' if args.quick else 'full size'}; "
          f"{', '.join(attns)})")
    window = args.window_batches * args.batch_tokens
    lengths = lengths_mix(window, args.max_length)
    real = sum(lengths)
    p10, p50, p90 = np.percentile(lengths, [10, 50, 90])
    print(f"window {window:,} tokens (default: 32 batches of batch_tokens {args.batch_tokens:,}), {len(lengths)} "
          f"samples, p10/p50/p90 {p10:.0f}/{p50:.0f}/{p90:.0f}, max_length {args.max_length}")
    layouts = {"padded": list(padded(lengths, args.batch_tokens)),
               "packed": list(packed_batches(lengths, args.batch_tokens)),
               "packed T=max": list(packed_batches(lengths, args.batch_tokens, width=args.max_length))}
    for name, lay in layouts.items():
        computed = sum(x.height * x.width for x in lay)
        print(f"  {name}: {len(lay)} batches, real/computed {real / computed:.3f}")
    print("| model | layout | attention | ms / 32k computed | computed tok/s | real tok/s | vs padded sdpa (real) "
          "| warm-up s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models, base = {}, _PADDED_SDPA  # real tok/s of padded sdpa per model, kept across calls
    # sdpa for both models first, flex (compiles per shape: slow to warm up) last, within the time budget.
    runs = [(m, lay, "sdpa") for m in MODELS for lay in layouts] if "sdpa" in attns else []
    runs += [(m, "packed T=max", attn) for attn in attns if attn != "sdpa" for m in MODELS]  # static shapes
    for model_name, layout, attn in runs:
        if time.time() > deadline:
            print(f"| {model_name} | {layout} | {attn} | skipped: time budget spent | | | | |")
            continue
        try:
            if model_name not in models:
                model = build(model_name, dtype, device, args.quick)
                models[model_name] = model, {k: grids(lengths, v, model.config.vocab_size, device)
                                             for k, v in layouts.items()}
            model, batches = models[model_name]
            set_attn(model, attn)
            seconds, warm = time_layout(model, layouts[layout], batches[layout], device, args.stride,
                                        every_shape=attn != "sdpa")
            computed = sum(x.height * x.width for x in layouts[layout])
            rate = real / seconds
            if (layout, attn) == ("padded", "sdpa"):
                base[model_name] = rate
            ratio = f"{rate / base[model_name]:.2f}" if model_name in base else "-"
            print(f"| {model_name} | {layout} | {attn} | {seconds / computed * 32768 * 1e3:.2f} | "
                  f"{computed / seconds:,.0f} | {rate:,.0f} | {ratio} | {warm:.1f} |")
        except Exception as e:  # noqa: BLE001
            print(f"| {model_name} | {layout} | {attn} | failed: {type(e).__name__}: {first_line(e)} | | | | |")


def exactness(args, device, attns: tuple[str, ...]) -> None:
    print(f"\n## 2. float32: packed rows against each sample alone ({', '.join(attns)})")
    model = build("llama-110m", torch.float32, device, args.quick)
    lengths = [300, 7, 150, 64, 1, 480, 33, 200]  # packed into rows of 480
    rng = np.random.default_rng(2)
    samples = [(i, rng.integers(0, model.config.vocab_size, size=n)) for i, n in enumerate(lengths)]
    layouts = list(packed_batches(lengths, 4 * 480))
    print(f"  {len(lengths)} samples in {sum(x.height for x in layouts)} rows of {layouts[0].width}")
    for attn in attns:
        try:
            set_attn(model, attn)
            worst = 0.0
            with torch.inference_mode():
                alone = {j: model(input_ids=torch.tensor(ids[None], device=device)).logits[0]
                         for j, (_, ids) in enumerate(samples)}
                for layout in layouts:
                    ids, positions, rows = (torch.from_numpy(a).to(device) for a in grid(samples, layout))
                    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
                    flat = logits.flatten(0, 1)[rows]  # (N, V), sample after sample
                    for j, got in zip(layout.samples, flat.split(layout.lengths)):
                        worst = max(worst, (got - alone[j]).abs().max().item())
            scale = max(a.abs().max().item() for a in alone.values())
            print(f"  {attn}: max |logit(packed) - logit(alone)| = {worst:.2e} (max |logit| {scale:.1f})")
        except Exception as e:  # noqa: BLE001
            print(f"  {attn}: failed: {type(e).__name__}: {first_line(e)}")
    del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models and window (a CPU smoke test)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-tokens", type=int, default=32768)
    parser.add_argument("--window-batches", type=int, default=32)
    parser.add_argument("--stride", type=int, default=4, help="time every stride-th batch of the window")
    parser.add_argument("--budget", type=float, default=80, help="seconds; later speed rows are skipped past it")
    args = parser.parse_args()
    if args.quick:
        args.max_length, args.batch_tokens, args.window_batches = 256, 2048, 8
    device = torch.device(args.device)
    start = time.time()
    out = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s):
            sys.__stdout__.write(s)
            sys.__stdout__.flush()
            return out.write(s)

    with redirect_stdout(Tee()):
        import transformers

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"# gpu_packing: {name}, torch {torch.__version__}, transformers {transformers.__version__}")
        deadline = start + args.budget
        # sdpa first; flex_attention (compiles per shape, slow to warm up) last, within the budget.
        steps = [lambda: speed(args, device, deadline, ("sdpa",)),
                 lambda: exactness(args, device, ("sdpa",)),
                 lambda: speed(args, device, deadline, ("flex_attention",)),
                 lambda: exactness(args, device, ("flex_attention",))]
        for step in steps:
            if time.time() > deadline:
                print("\n(time budget spent: later steps skipped)")
                break
            try:
                step()
            except Exception:  # noqa: BLE001
                traceback.print_exc(file=sys.stdout)
        print(f"\ntotal {time.time() - start:.1f} s")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_packing.txt").write_text(out.getvalue())


if __name__ == "__main__":
    main()
