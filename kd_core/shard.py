"""shard-dataset and teacher-inference: a Build's shards, and the teacher run over one shard, written in parts.

    plan(build)              -> ShardPlan     run.num_shards contiguous shards from the source's layout (footers)
    run_shard(build, shard)  -> ShardRecord   teacher inference for one shard: its parts' files, their records,
                                              then the shard's record (paths: kd_core.store)

Resume: a shard is cut into planned parts of run.part_samples rows; a part that would pass
output.max_object_bytes is split into several files as it is written. A part's record is written after its
files, and a part is complete when its record exists and every file it lists has the listed size. A killed shard
restarts at its first incomplete part (rewriting that part's files under the same names); a shard with a record
is skipped. One teacher pass covers all of a run's parts, but batches every part exactly as a pass over that part
alone would (run_teacher(parts=...)), so a resumed shard's arrays are byte-for-byte an uninterrupted run's. Only
parts of this build (Store.build_id) are resumed, and only while the source is what validate resolved
(check_source, before reading and before each part's record): a changed source is a new version, never mixed.

Overlap: the teacher never waits on storage while storage keeps up. Finished files are closed and published, and
part records written, on a background thread (io.Background: in order, the lease checked before each), at most
BACKGROUND_FILES files behind the teacher; past that the teacher waits (bounded memory and local disk).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable

import kd_core
from kd_core import data, h5cache, io, source
from kd_core.build import Build
from kd_core.data import ShardSpec
from kd_core.errors import AlreadyPublished, CacheFileError, ConfigError
from kd_core.estimate import BACKGROUND_FILES, check_projection
from kd_core.locks import LeaseLock
from kd_core.records import FileRecord, PartRecord, Provenance, ShardRecord


log = logging.getLogger("kd_core.shard")


def plan(build: Build) -> data.ShardPlan:
    """run.num_shards shards from the source's layout (parquet footers, or one counting pass): see kd_core.data."""
    return data.plan(build.config.dataset, build.config.run.num_shards, build.source.dataset)


def shard_state(build: Build, shard: ShardSpec) -> tuple[str, str | None]:
    """(state, lease token): "done", "writing", "dead" or "free" (Store.shard_state). The deployed parent
    re-submits a dead shard's run."""
    return build.store.shard_state(build.key, shard)


def refuse_if_published(build: Build, what: str) -> None:
    """A same-config run that found the version unpublished may meet it published later (the other run was
    merging): it must then stop, not redo the work and overwrite files of a live version."""
    if build.store.exists(build.store.manifest(build.key)):
        raise AlreadyPublished(f"{build.store.version_dir(build.key)} was published by another run while this one "
                               f"was starting {what}; nothing more to do.")


def run_shard(build: Build, shard: ShardSpec, progress: Callable[[Any], None] | None = None, *,
              background_files: int = BACKGROUND_FILES) -> ShardRecord:
    """Run the teacher over one shard, part by part; publish each part's files, its record, then the shard's
    record (last). Files are closed and published in the background (at most background_files waiting: see
    run_parts; 0 publishes each in turn, the teacher waiting).

    Idempotent and resumable: a shard with a record is skipped; otherwise its complete parts are kept and the run
    continues after the last one. A lease lock refuses a second run on this shard while this one is alive.
    """
    store, key = build.store, build.key
    if (record := store.read_shard(key, shard)) is not None:
        log.info("%s already complete, skipping", shard.name)
        return record
    refuse_if_published(build, shard.name)

    with store.shard_lock(key, shard) as lock, io.disk_full_is_fatal(**store.scratch(key)):
        refuse_if_published(build, shard.name)  # checked again under the lock: it may have just happened
        parts = plan_parts(shard, build.config.run.part_samples)
        build_id = store.build_id(key)
        done = complete_parts(build, shard, parts, build_id)
        if len(done) < len(parts):
            if done:
                log.info("%s: resuming at part %d of %d (row %d)", shard.name, len(done), len(parts),
                         parts[len(done)][0])
            check_source(build, shard)  # before the teacher loads or a row is read
            done += run_parts(build, shard, parts[len(done):], done, lock, progress, background_files, build_id)
        record = ShardRecord.from_parts(shard, done)
        lock.check()
        store.write_record(store.shard_record(key, shard), record)
    log.info("%s: %d samples, %d tokens, %d empty skipped", shard.name, record.num_samples, record.num_tokens,
             record.skipped_empty)
    return record


