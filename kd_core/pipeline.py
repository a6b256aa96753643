"""The five steps of a cache build, as plain functions. Prefect tasks (tasks/) are thin wrappers around these.

    validate(profile, overrides)   -> Config            every check that needs no data; the max_samples guard first
    estimate(config)               -> StorageEstimate   exact upper bound + expected size from a probe; size limits
    plan(config)                   -> ShardPlan          contiguous shards from the source's layout, exactly the run's rows
    run_shard(config, shard)       -> shard record       teacher inference for one shard, written in parts
    merge(config, records)         -> manifest           verify every shard, merge, publish, move `latest`

Where things live under output.uri (a local directory or an fsspec URL):

    latest.json                         which version readers get; moved only after a version is complete
    versions/<key>/cache.h5             the merged cache
    versions/<key>/manifest.json        written last: its presence marks the version complete
    work/<key>/<shard>/part-*.h5 (+ .json)   a shard's parts and their completion records
    work/<key>/<shard>.json             the shard's completion record (lists its parts), written after its last part
    work/<key>/<shard>.lock             lease lock: one writer per shard (kd_core.locks)
    work/<key>.merge.lock               lease lock: one merge at a time (outside work/<key>/, which the merge removes)
    work/publish.lock                   lease lock: one run at a time writes a manifest, moves latest and prunes
                                        work/<key>/ is removed after publishing

<key> is Config.content_key(): a hash of what determines the cache's content, so a rerun with the same inputs
finds its version published and does no teacher work.

Resume: a shard is cut into parts of run.part_samples rows. A part's record is written before its file is
published (so a file under its final name always has a record to be verified against); a part is complete when
both exist. A killed shard restarts after its last complete part; a shard with a record is skipped. Parts are
run one teacher pass each, so a resumed shard batches every part exactly as an uninterrupted run does and the
merged arrays are byte-for-byte the same.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import kd_core
from kd_core import cachefile, data, guards, io, storage, versions
from kd_core.config import Config, load_config
from kd_core.data import ShardSpec
from kd_core.errors import CacheFileError, ConfigError, StorageError

log = logging.getLogger("kd_core.pipeline")

PROBE_SAMPLES = 256  # samples tokenized by the storage estimate


class Layout:
    """Paths of one config's cache under output.uri."""

    def __init__(self, config: Config):
        self.root = config.output.uri.rstrip("/")
        self.key = config.content_key()
        self.version_dir = io.join(self.root, "versions", self.key)
        self.cache_file = io.join(self.version_dir, "cache.h5")
        self.manifest = io.join(self.version_dir, "manifest.json")
        self.work_dir = io.join(self.root, "work", self.key)
        self.merge_lock = versions.merge_lock_uri(self.root, self.key)

    def shard_record(self, shard: ShardSpec) -> str:
        return io.join(self.work_dir, f"{shard.name}.json")

    def shard_lock(self, shard: ShardSpec) -> str:
        return io.join(self.work_dir, f"{shard.name}.lock")

    def part_file(self, shard: ShardSpec, part: int) -> str:
        return io.join(self.work_dir, shard.name, f"part-{part:05d}.h5")

    def part_record(self, shard: ShardSpec, part: int) -> str:
        return io.join(self.work_dir, shard.name, f"part-{part:05d}.json")


def staging_dir(config: Config) -> Path:
    """Local scratch for files on their way to a remote target (h5py writes need a seekable local file)."""
    root = Path(os.environ.get("KD_CACHE_STAGING", tempfile.gettempdir())) / "kd-cache-staging" / config.content_key()
    root.mkdir(parents=True, exist_ok=True)
    return root


# -- validate-config -------------------------------------------------------------------------------------------

def validate(profile: str, overrides: dict[str, Any] | list[str] | None = None, check_target: bool = True) -> Config:
    """Load and check the config. The max_samples guard runs before anything is loaded or written.
    check_target=False skips the output target (`kd-cache estimate` needs no bucket to exist)."""
    from kd_core.teacher import teacher_vocab_size

    config = load_config(profile, overrides)
    guards.check_config(config)
    if check_target:
        io.check_target(config.output.uri, config.output.storage_options)  # writable directory / existing bucket
    guards.check_vocab(config, teacher_vocab_size(config.teacher))  # reads the teacher's config file, no weights
    return config


# -- estimate-storage ------------------------------------------------------------------------------------------

