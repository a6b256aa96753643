"""The five steps of a cache build, as plain functions. Prefect tasks (tasks/) are thin wrappers around these.

    validate(profile, overrides)   -> Config            every check that needs no data; the max_samples guard first
    estimate(config)               -> StorageEstimate   exact upper bound + expected size from a probe; size limits
    plan(config)                   -> ShardPlan          contiguous shards from the source's layout (footers)
    run_shard(config, shard)       -> shard record       teacher inference for one shard, written in parts
    merge(config, records)         -> manifest           verify every shard, merge, publish, move `latest`

Where things live under output.uri (a local directory or an fsspec URL):

    latest.json                         which version readers get; moved only after a version is complete
    versions/<key>/parts/<shard>/part-PPPPP-FFFF.h5   the data: file FFFF of planned part PPPPP of a shard,
                                        written once to this final name as soon as it is closed
    versions/<key>/cache.h5             the index: the whole version as one cache to stock h5py (virtual datasets
                                        over the parts by relative path; /offsets and /sample_index stored)
    versions/<key>/manifest.json        written after every file it lists: its presence marks the version complete
    work/<key>/<shard>/part-PPPPP.json  a part's record (kd_core.records.PartRecord: rows, counts, its files)
    work/<key>/<shard>.json             the shard's record, written after its last part
    work/<key>/<shard>.lock             lease lock: one writer per shard (kd_core.locks)
    work/<key>.merge.lock               lease lock: one merge at a time (outside work/<key>/, which the merge removes)
    work/publish.lock                   lease lock: one run at a time writes a manifest, moves latest and prunes
                                        work/<key>/ is removed after publishing

<key> is Config.content_key(): a hash of what determines the cache's content, so a rerun with the same inputs
finds its version published and does no teacher work.

Resume: a shard is cut into planned parts of run.part_samples rows; a part that would pass
output.max_object_bytes is split into several files as it is written. A part's record is written after its
files, and a part is complete when its record exists and every file it lists has the listed size. A killed shard
restarts at its first incomplete part (rewriting that part's files under the same names); a shard with a record
is skipped. One teacher pass covers all of a run's parts, but batches every part exactly as a pass over that part
alone would (run_teacher(parts=...)), so a resumed shard's arrays are byte-for-byte an uninterrupted run's.

Overlap: the teacher never waits on storage while storage keeps up. Finished files are closed and published, and
part records written, on a background thread (io.Background: in order, the lease checked before each), at most
BACKGROUND_FILES files behind the teacher; past that the teacher waits (bounded memory and local disk).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import ValidationError

import kd_core
from kd_core import data, guards, h5cache, io, locks, records, storage, versions
from kd_core.config import SAMPLER_VERSION, Config, describe_validation_error, load_config
from kd_core.data import ShardSpec
from kd_core.errors import CacheFileError, ConfigError, KDCacheError, StorageError
from kd_core.locks import is_held
from kd_core.records import FileRecord, Manifest, ManifestFile, PartRecord, Provenance, ShardRecord

if TYPE_CHECKING:  # kd_core.inference imports torch: seconds that validate, plan and merge need not pay
    from kd_core.inference import DeviceTimeline

log = logging.getLogger("kd_core.pipeline")

PROBE_SAMPLES = 256  # samples tokenized by the storage estimate
# Finished files that may wait for (or be in) their upload while the teacher fills the next one. One hides the
# upload entirely whenever a file uploads faster than the teacher fills one; more would only absorb bursts, at one
# more file of local disk and writer memory each.
BACKGROUND_FILES = 1


class Layout:
    """Paths of one config's cache under output.uri."""

    def __init__(self, config: Config):
        self.root = config.output.uri.rstrip("/")
        self.key = config.content_key()
        self.version_dir = io.join(self.root, "versions", self.key)
        self.cache_file = io.join(self.version_dir, versions.INDEX)
        self.manifest = io.join(self.version_dir, versions.MANIFEST)
        self.parts_dir = io.join(self.version_dir, "parts")
        self.work_dir = io.join(self.root, "work", self.key)
        self.merge_lock = versions.merge_lock_uri(self.root, self.key)

    def shard_record(self, shard: ShardSpec) -> str:
        return io.join(self.work_dir, f"{shard.name}.json")

    def shard_lock(self, shard: ShardSpec) -> str:
        return io.join(self.work_dir, f"{shard.name}.lock")

    @staticmethod
    def part_name(shard: ShardSpec, part: int, file: int = 0) -> str:
        """File `file` of a planned part, relative to the version directory."""
        return f"parts/{shard.name}/part-{part:05d}-{file:04d}.h5"

    def part_file(self, shard: ShardSpec, part: int, file: int = 0) -> str:
        return io.join(self.version_dir, self.part_name(shard, part, file))

    def part_record(self, shard: ShardSpec, part: int) -> str:
        return io.join(self.work_dir, shard.name, f"part-{part:05d}.json")


