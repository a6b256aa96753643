"""`kd-cache export`: a version as one self-contained file, its parts' chunks copied as stored.

Nothing is trusted on the way: every input file is checked against the manifest (size, metadata, sha256), the
output is written under a temporary name beside OUT, its copied datasets are checked against the parts' own
checksums (kept on each copied part), and only then renamed to OUT. An exported file can be exported again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from kd_core import io
from kd_core.errors import CacheFileError, ConfigError
from kd_core.h5cache.contained import check_contained
from kd_core.h5cache.format import ENTRY_OFFSETS, PER_SAMPLE_DATASETS, row_datasets, temporary_path
from kd_core.h5cache.index import write_index_into
from kd_core.h5cache.reader import CacheReader
from kd_core.h5cache.verify import iter_blocks

PARTS = "parts"  # an export keeps part k's datasets, and its root attributes, in group /parts/NNNNN


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


def groups_of(file: h5py.File) -> list[h5py.Group | h5py.File]:
    """The parts a self-contained file holds: an export's /parts/NNNNN groups in order, else the file itself."""
    if isinstance(file.get(PARTS), h5py.Group):  # exports before 'index = "exported"' was kept say "virtual"
        return [file[PARTS][name] for name in sorted(file[PARTS])]
    return [file]


def export(files: list[Path], path: str | Path, attrs: dict[str, Any]) -> dict[str, Any]:
    """One self-contained format-v1 file from local cache files in sample order (a version's parts, or exported
    files, whose parts are taken in turn): each part's datasets copied chunk for chunk under /parts/NNNNN/ with
    its root attributes (its checksums among them), and the root datasets virtual datasets over them within the
    same file (any stock HDF5 reader follows those). Written as PATH.partial, checked, then renamed; nothing is
    left behind on failure. Returns {num_samples, num_tokens}."""
    path = Path(path)
    tmp = temporary_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as out:
            entries = []
            for file in files:
                with h5py.File(file, "r") as src:
                    check_contained(src, str(file))
                    for part in groups_of(src):
                        group = f"{PARTS}/{len(entries):05d}/"
                        for name in (*row_datasets(part), *(n for n in PER_SAMPLE_DATASETS if n in part)):
                            copy_chunks(part[name], out, group + name)
                        for key, value in part.attrs.items():
                            out[group].attrs[key] = value
                        entries.append({"name": ".", "group": group, "offsets": part["offsets"][:],
                                        "sample_index": part["sample_index"][:], "layout": row_datasets(part),
                                        "entry_offsets": part[ENTRY_OFFSETS][:] if ENTRY_OFFSETS in part else None})
            summary = write_index_into(out, entries, {**attrs, "index": "exported"})
        check_groups(tmp, path)
        os.replace(tmp, path)
    except (OSError, KeyError, ValueError, RuntimeError) as e:  # an input that h5py cannot copy: one line
        raise CacheFileError(f"{path}: not written: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return summary


def check_groups(file_path: Path, shown: Path) -> None:
    """Every copied part's datasets against the checksums its root attributes recorded (every byte decompressed):
    CacheFileError naming the part. Parts without recorded checksums (exports before they were kept) pass."""
    with h5py.File(file_path, "r") as file:
        for part in groups_of(file):
            recorded = json.loads(part.attrs.get("checksums", "{}"))
            for name, want in recorded.items():
                digest = hashlib.sha256()
                for block in iter_blocks(part, name):
                    digest.update(np.ascontiguousarray(block).tobytes())
                if digest.hexdigest() != want:
                    raise CacheFileError(f"{shown}: {part.name}/{name} differs from its part's checksum (a part "
                                         "was damaged); nothing was written.")


def export_cache(uri: str, path: str | Path, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`kd-cache export`: the cache at `uri` (any URI form, local or remote) as one self-contained file at
    `path`. Every input is checked first: a version's files against its manifest (size, metadata, sha256), an
    exported file against its parts' checksums. Remote parts are downloaded next to the output first (so the
    disk there holds up to twice the cache until they are deleted). Refuses an OUT that is one of the cache's
    own files. Returns {num_samples, num_tokens, bytes (the version's), seconds}."""
    started = time.perf_counter()
    path = Path(path).absolute()
    with CacheReader(uri, storage_options) as reader:
        files, attrs, read_bytes = list(reader.files), dict(reader.attrs), reader.file_bytes
        manifest = reader.source.manifest
        own = [reader.source.index_uri, *files] + ([reader.source.join("manifest.json")] if manifest else [])
        if any(io.is_local(f) and os.path.realpath(io.local_path(f)) == os.path.realpath(path) for f in own):
            raise ConfigError(f"{path}: is one of the files of the cache being exported; choose another OUT.")
        if manifest is not None and (damage := reader.damage(deep=False)):
            raise CacheFileError(f"{damage[0].rstrip('.')}. Nothing was exported.")
    sums = {reader.source.join(p.name): p.sha256 for p in manifest.parts} if manifest is not None else {}
    attrs.pop("index", None), attrs.pop("parts", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".kd-export-") as scratch:
        local = []
        for k, file in enumerate(files):
            if io.is_local(file):
                local.append(io.local_path(file))
            else:
                local.append(Path(scratch) / f"part-{k:05d}.h5")
                io.fetch_file(file, local[-1], storage_options)
            if file in sums and io.sha256_of(str(local[-1])) != sums[file]:
                raise CacheFileError(f"{file}: its sha256 differs from the manifest's (the bytes were changed). "
                                     "Nothing was exported.")
        if manifest is None:  # an exported (or single) file: its parts' checksums, before anything is written
            check_groups(local[0], Path(files[0]))
        summary = export(local, path, attrs)
    return {**summary, "bytes": read_bytes, "seconds": time.perf_counter() - started}
