"""Checking a cache file against its own structure, its recorded checksums and a writer's record."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from kd_core.errors import CacheFileError
from kd_core.h5cache.format import (ENTRY_OFFSETS, FORMAT_VERSION, SAMPLE_DATASETS, dataset_names, per_sample_datasets,
                                    read_attrs, sampled_draws)


def iter_blocks(file: h5py.File, name: str, block_rows: int = 1 << 18) -> Iterator[np.ndarray]:
    dataset = file[name]
    for start in range(0, dataset.shape[0], block_rows):
        yield dataset[start:start + block_rows]


def verify_file(path: str | Path, expect: dict[str, Any] | None = None, checksums: bool = True) -> dict[str, Any]:
    """Check structure, counts and (unless checksums=False) checksums of a cache file; raise CacheFileError
    naming what is wrong.

    `expect` may hold num_samples, num_tokens and checksums recorded by the writer (e.g. a shard's completion
    record). Returns {num_samples, num_tokens, checksums} (checksums empty when not computed).
    """
    try:
        file = h5py.File(path, "r")
    except OSError as e:
        raise CacheFileError(f"{path}: not a readable HDF5 file ({e}); it is truncated or corrupt.") from None
    with file:
        try:
            attrs = read_attrs(file)
            token_names, entry_names = dataset_names(attrs)
            missing = [n for n in (*token_names, *entry_names, *per_sample_datasets(sampled_draws(attrs)))
                       if n not in file]
            if missing or attrs.get("format_version") != FORMAT_VERSION:
                raise CacheFileError(f"{path}: not a kd-cache v{FORMAT_VERSION} file (missing {missing or 'format_version'}).")
            offsets = file["offsets"][:]
            num_samples, num_tokens = len(offsets) - 1, int(offsets[-1])
            problems = []
            if np.any(np.diff(offsets) < 0) or offsets[0] != 0:
                problems.append("offsets are not increasing from 0")
            if file["sample_index"].shape[0] != num_samples:
                problems.append("sample_index length differs from the number of samples")
            for name in token_names:
                if file[name].shape[0] != num_tokens:
                    problems.append(f"{name} has {file[name].shape[0]} rows, offsets say {num_tokens}")
            if entry_names:
                problems += entry_problems(file, num_samples, entry_names)
            computed = {}
            for name in (*token_names, *entry_names, *SAMPLE_DATASETS) if checksums else ():
                digest = hashlib.sha256()
                for block in iter_blocks(file, name):
                    digest.update(np.ascontiguousarray(block).tobytes())
                computed[name] = digest.hexdigest()
        except CacheFileError:
            raise
        except (OSError, KeyError, ValueError) as e:  # a damaged chunk fails to decompress on read
            raise CacheFileError(f"{path}: unreadable data ({e}); it is truncated or corrupt.") from None
    expect = expect or {}
    if checksums:
        recorded = json.loads(attrs.get("checksums", "{}"))
        for source, values in (("the file's attributes", recorded), ("the completion record", expect.get("checksums", {}))):
            bad = [n for n, v in values.items() if computed.get(n) != v]
            if bad:
                problems.append(f"checksums of {', '.join(bad)} differ from {source}")
    found = {"num_samples": num_samples, "num_tokens": num_tokens}
    problems += [f"{key} is {found[key]}, expected {expect[key]}" for key in found if key in expect and expect[key] != found[key]]
    if problems:
        raise CacheFileError(f"{path}: " + "; ".join(problems) + ".")
    return {**found, "checksums": computed}


def entry_problems(file: h5py.File, num_samples: int, entry_names: tuple[str, ...]) -> list[str]:
    """A sampled file's entry datasets against /sampled_offsets (metadata and the per-sample array only)."""
    entry_offsets = file[ENTRY_OFFSETS][:]
    problems = []
    if len(entry_offsets) != num_samples + 1 or entry_offsets[0] != 0 or np.any(np.diff(entry_offsets) < 0):
        problems.append(f"{ENTRY_OFFSETS} is not {num_samples + 1} offsets increasing from 0")
    problems += [f"{name} has {file[name].shape[0]} rows, {ENTRY_OFFSETS} says {entry_offsets[-1]}"
                 for name in entry_names if file[name].shape[0] != entry_offsets[-1]]
    return problems

