"""The cache file format, version 1: the one place that knows it (write, verify, merge, read).

One HDF5 file per cache, samples concatenated CSR-style (no padding stored):

    /input_ids      (T,)    uint32   the tokens, samples back to back
    /offsets        (S+1,)  int64    sample s is rows offsets[s]:offsets[s+1]
    /sample_index   (S,)    int64    the sample's row number in the source split
    /topk_indices   (T, k)  uint16 if vocab <= 65536 else uint32   teacher's top-k next-token ids, best first
    /topk_logprobs  (T, k)  float16  log p_teacher(id) at temperature 1
    /logsumexp      (T,)    float32  logsumexp of the raw logits (raw logit = logprob + logsumexp)

Row t of a sample is the teacher's distribution for token t+1 given tokens 0..t. Root attributes record
provenance (see docs/FORMAT.md). Datasets are chunked with shuffle + gzip: lossless, and readable by any stock
HDF5 reader. Files are written under a temporary name and renamed only after they verify, so a file with the
final name is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

FORMAT_VERSION = 1
TOKEN_DATASETS = ("input_ids", "topk_indices", "topk_logprobs", "logsumexp")  # one row per token
SAMPLE_DATASETS = ("sample_index",)  # one row per sample (plus /offsets, S+1)
CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: big enough to compress well, small enough for cheap random access
COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}


def index_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def row_layout(top_k: int, vocab_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-token datasets: name -> (shape after the row axis, dtype)."""
    return {
        "input_ids": ((), np.dtype(np.uint32)),
        "topk_indices": ((top_k,), index_dtype(vocab_size)),
        "topk_logprobs": ((top_k,), np.dtype(np.float16)),
        "logsumexp": ((), np.dtype(np.float32)),
    }


def bytes_per_token(top_k: int, vocab_size: int) -> int:
    """Uncompressed bytes one token costs in the file."""
    return sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize for shape, dt in row_layout(top_k, vocab_size).values())


BYTES_PER_SAMPLE = 8 + 8  # one /offsets entry + one /sample_index entry


def temporary_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


class CacheWriter:
    """Append samples as they arrive; memory is bounded by `flush_tokens`, never by the number of samples.

    Writes to `<path>.partial`; `close()` verifies the file and renames it to `path`. On an exception inside a
    `with` block the partial file is removed, so nothing with the final name is ever incomplete.
    """

    def __init__(self, path: str | Path, *, top_k: int, vocab_size: int, attrs: dict[str, Any], flush_tokens: int = 1 << 16):
        self.path = Path(path)
        self.tmp_path = temporary_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.top_k, self.vocab_size = top_k, vocab_size
        self.layout = row_layout(top_k, vocab_size)
        self.flush_tokens = flush_tokens
        self.num_samples = 0
        self.num_tokens = 0
        self._hashes = {name: hashlib.sha256() for name in (*TOKEN_DATASETS, *SAMPLE_DATASETS)}
        self._pending: dict[str, list[np.ndarray]] = {name: [] for name in (*TOKEN_DATASETS, *SAMPLE_DATASETS)}
        self._pending_offsets: list[int] = []
        self._pending_tokens = 0

        self.file = h5py.File(self.tmp_path, "w")
        for name, (tail, dtype) in self.layout.items():
            row_bytes = max(1, int(np.prod(tail, dtype=np.int64))) * dtype.itemsize
            chunk_rows = max(1024, CHUNK_BYTES // row_bytes)
            self.file.create_dataset(
                name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype, chunks=(chunk_rows, *tail), **COMPRESSION
            )
        for name in ("offsets", "sample_index"):
            self.file.create_dataset(name, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1 << 16,), **COMPRESSION)
        self.file["offsets"].resize((1,))
        self.file["offsets"][0] = 0
        write_attrs(self.file, {**attrs, "format_version": FORMAT_VERSION, "top_k": top_k, "vocab_size": vocab_size})

    def append(self, sample_index: int, input_ids: np.ndarray, topk_indices: np.ndarray,
               topk_logprobs: np.ndarray, logsumexp: np.ndarray) -> None:
        """One sample's rows: input_ids (L,), topk_indices (L, k), topk_logprobs (L, k), logsumexp (L,)."""
        length = len(input_ids)
        arrays = {"input_ids": input_ids, "topk_indices": topk_indices, "topk_logprobs": topk_logprobs, "logsumexp": logsumexp}
        for name, array in arrays.items():
            tail, dtype = self.layout[name]
            if array.shape != (length, *tail):
                raise ValueError(f"{name}: expected shape {(length, *tail)}, got {array.shape}")
            self._pending[name].append(np.ascontiguousarray(array, dtype=dtype))
        self._pending["sample_index"].append(np.array([sample_index], dtype=np.int64))
        self.num_samples += 1
        self.num_tokens += length
        self._pending_offsets.append(self.num_tokens)
        self._pending_tokens += length
        if self._pending_tokens >= self.flush_tokens:
            self.flush()

    def append_rows(self, rows) -> None:
        """Append a kd_core.inference.SampleRows (or anything with the same attributes)."""
        self.append(rows.sample_index, rows.input_ids, rows.topk_indices, rows.topk_logprobs, rows.logsumexp)

    def flush(self) -> None:
        for name, parts in self._pending.items():
            if parts:
                data = np.concatenate(parts)
                self._hashes[name].update(data.tobytes())
                _append(self.file[name], data)
                parts.clear()
        if self._pending_offsets:
            _append(self.file["offsets"], np.asarray(self._pending_offsets, dtype=np.int64))
            self._pending_offsets.clear()
        self._pending_tokens = 0

    def checksums(self) -> dict[str, str]:
        return {name: h.hexdigest() for name, h in self._hashes.items()}

    def close(self) -> dict[str, Any]:
        """Flush, record counts and checksums, verify, and publish under the final name. Returns the summary."""
        self.flush()
        summary = {"num_samples": self.num_samples, "num_tokens": self.num_tokens, "checksums": self.checksums()}
        write_attrs(self.file, {"num_samples": self.num_samples, "num_tokens": self.num_tokens,
                                "checksums": json.dumps(summary["checksums"], sort_keys=True)})
        self.file.close()
        verify_file(self.tmp_path, expect=summary)
        os.replace(self.tmp_path, self.path)
        return summary

    def abort(self) -> None:
        """Drop everything written so far."""
        try:
            self.file.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _append(dataset: h5py.Dataset, data: np.ndarray) -> None:
    start = dataset.shape[0]
    dataset.resize((start + len(data), *dataset.shape[1:]))
    dataset[start:] = data


