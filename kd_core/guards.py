"""Checks that refuse a bad run before anything is loaded or written.

`check_config` needs nothing but the config: it runs first in validate-config, so a streaming dataset with no
`max_samples` is refused before any dataset, tokenizer or teacher is touched. `check_vocab` needs the teacher's
vocab size (read from its config file, no weights) and runs right after.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from kd_core import storage
from kd_core.config import DEMO_PREFIX, PROFILES_DIR, Config
from kd_core.demo import demo_dir
from kd_core.errors import ConfigError

# Sampled mode's counts are stored as uint16 and travel from the device as int16.
MAX_SAMPLES_PER_POSITION = 32767

# The deployment policy: what a run may touch is the worker's decision, not the run's (config values are run
# parameters, so anyone who can trigger a run sets them). docs/DEPLOYMENT.md, "What a run may touch".
ALLOW_REMOTE_CODE_ENV = "KD_CACHE_ALLOW_REMOTE_CODE"  # 1: runs may set teacher.trust_remote_code=true
ALLOWED_ROOTS_ENV = "KD_CACHE_ALLOWED_ROOTS"  # dirs (os.pathsep-separated) that runs may read local files under

# What each profile is for; quoted by the guard so the user can pick a limit.
RECOMMENDED_MAX_SAMPLES = {
    "smoke test (profile testing)": 1_000,
    "development (profile development)": 10_000,
    "small distillation run (profile small)": 100_000,
    "medium run (profile medium)": 1_000_000,
    "large run (profile large)": 10_000_000,
}


def streaming_guard_message(config: Config) -> str:
    sampled = config.cache.mode == "sampled"
    per_million = storage.upper_bound_bytes(
        num_samples=1_000_000, max_length=config.cache.max_length, top_k=config.cache.top_k, vocab_size=128_000,
        samples=config.cache.samples if sampled else None,
    )
    what = f"cache.samples {config.cache.samples}" if sampled else f"top_k {config.cache.top_k}"
    recommended = "\n".join(f"    {n:>12,}  {use}" for use, n in RECOMMENDED_MAX_SAMPLES.items())
    return (
        "dataset.max_samples is required when dataset.streaming=true.\n"
        f"  Why: a streaming source such as {config.dataset.name!r} can hold billions of samples (FineWeb: "
        "~15 trillion tokens). With no limit the run would read the whole stream: months of GPU time and up to "
        f"{storage.human_bytes(per_million)} of cache per million samples at "
        f"max_length {config.cache.max_length}, {what}.\n"
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


def check_policy(config: Config, deployed: bool, env: Mapping[str, str] | None = None) -> None:
    """Refuse a run that asks for more than this worker allows: remote code, or local files outside its roots.

    A deployed run (triggered from the UI, REST or a schedule) gets neither unless the worker's environment
    grants it. A local command-line run is the user's own: unrestricted unless the same variables say otherwise.
    """
    env = os.environ if env is None else env
    allow_code = env.get(ALLOW_REMOTE_CODE_ENV)
    if config.teacher.trust_remote_code and not _truthy(allow_code) and (deployed or allow_code is not None):
        raise ConfigError(
            "teacher.trust_remote_code: this worker does not let runs execute code from a model repository. Fix: "
            f"teacher.trust_remote_code=false, or the worker's operator starts it with {ALLOW_REMOTE_CODE_ENV}=1 "
            "(docs/DEPLOYMENT.md)."
        )
    allowed = allowed_roots(deployed, env)
    for key, value in local_inputs(config):
        check_local_path(key, value, allowed)


def allowed_roots(deployed: bool, env: Mapping[str, str] | None = None) -> list[Path] | None:
    """The directories runs may read local files under; None when unrestricted (a command-line run, no policy)."""
    env = os.environ if env is None else env
    roots = env.get(ALLOWED_ROOTS_ENV)
    if roots is None and not deployed:
        return None
    # Listed roots, then the shipped demo's own assets (@demo/..., resolved when the config loads): always readable.
    return [*(Path(r).expanduser().resolve() for r in (roots or "").split(os.pathsep) if r.strip()),
            demo_dir().resolve()]


def check_local_path(key: str, value: str, allowed: list[Path] | None) -> None:
    """ConfigError when the local path `value` (config key `key`) lies outside every allowed root."""
    if allowed is None:
        return
    real = Path(value.removeprefix("file://")).expanduser().resolve()  # symlinks and .. resolved
    if not any(real.is_relative_to(root) for root in allowed):
        where = ", ".join(map(str, allowed[:-1])) or f"none: {ALLOWED_ROOTS_ENV} is not set"
        raise ConfigError(
            f"{key}: {value!r} is a local path outside the directories this worker lets runs read ({where}). "
            f"Fix: use a hub id or a URL, or the worker's operator adds its directory to {ALLOWED_ROOTS_ENV} "
            "(docs/DEPLOYMENT.md)."
        )


def check_profile(profile: str, deployed: bool, env: Mapping[str, str] | None = None) -> None:
    """A profile given as a path is a file the run reads: the same roots apply (shipped profiles always may)."""
    path = Path(profile).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file() and not path.resolve().is_relative_to(PROFILES_DIR):
        check_local_path("profile", profile, allowed_roots(deployed, env))


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def local_inputs(config: Config) -> Iterator[tuple[str, str]]:
    """(key, value) of every config value that names a local file or directory a run would read."""
    teacher, ds = config.teacher.model, config.dataset
    if _is_local_path(teacher):
        yield "teacher.model", teacher
    if _is_local_path(ds.name):
        yield "dataset.name", ds.name
    files = ds.data_files
    values = [files] if isinstance(files, str) else list(files.values()) if isinstance(files, dict) else files or []
    for value in values:
        for path in [value] if isinstance(value, str) else value:
            if _is_local_path(str(path)):
                yield "dataset.data_files", str(path)


def _is_local_path(value: str) -> bool:
    """A local path: not a demo asset, not a URL; absolute, relative (./, ~), deeper than org/name, or existing."""
    if value.startswith(DEMO_PREFIX) or ("://" in value and not value.startswith("file://")):
        return False
    return (value.startswith(("/", ".", "~", "file://")) or value.count("/") > 1
            or os.path.exists(os.path.expanduser(value)))
