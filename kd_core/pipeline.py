"""The five steps of a cache build, as plain functions. Prefect tasks (tasks/) are thin wrappers around these.

    validate(profile, overrides)   -> Config            every check that needs no data; the max_samples guard first
    estimate(config)               -> StorageEstimate   exact upper bound + expected size from a probe; size limits
    plan(config, estimate)         -> [ShardSpec]        contiguous, deterministic, covering exactly the run's rows
    run_shard(config, shard)       -> shard record       teacher inference for one shard, written as one HDF5 file
    merge(config, records)         -> manifest           verify every shard, merge, publish, move `latest`

Where things live under output.uri (a local directory or an fsspec URL):

    latest.json                         which version readers get; moved only after a version is complete
    versions/<key>/cache.h5             the merged cache
    versions/<key>/manifest.json        written last: its presence marks the version complete
    work/<key>/shard-*.h5 (+ .json)     shard files and their completion records; removed after publishing

<key> is Config.content_key(): a hash of what determines the cache's content, so a rerun with the same inputs
finds its version published and does no teacher work.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import kd_core
from kd_core import cachefile, data, guards, io, storage
from kd_core.config import Config, load_config
from kd_core.data import ShardSpec
from kd_core.errors import ConfigError, StorageError

log = logging.getLogger("kd_core.pipeline")

PROBE_SAMPLES = 256  # samples tokenized by the storage estimate


class Layout:
    """Paths of one config's cache under output.uri."""

    def __init__(self, config: Config):
        self.root = config.output.uri.rstrip("/")
        self.key = config.content_key()
        self.latest = io.join(self.root, "latest.json")
        self.version_dir = io.join(self.root, "versions", self.key)
        self.cache_file = io.join(self.version_dir, "cache.h5")
        self.manifest = io.join(self.version_dir, "manifest.json")
        self.work_dir = io.join(self.root, "work", self.key)

    def shard_file(self, shard: ShardSpec) -> str:
        return io.join(self.work_dir, f"{shard.name}.h5")

    def shard_record(self, shard: ShardSpec) -> str:
        return io.join(self.work_dir, f"{shard.name}.json")


def staging_dir(config: Config) -> Path:
    """Local scratch for files on their way to a remote target (h5py writes need a seekable local file)."""
    root = Path(os.environ.get("KD_CACHE_STAGING", tempfile.gettempdir())) / "kd-cache-staging" / config.content_key()
    root.mkdir(parents=True, exist_ok=True)
    return root


# -- validate-config -------------------------------------------------------------------------------------------