def plan_parts(shard: ShardSpec, part_samples: int) -> list[tuple[int, int]]:
    """A shard's parts as [start, stop) row ranges of at most part_samples rows."""
    return [(start, min(start + part_samples, shard.stop)) for start in range(shard.start, shard.stop, part_samples)]


def check_source(build: Build, shard: ShardSpec) -> None:
    """SourceChanged when the teacher or one of this shard's data files is no longer what validate resolved (the
    files: a stat or one listing each, no data read). Called before the shard reads anything and before each part's
    record is written, so a part read from a file that changed meanwhile never becomes complete."""
    source.check_teacher_unchanged(build.source.teacher)
    files = build.source.dataset.files or []
    if shard.segments:  # only the files this shard reads
        mine = {s.path for s in shard.segments}
        files = [f for f in files if f.path in mine]
    source.check_unchanged(files, shard.name)


def complete_parts(build: Build, shard: ShardSpec, parts: list[tuple[int, int]], build_id: str) -> list[PartRecord]:
    """Records of the shard's leading complete parts: a record of this build over the planned rows whose files are
    all there with their recorded sizes (one listing of the shard's directory)."""
    store, key = build.store, build.key
    found = store.stamps(store.shard_parts(key, shard))
    done = []
    for index, (start, stop) in enumerate(parts):
        record = store.read_part(key, shard, index)
        if record is None or (record.start, record.stop) != (start, stop):  # absent, or another run.part_samples
            break
        if record.build_id != build_id:  # another build's (work/<key>/build.json was replaced): never mixed
            log.warning("%s: part %d was written by build %s, this build is %s: redoing it", shard.name, index,
                        record.build_id, build_id)
            break
        if any(found.get(f.name.rsplit("/", 1)[-1], {}).get("size") != f.bytes for f in record.files):
            break
        done.append(record)
    return done


def run_parts(build: Build, shard: ShardSpec, todo: list[tuple[int, int]], done: list[PartRecord],
              lock: LeaseLock, progress: Callable[[Any], None] | None = None,
              background_files: int = BACKGROUND_FILES, build_id: str | None = None) -> list[PartRecord]:
    """Run and publish the parts in `todo` (the shard's last ones, in order); their records. build_id: the
    build's (Store.build_id), stamped into every file and record.

    One teacher pass over all of them (run_teacher(parts=...): each part batched as if run alone). Each finished
    file is closed, published and its part's record written on a background thread (io.Background) while the
    teacher runs on: at most `background_files` files wait for storage, beyond that the teacher waits.
    """
    from kd_core.inference import InferenceStats, PartEnd, run_teacher
    from kd_core.teacher import load_teacher

    config, build_id = build.config, build_id or build.store.build_id(build.key)
    teacher = load_teacher(config.teacher)
    provenance = part_provenance(build, shard, teacher, done)
    # One reader over all the remaining rows, sliced into parts: it seeks to the resume point once.
    texts = data.iter_texts(config.dataset, shard, todo[0][0], shard.stop)
    # Progress counts the whole shard, complete parts included.
    stats = InferenceStats(samples=sum(r.num_samples for r in done), tokens=sum(r.num_tokens for r in done),
                           skipped_empty=sum(r.skipped_empty for r in done))
    first, out = len(done), []
    # A remote target's files wait in local staging, each deleted once uploaded (io.publish_file); the directory
    # goes when the shard stops, however it stops.
    staged = contextlib.nullcontext() if build.store.is_local else build.store.staging(build.key, shard.name)
    with staged as staging, io.Background(background_files) as background, contextlib.closing(run_teacher(
            teacher, texts, max_length=config.cache.max_length, batch_tokens=config.teacher.batch_tokens,
            stats=stats, parts=[stop - start for start, stop in todo],
            **build.rows.teacher_args())) as items:
        started = time.perf_counter()
        for index, (start, stop) in enumerate(todo, start=first):
            part = Part(build, shard, lock, provenance, index, start, stop, staging, projects=index == first,
                        parts=first + len(todo), build_id=build_id)
            attrs = {"producer": f"kd-cache {kd_core.__version__}", "shard": shard.name, "part": index,
                     "build_id": build_id, "source_digest": build.source.digest()}
            # top_k is unused by a sampled cache's writer.
            with h5cache.SplitWriter(part.local_path, config.output.max_object_bytes, part.publish,
                                       top_k=build.rows.top_k or 0, samples=build.rows.samples,
                                       vocab_size=teacher.vocab_size, attrs=attrs, submit=background.submit,
                                       max_length=config.cache.max_length) as writer:
                for item in items:  # this part's rows, then its PartEnd
                    background.check()  # a failed upload stops the run at once, not at the end
                    if isinstance(item, PartEnd):
                        break
                    writer.append_rows(item)
                    if progress is not None:
                        progress(stats)
                # run_teacher ends every part with a PartEnd, so `item` is this part's here.
                if item.rows != stop - start:  # the samples ran out: this part and the rest are short
                    raise ConfigError(f"dataset.max_samples: the dataset ended at row {start + item.rows:,}, before "
                                      f"the {shard.stop:,} rows planned. Fix: dataset.max_samples={start + item.rows} "
                                      "or fewer.")
            now = time.perf_counter()
            # After its files, on the same thread: the part is complete only once they are published.
            background.submit(functools.partial(part.write_record, item.skipped_empty, now - started, out))
            started = now
    return out


