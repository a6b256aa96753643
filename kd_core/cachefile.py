"""The cache file format, version 1: the one place that knows it (write, verify, merge, read).

One HDF5 file per cache, samples concatenated CSR-style (no padding stored):

    /input_ids      (T,)    uint32   the tokens, samples back to back
    /offsets        (S+1,)  int64    sample s is rows offsets[s]:offsets[s+1]
    /sample_index   (S,)    int64    the sample's row number in the source split
    /topk_indices   (T, k)  uint16 if vocab <= 65536 else uint32   teacher's top-k next-token ids, best first
    /topk_logprobs  (T, k)  float16  log p_teacher(id) at temperature 1
    /logsumexp      (T,)    float32  logsumexp of the raw logits (raw logit = logprob + logsumexp)

A sampled cache (cache.mode=sampled, N draws per row) has, instead of the two top-k datasets, a second level of
CSR over "entries" (one per distinct id drawn in a row):

    /sampled_lengths  (T,)    uint8 if N <= 255 else uint16   m_t: distinct ids drawn in row t
    /sampled_offsets  (S+1,)  int64    sample s's entries are sampled_offsets[s]:sampled_offsets[s+1]
    /sampled_id_gaps  (E,)    like topk_indices   row's ids ascending, each as its gap to the previous one
    /sampled_counts   (E,)    uint8 if N <= 255 else uint16   times drawn; a row's counts sum to N

Row t of a sample is the teacher's distribution for token t+1 given tokens 0..t. Root attributes record
provenance (see docs/FORMAT.md). Datasets are chunked with gzip (and shuffle, but for the top-k ids): lossless,
and readable by any stock HDF5 reader. Files are written under a temporary name and renamed only after their
structure checks out, so a file with the final name is always complete. A published version is part files of
this format plus an index (write_index): the same datasets as virtual datasets over the parts (docs/FORMAT.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from kd_core import io
from kd_core.errors import CacheFileError, ConfigError

FORMAT_VERSION = 1
TOKEN_DATASETS = ("input_ids", "topk_indices", "topk_logprobs", "logsumexp")  # one row per token (top-k mode)
SAMPLE_DATASETS = ("sample_index",)  # one row per sample (plus /offsets, S+1)
# Sampled mode: one row per distinct id drawn ("entry"), sliced per sample by /sampled_offsets (S+1).
ENTRY_DATASETS = ("sampled_id_gaps", "sampled_counts")
ENTRY_OFFSETS = "sampled_offsets"
# One row per sample (or S+1): every other dataset has one row per token, or per entry (ENTRY_DATASETS).
PER_SAMPLE_DATASETS = ("offsets", "sample_index", ENTRY_OFFSETS)
CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: big enough to compress well, small enough for cheap random access
COMPRESSION = {"compression": "gzip", "compression_opts": 1}  # deflate level 1: fast; higher levels gain little
# Shuffle helps every dataset but the top-k ids, whose bytes are all informative (measured: 5.0-5.5 B/token
# smaller without it at k=64 on the H100 benchmark, docs/PERFORMANCE.md).
UNSHUFFLED = {"topk_indices"}


# How readers return each dataset (others come as stored): ids as int64 for torch indexing, fp16 as float32.
READ_DTYPES = {"input_ids": np.int64, "topk_indices": np.int64, "topk_logprobs": np.float32}


def index_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def count_dtype(samples: int) -> np.dtype:
    return np.dtype(np.uint8 if samples <= 255 else np.uint16)


def row_layout(top_k: int, vocab_size: int, samples: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-token datasets: name -> (shape after the row axis, dtype). samples=N: a sampled cache's."""
    if samples is not None:
        return {
            "input_ids": ((), np.dtype(np.uint32)),
            "sampled_lengths": ((), count_dtype(samples)),
            "logsumexp": ((), np.dtype(np.float32)),
        }
    return {
        "input_ids": ((), np.dtype(np.uint32)),
        "topk_indices": ((top_k,), index_dtype(vocab_size)),
        "topk_logprobs": ((top_k,), np.dtype(np.float16)),
        "logsumexp": ((), np.dtype(np.float32)),
    }


