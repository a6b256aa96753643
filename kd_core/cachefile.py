"""The cache file format, version 1: the one place that knows it (write, verify, merge, read).

One HDF5 file per cache, samples concatenated CSR-style (no padding stored):

    /input_ids      (T,)    uint32   the tokens, samples back to back
    /offsets        (S+1,)  int64    sample s is rows offsets[s]:offsets[s+1]
    /sample_index   (S,)    int64    the sample's row number in the source split
    /topk_indices   (T, k)  uint16 if vocab <= 65536 else uint32   teacher's top-k next-token ids, best first
    /topk_logprobs  (T, k)  float16  log p_teacher(id) at temperature 1
    /logsumexp      (T,)    float32  logsumexp of the raw logits (raw logit = logprob + logsumexp)

Row t of a sample is the teacher's distribution for token t+1 given tokens 0..t. Root attributes record
provenance (see docs/FORMAT.md). Datasets are chunked with gzip (and shuffle, but for the top-k ids): lossless,
and readable by any stock HDF5 reader. Files are written under a temporary name and renamed only after their
structure checks out, so a file with the final name is always complete; checksums are verified where files are
consumed (merge).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

FORMAT_VERSION = 1
TOKEN_DATASETS = ("input_ids", "topk_indices", "topk_logprobs", "logsumexp")  # one row per token
SAMPLE_DATASETS = ("sample_index",)  # one row per sample (plus /offsets, S+1)
CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: big enough to compress well, small enough for cheap random access
COMPRESSION = {"compression": "gzip", "compression_opts": 1}  # deflate level 1: fast; higher levels gain little
# Shuffle helps every dataset but the top-k ids, whose bytes are all informative (measured: 5.0-5.5 B/token
# smaller without it at k=64 on the H100 benchmark, docs/PERFORMANCE.md).
UNSHUFFLED = {"topk_indices"}


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


def _encode_chunk(chunk: np.ndarray, shuffle: bool) -> bytes:
    """What HDF5's shuffle + deflate filters would store for this chunk (run on a worker thread: zlib releases
    the GIL, so chunks compress on several cores at once)."""
    raw = chunk.reshape(-1).view(np.uint8)
    if shuffle:  # byte k of every element together: the high bytes of small ids and similar floats compress well
        raw = raw.reshape(-1, chunk.dtype.itemsize).T
    return zlib.compress(np.ascontiguousarray(raw).tobytes(), COMPRESSION["compression_opts"])


class _Column:
    """One dataset filled chunk by chunk. Full chunks are hashed (in order, on one thread) and compressed (on the
    pool), then written with write_direct_chunk in order; at most `max_pending` chunks wait, so memory stays flat."""

    def __init__(self, dataset: h5py.Dataset, pool: ThreadPoolExecutor, hasher: ThreadPoolExecutor, shuffle: bool):
        self.dataset, self.pool, self.hasher, self.shuffle = dataset, pool, hasher, shuffle
        self.chunk_rows, self.tail = dataset.chunks[0], dataset.shape[1:]
        self.hash = hashlib.sha256()
        self.rows = 0  # rows appended so far
        self.max_pending = 2 * pool._max_workers
        self._pending: deque = deque()  # (chunk number, future of its compressed bytes)
        self._chunks = 0
        self._new_buffer()

    def _new_buffer(self) -> None:
        self.buffer = np.zeros((self.chunk_rows, *self.tail), dtype=self.dataset.dtype)
        self.fill = 0

    def append(self, data: np.ndarray) -> None:
        while len(data):
            take = min(self.chunk_rows - self.fill, len(data))
            self.buffer[self.fill:self.fill + take] = data[:take]
            self.fill += take
            self.rows += take
            data = data[take:]
            if self.fill == self.chunk_rows:
                self._submit()

    def _submit(self) -> None:
        chunk = self.buffer
        self.hasher.submit(self.hash.update, chunk[:self.fill])  # one hashing thread: updates stay in order
        self._pending.append((self._chunks, self.pool.submit(_encode_chunk, chunk, self.shuffle)))
        self._chunks += 1
        self._new_buffer()
        while len(self._pending) > self.max_pending or (self._pending and self._pending[0][1].done()):
            self._write_next()

    def _write_next(self) -> None:
        number, future = self._pending.popleft()
        start = number * self.chunk_rows
        if self.dataset.shape[0] < start + self.chunk_rows:
            self.dataset.resize((start + self.chunk_rows, *self.tail))
        self.dataset.id.write_direct_chunk((start, *(0 for _ in self.tail)), future.result())

    def close(self) -> None:
        """Write the last, partial chunk (zero-padded, as HDF5 stores edge chunks) and trim to the rows appended."""
        if self.fill:
            self._submit()
        while self._pending:
            self._write_next()
        self.dataset.resize((self.rows, *self.tail))


class CacheWriter:
    """Append samples as they arrive; memory is a few chunks per dataset, never the number of samples.

    Writes to `<path>.partial`; `close()` checks the file's structure and renames it to `path`. On an exception
    inside a `with` block the partial file is removed, so nothing with the final name is ever incomplete.
    Compression runs on a thread pool, hashing on a thread of its own: the caller only copies rows into buffers.
    """

    def __init__(self, path: str | Path, *, top_k: int, vocab_size: int, attrs: dict[str, Any]):
        self.path = Path(path)
        self.tmp_path = temporary_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.top_k, self.vocab_size = top_k, vocab_size
        self.layout = row_layout(top_k, vocab_size)
        self.num_samples = 0
        self.num_tokens = 0
        self._checksums: dict[str, str] | None = None
        self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="kd-gzip")
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kd-hash")

        self.file = h5py.File(self.tmp_path, "w")
        self.columns: dict[str, _Column] = {}
        for name, (tail, dtype) in self.layout.items():
            row_bytes = max(1, int(np.prod(tail, dtype=np.int64))) * dtype.itemsize
            chunk_rows = max(1024, CHUNK_BYTES // row_bytes)
            self._create(name, tail, dtype, chunk_rows)
        for name in ("offsets", "sample_index"):
            self._create(name, (), np.dtype(np.int64), 1 << 16)
        self.columns["offsets"].append(np.zeros(1, dtype=np.int64))
        write_attrs(self.file, {**attrs, "format_version": FORMAT_VERSION, "top_k": top_k, "vocab_size": vocab_size})

    def _create(self, name: str, tail: tuple[int, ...], dtype: np.dtype, chunk_rows: int) -> None:
        shuffle = name not in UNSHUFFLED
        dataset = self.file.create_dataset(
            name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype, chunks=(chunk_rows, *tail),
            compression=COMPRESSION["compression"], compression_opts=COMPRESSION["compression_opts"], shuffle=shuffle,
        )
        self.columns[name] = _Column(dataset, self._pool, self._hasher, shuffle)

    def append(self, sample_index: int, input_ids: np.ndarray, topk_indices: np.ndarray,
               topk_logprobs: np.ndarray, logsumexp: np.ndarray) -> None:
        """One sample's rows: input_ids (L,), topk_indices (L, k), topk_logprobs (L, k), logsumexp (L,)."""
        length = len(input_ids)
        arrays = {"input_ids": input_ids, "topk_indices": topk_indices, "topk_logprobs": topk_logprobs, "logsumexp": logsumexp}
        for name, array in arrays.items():
            tail, dtype = self.layout[name]
            if array.shape != (length, *tail):
                raise ValueError(f"{name}: expected shape {(length, *tail)}, got {array.shape}")
            self.columns[name].append(np.asarray(array, dtype=dtype))
        self.num_samples += 1
        self.num_tokens += length
        self.columns["sample_index"].append(np.array([sample_index], dtype=np.int64))
        self.columns["offsets"].append(np.array([self.num_tokens], dtype=np.int64))

    def append_rows(self, rows) -> None:
        """Append a kd_core.inference.SampleRows (or anything with the same attributes)."""
        self.append(rows.sample_index, rows.input_ids, rows.topk_indices, rows.topk_logprobs, rows.logsumexp)

    def checksums(self) -> dict[str, str]:
        """sha256 of each dataset's raw bytes as appended; known once the writer is closed."""
        if self._checksums is None:
            raise RuntimeError("checksums are known after close()")
        return self._checksums

    def close(self) -> dict[str, Any]:
        """Write what is buffered, record counts and checksums, check the structure, publish under the final name."""
        for column in self.columns.values():
            column.close()
        self._pool.shutdown()
        self._hasher.shutdown()  # waits for the last hash updates
        self._checksums = {name: self.columns[name].hash.hexdigest() for name in (*TOKEN_DATASETS, *SAMPLE_DATASETS)}
        summary = {"num_samples": self.num_samples, "num_tokens": self.num_tokens, "checksums": self._checksums}
        write_attrs(self.file, {"num_samples": self.num_samples, "num_tokens": self.num_tokens,
                                "checksums": json.dumps(self._checksums, sort_keys=True)})
        self.file.close()
        # Shapes and offsets only: re-reading every byte here would stall the teacher. Checksums are checked
        # where files are consumed (merge verifies every part, and the merged cache before it is published).
        verify_file(self.tmp_path, expect=summary, checksums=False)
        os.replace(self.tmp_path, self.path)
        return summary

    def abort(self) -> None:
        """Drop everything written so far."""
        self._pool.shutdown(cancel_futures=True)
        self._hasher.shutdown(cancel_futures=True)
        try:
            self.file.close()
        except Exception:  # noqa: BLE001 - the file is being dropped; the error that got us here is what counts
            pass
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:  # e.g. a full disk while flushing: no .partial left behind
            self.abort()
            raise


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


def verify_file(path: str | Path, expect: dict[str, Any] | None = None, checksums: bool = True) -> dict[str, Any]:
    """Check structure, counts and (unless checksums=False) checksums of a cache file; raise CacheFileError
    naming what is wrong.

    `expect` may hold num_samples, num_tokens and checksums recorded by the writer (e.g. a shard's completion
    record). Returns {num_samples, num_tokens, checksums} (checksums empty when not computed).
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
            computed = {}
            for name in (*TOKEN_DATASETS, *SAMPLE_DATASETS) if checksums else ():
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
