"""estimate-storage: the exact upper bound and the expected size of a Build's cache, and the size limits.

    estimate(build)          -> StorageEstimate   upper bound from the format's arithmetic; expected size from
                                                  tokenizing PROBE_SAMPLES real samples (kd_core.storage)
    check_space(build, est)                       output.max_bytes, the target's free space, local staging
    check_projection(...)                         the same limits against a shard's first real part (kd_core.shard)
"""

from __future__ import annotations

import json
import logging

from kd_core import data, io, storage
from kd_core.build import Build
from kd_core.data import ShardSpec
from kd_core.errors import ConfigError, StorageError
from kd_core.store import staging_root

log = logging.getLogger("kd_core.estimate")

PROBE_SAMPLES = 256  # samples tokenized by the storage estimate
# Finished files that may wait for (or be in) their upload while the teacher fills the next one. One hides the
# upload entirely whenever a file uploads faster than the teacher fills one; more would only absorb bursts, at one
# more file of local disk and writer memory each.
BACKGROUND_FILES = 1


def estimate(build: Build, check: bool = True) -> storage.StorageEstimate:
    """Exact upper bound, expected size and teacher compute; with check, StorageError when the cache is over
    output.max_bytes or the target's free space (`kd-cache estimate` passes check=False: it reports, never refuses).
    """
    from kd_core.teacher import load_tokenizer, teacher_num_parameters, teacher_vocab_size

    config = build.config
    source = data.Source(config.dataset, build.source.dataset)  # the files validate resolved
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
    est = storage.estimate(num_samples=total, max_length=max_length,
                           top_k=build.rows.top_k or 0, samples=build.rows.samples,  # top_k: unused when sampled
                           vocab_size=teacher_vocab_size(config.teacher), probe_lengths=lengths,
                           max_bytes=config.output.max_bytes, free_bytes=_target_free_bytes(build),
                           teacher_parameters=teacher_num_parameters(config.teacher),
                           num_shards=min(config.run.num_shards, total), part_samples=config.run.part_samples,
                           max_object_bytes=config.output.max_object_bytes,
                           metadata_bytes=max(storage.METADATA_BYTES, 2 * len(json.dumps(config.public_dict()))))
    est.reason = storage.does_not_fit(est)
    est.fits = est.reason is None
    if check:
        check_space(build, est)
    return est


def _target_free_bytes(build: Build) -> int | None:
    """Free space of a local target (None for a remote one: unknown)."""
    return storage.local_free_bytes(io.local_path(build.store.root)) if build.store.is_local else None


def check_space(build: Build, est: storage.StorageEstimate) -> None:
    """The size limits: output.max_bytes, the target's free space, and local staging for a remote target."""
    if not est.fits:
        raise StorageError(est.reason)
    if not build.store.is_local:
        check_staging(build, est)


def check_staging(build: Build, est: storage.StorageEstimate) -> None:
    """A remote target still needs local disk: each file is written locally, checked, then uploaded, and while
    BACKGROUND_FILES finished files wait for their upload the teacher fills the next one. Checked before any
    teacher work, against what this process's shards stage."""
    config = build.config
    root = staging_root()
    while not root.exists():
        root = root.parent
    part_share = min(1.0, config.run.part_samples / max(1, est.num_samples))
    file_bytes = min(int(est.expected_bytes * part_share), config.output.max_object_bytes)  # a part, or its pieces
    need = (1 + BACKGROUND_FILES) * file_bytes
    free = storage.local_free_bytes(root)
    if need > free:
        raise StorageError(
            f"KD_CACHE_STAGING: the local staging directory {root} has {storage.human_bytes(free)} free; a run to a "
            f"remote output.uri writes its files there before uploading them, {1 + BACKGROUND_FILES} at a time, "
            f"about {storage.human_bytes(need)} at run.part_samples={config.run.part_samples}. Fix: set "
            "KD_CACHE_STAGING to a directory on a larger disk, or lower run.part_samples."
        )


def check_projection(build: Build, shard: ShardSpec, part_bytes: int, part_rows: int) -> int:
    """The whole cache's size projected from a shard's first part (its real bytes per row x the run's rows).

    A StorageError when the projection passes output.max_bytes or the target's free space, raised before the
    part's record is written (so the part is not complete, and nothing more is written): a run with the limit
    fixed resumes at this part. The estimate's compression model is measured on small teachers and was 23% low on
    one with a 70k vocabulary: this catches that after one part instead of at a full disk.
    """
    config = build.config
    run_rows = config.dataset.max_samples or shard.num_samples * shard.world_size
    projected = round(part_bytes / max(part_rows, 1) * run_rows)
    log.info("%s: cache projected at %s from its first part (%s for %s rows)", shard.name,
             storage.human_bytes(projected), storage.human_bytes(part_bytes), f"{part_rows:,}")
    over = storage.projection_over(projected, part_bytes, config.output.max_bytes, _target_free_bytes(build))
    if over:
        key, limit = over
        raise StorageError(
            f"{key}: stopped at {shard.name}'s first part: its real size ({storage.human_bytes(part_bytes)} for "
            f"{part_rows:,} rows) projects the cache at {storage.human_bytes(projected)}, over {limit}. Parts "
            "already published are kept: raise output.max_bytes or free space and run the same command again to "
            "resume here; or lower dataset.max_samples, cache.top_k or cache.max_length (a new cache)."
        )
    return projected
