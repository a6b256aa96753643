"""The output layout: every path under output.uri is named here and nowhere else, and every read, write, listing,
publish and prune of it goes through a Store (one output.uri with its storage options, like a root-bound
filesystem).

    latest.json                           which version readers get; replaced in one atomic write, and only ever
                                          pointing at a complete version (its manifest exists)
    versions/<key>/manifest.json          written after every file it lists: its presence marks the version complete
    versions/<key>/cache.h5               the index: the whole version as one cache to stock h5py (virtual datasets
                                          over the parts by relative path; /offsets and /sample_index stored)
    versions/<key>/parts/<shard>/part-PPPPP-FFFF.h5   the data: file FFFF of planned part PPPPP of a shard, written
                                          once to this final name as soon as it is closed
    work/<key>/<shard>/part-PPPPP.json    a part's record (records.PartRecord: rows, counts, its files)
    work/<key>/<shard>.json               the shard's record, written after its last part
    work/<key>/<shard>.lock               lease lock: one writer per shard (kd_core.locks)
    work/<key>/build.json                 the build id (build_id), minted when the version's work starts
    work/<key>.merge.lock                 lease lock: one merge at a time (outside work/<key>/, which the merge removes)
    work/publish.lock                     lease lock: one run at a time writes a manifest, moves latest and prunes
    $KD_CACHE_STAGING/kd-cache-staging/<key>/<shard or merge>/   local scratch of a remote target (h5py needs a
                                          seekable local file): each file deleted once uploaded, the directory
                                          removed when its shard or merge stops (staging)

<key> is the build's version key (kd_core.build.version_key): a hash of what determines the cache's bytes, so a
rerun with the same inputs finds its version published and does no teacher work. work/<key>/ is removed after
publishing.

Publishing: writing a manifest, moving latest and pruning happen together under the output's publish lock: two
runs of different configs publishing at once would otherwise each prune the other's version between its manifest
and its latest.json, leaving latest pointing at a deleted version. Inside the lock, latest is read again before
pruning, and a version whose merge lock is live (a rebuild in progress) is never deleted. Old complete versions
are deleted only after latest has moved, oldest first; a version without a manifest may be another run still
building, and is never touched. Pruning considers only directories whose name is a key and whose own manifest
names that key, and deletes by the listed name: never a path read from a file.

Records that do not parse (written by an older version) read as absent: that part is simply redone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TypeVar

from pydantic import BaseModel, ValidationError

from kd_core import io
from kd_core.data import ShardSpec
from kd_core.errors import CacheFileError, ConfigError, StorageError
from kd_core.locks import LEASE_SECONDS, LeaseLock, holder_state, is_held
from kd_core.records import Manifest, PartRecord, ShardRecord

log = logging.getLogger("kd_core.store")
R = TypeVar("R", bound=BaseModel)

INDEX = "cache.h5"
BUILD_ID = "build.json"
KEY = re.compile(r"[0-9a-f]{16}")  # what kd_core.build.version_key returns
MANIFEST = "manifest.json"
LATEST = "latest.json"
# Publishing takes seconds (a manifest, latest.json, a few deletes); a holder that died is taken over once its
# lease ends, so waiting a few leases always ends.
PUBLISH_WAIT_SECONDS = 3 * LEASE_SECONDS


def is_key(name: str) -> bool:
    """Whether `name` can be a version key (so a directory of that name under versions/ may be this tool's)."""
    return KEY.fullmatch(name) is not None


def staging_root() -> Path:
    """Where local scratch lives: $KD_CACHE_STAGING, else the system's temporary directory."""
    return Path(os.environ.get("KD_CACHE_STAGING", tempfile.gettempdir()))


class Store:
    """One output.uri and its storage options: the paths of the layout above, and the operations on them."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.root = uri.rstrip("/")
        self.options = dict(storage_options or {})

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and (self.root, self.options) == (other.root, other.options)

    @property
    def is_local(self) -> bool:
        return io.is_local(self.root)

    # -- names ------------------------------------------------------------------------------------------------

    @property
    def latest(self) -> str:
        return io.join(self.root, LATEST)

    @property
    def versions_dir(self) -> str:
        return io.join(self.root, "versions")

    def version_dir(self, key: str) -> str:
        return io.join(self.versions_dir, key)

    def version_file(self, key: str, name: str) -> str:
        """A file of version `key` by its name relative to the version directory (as manifests list them)."""
        return io.join(self.version_dir(key), name)

    def index(self, key: str) -> str:
        return self.version_file(key, INDEX)

    def manifest(self, key: str) -> str:
        return self.version_file(key, MANIFEST)

    @staticmethod
    def part_name(shard: ShardSpec, part: int, file: int = 0) -> str:
        """File `file` of a planned part, relative to the version directory."""
        return f"parts/{shard.name}/part-{part:05d}-{file:04d}.h5"

    def part_file(self, key: str, shard: ShardSpec, part: int, file: int = 0) -> str:
        return self.version_file(key, self.part_name(shard, part, file))

    @staticmethod
    def is_part(name: str) -> bool:
        """Whether a name relative to a version directory is a part file's."""
        return name.startswith("parts/")

    def shard_parts(self, key: str, shard: ShardSpec) -> str:
        """The directory of a shard's part files."""
        return self.version_file(key, f"parts/{shard.name}")

    def work_dir(self, key: str) -> str:
        return io.join(self.root, "work", key)

    def shard_record(self, key: str, shard: ShardSpec) -> str:
        return io.join(self.work_dir(key), f"{shard.name}.json")

    def part_record(self, key: str, shard: ShardSpec, part: int) -> str:
        return io.join(self.work_dir(key), shard.name, f"part-{part:05d}.json")

    def shard_lock_uri(self, key: str, shard: ShardSpec) -> str:
        return io.join(self.work_dir(key), f"{shard.name}.lock")

    def build_id_uri(self, key: str) -> str:
        return io.join(self.work_dir(key), BUILD_ID)

    def merge_lock_uri(self, key: str) -> str:
        return io.join(self.root, "work", f"{key}.merge.lock")

    def publish_lock_uri(self) -> str:
        return io.join(self.root, "work", "publish.lock")

    def staging_dir(self, key: str) -> Path:
        """Local scratch of version `key` (a name; `staging` creates and removes what is under it)."""
        return staging_root() / "kd-cache-staging" / key

    @contextlib.contextmanager
    def staging(self, key: str, name: str) -> Iterator[Path]:
        """An empty local directory staging_dir(key)/name for the block, removed after it, success or not (its
        parents too once empty): staging holds only files on their way out, never a dead run's leftovers.

        Call it under the lock of what `name` is (a shard's lease, the merge lock): whatever is found there at the
        start was left by a run of that same shard or merge that died, and is dropped."""
        path = self.staging_dir(key) / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            for parent in (path.parent, path.parent.parent):  # <key>/, then kd-cache-staging/, if now empty
                with contextlib.suppress(OSError):
                    parent.rmdir()

    @property
    def local_root(self) -> Path | None:
        """output.uri as a local directory; None for a remote target."""
        return io.local_path(self.root) if self.is_local else None

    def scratch(self, key: str) -> dict[str, Path]:
        """The local disk a shard of version `key` writes its files on before they are final, by what it is
        (io.disk_full_is_fatal's keywords): the output directory itself, or staging for a remote target."""
        return {"output": self.local_root} if self.is_local else {"staging": self.staging_dir(key)}

    def local_path(self, uri: str, staging: Path) -> Path:
        """Where the file published as `uri` is written first: in place for a local target, else in `staging`."""
        return io.local_path(uri) if self.is_local else staging / uri.rsplit("/", 1)[-1]

    # -- files ------------------------------------------------------------------------------------------------

    def exists(self, uri: str) -> bool:
        return io.exists(uri, self.options)

    def remove(self, uri: str) -> None:
        io.remove(uri, self.options)

    def stamps(self, uri: str) -> dict[str, dict[str, Any]]:
        """Every file under `uri` by relative name: {"size", "etag", "mtime_ns"}, from one listing."""
        return io.stamps(uri, self.options)

    def publish_file(self, local: Path, uri: str) -> dict[str, Any]:
        """Move or upload a finished local file to its final name, written once (io.publish_file)."""
        return io.publish_file(local, uri, self.options)

    def sha256(self, uri: str) -> str:
        return io.sha256_of(uri, self.options)

    def open_for_read(self, uri: str, block_size: int = io.READ_BLOCK_BYTES):
        return io.open_for_read(uri, self.options, block_size=block_size)

    # -- records ----------------------------------------------------------------------------------------------

    def write_record(self, uri: str, record: BaseModel) -> None:
        """Any record, as JSON, in one atomic write."""
        io.write_json_atomic(uri, record.model_dump(mode="json"), self.options)

    def read_record(self, model: type[R], uri: str, warn: bool = True) -> R | None:
        """The record at `uri`; None when absent, or when it does not parse (an older format, a damaged file), said
        in a warning unless the caller reports it itself (`warn=False`: a reader's one-line refusal)."""
        if not self.exists(uri):
            return None
        try:
            return model.model_validate(io.read_json(uri, self.options))
        except (ValidationError, ValueError) as e:
            if warn:
                log.warning("ignoring %s: not a valid %s (%s)", uri, model.__name__, str(e).splitlines()[0])
            return None

    def read_shard(self, key: str, shard: ShardSpec) -> ShardRecord | None:
        return self.read_record(ShardRecord, self.shard_record(key, shard))

    def read_part(self, key: str, shard: ShardSpec, part: int) -> PartRecord | None:
        return self.read_record(PartRecord, self.part_record(key, shard, part))

    def read_manifest(self, key: str) -> Manifest | None:
        return self.read_record(Manifest, self.manifest(key))

    # -- locks ------------------------------------------------------------------------------------------------

    def shard_lock(self, key: str, shard: ShardSpec) -> LeaseLock:
        return LeaseLock(self.shard_lock_uri(key, shard), shard.name, self.options)

    def merge_lock(self, key: str) -> LeaseLock:
        return LeaseLock(self.merge_lock_uri(key), "the merge", self.options)

    def publish_lock(self) -> LeaseLock:
        """The output-wide lock held while a version becomes complete and latest, and while old ones are pruned."""
        return LeaseLock(self.publish_lock_uri(), "the publishing step", self.options,
                         wait_seconds=PUBLISH_WAIT_SECONDS)

    def build_id(self, key: str) -> str:
        """The id of the build of version `key`: minted (random) by the first shard or merge of its work, kept in
        work/<key>/build.json so that every shard and a resume use the same one; a rebuild after the version was
        published (work/<key>/ removed) gets a new one. Stamped into every part and the index, recorded in part
        records and the manifest: a reader can tell a file of another build (kd_core.h5cache.reader)."""
        uri, minted = self.build_id_uri(key), uuid.uuid4().hex
        if io.create_exclusive(uri, json.dumps({"build_id": minted}), self.options):  # whole or not at all
            return minted
        try:
            found = io.read_json(uri, self.options)["build_id"]
        except (ValueError, TypeError, KeyError):
            found = None
        if not isinstance(found, str) or not re.fullmatch(r"[0-9a-f]{32}", found):
            raise CacheFileError(f"{uri}: damaged, not the build id this tool writes. Fix: delete "
                                 f"{self.work_dir(key)} to start this version over.")
        return found

    def merging(self, key: str) -> bool:
        """Whether a live run holds the merge lock of version `key`."""
        return is_held(self.merge_lock_uri(key), self.options)

    def shard_state(self, key: str, shard: ShardSpec) -> tuple[str, str | None]:
        """(state, lease token): "done" (its record is published), "writing" (a live run holds its lease), "dead"
        (the lease's holder stopped refreshing it) or "free" (no lease)."""
        if self.exists(self.shard_record(key, shard)):
            return "done", None
        state, token = holder_state(self.shard_lock_uri(key, shard), self.options)
        return {"held": "writing", "stale": "dead", "free": "free"}[state], token

    # -- versions ---------------------------------------------------------------------------------------------

    def latest_key(self) -> str | None:
        """The version latest.json points at, or None when nothing was published yet; CacheFileError if damaged."""
        if not self.exists(self.latest):
            return None
        try:
            key = io.read_json(self.latest, self.options)["version"]
        except (ValueError, TypeError, KeyError) as e:  # garbage, or JSON without the key
            raise CacheFileError(f"{self.latest}: damaged, not the JSON this tool writes ({type(e).__name__}). Fix: "
                                 'point it at a complete version, e.g. {"version": "<key>"} for one under versions/, '
                                 "or run the build again.") from None
        if not isinstance(key, str) or not is_key(key):
            raise CacheFileError(f"{self.latest}: damaged, its version is not a key under versions/. Fix: run the "
                                 "build again.")
        return key

    def set_latest(self, key: str) -> None:
        """Point latest.json at versions/<key> (complete: the caller has written its manifest)."""
        io.write_json_atomic(self.latest, {"version": key, "path": f"versions/{key}/{INDEX}"}, self.options)

    def publish(self, key: str, manifest: Manifest, keep: int) -> list[str]:
        """Write versions/<key>/manifest.json (the version is complete), point latest at it, prune; the pruned keys."""
        with self.publish_lock():
            self.write_record(self.manifest(key), manifest)
            self.set_latest(key)  # readers move to it in one atomic write
            return self.prune(keep)  # only after latest moved

    def make_latest(self, key: str) -> Manifest | None:
        """The manifest of version `key` if it is complete, made latest again if it is not; None if incomplete.

        Under the publish lock, so that a version pruned by another run at this moment is not made latest.
        """
        if self.read_manifest(key) is None:  # absent, or a layout from before parts: rebuild
            return None
        with self.publish_lock():
            found = self.read_manifest(key)
            if found is None:  # pruned while we waited
                return None
            if damage := self.damaged_files(key, found):
                # Not complete after all: drop the manifest (the version is then being built, and nothing reads it)
                # so that this run rebuilds it, rather than calling it up to date.
                log.warning("version %s is damaged (%s): rebuilding it", key, "; ".join(damage))
                self.remove(self.manifest(key))
                return None
            if self.latest_key() != key:
                self.set_latest(key)
            return found

    def damaged_files(self, key: str, manifest: Manifest) -> list[str]:
        """What is wrong with a version's files against its manifest (no parts, missing, wrong size), from one
        listing. A manifest that lists no parts is damage too: every reader refuses it."""
        found = self.stamps(self.version_dir(key))
        problems = [] if manifest.parts else ["the manifest lists no parts"]
        for file in manifest.files:
            size = found.get(file.name, {}).get("size")
            if size != file.bytes:
                problems.append(f"{file.name} " + ("is missing" if size is None else
                                                   f"has {size:,} bytes, not {file.bytes:,}"))
        return problems

    def complete_versions(self) -> list[str]:
        """The keys of the complete versions this store owns, newest first (by their manifests' `published_at`).

        Only a directory under versions/ whose name is a key (is_key) and whose own manifest names that same key
        counts: a directory renamed by hand, or a manifest edited to name another key or a path, is left alone
        (and said so). Every key returned is a name read from the listing, never a value read from a file.
        """
        fs, versions = io.filesystem(self.versions_dir, self.options)
        if not fs.exists(versions):
            return []
        found = []
        for entry in fs.ls(versions, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if not is_key(name):
                log.warning("leaving %s alone: not a version key", self.version_dir(name))
                continue
            if not self.exists(self.manifest(name)):
                continue  # incomplete: another run may be building it
            try:
                manifest = io.read_json(self.manifest(name), self.options)
                named, published_at = manifest["key"], str(manifest["published_at"])
            except (ValueError, TypeError, KeyError):
                named, published_at = None, ""
            if named != name:
                log.warning("leaving %s alone: its manifest does not name its own key", self.version_dir(name))
                continue
            found.append((published_at, name))
        return [name for _, name in sorted(found, reverse=True)]

    def prune(self, keep: int) -> list[str]:
        """Delete all but the `keep` newest complete versions besides the latest one; return the deleted keys.

        Call it under publish_lock (publish does): latest cannot move while it runs, and no other run is
        publishing. A version whose merge lock is live is kept. Runs after latest moved, so it never fails the
        publish: a version it cannot delete is logged and left.
        """
        current = self.latest_key()
        old = [key for key in self.complete_versions() if key != current]
        deleted = []
        for key in old[keep:]:
            if self.merging(key):
                log.info("keeping old version %s: a merge of it is in progress", key)
                continue
            fs, path = io.filesystem(self.version_dir(key), self.options)
            try:
                # The manifest goes first: if the delete is interrupted, what is left is an incomplete version,
                # which nothing reads and a rebuild of that key overwrites.
                fs.rm(io.join(path, MANIFEST))
                fs.rm(path, recursive=True)
            except (OSError, StorageError) as e:
                log.warning("could not delete old version %s (%s: %s); it is left for the next prune", key,
                            type(e).__name__, e)
                continue
            deleted.append(key)
        return deleted


@dataclass(frozen=True)
class Source:
    """What a URI names: a published version (its manifest, with the index cache.h5 beside it), or one
    self-contained cache file (manifest None: a format-v1 file from before parts, or an export)."""

    index_uri: str
    manifest: Manifest | None

    def join(self, name: str) -> str:
        """A file of the version, by its name relative to the version directory."""
        return io.join(self.index_uri.rsplit("/", 1)[0], name)


def resolve(uri: str, storage_options: dict[str, Any] | None = None) -> Source:
    """An output root (follows latest.json), a version directory or a cache file -> Source; ConfigError if none."""
    uri = io.normalise_uri(uri, key="URI")
    if uri.endswith((".h5", ".hdf5")):
        directory, name = uri.rsplit("/", 1) if "/" in uri else (".", uri)
        version = Store(directory, storage_options)
        manifest = version.read_record(Manifest, io.join(directory, MANIFEST), warn=False) if name == INDEX else None
        return Source(uri, manifest)
    here = Store(uri, storage_options)
    if not here.exists(io.join(uri, MANIFEST)):
        if here.exists(io.join(uri, INDEX)):  # a version without its manifest: readers refuse it, naming it
            return Source(io.join(uri, INDEX), None)
        key = here.latest_key()
        if key is None:
            raise ConfigError(f"{uri}: no cache here (no {LATEST}, no {MANIFEST}, not an .h5 file). Pass the "
                              "output.uri of a finished run, a version directory or a cache.h5.")
        uri = here.version_dir(key)
    # A damaged manifest reads as None, and every reader refuses the version in one line that says so.
    return Source(io.join(uri, INDEX), here.read_record(Manifest, io.join(uri, MANIFEST), warn=False))
