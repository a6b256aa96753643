"""merge-to-hdf5: verify every part of a Build's shards, write the version's index and manifest, publish.

    published(build)        -> Manifest | None   the version, if already complete (made latest again if need be)
    merge(build, records)   -> Manifest          check every part file cheaply, write cache.h5 and the manifest,
                                                 move latest, prune old versions (kd_core.store), remove work/<key>/
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import kd_core
from kd_core import h5cache, io, records
from kd_core.build import Build
from kd_core.config import SAMPLER_VERSION
from kd_core.data import ShardSpec
from kd_core.errors import CacheFileError, ConfigError, StorageError
from kd_core.records import FileRecord, Manifest, ManifestFile, PartRecord, ShardRecord
from kd_core.store import INDEX

log = logging.getLogger("kd_core.merge")

# Remote part files are opened for their metadata and per-sample arrays only: small blocks, few bytes.
MERGE_READ_BLOCK_BYTES = 256 * 1024


def published(build: Build) -> Manifest | None:
    """The manifest of this build's version if it is already complete, else None.

    A complete version is made `latest` again if it is not (the config went back to an earlier one), so that
    "up to date" always means readers of `latest` get this config's cache.
    """
    store, key = build.store, build.key
    manifest = store.make_latest(key)
    if manifest is not None and store.exists(store.work_dir(key)) and not store.merging(key):
        # Left by a run killed between its manifest and its clean-up: every later run is "up to date", so
        # nothing else would ever remove it (at scale, a second copy of the cache).
        log.info("removing %s, left by a run stopped after publishing", store.work_dir(key))
        store.remove(store.work_dir(key))
    return manifest


def cache_attrs(build: Build, shards: list[ShardRecord]) -> dict[str, Any]:
    """The index's root attributes: provenance, the dataset, counts and the public config."""
    config = build.config
    ds, provenance = config.dataset, shards[0].provenance
    return {
        "producer": f"kd-cache {kd_core.__version__}",
        "teacher_model": config.teacher.model, "teacher_revision": config.teacher.revision,
        "vocab_size": provenance.vocab_size, "tokenizer": provenance.tokenizer,
        **({"mode": "topk", "top_k": provenance.top_k} if provenance.samples is None else
           {"mode": "sampled", "samples": provenance.samples, "sampler": SAMPLER_VERSION}),
        "teacher_dtype": provenance.teacher_dtype,
        "dataset_name": ds.name, "dataset_config": ds.config, "dataset_split": ds.split,
        "dataset_revision": ds.revision, "dataset_data_files": ds.data_files,
        "max_samples": ds.max_samples, "max_length": config.cache.max_length,
        "skipped_empty": sum(r.skipped_empty for r in shards),
        "content_key": build.key,
        **build.source.attrs(),
        "config": config.public_dict(),
    }


def merge(build: Build, shards: list[ShardRecord]) -> Manifest:
    """Check every part file cheaply, write the index (cache.h5) and the manifest, move latest.

    Copies no token data and downloads no part: per file it compares the listing's size and ETag (or a local
    mtime) with the record and reads the file's metadata, /offsets and /sample_index; only a file whose stamp
    changed since it was published is read whole, to check its sha256. Under the version's merge lock: a second
    merge of the same cache refuses instead of racing this one.
    """
    if sum(r.num_samples for r in shards) == 0:
        rows = sum(r.skipped_empty for r in shards)
        raise ConfigError(f"dataset.text_column: all {rows:,} rows of column {build.config.dataset.text_column!r} "
                          "were empty, so the cache would hold no samples; nothing was published. Fix: "
                          "dataset.text_column or dataset.data_files.")
    store = build.store
    # Its local scratch (Store.staging) is removed however the merge ends: no use to a re-run, no empty directories.
    with store.merge_lock(build.key), io.disk_full_is_fatal(output=store.local_root,
                                                            staging=store.staging_dir(build.key)):
        return _merge_locked(build, shards)


def _check_build(build: Build, shards: list[ShardRecord]) -> str:
    """The build id every part record must carry; CacheFileError naming the first part of another build."""
    build_id = build.store.build_id(build.key)
    for shard in shards:
        for part in shard.parts:
            if part.build_id != build_id:
                raise CacheFileError(
                    f"{shard.shard.name} part {part.part} was written by build {part.build_id}, but this version's "
                    f"build is {build_id} ({build.store.build_id_uri(build.key)}): refusing to mix two builds in one "
                    f"version; nothing was published. Fix: delete {build.store.work_dir(build.key)} and run again.")
    return build_id


