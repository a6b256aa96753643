"""What a build reads, resolved once at validate time without reading any data: the source is part of the version.

    ResolvedTeacher   a hub teacher's commit sha (the revision asked for, e.g. "main", as it resolves today), or
                      a local teacher directory's fingerprint (its files' names, sizes and sampled contents)
    ResolvedDataset   the builder that reads the split; a hub dataset's commit sha; every data file (globs
                      expanded, in the order `datasets` reads them) with its size and a fingerprint
    ResolvedSource    both: what the version key covers (`digest`), the manifest and the cache attributes record,
                      and the shard plan is made from (kd_core.data.Source takes its file list)

A file's fingerprint is what the store says about its content when it says something (S3's ETag and VersionId,
GCS's generation, the Hub's blob id), else its modification time (ns), plus, for a parquet file, the sha256 of its
footer (one small ranged read: row counts, column statistics and offsets). So a file rewritten in place, rows
appended, a file added to a glob, or a moved `main` each give another digest, hence another version; an untouched
source gives the same one (a nightly re-run is "up to date").

A source that changes while a build runs is refused, never mixed: each shard calls `check_unchanged` on the
teacher and on its own files before it reads them and again before each part's record is written (a stat, or a
listing, per file; no data read). A changed file stops the shard with SourceChanged; its parts never complete, and
the next run resolves the new source to a new version key, so nothing made from the old bytes is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fsspec.core import url_to_fs
from pydantic import BaseModel, ConfigDict

from kd_core import io
from kd_core.errors import ConfigError, KDCacheError

if TYPE_CHECKING:
    from kd_core.config import Config, DatasetConfig, TeacherConfig

log = logging.getLogger("kd_core.source")

FINGERPRINT_THREADS = 16  # remote footers fetched this many at a time
FOOTER_READ_BYTES = 64 * 1024  # one ranged read holds most footers; a larger one costs a second read
_SHA = re.compile(r"[0-9a-f]{40}")
# What object stores report about an object's content, in the order they are recorded.
_CONTENT_IDS = ("VersionId", "ETag", "generation", "md5Hash", "blob_id")


class SourceChanged(KDCacheError):
    """A file or teacher read by this build changed after the build resolved it: refused, never mixed."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceFile(_Record):
    path: str          # as `datasets` reads it: an absolute local path or a URL
    bytes: int
    fingerprint: str   # "etag=...;versionid=...", or "mtime_ns=...;footer=<sha256>" (see the module docstring)


class ResolvedTeacher(_Record):
    model: str
    revision: str | None      # as asked for (None means the hub's default branch)
    sha: str | None           # the hub commit it names now; None for a local directory
    fingerprint: str | None   # a local directory: sha256 over its files' names, sizes, contents; None on the hub


class ResolvedDataset(_Record):
    name: str
    config: str | None
    split: str
    revision: str | None      # as asked for
    sha: str | None           # a hub dataset's commit; None for a builder over files (parquet, json, ...)
    builder: str              # the `datasets` builder that reads the split
    files: list[SourceFile] | None  # None: `datasets` lists no files for it (the split is read as a stream)

    @property
    def paths(self) -> list[str] | None:
        return None if self.files is None else [f.path for f in self.files]


class ResolvedSource(_Record):
    teacher: ResolvedTeacher
    dataset: ResolvedDataset

    def digest(self) -> str:
        """sha256 of what was resolved (not of the revisions asked for: `main` and its sha are one source)."""
        data = self.model_dump(mode="json", exclude={"teacher": {"revision"}, "dataset": {"revision"}})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def attrs(self) -> dict[str, Any]:
        """Cache attributes (HDF5 root attributes take scalars): the resolved shas and the digest."""
        return {"teacher_sha": self.teacher.sha or "", "teacher_fingerprint": self.teacher.fingerprint or "",
                "dataset_sha": self.dataset.sha or "", "dataset_files": len(self.dataset.files or []),
                "source_digest": self.digest()}


def resolve(config: Config) -> ResolvedSource:
    """The teacher and the dataset as they are now (hub lookups, file listings, parquet footers; no data read)."""
    return ResolvedSource(teacher=resolve_teacher(config.teacher), dataset=resolve_dataset(config.dataset))


