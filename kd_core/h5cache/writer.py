"""Writing cache files: CacheWriter (one file, appended sample by sample, compressed on a thread pool) and
SplitWriter (a part of any size as files of at most output.max_object_bytes each)."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import deflate
import h5py
import numpy as np

from kd_core.errors import ConfigError
from kd_core.h5cache.format import (CHUNK_BYTES, CHUNK_INDEX_BYTES, COMPRESSION, ENTRY_OFFSETS, FORMAT_VERSION,
                                    METADATA_BYTES, SAMPLE_CHUNK_ROWS, SAMPLE_DATASETS, SAMPLED_LAYOUT,
                                    SHUFFLE_SKIPPED, Codec, chunk_rows, codec, deflate_bound, entry_layout,
                                    pack_sampled, per_sample_datasets, row_layout, sample_bound, temporary_path,
                                    write_attrs)
from kd_core.h5cache.verify import verify_file


def encode_chunk(chunk: np.ndarray, coding: Codec) -> bytes:
    """What HDF5's shuffle + deflate filters would store for this chunk: a zlib stream, from libdeflate at
    coding.level, or from zlib where the codec needs zlib's run-length strategy (both run on a worker thread and
    release the GIL, so chunks compress on several cores at once)."""
    raw = chunk.reshape(-1).view(np.uint8)
    if coding.shuffle:  # byte k of every element together: the high bytes of small ids and similar floats compress well
        raw = raw.reshape(-1, chunk.dtype.itemsize).T
    data = np.ascontiguousarray(raw).tobytes()
    if coding.strategy == zlib.Z_DEFAULT_STRATEGY:
        return deflate.zlib_compress(data, coding.level)
    stream = zlib.compressobj(coding.level, zlib.DEFLATED, zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, coding.strategy)
    return stream.compress(data) + stream.flush()


# `either` tries both codings on TRIALS chunks spread over a group of chunks; a group of fewer than TRIAL_CHUNKS
# (1 MiB chunks: a file without max_length) is not tried, which would double its cost, and is coded unshuffled.
TRIALS, TRIAL_CHUNKS = 4, 16


def encode_chunks(rows: np.ndarray, chunk_rows: int, coding: Codec) -> list[tuple[bytes, int]]:
    """(stored bytes, filter mask) of each chunk_rows rows of `rows` (a whole number of chunks): one pool task for a
    group. With coding.either, TRIALS chunks spread over the group are coded shuffled and not, and the group takes
    the way that stored them smaller (a pure function of the rows, so a rerun writes the same bytes)."""
    chunks = [rows[start:start + chunk_rows] for start in range(0, len(rows), chunk_rows)]
    if not coding.either:
        return [(encode_chunk(chunk, coding), 0) for chunk in chunks]
    plain = replace(coding, shuffle=False, either=False)
    if len(chunks) < TRIAL_CHUNKS:
        return [(encode_chunk(chunk, plain), SHUFFLE_SKIPPED) for chunk in chunks]
    shuffled = replace(coding, shuffle=True, either=False, level=coding.shuffled_level)
    trials = range(0, len(chunks), len(chunks) // TRIALS)[:TRIALS]
    tries = {mask: {t: encode_chunk(chunks[t], way) for t in trials}
             for mask, way in ((0, shuffled), (SHUFFLE_SKIPPED, plain))}
    mask = min(tries, key=lambda m: sum(map(len, tries[m].values())))
    chosen = plain if mask else shuffled
    return [(tries[mask][i] if i in tries[mask] else encode_chunk(chunk, chosen), mask) for i, chunk in enumerate(chunks)]


class _Column:
    """One dataset filled a group of chunks at a time, about group_bytes (the writer's chunk_bytes: sample-sized
    chunks are small, and a pool task, a hash update and a resize per chunk would cost more than compressing it).
    Full groups are hashed (in order, on one thread) and compressed (on the pool), then written with
    write_direct_chunk in order; at most `max_pending` groups wait, so memory stays flat."""

    def __init__(self, dataset: h5py.Dataset, pool: ThreadPoolExecutor, hasher: ThreadPoolExecutor, coding: Codec,
                 group_bytes: int):
        self.dataset, self.pool, self.hasher, self.coding = dataset, pool, hasher, coding
        self.chunk_rows, self.tail = dataset.chunks[0], dataset.shape[1:]
        self.hash = hashlib.sha256()
        self.rows = 0  # rows appended so far
        self.stored = 0  # compressed bytes written to the file so far
        self.chunk_bytes = self.chunk_rows * max(1, int(np.prod(self.tail, dtype=np.int64))) * dataset.dtype.itemsize
        self.group = max(1, group_bytes // self.chunk_bytes)  # chunks per buffer
        self.max_pending = 2 * pool._max_workers
        self._pending: deque = deque()  # (first chunk number, future of the group's compressed chunks)
        self._chunks = 0
        self._new_buffer()

    def _new_buffer(self) -> None:
        self.buffer = np.zeros((self.group * self.chunk_rows, *self.tail), dtype=self.dataset.dtype)
        self.fill = 0

    def append(self, data: np.ndarray) -> None:
        while len(data):
            take = min(len(self.buffer) - self.fill, len(data))
            self.buffer[self.fill:self.fill + take] = data[:take]
            self.fill += take
            self.rows += take
            data = data[take:]
            if self.fill == len(self.buffer):
                self._submit()

    def _submit(self) -> None:
        """Hand the buffer's chunks (the last one zero-padded when the buffer is not full: close) to the pool."""
        chunks = -(-self.fill // self.chunk_rows)
        rows = self.buffer[:chunks * self.chunk_rows]
        self.hasher.submit(self.hash.update, self.buffer[:self.fill])  # one hashing thread: updates stay in order
        self._pending.append((self._chunks, self.pool.submit(encode_chunks, rows, self.chunk_rows, self.coding)))
        self._chunks += chunks
        self._new_buffer()
        while len(self._pending) > self.max_pending or (self._pending and self._pending[0][1].done()):
            self._write_next()

    def _write_next(self) -> None:
        number, future = self._pending.popleft()
        encoded = future.result()
        start = number * self.chunk_rows
        # The last group (close) sets the final extent before it is written: shrinking the extent afterwards would
        # make HDF5 rewrite that edge chunk through its own filters (default zlib strategy, the old bytes left
        # unused in the file).
        end = min(start + len(encoded) * self.chunk_rows, self.rows)
        if self.dataset.shape[0] < end:
            self.dataset.resize((end, *self.tail))
        for k, (data, mask) in enumerate(encoded):
            self.stored += len(data)
            self.dataset.id.write_direct_chunk((start + k * self.chunk_rows, *(0 for _ in self.tail)), data, mask)

    def size_bound(self) -> int:
        """At most the bytes this dataset takes once closed: chunks written, plus a deflate bound for the groups
        still compressing and for the buffer (whose zero padding compresses at least 100:1)."""
        buffer_bytes = self.group * self.chunk_bytes
        fill_bytes = self.fill * self.chunk_bytes // self.chunk_rows  # an empty buffer counts: rows may come
        buffered = deflate_bound(fill_bytes) + (buffer_bytes - fill_bytes) // 100
        return (self.stored + len(self._pending) * self.group * deflate_bound(self.chunk_bytes) + buffered
                + CHUNK_INDEX_BYTES * (self._chunks + self.group))

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
                 chunk_bytes: int | None = None, samples: int | None = None, max_length: int | None = None):
        """samples=N writes a sampled cache (N draws per row; top_k is then ignored). max_length (cache.max_length):
        a top-k file's per-token datasets get chunks of at most token_chunk_rows(max_length) rows (and about
        chunk_bytes), NARROW_CHUNKS times that for /input_ids and /logsumexp, for random access (format.chunk_rows)."""
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

        self._group_bytes = chunk_bytes or CHUNK_BYTES  # what each column hands the pool at once
        self.file = h5py.File(self.tmp_path, "w")
        self.columns: dict[str, _Column] = {}
        for name, (tail, dtype) in {**self.layout, **self.entry_layout}.items():
            row_bytes = max(1, int(np.prod(tail, dtype=np.int64))) * dtype.itemsize
            self._create(name, tail, dtype, chunk_rows(row_bytes, chunk_bytes or CHUNK_BYTES, narrow=not tail,
                                                       max_length=max_length, samples=samples))
        for name in per_sample_datasets(samples):
            self._create(name, (), np.dtype(np.int64), SAMPLE_CHUNK_ROWS)
        self.columns["offsets"].append(np.zeros(1, dtype=np.int64))
        if samples is not None:
            self.columns[ENTRY_OFFSETS].append(np.zeros(1, dtype=np.int64))
            mode = {"mode": "sampled", "samples": samples, "sampled_layout": SAMPLED_LAYOUT}
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
        bound = sample_bound(num_tokens, self.top_k, self.vocab_size, self.samples)
        return bound + len(self.columns) * CHUNK_INDEX_BYTES

    def _create(self, name: str, tail: tuple[int, ...], dtype: np.dtype, rows_per_chunk: int) -> None:
        coding = codec(name, dtype)
        dataset = self.file.create_dataset(
            name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype, chunks=(rows_per_chunk, *tail),
            compression=COMPRESSION["compression"], compression_opts=COMPRESSION["compression_opts"],
            shuffle=coding.shuffle,
        )
        self.columns[name] = _Column(dataset, self._pool, self._hasher, coding, self._group_bytes)

    def append(self, sample_index: int, input_ids: np.ndarray, topk_indices: np.ndarray | None = None,
               topk_logprobs: np.ndarray | None = None, logsumexp: np.ndarray | None = None, *,
               sampled_ids: np.ndarray | None = None, sampled_counts: np.ndarray | None = None) -> None:
        """One sample's rows: input_ids (L,), and topk_indices (L, k) + topk_logprobs (L, k) + logsumexp (L,) in a
        top-k cache, or sampled_ids (L, m) ascending + sampled_counts (L, m) (0 = padding) in a sampled one (which
        stores no logsumexp: the argument is ignored)."""
        length = len(input_ids)
        arrays = {"input_ids": input_ids}
        if self.samples is None:
            arrays |= {"topk_indices": topk_indices, "topk_logprobs": topk_logprobs, "logsumexp": logsumexp}
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
            self.append(rows.sample_index, rows.input_ids, sampled_ids=rows.sampled_ids,
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


class SplitWriter:
    """CacheWriters that roll over to a new file before one would pass `max_bytes`: a part of any size becomes
    files of at most max_bytes each. `path_of(i)` names file i; `on_close(path, summary)` runs as each file is
    closed (to publish it, so local disk holds few files at a time). `summaries` lists what on_close received.

    submit(finish, abort) runs finish() (close the full file, check it, call on_close) now or later, in file order
    (kd_core.io.Background runs it on its own thread while this one fills the next file); abort() drops the file
    if finish never runs. Default: now, in the caller.
    """

    def __init__(self, path_of, max_bytes: int, on_close, *, top_k: int, vocab_size: int, attrs: dict[str, Any],
                 samples: int | None = None, submit=None, max_length: int | None = None):
        self.path_of, self.max_bytes, self.on_close = path_of, max_bytes, on_close
        self.submit = submit or (lambda finish, abort: finish())
        # Chunks far smaller than a file: a file's last chunks are padded, and counted at their worst until closed.
        self.options = {"top_k": top_k, "vocab_size": vocab_size, "attrs": attrs, "samples": samples,
                        "chunk_bytes": min(CHUNK_BYTES, max_bytes // 64), "max_length": max_length}
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