def entry_layout(vocab_size: int, samples: int | None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-entry datasets of a sampled cache (none for a top-k cache)."""
    if samples is None:
        return {}
    return {"sampled_id_gaps": ((), index_dtype(vocab_size)), "sampled_counts": ((), count_dtype(samples))}


def pack_sampled(ids: np.ndarray, counts: np.ndarray, samples: int, vocab_size: int) -> dict[str, np.ndarray]:
    """One sample's (L, m) ids ascending + counts (count 0 = padding, at the end of a row) -> the stored arrays:
    sampled_lengths (L,), sampled_id_gaps (E,), sampled_counts (E,).

    An id is stored as its gap to the previous id of its row (the first as itself): the gaps between sorted ids
    are small numbers whose high bytes shuffle + gzip remove (15% fewer bytes than the ids on the demo teacher).
    """
    real = counts > 0  # (L, m)
    gaps = np.diff(ids.astype(np.int64), axis=1, prepend=0)  # (L, m)
    return {
        "sampled_lengths": real.sum(-1).astype(count_dtype(samples)),
        "sampled_id_gaps": gaps[real].astype(index_dtype(vocab_size)),
        "sampled_counts": counts[real].astype(count_dtype(samples)),
    }


def unpack_sampled(lengths: np.ndarray, gaps: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pack_sampled's inverse: (L,), (E,), (E,) -> ids (L, m) int64 and counts (L, m) int64, m the longest row."""
    lengths = lengths.astype(np.int64)
    row_of = np.repeat(np.arange(len(lengths)), lengths)  # (E,) the row of each entry
    starts = np.cumsum(lengths) - lengths  # (L,) each row's first entry
    running = np.cumsum(gaps.astype(np.int64))  # (E,)
    before = np.concatenate([[0], running])[starts]  # (L,) running sum up to the row's start
    column = np.arange(len(gaps)) - starts[row_of]  # (E,)
    width = int(lengths.max()) if len(lengths) else 0
    ids, out = np.zeros((len(lengths), width), np.int64), np.zeros((len(lengths), width), np.int64)
    ids[row_of, column] = running - before[row_of]
    out[row_of, column] = counts
    return ids, out


def row_bytes(layout: dict[str, tuple[tuple[int, ...], np.dtype]]) -> int:
    """Uncompressed bytes of one row of every dataset in `layout`."""
    return sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize for shape, dt in layout.values())


def row_datasets(file: h5py.File) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """A cache file's row datasets as it holds them: name -> (shape after the row axis, dtype). Every root
    dataset but the per-sample ones (an export keeps its parts' copies in a group, not at the root)."""
    return {name: (d.shape[1:], d.dtype) for name, d in file.items()
            if isinstance(d, h5py.Dataset) and name not in PER_SAMPLE_DATASETS}


def bytes_per_token(top_k: int, vocab_size: int, samples: int | None = None) -> int:
    """Uncompressed bytes one token costs in the file, at most (sampled: every draw a distinct id)."""
    entries = min(samples, vocab_size) if samples is not None else 0
    return row_bytes(row_layout(top_k, vocab_size, samples)) + entries * row_bytes(entry_layout(vocab_size, samples))


BYTES_PER_SAMPLE = 8 + 8  # one /offsets entry + one /sample_index entry (+ 8 for /sampled_offsets: sampled)
# Size accounting for output.max_object_bytes: HDF5's own metadata (superblock, object headers, B-tree nodes:
# ~25 KB measured per file) beside the attributes, and the chunk index's cost per chunk.
METADATA_BYTES = 32 * 1024
CHUNK_INDEX_BYTES = 64


def sampled_draws(attrs: dict[str, Any]) -> int | None:
    """N of a sampled cache from its root attributes; None for a top-k cache (files before sampled mode too)."""
    return int(attrs["samples"]) if attrs.get("mode") == "sampled" else None