def validate(profile: str, overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Load and check the config. The max_samples guard runs before anything is loaded or written."""
    from kd_core.teacher import teacher_vocab_size

    config = load_config(profile, overrides)
    guards.check_config(config)
    guards.check_vocab(config, teacher_vocab_size(config.teacher))  # reads the teacher's config file, no weights
    return config


# -- estimate-storage ------------------------------------------------------------------------------------------

def estimate(config: Config) -> storage.StorageEstimate:
    """Exact upper bound and expected size; StorageError when over output.max_bytes or the target's free space."""
    from kd_core.teacher import load_tokenizer, teacher_vocab_size

    source = data.load_source(config.dataset)
    data.check_text_column(config.dataset, source)
    total = data.total_samples(config.dataset, source)
    texts = data.probe_texts(config.dataset, source, PROBE_SAMPLES)
    if not texts:
        raise ConfigError(f"dataset: {config.dataset.name!r} split {config.dataset.split!r} has no samples. "
                          "Fix dataset.split or dataset.data_files.")
    tokenizer = load_tokenizer(config.teacher)
    max_length = config.cache.max_length
    lengths = [len(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) if t and t.strip() else 0
               for t in texts]
    free = storage.local_free_bytes(io.local_path(config.output.uri)) if io.is_local(config.output.uri) else None
    est = storage.estimate(num_samples=total, max_length=max_length, top_k=config.cache.top_k,
                           vocab_size=teacher_vocab_size(config.teacher), probe_lengths=lengths,
                           max_bytes=config.output.max_bytes, free_bytes=free)
    check_fits(est)
    return est


def check_fits(est: storage.StorageEstimate) -> None:
    expected = storage.human_bytes(est.expected_bytes)
    if est.max_bytes is not None and est.expected_bytes > est.max_bytes:
        raise StorageError(
            f"output.max_bytes: the cache is expected to take {expected} ({est.num_samples:,} samples, "
            f"{est.mean_tokens_per_sample:.0f} tokens each on average), over the limit of "
            f"{storage.human_bytes(est.max_bytes)}. Fix: lower dataset.max_samples, cache.top_k or "
            "cache.max_length, or raise output.max_bytes."
        )
    # Shard files and the merged copy sit side by side until the merge publishes: twice the cache.
    if est.free_bytes is not None and 2 * est.expected_bytes > est.free_bytes:
        raise StorageError(
            f"output.uri: the target has {storage.human_bytes(est.free_bytes)} free; the run needs about "
            f"{storage.human_bytes(2 * est.expected_bytes)} (the {expected} cache plus its shards during the merge). "
            "Fix: free space, choose another output.uri, or lower dataset.max_samples."
        )


# -- shard-dataset ---------------------------------------------------------------------------------------------

def plan(config: Config, est: storage.StorageEstimate) -> list[ShardSpec]:
    return data.plan_shards(est.num_samples, min(config.run.num_shards, est.num_samples))


# -- teacher-inference -----------------------------------------------------------------------------------------

def run_shard(config: Config, shard: ShardSpec, progress: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Run the teacher over one shard and publish its file, then its completion record (last).

    Idempotent: a shard whose record exists is not run again, and a shard file is only ever published whole.
    """
    from kd_core.inference import InferenceStats, run_teacher
    from kd_core.teacher import load_teacher

    layout, opts = Layout(config), config.output.storage_options
    if io.exists(layout.shard_record(shard), opts) and io.exists(layout.shard_file(shard), opts):
        log.info("%s already complete, skipping", shard.name)
        return io.read_json(layout.shard_record(shard), opts)

    source = data.load_source(config.dataset)
    data.check_text_column(config.dataset, source)
    teacher = load_teacher(config.teacher)
    local = (io.local_path(layout.shard_file(shard)) if io.is_local(layout.root)
             else staging_dir(config) / f"{shard.name}.h5")
    stats = InferenceStats()
    started = time.perf_counter()
    attrs = {"producer": f"kd-cache {kd_core.__version__}", "shard": shard.name}
    with cachefile.CacheWriter(local, top_k=config.cache.top_k, vocab_size=teacher.vocab_size, attrs=attrs) as writer:
        rows_iter = run_teacher(teacher, data.iter_texts(config.dataset, source, shard.start, shard.stop),
                                top_k=config.cache.top_k, max_length=config.cache.max_length,
                                batch_tokens=config.teacher.batch_tokens, stats=stats)
        for rows in rows_iter:
            writer.append_rows(rows)
            if progress is not None:
                progress(stats)
    summary = {"num_samples": writer.num_samples, "num_tokens": writer.num_tokens, "checksums": writer.checksums()}
    io.publish_file(local, layout.shard_file(shard), opts)
    record = {
        "shard": shard.as_dict(), **summary,
        "skipped_empty": stats.skipped_empty,
        "seconds": round(time.perf_counter() - started, 3),
        "vocab_size": teacher.vocab_size,
        "tokenizer": getattr(teacher.tokenizer, "name_or_path", None),
    }
    io.write_json_atomic(layout.shard_record(shard), record, opts)
    log.info("%s: %d samples, %d tokens, %d empty skipped", shard.name, record["num_samples"], record["num_tokens"],
             record["skipped_empty"])
    return record


# -- merge-to-hdf5 ---------------------------------------------------------------------------------------------

def published(config: Config) -> dict[str, Any] | None:
    """The manifest of this config's version if it is already complete, else None."""
    layout = Layout(config)
    opts = config.output.storage_options
    return io.read_json(layout.manifest, opts) if io.exists(layout.manifest, opts) else None


def cache_attrs(config: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    ds = config.dataset
    return {
        "producer": f"kd-cache {kd_core.__version__}",
        "teacher_model": config.teacher.model, "teacher_revision": config.teacher.revision,
        "vocab_size": records[0]["vocab_size"], "tokenizer": records[0]["tokenizer"],
        "dataset_name": ds.name, "dataset_config": ds.config, "dataset_split": ds.split,
        "dataset_revision": ds.revision, "dataset_data_files": ds.data_files,
        "max_samples": ds.max_samples, "max_length": config.cache.max_length,
        "skipped_empty": sum(r["skipped_empty"] for r in records),
        "content_key": config.content_key(),
        "config": config.public_dict(),
    }


def merge(config: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Verify every shard against its record, merge in shard order, publish, write the manifest, move latest."""
    layout, opts = Layout(config), config.output.storage_options
    records = sorted(records, key=lambda r: r["shard"]["rank"])
    scratch = Path(tempfile.mkdtemp(prefix="kd-merge-", dir=staging_dir(config)))
    try:
        parts = []
        for record in records:
            shard = ShardSpec(**record["shard"])
            uri = layout.shard_file(shard)
            if io.is_local(uri):
                path = io.local_path(uri)
            else:
                path = scratch / f"{shard.name}.h5"
                fs, remote = io.filesystem(uri, opts)
                fs.get_file(remote, str(path))
            cachefile.verify_file(path, expect=record)  # raises CacheFileError naming the shard file
            parts.append(path)
        merged_local = (io.local_path(layout.cache_file) if io.is_local(layout.root) else scratch / "cache.h5")
        summary = cachefile.merge_files(parts, merged_local, attrs=cache_attrs(config, records))
        file_bytes = merged_local.stat().st_size
        io.publish_file(merged_local, layout.cache_file, opts)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    manifest = {
        "format_version": cachefile.FORMAT_VERSION, "key": layout.key, "cache": "cache.h5",
        "uri": layout.cache_file, "file_bytes": file_bytes,
        "bytes_per_token": file_bytes / max(1, summary["num_tokens"]),
        **summary,
        "skipped_empty": sum(r["skipped_empty"] for r in records),
        "shards": len(records), "config": config.public_dict(),
    }
    io.write_json_atomic(layout.manifest, manifest, opts)  # the version is complete from here on
    io.write_json_atomic(layout.latest, {"version": layout.key, "path": f"versions/{layout.key}/cache.h5"}, opts)
    fs, work = io.filesystem(layout.work_dir, opts)
    if fs.exists(work):
        fs.rm(work, recursive=True)
    return manifest


def resolve_cache_uri(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """A cache file's URI from either the file itself or an output.uri directory (follows latest.json)."""
    if uri.endswith((".h5", ".hdf5")):
        return uri
    latest = io.join(uri, "latest.json")
    if not io.exists(latest, storage_options):
        raise ConfigError(f"{uri}: no cache here (no latest.json and not an .h5 file). Pass the output.uri of a "
                          "finished run or the path of a cache.h5.")
    return io.join(uri, io.read_json(latest, storage_options)["path"])