def _merge_locked(build: Build, shards: list[ShardRecord]) -> Manifest:
    config, store, key = build.config, build.store, build.key
    if (existing := store.read_manifest(key)) is not None:  # another run published it first
        log.info("%s is already published; leaving it as it is", store.version_dir(key))
        return existing
    shards = sorted(shards, key=lambda r: r.shard.index)
    records.check_consistent([r.provenance for r in shards], f"the version {key}")
    build_id = _check_build(build, shards)
    found = store.stamps(store.version_dir(key))  # one listing for every file of the version
    entries = [_checked_part_file(build, shard.shard, part, file, found.get(file.name))
               for shard in shards for part in shard.parts for file in part.files]
    listed = {file.name for shard in shards for file in shard.files}
    for stray in sorted(n for n in found if store.is_part(n) and n not in listed):
        store.remove(store.version_file(key, stray))  # left by a killed attempt at a part
    with store.staging(key, "merge") as scratch:
        index_local = store.local_path(store.index(key), scratch)
        summary = h5cache.write_index(index_local, entries, attrs={**cache_attrs(build, shards), "build_id": build_id})
        index_bytes = index_local.stat().st_size
        if index_bytes > config.output.max_object_bytes:
            raise StorageError(f"output.max_object_bytes: the index of {summary['num_samples']:,} samples takes "
                               f"{index_bytes:,} bytes, over the limit of {config.output.max_object_bytes:,}. "
                               f"Fix: output.max_object_bytes={2 * index_bytes} or more.")
        index_stamp = store.publish_file(index_local, store.index(key))
    parts = [ManifestFile(name=f.name, bytes=f.bytes, sha256=f.sha256, num_samples=f.num_samples,
                          num_tokens=f.num_tokens) for shard in shards for f in shard.files]
    index = ManifestFile(name=INDEX, bytes=index_bytes, sha256=index_stamp["sha256"], **summary)
    file_bytes = index_bytes + sum(f.bytes for f in parts)
    manifest = Manifest(
        format_version=h5cache.FORMAT_VERSION, key=key, uri=store.index(key), index=index, parts=parts,
        num_samples=summary["num_samples"], num_tokens=summary["num_tokens"],
        skipped_empty=sum(r.skipped_empty for r in shards), shards=len(shards), file_bytes=file_bytes,
        bytes_per_token=file_bytes / max(1, summary["num_tokens"]), provenance=shards[0].provenance,
        config=config.public_dict(), published_at=datetime.now(timezone.utc).isoformat(),
        build_id=build_id, source=build.source,
    )
    # The manifest makes the version complete, then latest moves, then old versions go: one step under the
    # output's publish lock, so no other run prunes this version in between.
    for old in store.publish(key, manifest, config.output.keep_versions):
        log.info("deleted old version %s (output.keep_versions=%d)", old, config.output.keep_versions)
    store.remove(store.work_dir(key))
    return manifest


def _checked_part_file(build: Build, shard: ShardSpec, part: PartRecord, file: FileRecord,
                       stamp: dict[str, Any] | None) -> dict[str, Any]:
    """h5cache.index_entry of one part file, after checking it is the file its record describes."""
    store, key = build.store, build.key
    uri = store.version_file(key, file.name)
    fix = (f"Fix: delete {store.shard_record(key, shard)} and {store.part_record(key, shard, part.part)}, then run "
           "again: only that part is recomputed.")
    where = f"{shard.name} part {part.part} ({uri}) fails verification, so nothing was published:"
    if stamp is None:
        raise CacheFileError(f"{where} the file is missing. {fix}")
    if stamp["size"] != file.bytes:
        raise CacheFileError(f"{where} it has {stamp['size']:,} bytes, its record says {file.bytes:,}. {fix}")
    unchanged = ((file.etag is not None and stamp["etag"] == file.etag)
                 or (file.mtime_ns is not None and stamp["mtime_ns"] == file.mtime_ns))
    if not unchanged and store.sha256(uri) != file.sha256:  # changed since published: check every byte
        raise CacheFileError(f"{where} its bytes differ from those published (sha256). {fix}")
    fileobj, _ = store.open_for_read(uri, block_size=MERGE_READ_BLOCK_BYTES)
    try:
        return h5cache.index_entry(fileobj if fileobj is not None else io.local_path(uri), file.name,
                                     file.model_dump())
    except CacheFileError as e:
        raise CacheFileError(f"{where} {e} {fix}") from None
    finally:
        if fileobj is not None:
            fileobj.close()