def estimate(config: Config, check: bool = True) -> storage.StorageEstimate:
    """Exact upper bound, expected size and teacher compute; with check, StorageError when the cache is over
    output.max_bytes or the target's free space (`kd-cache estimate` passes check=False: it reports, never refuses).
    """
    from kd_core.teacher import load_tokenizer, teacher_num_parameters, teacher_vocab_size

    source = data.Source(config.dataset)
    source.check_text_column()
    total = source.run_rows()  # max_samples, checked here already when the source's size is known
    texts = data.probe_texts(config.dataset, source, PROBE_SAMPLES)
    if not texts:
        raise ConfigError(f"dataset: {config.dataset.name!r} split {config.dataset.split!r} has no samples. "
                          "Fix dataset.split or dataset.data_files.")
    if len(texts) == total and not any(t and t.strip() for t in texts):  # the probe saw every row: all blank
        raise ConfigError(f"dataset.text_column: all {total:,} rows of column {config.dataset.text_column!r} are "
                          "empty, so the cache would hold no samples. Fix: dataset.text_column or dataset.data_files.")
    tokenizer = load_tokenizer(config.teacher)
    max_length = config.cache.max_length
    lengths = [len(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) if t and t.strip() else 0
               for t in texts]
    free = storage.local_free_bytes(io.local_path(config.output.uri)) if io.is_local(config.output.uri) else None
    est = storage.estimate(num_samples=total, max_length=max_length, top_k=config.cache.top_k,
                           vocab_size=teacher_vocab_size(config.teacher), probe_lengths=lengths,
                           max_bytes=config.output.max_bytes, free_bytes=free,
                           teacher_parameters=teacher_num_parameters(config.teacher),
                           num_shards=min(config.run.num_shards, total))
    est.reason = storage.does_not_fit(est)
    est.fits = est.reason is None
    if check:
        check_fits(est)
    return est


def check_fits(est: storage.StorageEstimate) -> None:
    """StorageError naming the limit and the fix when the expected cache is over output.max_bytes or free space."""
    if not est.fits:
        raise StorageError(est.reason)


# -- shard-dataset ---------------------------------------------------------------------------------------------

def plan(config: Config) -> data.ShardPlan:
    """run.num_shards shards from the source's layout (parquet footers, or one counting pass): see kd_core.data."""
    return data.plan(config.dataset, config.run.num_shards)


# -- teacher-inference -----------------------------------------------------------------------------------------

