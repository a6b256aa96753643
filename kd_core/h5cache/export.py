"""`kd-cache export`: a version as one self-contained file, its parts' chunks copied as stored."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py

from kd_core import io
from kd_core.h5cache.format import ENTRY_OFFSETS, PER_SAMPLE_DATASETS, row_datasets, temporary_path
from kd_core.h5cache.index import write_index_into
from kd_core.h5cache.reader import CacheReader


def copy_chunks(src: h5py.Dataset, dst_file: h5py.File, name: str) -> None:
    """Dataset `src` into dst_file[name] with the same shape, chunks and filters, chunk by chunk as stored
    (read_direct_chunk/write_direct_chunk): nothing is decompressed or compressed again."""
    dst = dst_file.create_dataset(name, shape=src.shape, maxshape=src.maxshape, dtype=src.dtype, chunks=src.chunks,
                                  compression=src.compression, compression_opts=src.compression_opts,
                                  shuffle=src.shuffle)
    for i in range(src.id.get_num_chunks()):
        info = src.id.get_chunk_info(i)
        filter_mask, data = src.id.read_direct_chunk(info.chunk_offset)
        dst.id.write_direct_chunk(info.chunk_offset, data, filter_mask)


def export(files: list[Path], path: str | Path, attrs: dict[str, Any]) -> dict[str, Any]:
    """One self-contained format-v1 file from a version's part files (local paths, in sample order): each part's
    datasets copied chunk for chunk under /parts/NNNNN/, and the root datasets virtual datasets over them within
    the same file (any stock HDF5 reader follows those). Written atomically. Returns {num_samples, num_tokens}."""
    path = Path(path)
    tmp = temporary_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as out:
            entries = []
            for k, part in enumerate(files):
                group = f"parts/{k:05d}/"
                with h5py.File(part, "r") as src:
                    for name in (*row_datasets(src), *(n for n in PER_SAMPLE_DATASETS if n in src)):
                        copy_chunks(src[name], out, group + name)
                    entry = {"name": ".", "group": group, "offsets": src["offsets"][:],
                             "sample_index": src["sample_index"][:], "layout": row_datasets(src),
                             "entry_offsets": src[ENTRY_OFFSETS][:] if ENTRY_OFFSETS in src else None}
                entries.append(entry)
            summary = write_index_into(out, entries, {**attrs, "index": "exported"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return summary


def export_cache(uri: str, path: str | Path, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`kd-cache export`: the cache at `uri` (any URI form, local or remote) as one self-contained file at
    `path`. Remote parts are downloaded next to the output first (so the disk there holds up to twice the
    cache until they are deleted). Returns {num_samples, num_tokens, bytes (the version's), seconds}."""
    started = time.perf_counter()
    with CacheReader(uri, storage_options) as reader:
        files, attrs, read_bytes = list(reader.files), dict(reader.attrs), reader.file_bytes
    attrs.pop("index", None), attrs.pop("parts", None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".kd-export-") as scratch:
        local = []
        for k, file in enumerate(files):
            if io.is_local(file):
                local.append(io.local_path(file))
            else:
                local.append(Path(scratch) / f"part-{k:05d}.h5")
                io.fetch_file(file, local[-1], storage_options)
        summary = export(local, path, attrs)
    return {**summary, "bytes": read_bytes, "seconds": time.perf_counter() - started}