def staging_root() -> Path:
    """Where local scratch lives: $KD_CACHE_STAGING, else the system's temporary directory."""
    return Path(os.environ.get("KD_CACHE_STAGING", tempfile.gettempdir()))


def staging_dir(config: Config) -> Path:
    """Local scratch for files on their way to a remote target (h5py writes need a seekable local file)."""
    root = staging_root() / "kd-cache-staging" / config.content_key()
    root.mkdir(parents=True, exist_ok=True)
    return root


# -- validate-config -------------------------------------------------------------------------------------------

def validate(profile: str, overrides: dict[str, Any] | list[str] | None = None, check_target: bool = True,
             deployed: bool = False, read_secret: Callable[[str], Any] | None = None) -> Config:
    """Load and check the config. The max_samples guard runs before anything is loaded or written; the worker's
    policy (guards.check_policy; stricter for a `deployed` run) before any file the run names is read.
    check_target=False skips the output target (`kd-cache estimate` needs no bucket to exist).

    read_secret(name) returns the value of the Prefect Secret block named by output.credentials: the flow and
    command-line layers pass it (kd_core imports no Prefect). The credentials go to io.use_credentials, never
    into the config.
    """
    guards.check_profile(profile, deployed)
    return check(load_config(profile, overrides), check_target, deployed, read_secret)


def check(config: Config, check_target: bool = True, deployed: bool = False,
          read_secret: Callable[[str], Any] | None = None) -> Config:
    """Every check validate makes on a loaded config (a shard's flow run checks the config its parent sent)."""
    from kd_core.teacher import teacher_vocab_size

    guards.check_config(config)
    guards.check_policy(config, deployed)
    if config.output.credentials is not None:
        io.use_credentials(config.output.uri, _credentials(config, read_secret))
    # Resolved once, here: the key covers the dtype, and every shard of a build must run in the same one.
    config.teacher.dtype = config.resolved_dtype()
    if check_target:
        io.check_target(config.output.uri, config.output.storage_options)  # writable directory / existing bucket
    guards.check_vocab(config, teacher_vocab_size(config.teacher))  # reads the teacher's config file, no weights
    return config


def _credentials(config: Config, read_secret: Callable[[str], Any] | None) -> dict[str, Any]:
    """The fsspec options held by the Secret block named by output.credentials (a JSON object)."""
    name = config.output.credentials
    if read_secret is None:
        raise ConfigError(f"output.credentials: the Secret block {name!r} can only be read by a Prefect flow run or "
                          "the kd-cache command; this caller passed no reader.")
    value = read_secret(name)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, dict) or not value:  # never quote the value: it is a secret
        raise ConfigError(f"output.credentials: the Secret block {name!r} must hold a JSON object of fsspec options, "
                          'e.g. {"key": "...", "secret": "..."} for S3.')
    return value


def child_config(config: Config) -> dict[str, Any]:
    """The resolved config as a shard's flow-run parameter. It holds no credentials (Config refuses them; they
    come from output.credentials or the worker's environment), and teacher.dtype is already resolved."""
    return config.model_dump(mode="json")