def write_attrs(file: h5py.File, attrs: dict[str, Any]) -> None:
    """HDF5 attributes take no None and no nested objects: skip None, store dicts/lists as JSON."""
    for key, value in attrs.items():
        if value is None:
            continue
        file.attrs[key] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def read_attrs(file: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in file.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def iter_blocks(file: h5py.File, name: str, block_rows: int = 1 << 18) -> Iterator[np.ndarray]:
    dataset = file[name]
    for start in range(0, dataset.shape[0], block_rows):
        yield dataset[start:start + block_rows]


def verify_file(path: str | Path, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check structure, counts and checksums of a cache file; raise CacheFileError naming what is wrong.

    `expect` may hold num_samples, num_tokens and checksums recorded by the writer (e.g. a shard's completion
    record). Returns {num_samples, num_tokens, checksums}.
    """
    from kd_core.errors import CacheFileError

    try:
        file = h5py.File(path, "r")
    except OSError as e:
        raise CacheFileError(f"{path}: not a readable HDF5 file ({e}); it is truncated or corrupt.") from None
    with file:
        try:
            attrs = read_attrs(file)
            missing = [n for n in (*TOKEN_DATASETS, "offsets", "sample_index") if n not in file]
            if missing or attrs.get("format_version") != FORMAT_VERSION:
                raise CacheFileError(f"{path}: not a kd-cache v{FORMAT_VERSION} file (missing {missing or 'format_version'}).")
            offsets = file["offsets"][:]
            num_samples, num_tokens = len(offsets) - 1, int(offsets[-1])
            problems = []
            if np.any(np.diff(offsets) < 0) or offsets[0] != 0:
                problems.append("offsets are not increasing from 0")
            if file["sample_index"].shape[0] != num_samples:
                problems.append("sample_index length differs from the number of samples")
            for name in TOKEN_DATASETS:
                if file[name].shape[0] != num_tokens:
                    problems.append(f"{name} has {file[name].shape[0]} rows, offsets say {num_tokens}")
            checksums = {}
            for name in (*TOKEN_DATASETS, *SAMPLE_DATASETS):
                digest = hashlib.sha256()
                for block in iter_blocks(file, name):
                    digest.update(np.ascontiguousarray(block).tobytes())
                checksums[name] = digest.hexdigest()
        except CacheFileError:
            raise
        except (OSError, KeyError, ValueError) as e:  # a damaged chunk fails to decompress on read
            raise CacheFileError(f"{path}: unreadable data ({e}); it is truncated or corrupt.") from None
    recorded = json.loads(attrs.get("checksums", "{}"))
    for source, values in (("the file's attributes", recorded), ("the completion record", (expect or {}).get("checksums", {}))):
        bad = [n for n, v in values.items() if checksums.get(n) != v]
        if bad:
            problems.append(f"checksums of {', '.join(bad)} differ from {source}")
    for key in ("num_samples", "num_tokens"):
        if expect and key in expect and expect[key] != locals()[key]:
            problems.append(f"{key} is {locals()[key]}, expected {expect[key]}")
    if problems:
        raise CacheFileError(f"{path}: " + "; ".join(problems) + ".")
    return {"num_samples": num_samples, "num_tokens": num_tokens, "checksums": checksums}


def merge_files(parts: list[str | Path], path: str | Path, attrs: dict[str, Any], block_rows: int = 1 << 18) -> dict[str, Any]:
    """Concatenate verified cache files, in order, into one cache at `path` (written atomically)."""
    if not parts:
        raise ValueError("merge_files needs at least one part")
    with h5py.File(parts[0], "r") as first:
        top_k, vocab_size = int(first.attrs["top_k"]), int(first.attrs["vocab_size"])
    writer = CacheWriter(path, top_k=top_k, vocab_size=vocab_size, attrs=attrs)
    with writer:
        for part in parts:
            with h5py.File(part, "r") as src:
                offsets = src["offsets"][:]
                sample_index = src["sample_index"][:]
                # Copy whole samples in blocks of about block_rows tokens: memory stays bounded.
                s = 0
                while s < len(sample_index):
                    e = int(np.searchsorted(offsets, offsets[s] + block_rows, side="right")) - 1
                    e = max(e, s + 1)
                    lo, hi = int(offsets[s]), int(offsets[e])
                    block = {name: src[name][lo:hi] for name in TOKEN_DATASETS}
                    for i in range(s, e):
                        a, b = int(offsets[i]) - lo, int(offsets[i + 1]) - lo
                        writer.append(int(sample_index[i]), *(block[n][a:b] for n in TOKEN_DATASETS))
                    s = e
    return {"num_samples": writer.num_samples, "num_tokens": writer.num_tokens, "checksums": writer.checksums()}


@dataclass
class CacheInfo:
    path: str
    attrs: dict[str, Any]
    num_samples: int
    num_tokens: int
    top_k: int
    vocab_size: int
    file_bytes: int | None

    @property
    def bytes_per_token(self) -> float | None:
        return self.file_bytes / self.num_tokens if self.file_bytes and self.num_tokens else None


class CacheReader:
    """Random access to a cache by sample, from a local path or an fsspec URL (s3://...).

    `reader[i]` returns numpy arrays input_ids (L,) int64, topk_indices (L, k) int64, topk_logprobs (L, k)
    float32, logsumexp (L,) float32 and sample_index. /offsets is read once at open, so each sample costs one
    slice read per dataset.
    """

    def __init__(self, uri: str | Path, storage_options: dict[str, Any] | None = None):
        from kd_core import io

        self.uri = str(uri)
        self._fileobj, self.file_bytes = io.open_for_read(self.uri, storage_options)
        self.file = h5py.File(self._fileobj if self._fileobj is not None else io.local_path(self.uri), "r")
        self.attrs = read_attrs(self.file)
        if self.attrs.get("format_version") != FORMAT_VERSION:
            from kd_core.errors import CacheFileError

            raise CacheFileError(f"{uri}: format_version {self.attrs.get('format_version')!r}, this reader reads {FORMAT_VERSION}.")
        self.offsets = self.file["offsets"][:]
        self.top_k = int(self.attrs["top_k"])
        self.vocab_size = int(self.attrs["vocab_size"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def info(self) -> CacheInfo:
        return CacheInfo(self.uri, self.attrs, len(self), self.num_tokens, self.top_k, self.vocab_size, self.file_bytes)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a cache of {len(self)} samples")
        i %= len(self)
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return {
            "sample_index": int(self.file["sample_index"][i]),
            "input_ids": self.file["input_ids"][lo:hi].astype(np.int64),
            "topk_indices": self.file["topk_indices"][lo:hi].astype(np.int64),
            "topk_logprobs": self.file["topk_logprobs"][lo:hi].astype(np.float32),
            "logsumexp": self.file["logsumexp"][lo:hi],
        }

    def close(self) -> None:
        self.file.close()
        if self._fileobj is not None:
            self._fileobj.close()

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