def run_shard(config: Config, shard: ShardSpec, progress: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Run the teacher over one shard, part by part; publish each part, then the shard's record (last).

    Idempotent and resumable: a shard with a record is skipped; otherwise its complete parts are kept and the run
    continues after the last one. A lease lock refuses a second run on this shard while this one is alive.
    """
    from kd_core.locks import LeaseLock

    layout, opts = Layout(config), config.output.storage_options
    if io.exists(layout.shard_record(shard), opts):
        log.info("%s already complete, skipping", shard.name)
        return io.read_json(layout.shard_record(shard), opts)

    staging = io.local_path(layout.work_dir) if io.is_local(layout.root) else staging_dir(config)
    with LeaseLock(layout.shard_lock(shard), shard.name, opts) as lock, io.disk_full_is_fatal(staging):
        parts = plan_parts(shard, config.run.part_samples)
        done = complete_parts(layout, shard, parts, opts)
        if len(done) < len(parts):
            if done:
                log.info("%s: resuming at part %d of %d (row %d)", shard.name, len(done), len(parts), parts[len(done)][0])
            done += _run_parts(config, layout, shard, parts[len(done):], done, lock, progress)
        record = {
            "shard": shard.model_dump(),
            **{key: sum(p[key] for p in done) for key in ("num_samples", "num_tokens", "skipped_empty")},
            "seconds": round(sum(p["seconds"] for p in done), 3),
            "vocab_size": done[0]["vocab_size"], "tokenizer": done[0]["tokenizer"],
            "teacher_dtype": done[0]["teacher_dtype"],
            "parts": done,
        }
        lock.check()
        io.write_json_atomic(layout.shard_record(shard), record, opts)
    log.info("%s: %d samples, %d tokens, %d empty skipped", shard.name, record["num_samples"], record["num_tokens"],
             record["skipped_empty"])
    return record


def plan_parts(shard: ShardSpec, part_samples: int) -> list[tuple[int, int]]:
    """A shard's parts as [start, stop) row ranges of at most part_samples rows."""
    return [(start, min(start + part_samples, shard.stop)) for start in range(shard.start, shard.stop, part_samples)]


def complete_parts(layout: Layout, shard: ShardSpec, parts: list[tuple[int, int]], opts: dict[str, Any]) -> list[dict[str, Any]]:
    """Records of the shard's leading complete parts: record and file both there, over the planned rows."""
    done = []
    for index, (start, stop) in enumerate(parts):
        record_uri = layout.part_record(shard, index)
        if not (io.exists(record_uri, opts) and io.exists(layout.part_file(shard, index), opts)):
            break
        record = io.read_json(record_uri, opts)
        if (record["start"], record["stop"]) != (start, stop):  # written under another run.part_samples
            break
        done.append(record)
    return done


def _run_parts(config: Config, layout: Layout, shard: ShardSpec, todo: list[tuple[int, int]],
               done: list[dict[str, Any]], lock, progress: Callable[[Any], None] | None) -> list[dict[str, Any]]:
    """Run and publish the parts in `todo` (the shard's last ones, in order); their records."""
    from kd_core.inference import InferenceStats, run_teacher
    from kd_core.teacher import load_teacher

    opts = config.output.storage_options
    teacher = load_teacher(config.teacher)
    # One reader over all the remaining rows, sliced into parts: it seeks to the resume point once.
    texts = data.iter_texts(config.dataset, shard, todo[0][0], shard.stop)
    # Progress counts the whole shard, complete parts included.
    stats = InferenceStats(samples=sum(r["num_samples"] for r in done), tokens=sum(r["num_tokens"] for r in done),
                           skipped_empty=sum(r["skipped_empty"] for r in done))
    staging = (io.local_path(io.join(layout.work_dir, shard.name)) if io.is_local(layout.root)
               else staging_dir(config) / shard.name)
    first = len(done)
    records = []
    for index, (start, stop) in enumerate(todo, start=first):
        started, skipped_before = time.perf_counter(), stats.skipped_empty
        # Not the final name: the part's record is published first, then the file moves into place.
        local = staging / f"part-{index:05d}.h5.staged"
        attrs = {"producer": f"kd-cache {kd_core.__version__}", "shard": shard.name, "part": index}
        with cachefile.CacheWriter(local, top_k=config.cache.top_k, vocab_size=teacher.vocab_size, attrs=attrs) as writer:
            # One teacher pass per part: batches never straddle a part, so a resumed run batches like a clean one.
            for rows in run_teacher(teacher, itertools.islice(texts, stop - start), top_k=config.cache.top_k,
                                    max_length=config.cache.max_length, batch_tokens=config.teacher.batch_tokens,
                                    stats=stats):
                writer.append_rows(rows)
                if progress is not None:
                    progress(stats)
        skipped = stats.skipped_empty - skipped_before
        if writer.num_samples + skipped != stop - start:
            raise ConfigError(f"dataset.max_samples: the dataset ended at row {start + writer.num_samples + skipped:,}, "
                              f"before the {shard.stop:,} rows planned. Fix: dataset.max_samples="
                              f"{start + writer.num_samples + skipped} or fewer.")
        record = {
            "part": index, "start": start, "stop": stop,
            "num_samples": writer.num_samples, "num_tokens": writer.num_tokens, "checksums": writer.checksums(),
            "skipped_empty": skipped, "seconds": round(time.perf_counter() - started, 3),
            "vocab_size": teacher.vocab_size, "tokenizer": getattr(teacher.tokenizer, "name_or_path", None),
            "teacher_dtype": str(teacher.dtype).removeprefix("torch."),
        }
        lock.check()
        io.write_json_atomic(layout.part_record(shard, index), record, opts)
        io.publish_file(local, layout.part_file(shard, index), opts)
        local.unlink(missing_ok=True)  # uploaded (a local target moved it already)
        log.info("%s part %d/%d: %d samples, %d tokens", shard.name, index + 1, first + len(todo),
                 record["num_samples"], record["num_tokens"])
        records.append(record)
    return records


# -- merge-to-hdf5 ---------------------------------------------------------------------------------------------

def published(config: Config) -> dict[str, Any] | None:
    """The manifest of this config's version if it is already complete, else None.

    A complete version is made `latest` again if it is not (the config went back to an earlier one), so that
    "up to date" always means readers of `latest` get this config's cache.
    """
    layout = Layout(config)
    return versions.make_latest(layout.root, layout.key, config.output.storage_options)


def cache_attrs(config: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    ds = config.dataset
    return {
        "producer": f"kd-cache {kd_core.__version__}",
        "teacher_model": config.teacher.model, "teacher_revision": config.teacher.revision,
        "vocab_size": records[0]["vocab_size"], "tokenizer": records[0]["tokenizer"],
        "teacher_dtype": records[0]["teacher_dtype"],
        "dataset_name": ds.name, "dataset_config": ds.config, "dataset_split": ds.split,
        "dataset_revision": ds.revision, "dataset_data_files": ds.data_files,
        "max_samples": ds.max_samples, "max_length": config.cache.max_length,
        "skipped_empty": sum(r["skipped_empty"] for r in records),
        "content_key": config.content_key(),
        "config": config.public_dict(),
    }


def merge(config: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Verify every part of every shard against its record, merge in order, publish, write the manifest, move latest.

    Under a lease lock (Layout.merge_lock): a second merge of the same cache refuses instead of racing this one.
    """
    from kd_core.locks import LeaseLock

    layout, opts = Layout(config), config.output.storage_options
    if sum(r["num_samples"] for r in records) == 0:
        rows = sum(r["skipped_empty"] for r in records)
        raise ConfigError(f"dataset.text_column: all {rows:,} rows of column {config.dataset.text_column!r} were "
                          "empty, so the cache would hold no samples; nothing was published. Fix: "
                          "dataset.text_column or dataset.data_files.")
    with LeaseLock(layout.merge_lock, "the merge", opts), io.disk_full_is_fatal(staging_dir(config)):
        return _merge_locked(config, records)


def _merge_locked(config: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    layout, opts = Layout(config), config.output.storage_options
    records = sorted(records, key=lambda r: r["shard"]["index"])
    scratch = Path(tempfile.mkdtemp(prefix="kd-merge-", dir=staging_dir(config)))
    try:
        parts = []
        for record in records:
            shard = ShardSpec.model_validate(record["shard"])
            for part in record["parts"]:
                parts.append(_fetch_verified_part(layout, shard, record, part, scratch, opts))
        merged_local = (io.local_path(layout.cache_file) if io.is_local(layout.root) else scratch / "cache.h5")
        summary = cachefile.merge_files(parts, merged_local, attrs=cache_attrs(config, records))
        cachefile.verify_file(merged_local, expect=summary)  # every byte, once, before anyone can see it
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
        "published_at": datetime.now(timezone.utc).isoformat(),  # orders versions for pruning
    }
    # The manifest makes the version complete, then latest moves, then old versions go: one step under the
    # output's publish lock, so no other run prunes this version in between.
    for key in versions.publish(layout.root, layout.key, manifest, config.output.keep_versions, opts):
        log.info("deleted old version %s (output.keep_versions=%d)", key, config.output.keep_versions)
    io.remove(layout.work_dir, opts)
    return manifest


def _fetch_verified_part(layout: Layout, shard: ShardSpec, record: dict[str, Any], part: dict[str, Any],
                         scratch: Path, opts: dict[str, Any]) -> Path:
    """A part's local path (downloaded into scratch from a remote target), verified against its record."""
    uri = layout.part_file(shard, part["part"])
    if io.is_local(uri):
        path = io.local_path(uri)
    else:
        path = scratch / shard.name / f"part-{part['part']:05d}.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        io.fetch_file(uri, path, opts)
    try:
        cachefile.verify_file(path, expect=part)
    except CacheFileError as e:
        raise CacheFileError(
            f"{shard.name} part {part['part']} ({uri}) fails verification, so nothing was published: {e} "
            f"Fix: delete {layout.shard_record(shard)} and {layout.part_record(shard, part['part'])}, then run "
            "again: only that part is recomputed."
        ) from None
    return path


def resolve_cache_uri(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """A cache file's URI from either the file itself or an output.uri directory (follows latest.json)."""
    uri = io.normalise_uri(uri, key="URI")
    if uri.endswith((".h5", ".hdf5")):
        return uri
    key = versions.latest_key(uri, storage_options)
    if key is None:
        raise ConfigError(f"{uri}: no cache here (no latest.json and not an .h5 file). Pass the output.uri of a "
                          "finished run or the path of a cache.h5.")
    return io.join(uri.rstrip("/"), "versions", key, "cache.h5")