def accept(config: dict[str, Any], version_key: str, read_secret: Callable[[str], Any] | None = None) -> Config:
    """The parent's resolved config as this worker sees it: checked under this worker's policy for deployed runs,
    and refused when this worker resolves it to another version key (another kd-cache checkout or other teacher
    files would write other bytes)."""
    try:
        resolved = check(Config.model_validate(config), deployed=True, read_secret=read_secret)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e)) from None
    if resolved.content_key() != version_key:
        raise ConfigError(
            f"version key: this worker resolves the parent's config to {resolved.content_key()}, the parent to "
            f"{version_key}: its kd-cache checkout ({kd_core.__version__}) or teacher files differ from the "
            "parent's. Fix: deploy the same kd-cache version and teacher files on every worker."
        )
    return resolved


def shard_state(config: Config, shard: ShardSpec) -> tuple[str, str | None]:
    """(state, lease token): "done" (its record is published), "writing" (a live run holds its lease), "dead" (the
    lease's holder stopped refreshing it) or "free" (no lease). The deployed parent re-submits a dead shard's run."""
    layout, opts = Layout(config), config.output.storage_options
    if io.exists(layout.shard_record(shard), opts):
        return "done", None
    state, token = locks.holder_state(layout.shard_lock(shard), opts)
    return {"held": "writing", "stale": "dead", "free": "free"}[state], token


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
                           samples=sampled_draws(config), vocab_size=teacher_vocab_size(config.teacher),
                           probe_lengths=lengths,
                           max_bytes=config.output.max_bytes, free_bytes=free,
                           teacher_parameters=teacher_num_parameters(config.teacher),
                           num_shards=min(config.run.num_shards, total), part_samples=config.run.part_samples,
                           max_object_bytes=config.output.max_object_bytes,
                           metadata_bytes=max(storage.METADATA_BYTES, 2 * len(json.dumps(config.public_dict()))))
    est.reason = storage.does_not_fit(est)
    est.fits = est.reason is None
    if check:
        check_space(config, est)
    return est


def check_space(config: Config, est: storage.StorageEstimate) -> None:
    """The size limits: output.max_bytes, the target's free space, and local staging for a remote target."""
    check_fits(est)
    if not io.is_local(config.output.uri):
        check_staging(config, est)


def check_staging(config: Config, est: storage.StorageEstimate) -> None:
    """A remote target still needs local disk: each file is written locally, checked, then uploaded, and while
    BACKGROUND_FILES finished files wait for their upload the teacher fills the next one. Checked before any
    teacher work, against what this process's shards stage."""
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


def sampled_draws(config: Config) -> int | None:
    """N draws per row when the config asks for a sampled cache, None for a top-k cache."""
    return config.cache.samples if config.cache.mode == "sampled" else None


def check_fits(est: storage.StorageEstimate) -> None:
    """StorageError naming the limit and the fix when the expected cache is over output.max_bytes or free space."""
    if not est.fits:
        raise StorageError(est.reason)


def check_projection(config: Config, shard: ShardSpec, part_bytes: int, part_rows: int) -> int:
    """The whole cache's size projected from a shard's first part (its real bytes per row x the run's rows).

    A StorageError when the projection passes output.max_bytes or the target's free space, raised before the
    part's record is written (so the part is not complete, and nothing more is written): a run with the limit
    fixed resumes at this part. The estimate's
    compression model is measured on small teachers and was 23% low on one with a 70k vocabulary: this catches
    that after one part instead of at a full disk.
    """
    run_rows = config.dataset.max_samples or shard.num_samples * shard.world_size
    projected = round(part_bytes / max(part_rows, 1) * run_rows)
    free = storage.local_free_bytes(io.local_path(config.output.uri)) if io.is_local(config.output.uri) else None
    log.info("%s: cache projected at %s from its first part (%s for %s rows)", shard.name,
             storage.human_bytes(projected), storage.human_bytes(part_bytes), f"{part_rows:,}")
    over = storage.projection_over(projected, part_bytes, config.output.max_bytes, free)
    if over:
        key, limit = over
        raise StorageError(
            f"{key}: stopped at {shard.name}'s first part: its real size ({storage.human_bytes(part_bytes)} for "
            f"{part_rows:,} rows) projects the cache at {storage.human_bytes(projected)}, over {limit}. Parts "
            "already published are kept: raise output.max_bytes or free space and run the same command again to "
            "resume here; or lower dataset.max_samples, cache.top_k or cache.max_length (a new cache)."
        )
    return projected


# -- shard-dataset ---------------------------------------------------------------------------------------------

