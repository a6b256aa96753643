"""Published versions under an output.uri: the `latest` pointer, and pruning old versions.

A version is versions/<key>/ and is complete once its manifest.json exists (merge writes it last). latest.json
names the version readers get; it is replaced in one atomic write, and only ever points at a complete version,
so a reader that follows it never sees a half-built one. Old complete versions are deleted only after latest
has moved, oldest first; a version without a manifest may be another run still building, and is never touched.

Writing a manifest, moving latest and pruning happen together under one lock per output (work/publish.lock):
two runs of different configs publishing at once would otherwise each prune the other's version between its
manifest and its latest.json, leaving latest pointing at a deleted version. Inside the lock, latest is read
again before pruning, and a version whose merge lock is live (a rebuild in progress) is never deleted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kd_core import io, records
from kd_core.errors import CacheFileError, ConfigError
from kd_core.locks import LEASE_SECONDS, LeaseLock, is_held
from kd_core.records import Manifest, read_manifest

log = logging.getLogger("kd_core.versions")

INDEX = "cache.h5"
MANIFEST = "manifest.json"


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
        manifest = read_manifest(io.join(directory, MANIFEST), storage_options) if name == INDEX else None
        return Source(uri, manifest)
    if not io.exists(io.join(uri, MANIFEST), storage_options):
        key = latest_key(uri, storage_options)
        if key is None:
            raise ConfigError(f"{uri}: no cache here (no latest.json, no manifest.json, not an .h5 file). Pass the "
                              "output.uri of a finished run, a version directory or a cache.h5.")
        uri = io.join(uri, "versions", key)
    return Source(io.join(uri, INDEX), read_manifest(io.join(uri, MANIFEST), storage_options))


# Publishing takes seconds (a manifest, latest.json, a few deletes); a holder that died is taken over once its
# lease ends, so waiting a few leases always ends.
PUBLISH_WAIT_SECONDS = 3 * LEASE_SECONDS


def publish_lock(root: str, storage_options: dict[str, Any] | None = None) -> LeaseLock:
    """The output-wide lock held while a version becomes complete and latest, and while old ones are pruned."""
    return LeaseLock(io.join(root, "work", "publish.lock"), "the publishing step", storage_options,
                     wait_seconds=PUBLISH_WAIT_SECONDS)


def merge_lock_uri(root: str, key: str) -> str:
    """The lease lock a merge of version `key` holds (pipeline.Layout uses the same path)."""
    return io.join(root, "work", f"{key}.merge.lock")


def publish(root: str, key: str, manifest: Manifest, keep: int,
            storage_options: dict[str, Any] | None = None) -> list[str]:
    """Write versions/<key>/manifest.json (the version is complete), point latest at it, prune; the pruned keys."""
    with publish_lock(root, storage_options):
        records.write(io.join(root, "versions", key, MANIFEST), manifest, storage_options)
        set_latest(root, key, storage_options)  # readers move to it in one atomic write
        return prune(root, keep, storage_options)  # only after latest moved


def make_latest(root: str, key: str, storage_options: dict[str, Any] | None = None) -> Manifest | None:
    """The manifest of version `key` if it is complete, made latest again if it is not; None if incomplete.

    Under the publish lock, so that a version pruned by another run at this moment is not made latest.
    """
    manifest = io.join(root, "versions", key, MANIFEST)
    if read_manifest(manifest, storage_options) is None:  # absent, or a layout from before parts: rebuild
        return None
    with publish_lock(root, storage_options):
        found = read_manifest(manifest, storage_options)
        if found is None:  # pruned while we waited
            return None
        if damage := damaged_files(root, key, found, storage_options):
            # Not complete after all: drop the manifest (the version is then being built, and nothing reads it)
            # so that this run rebuilds it, rather than calling it up to date.
            log.warning("version %s is damaged (%s): rebuilding it", key, "; ".join(damage))
            io.remove(manifest, storage_options)
            return None
        if latest_key(root, storage_options) != key:
            set_latest(root, key, storage_options)
        return found


def damaged_files(root: str, key: str, manifest: Manifest, storage_options: dict[str, Any] | None = None) -> list[str]:
    """What is wrong with a version's files against its manifest (missing, wrong size), from one listing."""
    found = io.stamps(io.join(root, "versions", key), storage_options)
    problems = []
    for file in manifest.files:
        size = found.get(file.name, {}).get("size")
        if size != file.bytes:
            problems.append(f"{file.name} " + ("is missing" if size is None else f"has {size:,} bytes, not {file.bytes:,}"))
    return problems


def latest_key(root: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The version latest.json points at, or None when nothing was published yet; CacheFileError if damaged."""
    latest = io.join(root, "latest.json")
    if not io.exists(latest, storage_options):
        return None
    try:
        key = io.read_json(latest, storage_options)["version"]
    except (ValueError, TypeError, KeyError) as e:  # garbage, or JSON without the key
        raise CacheFileError(f"{latest}: damaged, not the JSON this tool writes ({type(e).__name__}). Fix: point it "
                             'at a complete version, e.g. {"version": "<key>"} for one under versions/, or run '
                             "the build again.") from None
    if not isinstance(key, str) or not key or "/" in key:
        raise CacheFileError(f"{latest}: damaged, its version is not a key under versions/. Fix: run the build again.")
    return key


def set_latest(root: str, key: str, storage_options: dict[str, Any] | None = None) -> None:
    """Point latest.json at versions/<key> (complete: the caller has written its manifest)."""
    io.write_json_atomic(io.join(root, "latest.json"), {"version": key, "path": f"versions/{key}/cache.h5"},
                         storage_options)


def complete_versions(root: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Manifests of every complete version under root, newest first (by their `published_at`)."""
    fs, versions = io.filesystem(io.join(root, "versions"), storage_options)
    if not fs.exists(versions):
        return []
    manifests = []
    for entry in fs.ls(versions, detail=False):
        manifest = io.join(root, "versions", entry.rstrip("/").rsplit("/", 1)[-1], "manifest.json")
        if io.exists(manifest, storage_options):
            manifests.append(io.read_json(manifest, storage_options))
    return sorted(manifests, key=lambda m: m["published_at"], reverse=True)


def prune(root: str, keep: int, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Delete all but the `keep` newest complete versions besides the latest one; return the deleted keys.

    Call it under publish_lock (publish does): latest cannot move while it runs.
    """
    current = latest_key(root, storage_options)
    old = [m["key"] for m in complete_versions(root, storage_options) if m["key"] != current]
    deleted = []
    for key in old[keep:]:
        if is_held(merge_lock_uri(root, key), storage_options):
            log.info("keeping old version %s: a merge of it is in progress", key)
        else:
            deleted.append(key)
    for key in deleted:
        fs, path = io.filesystem(io.join(root, "versions", key), storage_options)
        # The manifest goes first: if the delete is interrupted, what is left is an incomplete version,
        # which nothing reads and a rebuild of that key overwrites.
        fs.rm(io.join(path, "manifest.json"))
        fs.rm(path, recursive=True)
    return deleted
