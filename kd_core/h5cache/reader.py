"""Reading caches: CacheReader (random access by sample over any URI form), and whole-file iteration."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from kd_core import io
from kd_core.errors import CacheFileError
from kd_core.h5cache.format import (ENTRY_DATASETS, ENTRY_OFFSETS, FORMAT_VERSION, PER_SAMPLE_DATASETS, read_attrs,
                                    row_datasets, sampled_draws, unpack_sampled)
from kd_core.h5cache.verify import verify_file


# How readers return each dataset (others come as stored): ids as int64 for torch indexing, fp16 as float32.
READ_DTYPES = {"input_ids": np.int64, "topk_indices": np.int64, "topk_logprobs": np.float32}


def read_sample(file: h5py.File, j: int) -> dict[str, Any]:
    """Sample j of one open cache file, as CacheReader returns it: O(1) slice reads."""
    lo, hi = (int(x) for x in file["offsets"][j:j + 2])
    sample = {"sample_index": int(file["sample_index"][j])}
    for name in row_datasets(file):
        if name not in ENTRY_DATASETS:
            sample[name] = _as_read(name, file[name][lo:hi])
    if ENTRY_OFFSETS in file:  # a sampled cache: its entries, back to (L, m)
        first, last = (int(x) for x in file[ENTRY_OFFSETS][j:j + 2])
        gaps, counts = (file[name][first:last] for name in ENTRY_DATASETS)
        samples = int(file.attrs["samples"])
        sample["sampled_ids"], sample["sampled_counts"] = unpack_sampled(gaps, counts, hi - lo, samples)
    return sample


def iter_samples(source, block_tokens: int = 1 << 16) -> Iterator[dict[str, Any]]:
    """Every sample of one cache file (a path or a file object), front to back, in its stored dtypes
    (as_read() converts one as CacheReader returns it). Whole samples are read in blocks of about block_tokens
    rows, so each chunk is decompressed once; each sample is copied out, so holding one never holds its block.
    A sampled-mode file is read sample by sample (read_sample), its chunks kept in HDF5's chunk cache."""
    with h5py.File(source, "r") as file:
        if ENTRY_OFFSETS in file:
            for j in range(file["sample_index"].shape[0]):
                yield read_sample(file, j)
            return
        offsets, sample_index = file["offsets"][:], file["sample_index"][:]
        names = list(row_datasets(file))
        s = 0
        while s < len(sample_index):
            e = max(s + 1, int(np.searchsorted(offsets, offsets[s] + block_tokens, side="right")) - 1)
            lo, hi = int(offsets[s]), int(offsets[e])
            block = {name: file[name][lo:hi] for name in names}
            for i in range(s, e):
                a, b = int(offsets[i]) - lo, int(offsets[i + 1]) - lo
                yield {"sample_index": int(sample_index[i]), **{n: block[n][a:b].copy() for n in names}}
            s = e