def pinned(config: Config, source: ResolvedSource) -> Config:
    """A copy of the config that loads exactly what was resolved: hub revisions become the commit shas they name
    now, so a branch that moves during a long build cannot change what a later shard loads (the revisions asked
    for stay in `source`)."""
    teacher = config.teacher.model_copy(update={"revision": source.teacher.sha or config.teacher.revision})
    dataset = config.dataset.model_copy(update={"revision": source.dataset.sha or config.dataset.revision})
    return config.model_copy(deep=True, update={"teacher": teacher, "dataset": dataset})


# -- the teacher -----------------------------------------------------------------------------------------------

def resolve_teacher(cfg: TeacherConfig) -> ResolvedTeacher:
    path = os.path.expanduser(cfg.model)
    if os.path.isdir(path):
        return ResolvedTeacher(model=cfg.model, revision=cfg.revision, sha=None, fingerprint=directory_fingerprint(path))
    if os.path.isfile(path):
        raise ConfigError(f"teacher.model: {cfg.model!r} is a file; a local teacher is a directory holding config.json, "
                          "the weights and the tokenizer (as save_pretrained writes it). Point it at that directory.")
    if os.path.isabs(path) or cfg.model.startswith((".", "~")) or cfg.model.count("/") > 1:  # meant as a local path
        raise ConfigError(f"teacher.model: local path {cfg.model!r} does not exist. Point it at a model directory.")
    sha = hub_sha(cfg.model, cfg.revision, "model", key="teacher.revision")
    return ResolvedTeacher(model=cfg.model, revision=cfg.revision, sha=sha, fingerprint=None)


# A local teacher's files are fingerprinted by content, so every host holding a copy agrees (a deployed shard checks
# its own copy against the parent's): a file up to WHOLE_FILE_BYTES is hashed whole (configs, tokenizer, an index);
# a larger one (weights) by its size and SAMPLES blocks of SAMPLE_BYTES spread evenly over it, the last included,
# about 4 MiB read per file: any tensor longer than the stride (1/64 of the file) that changes is seen.
WHOLE_FILE_BYTES = 4 << 20
SAMPLES = 64
SAMPLE_BYTES = 64 << 10


def directory_fingerprint(path: str) -> str:
    """sha256 over (relative name, size, content digest) of every file under `path` (hidden ones excepted), content
    hashed as above: weights replaced, a config edited or a tokenizer swapped each change it; copies agree."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            entries.append([os.path.relpath(full, path), os.path.getsize(full), _file_digest(full)])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _file_digest(path: str) -> str:
    size, sha = os.path.getsize(path), hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            sha.update(f.read())
        else:
            for i in range(SAMPLES):
                f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                sha.update(f.read(SAMPLE_BYTES))
    return sha.hexdigest()


def hub_sha(repo_id: str, revision: str | None, repo_type: str, key: str) -> str:
    """The commit `revision` (None: the default branch) names now: asked of the hub, or offline, read from the local
    Hugging Face cache (the snapshot a `from_pretrained` would load). ConfigError naming `key` when neither knows."""
    from huggingface_hub.errors import HFValidationError

    if revision is not None and _SHA.fullmatch(revision):
        return revision
    try:
        return _hub_sha(repo_id, revision, repo_type, key)
    except HFValidationError as e:
        raise ConfigError(f"{key.split('.')[0]}.model: {repo_id!r} is neither a local directory nor a hub id ({e}). "
                          "Fix the name or the path.") from None


def _hub_sha(repo_id: str, revision: str | None, repo_type: str, key: str) -> str:
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if not constants.is_offline_mode():
        try:
            return HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type).sha
        except RevisionNotFoundError:
            raise ConfigError(f"{key}: {repo_id!r} has no revision {revision!r} on the hub. Fix: {key}=main, a tag "
                              "or a commit sha.") from None
        except RepositoryNotFoundError:
            raise ConfigError(f"{key.split('.')[0]}: {repo_id!r} is not a {repo_type} on the hub (or needs a token "
                              "this worker lacks). Fix the name, or set HF_TOKEN on the worker.") from None
        except Exception as e:  # noqa: BLE001 - no network: what the cache holds is what would be loaded
            log.warning("%s: cannot reach the hub for %s (%s); using the locally cached revision", key, repo_id,
                        type(e).__name__)
    found = try_to_load_from_cache(repo_id, "config.json" if repo_type == "model" else "README.md",
                                   revision=revision, repo_type=repo_type)
    if isinstance(found, str):  # .../snapshots/<sha>/config.json
        sha = posixpath.basename(posixpath.dirname(found.replace(os.sep, "/")))
        if _SHA.fullmatch(sha):
            return sha
    raise ConfigError(f"{key}: cannot resolve {repo_id!r} at revision {revision or 'main'!r}: the hub is not "
                      "reachable (or HF_HUB_OFFLINE is set) and the local Hugging Face cache has no snapshot of it. "
                      f"Fix: download it once with network access, or set {key} to a cached commit sha.")


# -- the dataset -----------------------------------------------------------------------------------------------

def resolve_dataset(cfg: DatasetConfig) -> ResolvedDataset:
    """The builder, the hub commit (hub datasets) and every data file of the split with its fingerprint."""
    builder = load_builder(cfg)
    data_files = builder.config.data_files
    paths = None
    if data_files:
        if cfg.split not in data_files:
            raise ConfigError(f"dataset.split: {cfg.name!r} has no split {cfg.split!r}; it has {sorted(data_files)}. "
                              f"Fix: dataset.split={sorted(data_files)[0]}.")
        paths = [str(f) for f in data_files[cfg.split]]
    sha = builder.hash if getattr(builder, "repo_id", None) and builder.hash and _SHA.fullmatch(builder.hash) else None
    return ResolvedDataset(name=cfg.name, config=cfg.config, split=cfg.split, revision=cfg.revision, sha=sha,
                           builder=builder.name, files=None if paths is None else fingerprint_files(paths))


def load_builder(cfg: DatasetConfig):
    """datasets' builder for the split (it expands data_files globs and resolves a hub revision to its commit)."""
    import datasets

    with dataset_errors(cfg):
        return datasets.load_dataset_builder(cfg.name, cfg.config, data_files=cfg.data_files, revision=cfg.revision)


