"""A bounded local cache of whole remote part files, for random access to a cache on object storage.

Random access straight to S3 costs a ranged GET (tens of ms) for nearly every sample; a training job reads every
sample of every part each epoch, so one download per part, then local reads, is cheaper by orders of magnitude.
Parts are downloaded whole (one GET stream), checked against the manifest (size and sha256), and kept under
`directory` as <sha256>.h5: named by content, so two versions, two runs or two DataLoader workers that share the
directory share the files, and a stale or foreign file cannot be taken for another. When the files would pass
max_bytes, the least recently used ones are deleted first (a process that still has one open keeps reading it:
POSIX unlinks only the name).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from kd_core import io
from kd_core.errors import CacheFileError

DEFAULT_BYTES = 8 << 30  # 8 GiB: a few parts at the default output.max_object_bytes (4 GiB)


def default_directory() -> Path:
    """$KD_CACHE_PARTS if set, else kd-cache-parts-<uid> under the system's temporary directory."""
    return Path(os.environ.get("KD_CACHE_PARTS") or Path(tempfile.gettempdir()) / f"kd-cache-parts-{os.getuid()}")


class PartCache:
    """Whole remote files on local disk: local(uri, size, sha256) -> a local path holding exactly those bytes."""

    def __init__(self, directory: str | Path | None = None, max_bytes: int = DEFAULT_BYTES,
                 storage_options: dict[str, Any] | None = None):
        self.directory = Path(directory) if directory is not None else default_directory()
        self.max_bytes, self.storage_options = max_bytes, storage_options
        self.downloads = 0  # files fetched by this process (the bench and tests count them)

    def local(self, uri: str, size: int, sha256: str) -> Path:
        path = self.directory / f"{sha256}.h5"
        try:
            if path.stat().st_size == size:
                os.utime(path)  # most recently used
                return path
        except FileNotFoundError:
            pass
        if size > self.max_bytes:
            raise CacheFileError(f"{uri}: {size:,} bytes, more than the local part cache's {self.max_bytes:,} "
                                 "(CacheDataset's cache_bytes): raise it, or read with StreamingCacheDataset.")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._make_room(size)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".partial")
        os.close(fd)
        try:
            io.fetch_file(uri, tmp, self.storage_options)
            got = Path(tmp).stat().st_size
            if got != size or io.sha256_of(tmp) != sha256:
                raise CacheFileError(f"{uri}: the downloaded file ({got:,} bytes) differs from the manifest's "
                                     f"({size:,} bytes, sha256 {sha256[:12]}...): the version was changed or damaged "
                                     "after it was published. Rebuild it (kd-cache run).")
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.downloads += 1
        return path

    def _make_room(self, size: int) -> None:
        """Delete the least recently used files until `size` more bytes fit under max_bytes."""
        files = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".h5"):
                try:
                    stat = entry.stat()
                except FileNotFoundError:  # another process evicted it just now
                    continue
                files.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(f[1] for f in files)
        for _, bytes_, path in sorted(files):
            if total + size <= self.max_bytes:
                break
            Path(path).unlink(missing_ok=True)
            total -= bytes_
