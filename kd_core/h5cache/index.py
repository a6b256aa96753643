"""The index of a version: one format-v1 cache to stock h5py whose row datasets are virtual datasets over the
version's part files (by relative path), with /offsets and /sample_index stored."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from kd_core.errors import CacheFileError
from kd_core.h5cache.format import (COMPRESSION, ENTRY_DATASETS, ENTRY_OFFSETS, FORMAT_VERSION, SAMPLE_CHUNK_ROWS,
                                    fill_value, read_attrs, row_datasets, temporary_path, write_attrs)
from kd_core.h5cache.verify import entry_problems


def index_entry(source, name: str, expect: dict[str, Any]) -> dict[str, Any]:
    """What the index needs of one part file (a path or a file object), checked cheaply: format, row counts,
    offsets, sample_index (whose checksum is compared with the record's). Reads only metadata and the per-sample
    arrays, never token data.

    `expect` holds the record's num_samples, num_tokens and checksums. Returns {name, offsets (S+1,),
    sample_index (S,), layout {dataset: (shape after the row axis, dtype)}, entry_offsets (S+1,) or None}
    (a sampled file's ENTRY_DATASETS are in layout too, with one row per entry); CacheFileError naming the problem.
    """
    try:
        with h5py.File(source, "r") as file:
            if read_attrs(file).get("format_version") != FORMAT_VERSION:
                raise CacheFileError(f"{name}: not a kd-cache v{FORMAT_VERSION} file.")
            offsets, sample_index = file["offsets"][:], file["sample_index"][:]
            entry_offsets = file[ENTRY_OFFSETS][:] if ENTRY_OFFSETS in file else None
            layout = row_datasets(file)
            rows = {key: file[key].shape[0] for key in layout}
            problems = entry_problems(file, len(sample_index), ENTRY_DATASETS) if entry_offsets is not None else []
    except (OSError, KeyError, ValueError) as e:
        raise CacheFileError(f"{name}: unreadable ({e}); it is truncated or corrupt.") from None
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        problems.append("offsets are not increasing from 0")
    if len(offsets) - 1 != expect["num_samples"] or len(sample_index) != expect["num_samples"]:
        problems.append(f"{len(sample_index)} samples, the record says {expect['num_samples']}")
    problems += [f"{key} has {n} rows, the record says {expect['num_tokens']}"
                 for key, n in rows.items() if key not in ENTRY_DATASETS and (n != expect["num_tokens"] or offsets[-1] != n)]
    if hashlib.sha256(sample_index.tobytes()).hexdigest() != expect["checksums"].get("sample_index"):
        problems.append("sample_index differs from the record's checksum")
    if problems:
        raise CacheFileError(f"{name}: " + "; ".join(problems) + ".")
    return {"name": name, "offsets": offsets, "sample_index": sample_index, "layout": layout,
            "entry_offsets": entry_offsets}


def write_index(path: str | Path, entries: list[dict[str, Any]], attrs: dict[str, Any]) -> dict[str, Any]:
    """The index of a version: one format-v1 cache to stock h5py, whose row datasets are virtual datasets over
    the part files (by their path relative to the index, resolved against its directory) and whose /offsets and
    /sample_index are stored. entries: index_entry() of each file, in sample order. Written atomically.
    """
    path = Path(path)
    tmp = temporary_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with h5py.File(tmp, "w") as f:
            summary = write_index_into(f, entries, attrs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return summary


def write_index_into(f: h5py.File, entries: list[dict[str, Any]], attrs: dict[str, Any]) -> dict[str, Any]:
    """Root datasets of `f` over the entries' files: a virtual dataset per row dataset, whose source k is
    dataset `entries[k]["group"] + name` of file `entries[k]["name"]` ("." for f itself); /offsets and
    /sample_index stored. Row datasets are whatever the parts hold (every dataset but the per-sample ones), so
    new ones need no change here."""
    layouts = {tuple((k, v[0], str(v[1])) for k, v in sorted(e["layout"].items())) for e in entries}
    if len(layouts) != 1:
        raise CacheFileError(f"the parts hold different datasets or shapes ({layouts}); they cannot form one cache.")
    counts, starts, offsets = concatenated_offsets([e["offsets"] for e in entries])
    sampled = entries[0]["entry_offsets"] is not None
    if sampled:  # entry datasets are concatenated like token datasets, over their own offsets
        entry_counts, entry_starts, entry_offsets = concatenated_offsets([e["entry_offsets"] for e in entries])
    sample_index = np.concatenate([e["sample_index"] for e in entries]).astype(np.int64)
    for name, (tail, dtype) in entries[0]["layout"].items():
        rows_of = (entry_starts, entry_counts) if name in ENTRY_DATASETS else (starts, counts)
        virtual = h5py.VirtualLayout(shape=(int(rows_of[0][-1]), *tail), dtype=dtype)
        for entry, start, count in zip(entries, *rows_of):
            if count:
                source = h5py.VirtualSource(entry["name"], entry.get("group", "") + name, shape=(count, *tail))
                virtual[start:start + count] = source
        f.create_virtual_dataset(name, virtual, fillvalue=fill_value(name, dtype))
    stored = [("offsets", offsets), ("sample_index", sample_index)]
    for name, array in stored + ([(ENTRY_OFFSETS, entry_offsets)] if sampled else []):
        f.create_dataset(name, data=array, chunks=(max(1, min(len(array), SAMPLE_CHUNK_ROWS)),), shuffle=True, **COMPRESSION)
    checksums = {"sample_index": hashlib.sha256(sample_index.tobytes()).hexdigest()}
    write_attrs(f, {**attrs, "format_version": FORMAT_VERSION, "index": attrs.get("index", "virtual"), "parts": len(entries),
                    "num_samples": len(sample_index), "num_tokens": int(starts[-1]),
                    "checksums": json.dumps(checksums, sort_keys=True)})
    return {"num_samples": len(sample_index), "num_tokens": int(starts[-1])}


def concatenated_offsets(parts: list[np.ndarray]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Per-file offsets (each from 0) -> rows per file, each file's first row in the whole, the whole's offsets."""
    counts = [int(o[-1]) for o in parts]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    offsets = np.concatenate([[0]] + [o[1:] + start for o, start in zip(parts, starts)]).astype(np.int64)
    return counts, starts, offsets