def fingerprint_files(paths: list[str]) -> list[SourceFile]:
    """Each file with its size and fingerprint: one listing per directory, footers fetched in parallel."""
    infos = _infos(paths)
    with ThreadPoolExecutor(FINGERPRINT_THREADS) as pool:
        return list(pool.map(lambda p: _fingerprint(p, infos[p]), paths))


def check_unchanged(files: list[SourceFile], what: str) -> None:
    """SourceChanged naming the first of `files` whose size or fingerprint differs from what was resolved."""
    now = {f.path: f for f in fingerprint_files([f.path for f in files])} if files else {}
    for old in files:
        new = now[old.path]
        if new != old:
            raise SourceChanged(
                f"dataset.data_files: {old.path} changed while this build was running ({_difference(old, new)}). "
                f"{what} stopped before using it, so no part mixes the old and new file. Fix: run again once the "
                "source is settled: the new file makes a new version (the old one stays published until then)."
            )


def check_teacher_unchanged(teacher: ResolvedTeacher) -> None:
    """SourceChanged when a local teacher directory's files changed after the build resolved them. (A hub teacher
    is pinned to its commit sha: what that names cannot change.)"""
    if teacher.fingerprint is None:
        return
    path = os.path.expanduser(teacher.model)
    now = directory_fingerprint(path) if os.path.isdir(path) else "missing"
    if now != teacher.fingerprint:
        raise SourceChanged(
            f"teacher.model: the files of {teacher.model} changed while this build was running. The build stopped "
            "before loading them, so no part mixes two teachers. Fix: run again once the teacher is settled: it makes "
            "a new version."
        )


def _difference(old: SourceFile, new: SourceFile) -> str:
    if new.bytes < 0:
        return "it is gone"
    if old.bytes != new.bytes:
        return f"{old.bytes:,} bytes when resolved, {new.bytes:,} now"
    return f"fingerprint {old.fingerprint} when resolved, {new.fingerprint} now"


