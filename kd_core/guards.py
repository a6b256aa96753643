"""Checks that refuse a bad run before anything is loaded or written.

`check_config` needs nothing but the config: it runs first in validate-config, so a streaming dataset with no
`max_samples` is refused before any dataset, tokenizer or teacher is touched. `check_vocab` needs the teacher's
vocab size (read from its config file, no weights) and runs right after.
"""

from __future__ import annotations

from kd_core import storage
from kd_core.config import Config
from kd_core.errors import ConfigError

# Sampled mode's counts are stored as uint16 and travel from the device as int16.
MAX_SAMPLES_PER_POSITION = 32767
SAMPLED_WRITER_READY = False

# What each profile is for; quoted by the guard so the user can pick a limit.
RECOMMENDED_MAX_SAMPLES = {
    "smoke test (profile testing)": 1_000,
    "development (profile development)": 10_000,
    "small distillation run (profile small)": 100_000,
    "medium run (profile medium)": 1_000_000,
    "large run (profile large)": 10_000_000,
}


def streaming_guard_message(config: Config) -> str:
    per_million = storage.upper_bound_bytes(
        num_samples=1_000_000, max_length=config.cache.max_length, top_k=config.cache.top_k, vocab_size=128_000
    )
    recommended = "\n".join(f"    {n:>12,}  {use}" for use, n in RECOMMENDED_MAX_SAMPLES.items())
    return (
        "dataset.max_samples is required when dataset.streaming=true.\n"
        f"  Why: a streaming source such as {config.dataset.name!r} can hold billions of samples (FineWeb: "
        "~15 trillion tokens). With no limit the run would read the whole stream: months of GPU time and up to "
        f"{storage.human_bytes(per_million)} of cache per million samples at "
        f"max_length {config.cache.max_length}, top_k {config.cache.top_k}.\n"
        "  Fix: set a limit (the seed's form distillation.dataset.max_samples=1000000 works too), e.g.\n"
        "    command line:  kd-cache run --profile PROFILE dataset.max_samples=1000000\n"
        "    REST API:      \"overrides\": [\"dataset.max_samples=1000000\"]\n"
        "    Prefect UI:    add the line dataset.max_samples=1000000 to the Overrides field\n"
        "  and check size and GPU time first with `kd-cache estimate` (docs/STREAMING.md). Recommended values:\n"
        f"{recommended}"
    )


def check_config(config: Config) -> None:
    """Every check that needs only the config. Raises ConfigError naming the key and the fix."""
    ds, cache, run = config.dataset, config.cache, config.run
    if ds.streaming and ds.max_samples is None:
        raise ConfigError(streaming_guard_message(config))
    if ds.max_samples is not None and ds.max_samples <= 0:
        raise ConfigError(
            f"dataset.max_samples must be a positive number of samples, got {ds.max_samples}. "
            "Fix: e.g. dataset.max_samples=1000, or dataset.max_samples=null to read a non-streaming split whole."
        )
    if cache.mode == "topk" and cache.top_k < 1:
        raise ConfigError(f"cache.top_k must be at least 1, got {cache.top_k}. Fix: e.g. cache.top_k=64.")
    if cache.mode == "sampled" and not SAMPLED_WRITER_READY:  # until the cache format has its datasets
        raise ConfigError("cache.mode=sampled: this version does not write sampled caches yet. Fix: cache.mode=topk.")
    if cache.mode == "sampled" and not 1 <= cache.samples <= MAX_SAMPLES_PER_POSITION:
        raise ConfigError(
            f"cache.samples must be between 1 and {MAX_SAMPLES_PER_POSITION} draws per position, got "
            f"{cache.samples}. Fix: e.g. cache.samples=64 (about 12 distinct ids per token on a trained teacher)."
        )
    if cache.max_length < 2:
        raise ConfigError(
            f"cache.max_length must be at least 2 tokens (one to predict from, one to predict), "
            f"got {cache.max_length}. Fix: e.g. cache.max_length=2048."
        )
    if config.teacher.batch_tokens < cache.max_length:
        raise ConfigError(
            f"teacher.batch_tokens ({config.teacher.batch_tokens}) must hold at least one sample of "
            f"cache.max_length ({cache.max_length}) tokens. Fix: teacher.batch_tokens={cache.max_length * 8}."
        )
    if run.num_shards < 1:
        raise ConfigError(f"run.num_shards must be at least 1, got {run.num_shards}. Fix: e.g. run.num_shards=4.")
    if ds.max_samples is not None and run.num_shards > ds.max_samples:
        raise ConfigError(
            f"run.num_shards ({run.num_shards}) is larger than dataset.max_samples ({ds.max_samples}): "
            f"some shards would be empty. Fix: run.num_shards={ds.max_samples} or fewer."
        )
    if config.output.max_bytes is not None and config.output.max_bytes <= 0:
        raise ConfigError(
            f"output.max_bytes must be a positive byte count, got {config.output.max_bytes}. "
            "Fix: e.g. output.max_bytes=500000000000 (500 GB), or output.max_bytes=null for no limit."
        )


def check_vocab(config: Config, vocab_size: int) -> None:
    """top_k must not exceed the teacher's vocabulary (sampled mode has no top_k: any vocabulary will do)."""
    if config.cache.mode == "topk" and config.cache.top_k > vocab_size:
        raise ConfigError(
            f"cache.top_k ({config.cache.top_k}) is larger than the teacher's vocabulary ({vocab_size} tokens). "
            f"Fix: cache.top_k={min(64, vocab_size)}."
        )