def part_provenance(build: Build, shard: ShardSpec, teacher, done: list[PartRecord]) -> Provenance:
    """What this worker's parts record about how they were made; CacheFileError if the shard's complete parts
    were made in another precision."""
    provenance = Provenance(format_version=h5cache.FORMAT_VERSION, vocab_size=teacher.vocab_size,
                            top_k=build.rows.top_k, samples=build.rows.samples,
                            tokenizer=getattr(teacher.tokenizer, "name_or_path", None),
                            teacher_dtype=str(teacher.dtype).removeprefix("torch."))
    if done and done[0].provenance.teacher_dtype != provenance.teacher_dtype:  # never mix precisions
        raise CacheFileError(
            f"{shard.name}: its complete parts were made in {done[0].provenance.teacher_dtype} but this worker loads "
            f"the teacher in {provenance.teacher_dtype}; refusing to mix them in one cache. Fix: "
            f"teacher.dtype={done[0].provenance.teacher_dtype}, or delete {build.store.work_dir(build.key)} to start "
            "this version over."
        )
    return provenance


class Part:
    """One planned part on its way out: its files are published as they are closed, then its record is written
    (both on the background thread, in that order)."""

    def __init__(self, build: Build, shard: ShardSpec, lock: LeaseLock, provenance: Provenance, index: int,
                 start: int, stop: int, staging: Path | None, projects: bool, parts: int, build_id: str):
        self.build, self.shard, self.lock, self.provenance = build, shard, lock, provenance
        self.build_id = build_id
        self.index, self.start, self.stop, self.staging, self.parts = index, start, stop, staging, parts
        self.projects = projects  # the run's first part checks the cache size projected from its real bytes
        self.files: list[FileRecord] = []

    def local_path(self, file: int) -> Path:
        """Where file `file` is written: in place for a local target, else in local staging."""
        store = self.build.store
        return store.local_path(store.part_file(self.build.key, self.shard, self.index, file), self.staging)

    def publish(self, path: Path, summary: dict[str, Any]) -> None:
        store = self.build.store
        name = store.part_name(self.shard, self.index, len(self.files))
        self.lock.check()
        size = path.stat().st_size
        stamp = store.publish_file(path, store.version_file(self.build.key, name))  # its final name, written once
        self.files.append(FileRecord(name=name, bytes=size, num_samples=summary["num_samples"],
                                     num_tokens=summary["num_tokens"], checksums=summary["checksums"], **stamp))

    def write_record(self, skipped: int, seconds: float, out: list[PartRecord]) -> None:
        """Write the part's record (it is complete from then on) and add it to `out`."""
        shard, files, store = self.shard, self.files, self.build.store
        part_bytes, rows = sum(f.bytes for f in files), self.stop - self.start
        # Real bytes meet the estimate's compression model: stop before this part is complete if the cache won't fit.
        projected = check_projection(self.build, shard, part_bytes, rows) if self.projects else None
        record = PartRecord(part=self.index, start=self.start, stop=self.stop,
                            num_samples=sum(f.num_samples for f in files), num_tokens=sum(f.num_tokens for f in files),
                            skipped_empty=skipped, seconds=round(seconds, 3), provenance=self.provenance, files=files,
                            projected_cache_bytes=projected, build_id=self.build_id)
        check_source(self.build, shard)  # its rows were read from the files validate resolved, or it never completes
        self.lock.check()
        store.write_record(store.part_record(self.build.key, shard, self.index), record)
        log.info("%s part %d/%d: %d samples, %d tokens in %d file(s)", shard.name, self.index + 1, self.parts,
                 record.num_samples, record.num_tokens, len(files))
        out.append(record)
