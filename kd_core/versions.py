"""Published versions under an output.uri: the `latest` pointer, and pruning old versions.

A version is versions/<key>/ and is complete once its manifest.json exists (merge writes it last). latest.json
names the version readers get; it is replaced in one atomic write, and only ever points at a complete version,
so a reader that follows it never sees a half-built one. Old complete versions are deleted only after latest
has moved, oldest first; a version without a manifest may be another run still building, and is never touched.
"""

from __future__ import annotations

from typing import Any

from kd_core import io


def latest_key(root: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The version latest.json points at, or None when nothing was published yet."""
    latest = io.join(root, "latest.json")
    return io.read_json(latest, storage_options)["version"] if io.exists(latest, storage_options) else None


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
    """Delete all but the `keep` newest complete versions besides the latest one; return the deleted keys."""
    current = latest_key(root, storage_options)
    old = [m["key"] for m in complete_versions(root, storage_options) if m["key"] != current]
    deleted = old[keep:]
    for key in deleted:
        fs, path = io.filesystem(io.join(root, "versions", key), storage_options)
        # The manifest goes first: if the delete is interrupted, what is left is an incomplete version,
        # which nothing reads and a rebuild of that key overwrites.
        fs.rm(io.join(path, "manifest.json"))
        fs.rm(path, recursive=True)
    return deleted