def plan(config: Config) -> data.ShardPlan:
    """run.num_shards shards from the source's layout (parquet footers, or one counting pass): see kd_core.data."""
    return data.plan(config.dataset, config.run.num_shards)


# -- teacher-inference -----------------------------------------------------------------------------------------

def run_shard(config: Config, shard: ShardSpec, progress: Callable[[Any], None] | None = None, *,
              background_files: int = BACKGROUND_FILES, timeline: DeviceTimeline | None = None) -> ShardRecord:
    """Run the teacher over one shard, part by part; publish each part's files, its record, then the shard's
    record (last). Files are closed and published in the background (at most background_files waiting: see
    _run_parts; 0 publishes each in turn, the teacher waiting). timeline: optional instrumentation
    (bench/bench_upload.py).

    Idempotent and resumable: a shard with a record is skipped; otherwise its complete parts are kept and the run
    continues after the last one. A lease lock refuses a second run on this shard while this one is alive.
    """
    layout, opts = Layout(config), config.output.storage_options
    if (record := records.read_shard(layout.shard_record(shard), opts)) is not None:
        log.info("%s already complete, skipping", shard.name)
        return record
    _refuse_if_published(layout, opts, shard.name)

    scratch = {"output": io.local_path(layout.root)} if io.is_local(layout.root) else {"staging": staging_dir(config)}
    with locks.LeaseLock(layout.shard_lock(shard), shard.name, opts) as lock, io.disk_full_is_fatal(**scratch):
        _refuse_if_published(layout, opts, shard.name)  # checked again under the lock: it may have just happened
        parts = plan_parts(shard, config.run.part_samples)
        done = complete_parts(layout, shard, parts, opts)
        if len(done) < len(parts):
            if done:
                log.info("%s: resuming at part %d of %d (row %d)", shard.name, len(done), len(parts), parts[len(done)][0])
            done += _run_parts(config, layout, shard, parts[len(done):], done, lock, progress, background_files,
                               timeline)
        record = ShardRecord.from_parts(shard, done)
        lock.check()
        records.write(layout.shard_record(shard), record, opts)
    log.info("%s: %d samples, %d tokens, %d empty skipped", shard.name, record.num_samples, record.num_tokens,
             record.skipped_empty)
    return record


def plan_parts(shard: ShardSpec, part_samples: int) -> list[tuple[int, int]]:
    """A shard's parts as [start, stop) row ranges of at most part_samples rows."""
    return [(start, min(start + part_samples, shard.stop)) for start in range(shard.start, shard.stop, part_samples)]


def complete_parts(layout: Layout, shard: ShardSpec, parts: list[tuple[int, int]], opts: dict[str, Any]) -> list[PartRecord]:
    """Records of the shard's leading complete parts: a record over the planned rows whose files are all there
    with their recorded sizes (one listing of the shard's directory)."""
    found = io.stamps(io.join(layout.parts_dir, shard.name), opts)
    done = []
    for index, (start, stop) in enumerate(parts):
        record = records.read_part(layout.part_record(shard, index), opts)
        if record is None or (record.start, record.stop) != (start, stop):  # absent, or another run.part_samples
            break
        if any(found.get(f.name.rsplit("/", 1)[-1], {}).get("size") != f.bytes for f in record.files):
            break
        done.append(record)
    return done


