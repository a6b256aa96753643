"""Raw-chunk reading (kd_core.h5cache.chunks): the same rows as h5py for every dtype, shape and filter pipeline a
cache has, h5py's path for any other, and damage refused where h5py would return fill values."""

from __future__ import annotations

import zlib

import h5py
import numpy as np
import pytest

from kd_core.errors import CacheFileError
from kd_core.h5cache import CacheReader, CacheWriter
from kd_core.h5cache import chunks
from kd_core.h5cache.chunks import ChunkError, raw_column

CASES = [  # dtype, row shape, shuffle: every kind of row dataset a cache holds
    (np.uint32, (), True),  # input_ids
    (np.float32, (), True),  # logsumexp
    (np.uint16, (8,), False),  # topk_indices, vocab <= 65,536
    (np.uint32, (8,), True),  # topk_indices, larger vocab
    (np.float16, (8,), True),  # topk_logprobs
    (np.uint8, (), True),  # sampled_counts (a shuffle of 1-byte values is a no-op)
]


def values(rng, dtype, shape):
    if np.issubdtype(dtype, np.floating):
        return rng.normal(size=shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("dtype, tail, shuffle", CASES)
def test_raw_column_reads_what_h5py_reads(tmp_path, dtype, tail, shuffle):
    rng = np.random.default_rng(0)
    data = values(rng, dtype, (1000, *tail))  # 1000 rows in chunks of 64: the last chunk is an edge chunk
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("d", data=data, chunks=(64, *tail), compression="gzip", shuffle=shuffle)
    with h5py.File(tmp_path / "f.h5") as f:
        column = raw_column(f["d"])
        assert column is not None and column.shuffled == shuffle
        for lo, hi in [(0, 1000), (0, 0), (63, 65), (64, 128), (990, 1000), *(sorted(pair) for pair in rng.integers(0, 1001, (40, 2)).tolist())]:
            assert np.array_equal(column.rows(lo, hi), f["d"][lo:hi])
            wide = column.rows(lo, hi, np.float32 if np.issubdtype(dtype, np.floating) else np.int64)
            assert np.array_equal(wide, f["d"][lo:hi].astype(wide.dtype))
        assert column.decoded > 0


def test_other_layouts_are_left_to_h5py_and_read_the_same(tmp_path):
    """Filters it does not decode, chunks across columns, contiguous: raw_column declines; _Part reads via h5py."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 1000, (300, 8)).astype(np.uint16)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("fletcher", data=data, chunks=(64, 8), compression="gzip", fletcher32=True)
        f.create_dataset("lzf", data=data, chunks=(64, 8), compression="lzf")
        f.create_dataset("columns", data=data, chunks=(64, 4), compression="gzip")
        f.create_dataset("plain", data=data)
    with h5py.File(tmp_path / "f.h5") as f:
        assert all(raw_column(f[name]) is None for name in f)


def test_a_chunk_stored_without_a_filter_reads_as_stored(tmp_path):
    """HDF5's filter mask: a chunk whose deflate (or shuffle) was skipped is taken as it is."""
    data = np.arange(256, dtype=np.uint32)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        d = f.create_dataset("d", shape=(256,), dtype=np.uint32, chunks=(128,), compression="gzip", shuffle=True)
        d.id.write_direct_chunk((0,), data[:128].tobytes(), filter_mask=0b11)  # neither filter applied
        shuffled = data[128:].view(np.uint8).reshape(-1, 4).T.tobytes()
        d.id.write_direct_chunk((128,), shuffled, filter_mask=0b10)  # shuffled, not deflated
    with h5py.File(tmp_path / "f.h5") as f:
        assert np.array_equal(f["d"][:], data)
        assert np.array_equal(raw_column(f["d"]).rows(0, 256), data)


# How a column fetches chunks: through HDF5 one by one (TABLE_AFTER 0: never listed), or listed on the first
# fetch and read with os.pread (a huge TABLE_AFTER).
FETCHES = pytest.mark.parametrize("table_after", [0, 1 << 30], ids=["through-hdf5", "listed"])


@FETCHES
def test_damage_is_a_chunk_error_where_h5py_reads_fill_values(tmp_path, monkeypatch, table_after):
    monkeypatch.setattr(chunks, "TABLE_AFTER", table_after)
    data = np.arange(512, dtype=np.uint32)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        d = f.create_dataset("d", shape=(512,), dtype=np.uint32, chunks=(128,), compression="gzip", shuffle=False)
        d.id.write_direct_chunk((0,), zlib.compress(data[:128].tobytes()))
        stored = bytearray(zlib.compress(data[128:256].tobytes()))
        stored[len(stored) // 2] ^= 0xFF
        d.id.write_direct_chunk((128,), bytes(stored))  # damaged bytes
        d.id.write_direct_chunk((256,), zlib.compress(data[256:300].tobytes()))  # inflates short
        # chunk 3 (rows 384-511) is never written: h5py reads it as zeros
    with h5py.File(tmp_path / "f.h5") as f:
        assert not f["d"][384:512].any()
        column = raw_column(f["d"])
        assert np.array_equal(column.rows(0, 128), data[:128])
        assert (column._table is not None) == bool(table_after)
        for lo, hi, why in [(130, 140, "does not inflate"), (256, 260, "holds 176 bytes"), (400, 401, "not stored")]:
            with pytest.raises(ChunkError, match=why):
                column.rows(lo, hi)


def test_a_column_lists_its_chunks_only_once_it_has_fetched_a_share_of_them(tmp_path):
    """Listing costs ~1 us a chunk: a file read for a few samples and closed (a random order over many parts)
    fetches through HDF5; one read on lists them once and reads the same rows with os.pread."""
    rng = np.random.default_rng(3)
    data = values(rng, np.float16, (64 * 64, 8))  # 64 chunks of 64 rows
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("d", data=data, chunks=(64, 8), compression="gzip", shuffle=True)
    with h5py.File(tmp_path / "f.h5") as f:
        column = raw_column(f["d"])
        for c in range(64 // chunks.TABLE_AFTER - 1):
            assert np.array_equal(column.rows(c * 64 + 3, c * 64 + 5), data[c * 64 + 3:c * 64 + 5])
        assert column._table is None
        for lo in rng.integers(0, len(data) - 200, 100):
            assert np.array_equal(column.rows(lo, lo + 200), data[lo:lo + 200])
        assert column._table is not None


def test_a_file_read_through_a_file_object_keeps_fetching_through_hdf5(tmp_path):
    """A file object (fsspec's ranged reads) has no descriptor to read at HDF5's addresses: the column never lists
    its chunks and reads what h5py reads."""
    data = values(np.random.default_rng(4), np.uint16, (64 * 32, 8))
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("d", data=data, chunks=(64, 8), compression="gzip", shuffle=True)
    with open(tmp_path / "f.h5", "rb") as raw, h5py.File(raw, "r") as f:
        column = raw_column(f["d"])
        assert np.array_equal(column.rows(0, len(data)), data)
        assert column._table is None and column._lookups is None


@FETCHES
def test_cache_reader_reads_raw_chunks_and_refuses_a_damaged_one(tmp_path, monkeypatch, table_after):
    """Through CacheReader: every dataset of a top-k file goes through RawColumn, samples equal h5py's rows, and a
    flipped byte in a chunk is one CacheFileError naming the file."""
    monkeypatch.setattr(chunks, "TABLE_AFTER", table_after)
    rng = np.random.default_rng(2)
    path = tmp_path / "c.h5"
    with CacheWriter(path, top_k=8, vocab_size=70_000, attrs={}, max_length=64) as writer:
        for s in range(200):
            L = int(rng.integers(1, 128))
            writer.append(s, rng.integers(0, 70_000, L).astype(np.uint32), rng.integers(0, 70_000, (L, 8)).astype(np.uint32),
                          -np.sort(rng.exponential(2.0, (L, 8)), axis=1).astype(np.float16),
                          rng.normal(size=L).astype(np.float32))
    with CacheReader(str(path)) as reader, h5py.File(path) as f:
        part = reader._part(0)
        assert set(part.columns) == {"input_ids", "topk_indices", "topk_logprobs", "logsumexp"}
        offsets = f["offsets"][:]
        for i in rng.permutation(200):
            lo, hi = offsets[i], offsets[i + 1]
            sample = reader[int(i)]
            assert sample["topk_indices"].dtype == np.int64 and sample["topk_logprobs"].dtype == np.float32
            for name in part.columns:
                assert np.array_equal(sample[name], f[name][lo:hi].astype(sample[name].dtype))
        info = f["topk_logprobs"].id.get_chunk_info(3)
        target = int(offsets.searchsorted(info.chunk_offset[0], side="right")) - 1
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + info.size // 2)
        byte = raw.read(1)
        raw.seek(-1, 1)
        raw.write(bytes([byte[0] ^ 0xFF]))
    with CacheReader(str(path)) as reader, pytest.raises(CacheFileError, match=f"{path}: sample {target}"):
        reader[target]
