"""Where caches live: a local directory or any fsspec URL (s3://, gs://, ...), through one small API.

HDF5 files are always written locally first (h5py needs a seekable file), closed and verified, then uploaded:
to a temporary key, then moved to their final key, so a reader never sees half an object under a final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

READ_BLOCK_BYTES = 8 << 20  # remote reads: 8 MiB blocks, cached, so random access costs few requests


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(uri, **(storage_options or {}))


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def read_text(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "r") as f:
        return f.read()


def read_json(uri: str, storage_options: dict[str, Any] | None = None) -> Any:
    return json.loads(read_text(uri, storage_options))


def write_text_atomic(uri: str, text: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write to a temporary name next to the target, then move it into place."""
    if is_local(uri):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    fs, path = filesystem(uri, storage_options)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open(tmp, "w") as f:
        f.write(text)
    fs.mv(tmp, path)


def write_json_atomic(uri: str, data: Any, storage_options: dict[str, Any] | None = None) -> None:
    write_text_atomic(uri, json.dumps(data, indent=2, sort_keys=True), storage_options)


def publish_file(local: str | Path, uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Move (local target) or upload (remote target) a finished file to `uri`, atomically under its final name."""
    if is_local(uri):
        dest = local_path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if Path(local).resolve() != dest.resolve():
            os.replace(local, dest)
        return
    fs, path = filesystem(uri, storage_options)
    tmp = f"{path}.uploading"
    fs.put_file(str(local), tmp)
    fs.mv(tmp, path)


def open_for_read(uri: str, storage_options: dict[str, Any] | None = None):
    """(file object or None for a local path, size in bytes). h5py opens either."""
    if is_local(uri):
        return None, local_path(uri).stat().st_size
    fs, path = filesystem(uri, storage_options)
    f = fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="blockcache")
    return f, fs.size(path)