def _run_parts(config: Config, layout: Layout, shard: ShardSpec, todo: list[tuple[int, int]],
               done: list[PartRecord], lock, progress: Callable[[Any], None] | None, background_files: int,
               timeline: DeviceTimeline | None) -> list[PartRecord]:
    """Run and publish the parts in `todo` (the shard's last ones, in order); their records.

    One teacher pass over all of them (run_teacher(parts=...): each part batched as if run alone). Each finished
    file is closed, published and its part's record written on a background thread (io.Background) while the
    teacher runs on: at most `background_files` files wait for storage, beyond that the teacher waits.
    """
    from kd_core.inference import InferenceStats, PartEnd, run_teacher
    from kd_core.teacher import load_teacher

    teacher = load_teacher(config.teacher)
    samples = sampled_draws(config)
    provenance = part_provenance(config, layout, shard, teacher, done)
    # One reader over all the remaining rows, sliced into parts: it seeks to the resume point once.
    texts = data.iter_texts(config.dataset, shard, todo[0][0], shard.stop)
    # Progress counts the whole shard, complete parts included.
    stats = InferenceStats(samples=sum(r.num_samples for r in done), tokens=sum(r.num_tokens for r in done),
                           skipped_empty=sum(r.skipped_empty for r in done))
    staging = None if io.is_local(layout.root) else staging_dir(config) / shard.name
    first, out = len(done), []
    with io.Background(background_files) as background, contextlib.closing(run_teacher(
            teacher, texts, top_k=config.cache.top_k, max_length=config.cache.max_length,
            batch_tokens=config.teacher.batch_tokens, stats=stats, mode=config.cache.mode, draws=config.cache.samples,
            parts=[stop - start for start, stop in todo], timeline=timeline)) as items:
        started = time.perf_counter()
        for index, (start, stop) in enumerate(todo, start=first):
            part = _Part(config, layout, shard, lock, provenance, index, start, stop, staging,
                         projects=index == first, parts=first + len(todo))
            attrs = {"producer": f"kd-cache {kd_core.__version__}", "shard": shard.name, "part": index}
            with h5cache.SplitWriter(part.local_path, config.output.max_object_bytes, part.publish,
                                       top_k=config.cache.top_k, vocab_size=teacher.vocab_size, attrs=attrs,
                                       samples=samples, submit=background.submit) as writer:
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


def part_provenance(config: Config, layout: Layout, shard: ShardSpec, teacher, done: list[PartRecord]) -> Provenance:
    """What this worker's parts record about how they were made; CacheFileError if the shard's complete parts
    were made in another precision."""
    samples = sampled_draws(config)
    provenance = Provenance(format_version=h5cache.FORMAT_VERSION, vocab_size=teacher.vocab_size,
                            top_k=config.cache.top_k if samples is None else None, samples=samples,
                            tokenizer=getattr(teacher.tokenizer, "name_or_path", None),
                            teacher_dtype=str(teacher.dtype).removeprefix("torch."))
    if done and done[0].provenance.teacher_dtype != provenance.teacher_dtype:  # never mix precisions
        raise CacheFileError(
            f"{shard.name}: its complete parts were made in {done[0].provenance.teacher_dtype} but this worker loads "
            f"the teacher in {provenance.teacher_dtype}; refusing to mix them in one cache. Fix: "
            f"teacher.dtype={done[0].provenance.teacher_dtype}, or delete {layout.work_dir} to start this version over."
        )
    return provenance


class _Part:
    """One planned part on its way out: its files are published as they are closed, then its record is written
    (both on the background thread, in that order)."""

    def __init__(self, config: Config, layout: Layout, shard: ShardSpec, lock, provenance: Provenance, index: int,
                 start: int, stop: int, staging: Path | None, projects: bool, parts: int):
        self.config, self.layout, self.shard, self.lock, self.provenance = config, layout, shard, lock, provenance
        self.index, self.start, self.stop, self.staging, self.parts = index, start, stop, staging, parts
        self.projects = projects  # the run's first part checks the cache size projected from its real bytes
        self.files: list[FileRecord] = []

    def local_path(self, file: int) -> Path:
        """Where file `file` is written: in place for a local target, else in local staging."""
        final = self.layout.part_file(self.shard, self.index, file)
        return io.local_path(final) if self.staging is None else self.staging / final.rsplit("/", 1)[-1]

    def publish(self, path: Path, summary: dict[str, Any]) -> None:
        name = self.layout.part_name(self.shard, self.index, len(self.files))
        self.lock.check()
        size = path.stat().st_size
        uri = io.join(self.layout.version_dir, name)
        stamp = io.publish_file(path, uri, self.config.output.storage_options)  # its final name, written once
        self.files.append(FileRecord(name=name, bytes=size, num_samples=summary["num_samples"],
                                     num_tokens=summary["num_tokens"], checksums=summary["checksums"], **stamp))

    def write_record(self, skipped: int, seconds: float, out: list[PartRecord]) -> None:
        """Write the part's record (it is complete from then on) and add it to `out`."""
        config, shard, files = self.config, self.shard, self.files
        part_bytes, rows = sum(f.bytes for f in files), self.stop - self.start
        # Real bytes meet the estimate's compression model: stop before this part is complete if the cache won't fit.
        projected = check_projection(config, shard, part_bytes, rows) if self.projects else None
        record = PartRecord(part=self.index, start=self.start, stop=self.stop,
                            num_samples=sum(f.num_samples for f in files), num_tokens=sum(f.num_tokens for f in files),
                            skipped_empty=skipped, seconds=round(seconds, 3), provenance=self.provenance, files=files,
                            projected_cache_bytes=projected)
        self.lock.check()
        records.write(self.layout.part_record(shard, self.index), record, config.output.storage_options)
        log.info("%s part %d/%d: %d samples, %d tokens in %d file(s)", shard.name, self.index + 1, self.parts,
                 record.num_samples, record.num_tokens, len(files))
        out.append(record)


