"""The size and GPU time of every shipped profile, as `kd-cache estimate` computes them, without the network.

    .venv/bin/python bench/estimate_profiles.py [--mean-tokens 1000]

`kd-cache estimate` needs the hub: the teacher's config (vocab size, parameter count) and a probe of the
dataset's samples (mean tokens per sample). Offline, this script gives it the same inputs from what is
published: each Qwen2.5 teacher's config.json (architecture below; the parameter count is computed from it on
the meta device, exactly as the estimate does) and an assumed mean of tokens per sample for FineWeb-Edu
(sample-10BT: 10B GPT-2 tokens over 9.67M documents, ~1,030 per document, a little less after truncation at
2048). Everything else is kd_core.storage's arithmetic. Prints a markdown table; docs/STREAMING.md quotes it.
"""

from __future__ import annotations

import argparse

from kd_core import storage
from kd_core.config import load_config

# From the teachers' config.json on the hub: hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings.
QWEN25 = {
    "Qwen/Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 151_936, True),
    "Qwen/Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 151_936, True),
    "Qwen/Qwen2.5-7B": (3584, 18944, 28, 28, 4, 152_064, False),
}


def parameters(model: str) -> int:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, Qwen2Config

    hidden, inter, layers, heads, kv, vocab, tied = QWEN25[model]
    config = Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied)
    with init_empty_weights():
        net = AutoModelForCausalLM.from_config(config)
    net.tie_weights()
    return sum(p.numel() for p in net.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mean-tokens", type=float, default=1000.0, help="assumed tokens per sample after truncation")
    args = parser.parse_args()
    print(f"Assumed: {args.mean_tokens:,.0f} tokens per sample; MFU {storage.MEASURED_MFU:.0%} of peak dense bf16.\n")
    print("| profile | teacher (parameters) | samples | expected tokens | expected size | upper bound | teacher FLOPs "
          "| GPU hours H100 / A100 / L4 | shards | wall time on as many H100s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("testing", "development", "small", "medium", "large"):
        config = load_config(name)
        params = parameters(config.teacher.model)
        samples = config.dataset.max_samples
        length = min(round(args.mean_tokens), config.cache.max_length)
        est = storage.estimate(num_samples=samples, max_length=config.cache.max_length, top_k=config.cache.top_k,
                               vocab_size=QWEN25[config.teacher.model][5], probe_lengths=[length],
                               teacher_parameters=params, num_shards=config.run.num_shards)
        hours = " / ".join(storage.human_hours(h) for h in est.gpu_hours.values())
        print(f"| {name} | {config.teacher.model.split('/')[1]} ({params / 1e9:.2f} B) | {samples:,} "
              f"| {est.expected_tokens:,} | {storage.human_bytes(est.expected_bytes)} "
              f"| {storage.human_bytes(est.upper_bound_bytes)} | {est.teacher_flops:.2e} | {hours} "
              f"| {config.run.num_shards} | {storage.human_hours(est.wall_hours['H100'])} |")


if __name__ == "__main__":
    main()
