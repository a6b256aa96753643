"""Reading rows of a chunked dataset by inflating its raw chunks with libdeflate, instead of through HDF5's filters.

Every row dataset of a cache file is chunked along its rows and coded by HDF5's shuffle (optional) + deflate
filters, so any stock HDF5 reader opens it. Going through those filters costs a reader most of its time: HDF5
inflates with zlib and adds a per-chunk overhead that dominates the small chunks of a sample-sized layout
(docs/PERFORMANCE.md, "Reading": h5py 170-243 MB/s on the large datasets, libdeflate 490-689 MB/s on the same
chunks). A `RawColumn` fetches a chunk's stored bytes (`read_direct_chunk`: HDF5's own chunk index and file
driver, so a local file and an fsspec file object read alike), inflates them with libdeflate (the zlib stream's
Adler-32 checked, the size checked against the chunk's), undoes the shuffle, and keeps the last few chunks.

It reads the same values as h5py, or raises: a chunk that is not stored, or does not inflate to its size, is a
ChunkError, never rows of fill values. `raw_column` returns None for a dataset it does not know how to read
(another filter, chunks across columns, a virtual dataset); the caller reads that one through h5py.
"""

from __future__ import annotations

from collections import OrderedDict

import deflate
import h5py
import numpy as np

SHUFFLE, DEFLATE = h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE
KEEP_CHUNKS = 2  # decoded chunks kept per dataset: a sample's rows span at most a few; more would only help small caches


class ChunkError(ValueError):
    """A stored chunk that is missing or does not decode: the file is damaged."""


class RawColumn:
    """Rows [lo, hi) of one chunked dataset, chunks inflated here (see the module's docstring). `decoded` counts
    the bytes this column inflated (every chunk decoded, whole), for read amplification."""

    def __init__(self, dataset: h5py.Dataset, shuffled: bool):
        self.id, self.dtype, self.shuffled = dataset.id, dataset.dtype, shuffled
        self.chunk_shape, self.tail = dataset.chunks, dataset.shape[1:]
        self.chunk_rows = self.chunk_shape[0]
        self._zeros = (0,) * len(self.tail)  # a chunk's offset past its first row
        self.chunk_bytes = int(np.prod(self.chunk_shape, dtype=np.int64)) * self.dtype.itemsize
        self.name = dataset.name
        self.decoded = 0
        self._kept: OrderedDict[int, np.ndarray] = OrderedDict()  # chunk number -> its rows (chunk_rows, *tail)

    def rows(self, lo: int, hi: int, dtype: np.dtype | type | None = None) -> np.ndarray:
        """(hi - lo, *tail) in `dtype` (default: as stored), converted while copied out of the chunks."""
        c = lo // self.chunk_rows
        if hi <= (c + 1) * self.chunk_rows:  # within one chunk (most reads of the 1-value datasets)
            rows = self._chunk(c)[lo - c * self.chunk_rows:hi - c * self.chunk_rows]
            return rows.astype(dtype or self.dtype)  # a copy: the caller may keep it while the chunk is dropped
        out = np.empty((hi - lo, *self.tail), dtype or self.dtype)
        at = lo
        while at < hi:
            c = at // self.chunk_rows
            first = c * self.chunk_rows
            end = min(hi, first + self.chunk_rows)
            out[at - lo:end - lo] = self._chunk(c)[at - first:end - first]
            at = end
        return out

    def _chunk(self, c: int) -> np.ndarray:
        rows = self._kept.get(c)
        if rows is None:
            rows = self._decode(c)
            self._kept[c] = rows
            if len(self._kept) > KEEP_CHUNKS:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end(c)
        return rows

    def _decode(self, c: int) -> np.ndarray:
        offset = (c * self.chunk_rows, *self._zeros)
        try:
            mask, stored = self.id.read_direct_chunk(offset)
        except (RuntimeError, OSError, KeyError) as e:  # not stored: h5py would return fill values, never data
            raise ChunkError(f"{self.name}: chunk {c} is not stored ({e})") from None
        # Bit i of the mask set: filter i of the pipeline (shuffle first, when present) was skipped for this chunk.
        shuffle_skipped, deflate_skipped = (mask & 1, mask & 2) if self.shuffled else (0, mask & 1)
        if deflate_skipped:
            data = stored
        else:
            try:
                data = deflate.zlib_decompress(stored, self.chunk_bytes)
            except deflate.DeflateError:
                raise ChunkError(f"{self.name}: chunk {c} does not inflate (damaged bytes)") from None
        if len(data) != self.chunk_bytes:
            raise ChunkError(f"{self.name}: chunk {c} holds {len(data):,} bytes, its shape needs {self.chunk_bytes:,}")
        raw = np.frombuffer(data, np.uint8)
        if self.shuffled and not shuffle_skipped and self.dtype.itemsize > 1:
            raw = unshuffle(raw, self.dtype.itemsize)
        self.decoded += self.chunk_bytes
        return raw.view(self.dtype).reshape(self.chunk_shape)


def unshuffle(planes: np.ndarray, itemsize: int) -> np.ndarray:
    """HDF5's shuffle undone: (itemsize * n,) uint8 stored as byte 0 of every element, then byte 1, ... ->
    (n * itemsize,) uint8 in element order. One contiguous read per byte plane (a transposed copy is 2-3x slower)."""
    planes = planes.reshape(itemsize, -1)
    out = np.empty((planes.shape[1], itemsize), np.uint8)
    for k in range(itemsize):
        out[:, k] = planes[k]
    return out.reshape(-1)


def raw_column(dataset: h5py.Dataset) -> RawColumn | None:
    """A RawColumn for a dataset chunked by rows whose filters are [shuffle,] deflate; None for any other."""
    if dataset.chunks is None or dataset.is_virtual or tuple(dataset.chunks[1:]) != tuple(dataset.shape[1:]):
        return None
    plist = dataset.id.get_create_plist()
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    if filters not in ([SHUFFLE, DEFLATE], [DEFLATE]):
        return None
    return RawColumn(dataset, shuffled=filters[0] == SHUFFLE)