# -- merge-to-hdf5 ---------------------------------------------------------------------------------------------

def published(config: Config) -> Manifest | None:
    """The manifest of this config's version if it is already complete, else None.

    A complete version is made `latest` again if it is not (the config went back to an earlier one), so that
    "up to date" always means readers of `latest` get this config's cache.
    """
    layout, opts = Layout(config), config.output.storage_options
    manifest = versions.make_latest(layout.root, layout.key, opts)
    if manifest is not None and io.exists(layout.work_dir, opts) and not is_held(layout.merge_lock, opts):
        # Left by a run killed between its manifest and its clean-up: every later run is "up to date", so
        # nothing else would ever remove it (at scale, a second copy of the cache).
        log.info("removing %s, left by a run stopped after publishing", layout.work_dir)
        io.remove(layout.work_dir, opts)
    return manifest


class AlreadyPublished(KDCacheError):
    """Another run published this version while this one was running: there is nothing left to do."""


def _refuse_if_published(layout: Layout, opts: dict[str, Any], what: str) -> None:
    """A same-config run that found the version unpublished may meet it published later (the other run was
    merging): it must then stop, not redo the work and overwrite files of a live version."""
    if io.exists(layout.manifest, opts):
        raise AlreadyPublished(f"{layout.version_dir} was published by another run while this one was starting "
                               f"{what}; nothing more to do.")


def cache_attrs(config: Config, shards: list[ShardRecord]) -> dict[str, Any]:
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
        "content_key": config.content_key(),
        "config": config.public_dict(),
    }


def merge(config: Config, shards: list[ShardRecord]) -> Manifest:
    """Check every part file cheaply, write the index (cache.h5) and the manifest, move latest.

    Copies no token data and downloads no part: per file it compares the listing's size and ETag (or a local
    mtime) with the record and reads the file's metadata, /offsets and /sample_index; only a file whose stamp
    changed since it was published is read whole, to check its sha256. Under a lease lock (Layout.merge_lock):
    a second merge of the same cache refuses instead of racing this one.
    """
    layout, opts = Layout(config), config.output.storage_options
    if sum(r.num_samples for r in shards) == 0:
        rows = sum(r.skipped_empty for r in shards)
        raise ConfigError(f"dataset.text_column: all {rows:,} rows of column {config.dataset.text_column!r} were "
                          "empty, so the cache would hold no samples; nothing was published. Fix: "
                          "dataset.text_column or dataset.data_files.")
    with locks.LeaseLock(layout.merge_lock, "the merge", opts), io.disk_full_is_fatal(
            output=io.local_path(layout.root) if io.is_local(layout.root) else None, staging=staging_dir(config)):
        return _merge_locked(config, shards)