def as_read(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample in the dtypes readers return (READ_DTYPES), from the dtypes stored."""
    return {name: _as_read(name, value) if isinstance(value, np.ndarray) else value for name, value in sample.items()}


def _as_read(name: str, rows: np.ndarray) -> np.ndarray:
    return rows.astype(READ_DTYPES[name]) if name in READ_DTYPES else rows


@dataclass
class CacheInfo:
    path: str
    attrs: dict[str, Any]
    num_samples: int
    num_tokens: int
    top_k: int | None  # None for a sampled cache
    vocab_size: int
    file_bytes: int | None
    samples: int | None = None  # N draws per row of a sampled cache

    @property
    def mode(self) -> str:
        return "topk" if self.samples is None else "sampled"

    @property
    def bytes_per_token(self) -> float | None:
        return self.file_bytes / self.num_tokens if self.file_bytes and self.num_tokens else None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


class CacheReader:
    """Random access to a cache by sample: a published version (its output root, its directory or its cache.h5;
    local or any fsspec URL, always through its manifest) or a single format-v1 file.

    `reader[i]` returns numpy arrays input_ids (L,) int64, sample_index, and either topk_indices (L, k) int64,
    topk_logprobs (L, k) float32 and logsumexp (L,) float32 (a top-k cache) or sampled_ids (L, m) int64 and
    sampled_counts (L, m) int64 (a sampled cache: ids ascending, count 0 = padding, m = the sample's most
    distinct ids in a row); any other row dataset as stored. One sample costs O(1)
    reads: its part file is found by a bisect over the manifest's per-file sample counts (one entry per file),
    then offsets[j:j+2] and the rows are read from that file alone. Per-sample offsets are never loaded whole
    (at 10M samples that would be 80 MB in every DataLoader worker); the last MAX_OPEN files stay open.
    """

    # Files kept open: a local handle costs little (HDF5's chunk cache, 1 MiB per dataset read); a remote one
    # also holds up to io.READ_CACHE_BLOCKS blocks of io.READ_BLOCK_BYTES (16 MiB).
    MAX_OPEN = {"local": 16, "remote": 8}

    def __init__(self, uri: str | Path, storage_options: dict[str, Any] | None = None):
        from kd_core import store  # here, not at the top: store -> records -> data -> config -> this package

        self.uri, self.storage_options = str(uri), storage_options
        self.source = store.resolve(self.uri, storage_options)
        self._open_files: OrderedDict[int, tuple[h5py.File, Any]] = OrderedDict()  # file number -> _open()
        if self.source.manifest is not None:  # a version: its parts, and the index for the attributes
            manifest = self.source.manifest
            self.files = [self.source.join(part.name) for part in manifest.parts]
            counts = [part.num_samples for part in manifest.parts]
            self.num_tokens, self.file_bytes = manifest.num_tokens, manifest.file_bytes
            index = self._open(self.source.index_uri)
            self.attrs = read_attrs(index[0])
            self._close(index)
        else:  # one self-contained file
            self.files = [self.source.index_uri]
            file = self._file(0)
            self.attrs = read_attrs(file)
            counts = [file["offsets"].shape[0] - 1]
            self.num_tokens = int(file["offsets"][-1])
            self.file_bytes = self._size(self.source.index_uri)
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise CacheFileError(f"{uri}: format_version {self.attrs.get('format_version')!r}, this reader reads {FORMAT_VERSION}.")
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (files + 1,)
        self.samples = sampled_draws(self.attrs)
        self.top_k = int(self.attrs["top_k"]) if self.samples is None else None
        self.vocab_size = int(self.attrs["vocab_size"])

    def _size(self, uri: str) -> int:
        fs, path = io.filesystem(uri, self.storage_options)
        return fs.size(path)

    def _open(self, uri: str) -> tuple[h5py.File, Any]:
        """(h5py file, the fsspec file object under it or None for a local path)."""
        try:
            fileobj, _ = io.open_for_read(uri, self.storage_options)
        except FileNotFoundError:
            raise CacheFileError(f"{uri}: missing. The cache is incomplete: run the build again.") from None
        try:
            return h5py.File(fileobj if fileobj is not None else io.local_path(uri), "r"), fileobj
        except OSError as e:  # truncated, overwritten, not HDF5
            raise CacheFileError(f"{uri}: not a readable HDF5 file ({_first_line(e)}). It is damaged: run the build "
                                 "again (a damaged version is rebuilt), or `kd-cache inspect --deep` for details.") from None

    @staticmethod
    def _close(handle: tuple[h5py.File, Any]) -> None:
        handle[0].close()
        if handle[1] is not None:
            handle[1].close()

    def _file(self, f: int) -> h5py.File:
        """File f, opened once and kept among the MAX_OPEN most recently used."""
        if f not in self._open_files:
            self._open_files[f] = self._open(self.files[f])
            limit = self.MAX_OPEN["local" if io.is_local(self.files[f]) else "remote"]
            while len(self._open_files) > limit:
                self._close(self._open_files.popitem(last=False)[1])
        self._open_files.move_to_end(f)
        return self._open_files[f][0]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def info(self) -> CacheInfo:
        return CacheInfo(self.uri, self.attrs, len(self), self.num_tokens, self.top_k, self.vocab_size,
                         self.file_bytes, self.samples)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a cache of {len(self)} samples")
        i %= len(self)
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        file, j = self._file(f), i - int(self.starts[f])
        try:
            sample = read_sample(file, j)
        except (OSError, KeyError, ValueError) as e:  # a corrupt chunk (checksum/decompression), a missing dataset
            raise CacheFileError(f"{self.files[f]}: sample {i} cannot be read ({_first_line(e)}). The file is "
                                 "damaged: run the build again, or `kd-cache inspect --deep` for details.") from None
        return sample

    def damage(self, deep: bool = False) -> list[str]:
        """Every file of the cache against the manifest (a version): its size, and with `deep` its sha256 (every
        byte read); a single-file cache against its own checksums. One line per damaged file; empty if intact."""
        if self.source.manifest is None:
            if not deep:
                return []
            try:
                verify_file(io.local_path(self.files[0]) if io.is_local(self.files[0]) else self._fetch(0))
            except CacheFileError as e:
                return [f"{self.files[0]}: {e}"]
            return []
        problems = []
        for entry in self.source.manifest.files:
            uri = self.source.join(entry.name)
            try:
                size = self._size(uri)
            except FileNotFoundError:
                problems.append(f"{uri}: missing")
                continue
            if size != entry.bytes:
                problems.append(f"{uri}: {size:,} bytes, the manifest says {entry.bytes:,} (truncated or replaced)")
            elif deep and io.sha256_of(uri, self.storage_options) != entry.sha256:
                problems.append(f"{uri}: its sha256 differs from the manifest's (the bytes were changed)")
        return problems

    def _fetch(self, f: int):
        raise CacheFileError(f"{self.files[f]}: a remote single-file cache is checked by downloading it first "
                             "(kd-cache export), then inspect --deep on the local copy.")

    def read_all(self) -> dict[str, np.ndarray]:
        """Every dataset of the whole cache as stored, offsets included (small caches: tests, tools)."""
        arrays: dict[str, list[np.ndarray]] = {}
        rows = {"offsets": 0, ENTRY_OFFSETS: 0}  # rows of the files before this one, per offsets dataset
        for f in range(len(self.files)):
            file = self._file(f)
            for name in (*row_datasets(file), *(n for n in PER_SAMPLE_DATASETS if n in file)):
                data = file[name][:]
                if name in rows:
                    data = (data if f == 0 else data[1:]) + rows[name]
                arrays.setdefault(name, []).append(data)
            for name in rows.keys() & file.keys():
                rows[name] += int(file[name][-1])
        return {name: np.concatenate(parts) for name, parts in arrays.items()}

    def close(self) -> None:
        while self._open_files:
            self._close(self._open_files.popitem()[1])

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
