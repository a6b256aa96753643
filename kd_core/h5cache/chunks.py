"""Reading rows of a chunked dataset by inflating its raw chunks with libdeflate, instead of through HDF5's filters.

Every row dataset of a cache file is chunked along its rows and coded by HDF5's shuffle (optional) + deflate
filters, so any stock HDF5 reader opens it. Going through those filters costs a reader most of its time: HDF5
inflates with zlib and adds a per-chunk overhead that dominates the small chunks of a sample-sized layout
(docs/PERFORMANCE.md, "Before this: raw chunks inflated by libdeflate": h5py 170-243 MB/s on the large datasets,
libdeflate 490-689 MB/s on the same chunks). A `RawColumn` fetches a chunk's stored bytes (`read_direct_chunk`:
HDF5's own chunk index and file driver, so a local file and an fsspec file object read alike), inflates them with
libdeflate (the zlib stream's Adler-32 checked, the size checked against the chunk's), and keeps the last few
chunks as inflated; a read undoes the shuffle for the rows it asks for only, copying them out (a sample of a
random order needs about half of the rows of the chunks it spans: 1.035x on a random-order read, against
unshuffling whole chunks).

Fetching a chunk through HDF5 costs as much as inflating it (read_direct_chunk: 28% of a random-order read of a
local cache, libdeflate 30%). So a column of a local file, once it has fetched 1/TABLE_AFTER of its chunks one by
one, lists them all in one call (H5Dchunk_iter, ~1 us a chunk) and reads each chunk from there with os.pread on
HDF5's own descriptor. A large file read for a few samples and closed again (a random order over many parts)
never pays for the list. (Mapping the file instead was another 1.13x on a cache in the page cache, but a cold
cache on disk would fault in the kernel's read-around, ~128 KiB, for each ~10 KiB chunk; a truncated file would
kill the reader with SIGBUS where pread returns a short read; and every page touched would show in the reader's
RSS.)

It reads the same values as h5py, or raises: a chunk that is not stored, or does not inflate to its size, is a
ChunkError, never rows of fill values. `raw_column` returns None for a dataset it does not know how to read
(another filter, chunks across columns, a virtual dataset); the caller reads that one through h5py.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import deflate
import h5py
import numpy as np

SHUFFLE, DEFLATE = h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE
KEEP_CHUNKS = 2  # inflated chunks kept per dataset: a sample's rows span at most a few; more would only help small caches
TABLE_AFTER = 8  # a column lists its chunks once it has looked up 1/TABLE_AFTER of them one by one


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
        self._kept: OrderedDict[int, np.ndarray] = OrderedDict()  # chunk number -> its bytes as inflated (_decode)
        self.num_chunks = -(-dataset.shape[0] // self.chunk_rows)
        self._dataset = dataset  # its file is looked at when the column lists its chunks, not on every open
        self._fd: int | None = None  # the file's descriptor, once listed
        # Once listed, per chunk number: file offset (-1: not stored), stored size, filter mask. 13 B a chunk: 1.7 MB
        # for a 4 GiB part of 2,048-token samples.
        self._table: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._lookups: int | None = 0  # chunks fetched one by one; None: this column cannot list (_list_chunks)

    def rows(self, lo: int, hi: int, dtype: np.dtype | type | None = None) -> np.ndarray:
        """(hi - lo, *tail) in `dtype` (default: as stored). Each chunk is kept as inflated (byte planes, when
        shuffled), and only the rows asked for are put back in element order, straight into the result: a sample
        of a random order needs about half of the rows of the chunks it spans."""
        out = np.empty((hi - lo, *self.tail), self.dtype)
        at = lo
        while at < hi:
            c = at // self.chunk_rows
            first = c * self.chunk_rows
            end = min(hi, first + self.chunk_rows)
            planes = self._chunk(c)  # (P, chunk_rows * row_bytes / P) uint8
            width = planes.shape[1] // self.chunk_rows  # bytes of a row in each plane
            part = out[at - lo:end - lo].view(np.uint8).reshape(-1, len(planes))  # (rows * row_bytes / P, P)
            for k, plane in enumerate(planes):
                part[:, k] = plane[(at - first) * width:(end - first) * width]
            at = end
        return out if dtype is None or np.dtype(dtype) == self.dtype else out.astype(dtype)

    def _chunk(self, c: int) -> np.ndarray:
        planes = self._kept.get(c)
        if planes is None:
            planes = self._decode(c)
            self._kept[c] = planes
            if len(self._kept) > KEEP_CHUNKS:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end(c)
        return planes

    def _stored(self, c: int) -> tuple[int, bytes]:
        """(filter mask, stored bytes) of chunk c; a chunk that is not stored (h5py would return fill values for
        it, never data) is a ChunkError."""
        if self._table is None and self._lookups is not None:
            self._lookups += 1
            if self._lookups * TABLE_AFTER >= self.num_chunks:
                self._table = self._list_chunks()
        if self._table is None:
            try:
                return self.id.read_direct_chunk((c * self.chunk_rows, *self._zeros))
            except (RuntimeError, OSError, KeyError) as e:
                raise ChunkError(f"{self.name}: chunk {c} is not stored ({e})") from None
        addresses, sizes, masks = self._table
        if not 0 <= c < self.num_chunks or addresses[c] < 0:
            raise ChunkError(f"{self.name}: chunk {c} is not stored")
        size, mask = int(sizes[c]), int(masks[c])
        stored = os.pread(self._fd, size, int(addresses[c]))
        if len(stored) != size:
            raise ChunkError(f"{self.name}: chunk {c} is cut short ({len(stored):,} of {size:,} bytes)")
        return mask, stored

    def _list_chunks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Every stored chunk's place in the file, from HDF5's index in one pass, and the file's descriptor; None
        for a file that is not local (HDF5's sec2 driver, no user block: its addresses are file offsets, and
        os.pread shares the descriptor with HDF5 without moving anything) or without H5Dchunk_iter (HDF5 before
        1.12.3), and the column keeps fetching chunks through HDF5."""
        file = self._dataset.file
        if file.driver != "sec2" or file.userblock_size != 0 or not hasattr(os, "pread"):
            self._lookups = None
            return None
        addresses = np.full(self.num_chunks, -1, np.int64)
        sizes, masks = np.zeros(self.num_chunks, np.uint32), np.zeros(self.num_chunks, np.uint8)

        def note(info) -> None:
            c = info.chunk_offset[0] // self.chunk_rows
            if c < self.num_chunks:
                addresses[c], sizes[c], masks[c] = info.byte_offset, info.size, info.filter_mask

        try:
            self.id.chunk_iter(note)
        except (AttributeError, NotImplementedError, RuntimeError):
            self._lookups = None
            return None
        self._fd = file.id.get_vfd_handle()
        return addresses, sizes, masks

    def _decode(self, c: int) -> np.ndarray:
        """Chunk c inflated, (P, chunk_bytes / P) uint8: HDF5's P = itemsize byte planes of a shuffled chunk (byte 0
        of every element, then byte 1, ...), or P = 1 for a chunk stored unshuffled."""
        mask, stored = self._stored(c)
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
        self.decoded += self.chunk_bytes
        if self.shuffled and not shuffle_skipped:
            return raw.reshape(self.dtype.itemsize, -1)
        return raw.reshape(1, -1)


def raw_column(dataset: h5py.Dataset) -> RawColumn | None:
    """A RawColumn for a dataset chunked by rows whose filters are [shuffle,] deflate; None for any other."""
    if dataset.chunks is None or dataset.is_virtual or tuple(dataset.chunks[1:]) != tuple(dataset.shape[1:]):
        return None
    plist = dataset.id.get_create_plist()
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    if filters not in ([SHUFFLE, DEFLATE], [DEFLATE]):
        return None
    return RawColumn(dataset, shuffled=filters[0] == SHUFFLE)