def _infos(paths: list[str]) -> dict[str, dict[str, Any]]:
    """{path: fsspec info} from one listing per directory (S3: one request per 1,000 objects); {} for a missing
    file."""
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        by_dir.setdefault(p.rsplit("/", 1)[0], []).append(p)
    out: dict[str, dict[str, Any]] = {}
    for directory, members in by_dir.items():
        if io.is_local(members[0]):
            out.update((p, _local_info(p)) for p in members)
            continue
        fs, _ = url_to_fs(members[0])
        fs.invalidate_cache()  # fsspec caches listings per instance: a file rewritten since must be seen as it is now
        try:
            listing = {posixpath.normpath(e["name"]): e for e in fs.ls(url_to_fs(directory)[1], detail=True)}
        except (FileNotFoundError, OSError):
            listing = {}
        for p in members:
            info = listing.get(posixpath.normpath(url_to_fs(p)[1]))
            if info is None:
                try:
                    info = fs.info(url_to_fs(p)[1])
                except FileNotFoundError:
                    info = {}
            out[p] = info
    return out


def _local_info(path: str) -> dict[str, Any]:
    try:
        st = os.stat(path.removeprefix("file://"))
    except FileNotFoundError:
        return {}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _fingerprint(path: str, info: dict[str, Any]) -> SourceFile:
    if not info:
        return SourceFile(path=path, bytes=-1, fingerprint="missing")
    size = int(info.get("size") or 0)
    parts = [f"{k.lower()}={str(info[k]).strip(chr(34))}" for k in _CONTENT_IDS if info.get(k)]
    if isinstance(info.get("lfs"), dict) and info["lfs"].get("sha256"):
        parts.append(f"sha256={info['lfs']['sha256']}")
    if not parts:  # the store says nothing about content: the time it was written, and the parquet footer
        mtime = info.get("mtime_ns") or info.get("LastModified") or info.get("mtime")
        if mtime is not None:
            parts.append(f"mtime={mtime}")
        if path.endswith(".parquet"):
            parts.append(f"footer={_footer_sha(path, size)}")
    if not parts:
        log.warning("dataset.data_files: %s: the store reports no ETag or modification time; only its size tells "
                    "whether it changed", path)
    return SourceFile(path=path, bytes=size, fingerprint=";".join(parts) or "size")


def _footer_sha(path: str, size: int) -> str:
    """sha256 of a parquet file's footer (the thrift metadata before the trailing length and PAR1), or "none" for
    a file that is not parquet (the reader reports that, with its own message)."""
    if size < 12:
        return "none"
    fs, fpath = url_to_fs(path)
    start = max(0, size - FOOTER_READ_BYTES)
    tail = fs.cat_file(fpath, start=start, end=size)
    if tail[-4:] != b"PAR1":
        return "none"
    length = int.from_bytes(tail[-8:-4], "little")
    if length + 8 > len(tail):
        if length + 8 > size:
            return "none"
        tail = fs.cat_file(fpath, start=size - 8 - length, end=size)
    return hashlib.sha256(tail[-8 - length:-8]).hexdigest()


class dataset_errors:
    """datasets' loading errors as ConfigErrors that name the key to fix."""

    def __init__(self, cfg: DatasetConfig):
        self.cfg = cfg

    def __enter__(self):
        return self

    def __exit__(self, exc_type, e, tb):
        import datasets

        cfg = self.cfg
        if exc_type is None:
            return False
        if issubclass(exc_type, ConnectionError):  # offline and not in the local cache, or the hub unreachable
            raise ConfigError(f"dataset.name: cannot read {cfg.name!r}: {' '.join(str(e).split())}. Fix: network "
                              "access, or HF_HUB_OFFLINE=1 with the dataset in the Hugging Face cache, or local files "
                              "(dataset.name=parquet dataset.data_files=/path/*.parquet).") from None
        if issubclass(exc_type, FileNotFoundError):
            raise ConfigError(f"dataset.name / dataset.data_files: dataset not found ({e}). "
                              "Fix the name or the file paths.") from None
        if issubclass(exc_type, datasets.exceptions.DatasetGenerationError):  # e.g. an empty parquet file
            raise ConfigError(f"dataset: could not read {cfg.name!r} split {cfg.split!r} ({e.__cause__ or e}). "
                              "An empty or damaged data file reads like this: fix dataset.data_files.") from None
        if issubclass(exc_type, ValueError):
            raise ConfigError(f"dataset: could not load {cfg.name!r} split {cfg.split!r}: {e}") from None
        return False