def dataset_names(attrs: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(per-token, per-entry) dataset names a file with these root attributes holds."""
    samples = sampled_draws(attrs)
    return tuple(row_layout(0, 2, samples)), tuple(entry_layout(2, samples))


def temporary_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


def _deflate_bound(n: int) -> int:
    """zlib's worst case for n input bytes (compressBound), rounded up."""
    return n + n // 1000 + 64


def encode_chunk(chunk: np.ndarray, shuffle: bool, level: int = COMPRESSION["compression_opts"]) -> bytes:
    """What HDF5's shuffle + deflate filters would store for this chunk (run on a worker thread: zlib releases
    the GIL, so chunks compress on several cores at once)."""
    raw = chunk.reshape(-1).view(np.uint8)
    if shuffle:  # byte k of every element together: the high bytes of small ids and similar floats compress well
        raw = raw.reshape(-1, chunk.dtype.itemsize).T
    return zlib.compress(np.ascontiguousarray(raw).tobytes(), level)


class _Column:
    """One dataset filled chunk by chunk. Full chunks are hashed (in order, on one thread) and compressed (on the
    pool), then written with write_direct_chunk in order; at most `max_pending` chunks wait, so memory stays flat."""

    def __init__(self, dataset: h5py.Dataset, pool: ThreadPoolExecutor, hasher: ThreadPoolExecutor, shuffle: bool):
        self.dataset, self.pool, self.hasher, self.shuffle = dataset, pool, hasher, shuffle
        self.chunk_rows, self.tail = dataset.chunks[0], dataset.shape[1:]
        self.hash = hashlib.sha256()
        self.rows = 0  # rows appended so far
        self.stored = 0  # compressed bytes written to the file so far
        self.chunk_bytes = self.chunk_rows * max(1, int(np.prod(self.tail, dtype=np.int64))) * dataset.dtype.itemsize
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
        self._pending.append((self._chunks, self.pool.submit(encode_chunk, chunk, self.shuffle)))
        self._chunks += 1
        self._new_buffer()
        while len(self._pending) > self.max_pending or (self._pending and self._pending[0][1].done()):
            self._write_next()

    def _write_next(self) -> None:
        number, future = self._pending.popleft()
        start = number * self.chunk_rows
        if self.dataset.shape[0] < start + self.chunk_rows:
            self.dataset.resize((start + self.chunk_rows, *self.tail))
        data = future.result()
        self.stored += len(data)
        self.dataset.id.write_direct_chunk((start, *(0 for _ in self.tail)), data)

    def size_bound(self) -> int:
        """At most the bytes this dataset takes once closed: chunks written, plus a deflate bound for the chunks
        still compressing and for the buffer (whose zero padding compresses at least 100:1)."""
        fill_bytes = self.fill * self.chunk_bytes // self.chunk_rows  # an empty buffer counts: rows may come
        buffered = _deflate_bound(fill_bytes) + (self.chunk_bytes - fill_bytes) // 100
        return (self.stored + len(self._pending) * _deflate_bound(self.chunk_bytes) + buffered
                + CHUNK_INDEX_BYTES * (self._chunks + 1))

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

    def __init__(self, path: str | Path, *, top_k: int, vocab_size: int, attrs: dict[str, Any],
                 chunk_bytes: int | None = None, samples: int | None = None):
        """samples=N writes a sampled cache (N draws per row; top_k is then ignored)."""
        self.path = Path(path)
        self.tmp_path = temporary_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.top_k, self.vocab_size, self.samples = top_k, vocab_size, samples
        self.layout = row_layout(top_k, vocab_size, samples)
        self.entry_layout = entry_layout(vocab_size, samples)
        self.num_entries = 0
        self.num_samples = 0
        self.num_tokens = 0
        self._checksums: dict[str, str] | None = None
        self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="kd-gzip")
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kd-hash")

        self.file = h5py.File(self.tmp_path, "w")
        self.columns: dict[str, _Column] = {}
        for name, (tail, dtype) in {**self.layout, **self.entry_layout}.items():
            row_bytes = max(1, int(np.prod(tail, dtype=np.int64))) * dtype.itemsize
            chunk_rows = max(1024, (chunk_bytes or CHUNK_BYTES) // row_bytes)
            self._create(name, tail, dtype, chunk_rows)
        offsets = ("offsets", "sample_index") + ((ENTRY_OFFSETS,) if samples is not None else ())
        for name in offsets:
            self._create(name, (), np.dtype(np.int64), 1 << 16)
        self.columns["offsets"].append(np.zeros(1, dtype=np.int64))
        if samples is not None:
            self.columns[ENTRY_OFFSETS].append(np.zeros(1, dtype=np.int64))
            mode = {"mode": "sampled", "samples": samples}
        else:
            mode = {"mode": "topk", "top_k": top_k}
        attrs = {**attrs, "format_version": FORMAT_VERSION, **mode, "vocab_size": vocab_size}
        write_attrs(self.file, attrs)
        # Attributes written at close (counts, checksums) take < 1 KB; the ones above are counted at their size.
        self._metadata_bytes = METADATA_BYTES + len(json.dumps(attrs, default=str)) + 1024

    def size_bound(self) -> int:
        """At most the bytes the file would take if it were closed now."""
        return self._metadata_bytes + sum(column.size_bound() for column in self.columns.values())

    def sample_bound(self, num_tokens: int) -> int:
        """At most the bytes one more sample of num_tokens tokens adds to size_bound()."""
        raw = num_tokens * bytes_per_token(self.top_k, self.vocab_size, self.samples) + BYTES_PER_SAMPLE + 8
        return _deflate_bound(raw) + len(self.columns) * CHUNK_INDEX_BYTES

    def _create(self, name: str, tail: tuple[int, ...], dtype: np.dtype, chunk_rows: int) -> None:
        shuffle = name not in UNSHUFFLED
        dataset = self.file.create_dataset(
            name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype, chunks=(chunk_rows, *tail),
            compression=COMPRESSION["compression"], compression_opts=COMPRESSION["compression_opts"], shuffle=shuffle,
        )
        self.columns[name] = _Column(dataset, self._pool, self._hasher, shuffle)

    def append(self, sample_index: int, input_ids: np.ndarray, topk_indices: np.ndarray | None = None,
               topk_logprobs: np.ndarray | None = None, logsumexp: np.ndarray | None = None, *,
               sampled_ids: np.ndarray | None = None, sampled_counts: np.ndarray | None = None) -> None:
        """One sample's rows: input_ids (L,), logsumexp (L,), and topk_indices (L, k) + topk_logprobs (L, k) in a
        top-k cache, or sampled_ids (L, m) ascending + sampled_counts (L, m) (0 = padding) in a sampled one."""
        length = len(input_ids)
        arrays = {"input_ids": input_ids, "logsumexp": logsumexp}
        if self.samples is None:
            arrays |= {"topk_indices": topk_indices, "topk_logprobs": topk_logprobs}
        else:
            if sampled_counts is None or len(sampled_counts) != length or not np.all(sampled_counts.sum(-1) == self.samples):
                raise ValueError(f"sampled_counts: every row's counts must sum to {self.samples}")
            arrays |= pack_sampled(sampled_ids, sampled_counts, self.samples, self.vocab_size)
        for name, array in arrays.items():
            tail, dtype = self.layout[name] if name in self.layout else self.entry_layout[name]
            rows = length if name in self.layout else len(array)
            if array is None or array.shape != (rows, *tail):
                raise ValueError(f"{name}: expected shape {(rows, *tail)}, got {getattr(array, 'shape', None)}")
            self.columns[name].append(np.asarray(array, dtype=dtype))
        self.num_samples += 1
        self.num_tokens += length
        self.columns["sample_index"].append(np.array([sample_index], dtype=np.int64))
        self.columns["offsets"].append(np.array([self.num_tokens], dtype=np.int64))
        if self.samples is not None:
            self.num_entries += len(arrays["sampled_counts"])
            self.columns[ENTRY_OFFSETS].append(np.array([self.num_entries], dtype=np.int64))

    def append_rows(self, rows) -> None:
        """Append a kd_core.inference.SampleRows (or anything with the same attributes)."""
        if self.samples is None:
            self.append(rows.sample_index, rows.input_ids, rows.topk_indices, rows.topk_logprobs, rows.logsumexp)
        else:
            self.append(rows.sample_index, rows.input_ids, logsumexp=rows.logsumexp, sampled_ids=rows.sampled_ids,
                        sampled_counts=rows.sampled_counts)

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
        self._checksums = {name: self.columns[name].hash.hexdigest()
                           for name in (*self.layout, *self.entry_layout, *SAMPLE_DATASETS)}
        summary = {"num_samples": self.num_samples, "num_tokens": self.num_tokens, "checksums": self._checksums}
        write_attrs(self.file, {"num_samples": self.num_samples, "num_tokens": self.num_tokens,
                                "checksums": json.dumps(self._checksums, sort_keys=True)})
        self.file.close()
        # Shapes and offsets only: re-reading every byte here would stall the teacher. The data checksums are of
        # the arrays as encoded; the file's sha256 is taken before it is published (io.publish_file).
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
    try:
        file = h5py.File(path, "r")
    except OSError as e:
        raise CacheFileError(f"{path}: not a readable HDF5 file ({e}); it is truncated or corrupt.") from None
    with file:
        try:
            attrs = read_attrs(file)
            token_names, entry_names = dataset_names(attrs)
            per_sample = ("offsets", "sample_index") + ((ENTRY_OFFSETS,) if entry_names else ())
            missing = [n for n in (*token_names, *entry_names, *per_sample) if n not in file]
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
                problems += _entry_problems(file, num_samples, entry_names)
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


def _entry_problems(file: h5py.File, num_samples: int, entry_names: tuple[str, ...]) -> list[str]:
    """A sampled file's entry datasets against /sampled_offsets (metadata and the per-sample array only)."""
    entry_offsets = file[ENTRY_OFFSETS][:]
    problems = []
    if len(entry_offsets) != num_samples + 1 or entry_offsets[0] != 0 or np.any(np.diff(entry_offsets) < 0):
        problems.append(f"{ENTRY_OFFSETS} is not {num_samples + 1} offsets increasing from 0")
    problems += [f"{name} has {file[name].shape[0]} rows, {ENTRY_OFFSETS} says {entry_offsets[-1]}"
                 for name in entry_names if file[name].shape[0] != entry_offsets[-1]]
    return problems


class SplitWriter:
    """CacheWriters that roll over to a new file before one would pass `max_bytes`: a part of any size becomes
    files of at most max_bytes each. `path_of(i)` names file i; `on_close(path, summary)` runs as each file is
    closed (to publish it, so local disk holds few files at a time). `summaries` lists what on_close received.

    submit(finish, abort) runs finish() (close the full file, check it, call on_close) now or later, in file order
    (kd_core.io.Background runs it on its own thread while this one fills the next file); abort() drops the file
    if finish never runs. Default: now, in the caller.
    """

    def __init__(self, path_of, max_bytes: int, on_close, *, top_k: int, vocab_size: int, attrs: dict[str, Any],
                 samples: int | None = None, submit=None):
        self.path_of, self.max_bytes, self.on_close = path_of, max_bytes, on_close
        self.submit = submit or (lambda finish, abort: finish())
        # Chunks far smaller than a file: a file's last chunks are padded, and counted at their worst until closed.
        self.options = {"top_k": top_k, "vocab_size": vocab_size, "attrs": attrs, "samples": samples,
                        "chunk_bytes": min(CHUNK_BYTES, max_bytes // 64)}
        self.summaries: list[dict[str, Any]] = []
        self.opened = 0
        self.writer: CacheWriter | None = self._open()

    def _open(self) -> CacheWriter:
        index, self.opened = self.opened, self.opened + 1
        return CacheWriter(self.path_of(index), **{**self.options, "attrs": {**self.options["attrs"], "file": index}})

    def append_rows(self, rows) -> None:
        need = self.writer.sample_bound(len(rows.input_ids))
        if self.writer.size_bound() + need > self.max_bytes:
            if self.writer.num_samples == 0:
                raise ConfigError(
                    f"output.max_object_bytes: {self.max_bytes:,} bytes cannot hold one sample of "
                    f"{len(rows.input_ids):,} tokens (up to {self.writer.size_bound() + need:,} bytes in a file). "
                    f"Fix: output.max_object_bytes={2 * (self.writer.size_bound() + need)} or more."
                )
            self._hand_off()
            self.writer = self._open()
        self.writer.append_rows(rows)

    def _hand_off(self) -> None:
        """The full file goes to submit; from here on only its finish or abort touches it."""
        writer, self.writer = self.writer, None
        self.submit(lambda: self._finish(writer), writer.abort)

    def _finish(self, writer: CacheWriter) -> None:
        path = writer.path
        try:
            summary = writer.close()
        except BaseException:  # e.g. a full disk while flushing: no .partial left behind
            writer.abort()
            raise
        size = path.stat().st_size
        if size > self.max_bytes:  # the bound above is meant to make this impossible
            raise AssertionError(f"{path} is {size:,} bytes, over output.max_object_bytes={self.max_bytes:,}")
        self.summaries.append({**summary, "path": path})
        self.on_close(path, summary)

    def close(self) -> list[dict[str, Any]]:
        """Hand the last file to submit; the summaries (complete once every submitted finish has run)."""
        self._hand_off()
        return self.summaries

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


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
            problems = _entry_problems(file, len(sample_index), ENTRY_DATASETS) if entry_offsets is not None else []
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
            summary = _write_index_into(f, entries, attrs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return summary


def _write_index_into(f: h5py.File, entries: list[dict[str, Any]], attrs: dict[str, Any]) -> dict[str, Any]:
    """Root datasets of `f` over the entries' files: a virtual dataset per row dataset, whose source k is
    dataset `entries[k]["group"] + name` of file `entries[k]["name"]` ("." for f itself); /offsets and
    /sample_index stored. Row datasets are whatever the parts hold (every dataset but the per-sample ones), so
    new ones need no change here."""
    layouts = {tuple((k, v[0], str(v[1])) for k, v in sorted(e["layout"].items())) for e in entries}
    if len(layouts) != 1:
        raise CacheFileError(f"the parts hold different datasets or shapes ({layouts}); they cannot form one cache.")
    counts, starts, offsets = _concatenated_offsets([e["offsets"] for e in entries])
    sampled = entries[0]["entry_offsets"] is not None
    if sampled:  # entry datasets are concatenated like token datasets, over their own offsets
        entry_counts, entry_starts, entry_offsets = _concatenated_offsets([e["entry_offsets"] for e in entries])
    sample_index = np.concatenate([e["sample_index"] for e in entries]).astype(np.int64)
    for name, (tail, dtype) in entries[0]["layout"].items():
        rows_of = (entry_starts, entry_counts) if name in ENTRY_DATASETS else (starts, counts)
        virtual = h5py.VirtualLayout(shape=(int(rows_of[0][-1]), *tail), dtype=dtype)
        for entry, start, count in zip(entries, *rows_of):
            if count:
                source = h5py.VirtualSource(entry["name"], entry.get("group", "") + name, shape=(count, *tail))
                virtual[start:start + count] = source
        f.create_virtual_dataset(name, virtual, fillvalue=0)
    stored = [("offsets", offsets), ("sample_index", sample_index)]
    for name, array in stored + ([(ENTRY_OFFSETS, entry_offsets)] if sampled else []):
        f.create_dataset(name, data=array, chunks=(max(1, min(len(array), 1 << 16)),), shuffle=True, **COMPRESSION)
    checksums = {"sample_index": hashlib.sha256(sample_index.tobytes()).hexdigest()}
    write_attrs(f, {**attrs, "format_version": FORMAT_VERSION, "index": "virtual", "parts": len(entries),
                    "num_samples": len(sample_index), "num_tokens": int(starts[-1]),
                    "checksums": json.dumps(checksums, sort_keys=True)})
    return {"num_samples": len(sample_index), "num_tokens": int(starts[-1])}


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
            summary = _write_index_into(out, entries, {**attrs, "index": "exported"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return summary


def export_cache(uri: str, path: str | Path, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """`kd-cache export`: the cache at `uri` (any URI form, local or remote) as one self-contained file at
    `path`. Remote parts are downloaded next to the output first (so the disk there holds up to twice the
    cache until they are deleted). Returns {num_samples, num_tokens, bytes (the version's), seconds}."""
    import tempfile
    import time

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
        sample["sampled_ids"], sample["sampled_counts"] = unpack_sampled(sample.pop("sampled_lengths"), gaps, counts)
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


def _concatenated_offsets(parts: list[np.ndarray]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Per-file offsets (each from 0) -> rows per file, each file's first row in the whole, the whole's offsets."""
    counts = [int(o[-1]) for o in parts]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    offsets = np.concatenate([[0]] + [o[1:] + start for o, start in zip(parts, starts)]).astype(np.int64)
    return counts, starts, offsets


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

    `reader[i]` returns numpy arrays input_ids (L,) int64, logsumexp (L,) float32, sample_index, and either
    topk_indices (L, k) int64 and topk_logprobs (L, k) float32 (a top-k cache) or sampled_ids (L, m) int64 and
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
        from kd_core import versions  # here, not at the top: versions -> records -> data -> config -> this module

        self.uri, self.storage_options = str(uri), storage_options
        self.source = versions.resolve(self.uri, storage_options)
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