def _merge_locked(config: Config, shards: list[ShardRecord]) -> Manifest:
    layout, opts = Layout(config), config.output.storage_options
    if (existing := records.read_manifest(layout.manifest, opts)) is not None:  # another run published it first
        log.info("%s is already published; leaving it as it is", layout.version_dir)
        return existing
    shards = sorted(shards, key=lambda r: r.shard.index)
    records.check_consistent([r.provenance for r in shards], f"the version {layout.key}")
    found = io.stamps(layout.version_dir, opts)  # one listing for every file of the version
    entries = [_checked_part_file(layout, shard.shard, part, file, found.get(file.name), opts)
               for shard in shards for part in shard.parts for file in part.files]
    listed = {file.name for shard in shards for file in shard.files}
    for stray in sorted(n for n in found if n.startswith("parts/") and n not in listed):
        io.remove(io.join(layout.version_dir, stray), opts)  # left by a killed attempt at a part
    scratch = Path(tempfile.mkdtemp(prefix="kd-merge-", dir=staging_dir(config)))
    try:
        index_local = io.local_path(layout.cache_file) if io.is_local(layout.root) else scratch / versions.INDEX
        summary = h5cache.write_index(index_local, entries, attrs=cache_attrs(config, shards))
        index_bytes = index_local.stat().st_size
        if index_bytes > config.output.max_object_bytes:
            raise StorageError(f"output.max_object_bytes: the index of {summary['num_samples']:,} samples takes "
                               f"{index_bytes:,} bytes, over the limit of {config.output.max_object_bytes:,}. "
                               f"Fix: output.max_object_bytes={2 * index_bytes} or more.")
        index_stamp = io.publish_file(index_local, layout.cache_file, opts)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    parts = [ManifestFile(name=f.name, bytes=f.bytes, sha256=f.sha256, num_samples=f.num_samples,
                          num_tokens=f.num_tokens) for shard in shards for f in shard.files]
    index = ManifestFile(name=versions.INDEX, bytes=index_bytes, sha256=index_stamp["sha256"], **summary)
    file_bytes = index_bytes + sum(f.bytes for f in parts)
    manifest = Manifest(
        format_version=h5cache.FORMAT_VERSION, key=layout.key, uri=layout.cache_file, index=index, parts=parts,
        num_samples=summary["num_samples"], num_tokens=summary["num_tokens"],
        skipped_empty=sum(r.skipped_empty for r in shards), shards=len(shards), file_bytes=file_bytes,
        bytes_per_token=file_bytes / max(1, summary["num_tokens"]), provenance=shards[0].provenance,
        config=config.public_dict(), published_at=datetime.now(timezone.utc).isoformat(),
    )
    # The manifest makes the version complete, then latest moves, then old versions go: one step under the
    # output's publish lock, so no other run prunes this version in between.
    for key in versions.publish(layout.root, layout.key, manifest, config.output.keep_versions, opts):
        log.info("deleted old version %s (output.keep_versions=%d)", key, config.output.keep_versions)
    io.remove(layout.work_dir, opts)
    return manifest


# Remote part files are opened for their metadata and per-sample arrays only: small blocks, few bytes.
MERGE_READ_BLOCK_BYTES = 256 * 1024


def _checked_part_file(layout: Layout, shard: ShardSpec, part: PartRecord, file: FileRecord,
                       stamp: dict[str, Any] | None, opts: dict[str, Any]) -> dict[str, Any]:
    """h5cache.index_entry of one part file, after checking it is the file its record describes."""
    uri = io.join(layout.version_dir, file.name)
    fix = (f"Fix: delete {layout.shard_record(shard)} and {layout.part_record(shard, part.part)}, then run "
           "again: only that part is recomputed.")
    where = f"{shard.name} part {part.part} ({uri}) fails verification, so nothing was published:"
    if stamp is None:
        raise CacheFileError(f"{where} the file is missing. {fix}")
    if stamp["size"] != file.bytes:
        raise CacheFileError(f"{where} it has {stamp['size']:,} bytes, its record says {file.bytes:,}. {fix}")
    unchanged = ((file.etag is not None and stamp["etag"] == file.etag)
                 or (file.mtime_ns is not None and stamp["mtime_ns"] == file.mtime_ns))
    if not unchanged and io.sha256_of(uri, opts) != file.sha256:  # changed since published: check every byte
        raise CacheFileError(f"{where} its bytes differ from those published (sha256). {fix}")
    fileobj, _ = io.open_for_read(uri, opts, block_size=MERGE_READ_BLOCK_BYTES)
    try:
        return h5cache.index_entry(fileobj if fileobj is not None else io.local_path(uri), file.name,
                                     file.model_dump())
    except CacheFileError as e:
        raise CacheFileError(f"{where} {e} {fix}") from None
    finally:
        if fileobj is not None:
            fileobj.close()
