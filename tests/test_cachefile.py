"""The cache format: write, verify, merge, read; the torch Dataset and its collate."""

import json

import h5py
import numpy as np
import pytest
import torch

from kd_core import h5cache
from kd_core.h5cache import CacheReader, CacheWriter, verify_file
from kd_core.dataset import CacheDataset, pad_collate
from kd_core.errors import CacheFileError


def random_samples(n, k, vocab, seed=0, max_len=50):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(1, max_len))
        logprobs = -np.sort(rng.exponential(2.0, size=(L, k)), axis=1)
        out.append(dict(sample_index=i * 3 + 1, input_ids=rng.integers(0, vocab, L).astype(np.uint32),
                        topk_indices=rng.integers(0, vocab, (L, k)), topk_logprobs=logprobs.astype(np.float16),
                        logsumexp=rng.normal(size=L).astype(np.float32)))
    return out


def write(path, samples, k, vocab):
    with CacheWriter(path, top_k=k, vocab_size=vocab, attrs={"teacher_model": "t"}) as w:
        for s in samples:
            w.append(**s)
    return w


@pytest.mark.parametrize("vocab, dtype", [(1000, np.uint16), (65536, np.uint16), (65537, np.uint32), (152000, np.uint32)])
def test_round_trip_and_index_dtype(tmp_path, vocab, dtype):
    samples = random_samples(20, 8, vocab)
    write(tmp_path / "c.h5", samples, 8, vocab)
    with h5py.File(tmp_path / "c.h5") as f:  # a stock h5py reader opens it
        assert f["topk_indices"].dtype == dtype and f["topk_logprobs"].dtype == np.float16
        assert f["input_ids"].dtype == np.uint32 and f["offsets"].dtype == np.int64
        assert f["offsets"].shape == (21,) and f["topk_indices"].shape == (sum(len(s["input_ids"]) for s in samples), 8)
        assert f.attrs["format_version"] == 1 and f.attrs["num_samples"] == 20
    with CacheReader(tmp_path / "c.h5") as r:
        assert len(r) == 20
        for i in (0, 7, 19, -1):
            got, want = r[i], samples[i]
            assert got["sample_index"] == want["sample_index"]
            np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
            np.testing.assert_array_equal(got["topk_indices"], want["topk_indices"])
            np.testing.assert_array_equal(got["topk_logprobs"], want["topk_logprobs"].astype(np.float32))
            np.testing.assert_array_equal(got["logsumexp"], want["logsumexp"])
        with pytest.raises(IndexError):
            r[20]


def test_bytes_per_token_matches_the_uncompressed_arrays():
    assert h5cache.bytes_per_token(64, 32000) == 4 + 64 * 2 + 64 * 2 + 4 == 264
    assert h5cache.bytes_per_token(64, 151936) == 4 + 64 * 4 + 64 * 2 + 4 == 392


def test_a_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(RuntimeError):
        with CacheWriter(path, top_k=4, vocab_size=100, attrs={}) as w:
            w.append(**random_samples(1, 4, 100)[0])
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_nothing_has_the_final_name_until_close(tmp_path):
    path = tmp_path / "c.h5"
    w = CacheWriter(path, top_k=4, vocab_size=100, attrs={})
    for s in random_samples(5, 4, 100):
        w.append(**s)
    assert not path.exists() and h5cache.temporary_path(path).exists()
    w.close()
    assert path.exists() and not h5cache.temporary_path(path).exists()


def test_verify_catches_truncation_and_wrong_records(tmp_path):
    path = tmp_path / "c.h5"
    summary = write(path, random_samples(30, 8, 1000), 8, 1000)
    verify_file(path, expect={"num_samples": 30, "num_tokens": summary.num_tokens, "checksums": summary.checksums()})
    with pytest.raises(CacheFileError, match="num_samples is 30, expected 31"):
        verify_file(path, expect={"num_samples": 31})
    bad_sums = {**summary.checksums(), "topk_logprobs": "0" * 64}
    with pytest.raises(CacheFileError, match="checksums of topk_logprobs differ from the completion record"):
        verify_file(path, expect={"checksums": bad_sums})
    data = path.read_bytes()
    truncated = tmp_path / "t.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheFileError, match="truncated or corrupt"):
        verify_file(truncated)


def test_verify_catches_a_changed_value(tmp_path):
    path = tmp_path / "c.h5"
    write(path, random_samples(10, 4, 100), 4, 100)
    with h5py.File(path, "r+") as f:
        f["logsumexp"][3] = 123.0
    with pytest.raises(CacheFileError, match="checksums of logsumexp differ from the file's attributes"):
        verify_file(path)


class Rows:
    """A sample as run_teacher yields it (attributes, not a dict)."""

    def __init__(self, sample):
        self.__dict__.update(sample)


def split_write(directory, samples, k, vocab, max_bytes):
    """Samples through a SplitWriter into directory/parts/part-NNNN.h5; the index entries of the files."""
    closed = []
    with h5cache.SplitWriter(lambda i: directory / "parts" / f"part-{i:04d}.h5", max_bytes,
                               lambda path, summary: closed.append((path, summary)), top_k=k, vocab_size=vocab,
                               attrs={"teacher_model": "t"}) as writer:
        for sample in samples:
            writer.append_rows(Rows(sample))
    return [h5cache.index_entry(path, f"parts/{path.name}", summary) for path, summary in closed]


def test_a_part_over_the_object_limit_is_split_and_no_file_passes_it(tmp_path):
    samples = random_samples(600, 8, 70000, seed=1)  # random ids and log-probs: they barely compress
    limit = 100_000
    entries = split_write(tmp_path, samples, 8, 70000, limit)
    sizes = [(tmp_path / e["name"]).stat().st_size for e in entries]
    assert len(entries) >= 4 and max(sizes) <= limit, sizes
    assert min(sizes[:-1]) > limit // 2, sizes  # the bound is not so loose that files come out tiny
    assert [int(i) for e in entries for i in e["sample_index"]] == [s["sample_index"] for s in samples]


def test_the_index_presents_the_parts_as_one_cache_to_stock_h5py(tmp_path):
    samples = random_samples(300, 8, 70000, seed=1)
    entries = split_write(tmp_path / "v", samples, 8, 70000, 90_000)
    assert len(entries) >= 3
    h5cache.write_index(tmp_path / "v" / "cache.h5", entries, attrs={"teacher_model": "t", "top_k": 8,
                                                                       "vocab_size": 70000})
    write(tmp_path / "whole.h5", samples, 8, 70000)
    (tmp_path / "v").rename(tmp_path / "moved")  # parts are found relative to the index, wherever it is
    with h5py.File(tmp_path / "moved" / "cache.h5") as index, h5py.File(tmp_path / "whole.h5") as whole:
        for name in (*h5cache.TOKEN_DATASETS, "offsets", "sample_index"):
            assert index[name].dtype == whole[name].dtype
            np.testing.assert_array_equal(index[name][:], whole[name][:])
        assert index["topk_indices"].is_virtual and not index["offsets"].is_virtual
        assert index.attrs["num_samples"] == 300 and index.attrs["format_version"] == 1
    index_bytes = (tmp_path / "moved" / "cache.h5").stat().st_size
    assert index_bytes < 0.1 * sum(p.stat().st_size for p in (tmp_path / "moved" / "parts").iterdir())


def test_index_entry_refuses_a_file_that_disagrees_with_its_record(tmp_path):
    samples = random_samples(10, 4, 100)
    w = write(tmp_path / "c.h5", samples, 4, 100)
    expect = {"num_samples": 10, "num_tokens": w.num_tokens, "checksums": w.checksums()}
    assert h5cache.index_entry(tmp_path / "c.h5", "c.h5", expect)["offsets"][-1] == w.num_tokens
    with pytest.raises(CacheFileError, match="10 samples, the record says 11"):
        h5cache.index_entry(tmp_path / "c.h5", "c.h5", {**expect, "num_samples": 11})
    with pytest.raises(CacheFileError, match="sample_index differs from the record's checksum"):
        h5cache.index_entry(tmp_path / "c.h5", "c.h5", {**expect, "checksums": {"sample_index": "0"}})


def test_dataset_and_pad_collate(tmp_path):
    samples = random_samples(6, 4, 100, max_len=9)
    write(tmp_path / "c.h5", samples, 4, 100)
    ds = CacheDataset(str(tmp_path / "c.h5"))
    assert len(ds) == 6
    batch = pad_collate([ds[0], ds[1], ds[2]])
    lengths = [len(samples[i]["input_ids"]) for i in range(3)]
    B, T = batch["input_ids"].shape
    assert (B, T) == (3, max(lengths)) and batch["topk_indices"].shape == (3, T, 4)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for b in range(3):
        L = lengths[b]
        assert torch.equal(batch["topk_indices"][b, :L], torch.as_tensor(samples[b]["topk_indices"]))
        assert torch.isinf(batch["topk_logprobs"][b, L:]).all()
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=pad_collate, num_workers=2)
    assert sum(len(b["sample_index"]) for b in loader) == 6


def test_many_chunks_compressed_in_parallel_read_back_exactly(tmp_path, monkeypatch):
    """Small chunks, so rows cross many chunk borders and several chunks compress at once on the pool."""
    import hashlib

    monkeypatch.setattr(h5cache.writer, "CHUNK_BYTES", 1)  # the 1024-row minimum: ~10 chunks per dataset here
    samples = random_samples(200, 4, 70000, seed=2, max_len=100)
    write(tmp_path / "c.h5", samples, 4, 70000)
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["topk_indices"].chunks == (1024, 4) and f["input_ids"].shape[0] > 8 * 1024
        for name in ("input_ids", "topk_indices", "topk_logprobs", "logsumexp"):
            want = np.concatenate([s[name] for s in samples]).astype(f[name].dtype)
            np.testing.assert_array_equal(f[name][:], want)  # HDF5's own filters decode what we encoded
            assert json.loads(f.attrs["checksums"])[name] == hashlib.sha256(want.tobytes()).hexdigest()
    verify_file(tmp_path / "c.h5")


@pytest.mark.parametrize("name, dtype", [("topk_logprobs", np.float16), ("topk_indices", np.uint16),
                                         ("sampled_id_gaps", np.uint32), ("sampled_counts", np.uint8)])
def test_a_chunk_is_never_stored_larger_than_the_bound_the_estimate_uses(name, dtype):
    """Incompressible bytes through each codec (libdeflate's, zlib's run-length): within format.deflate_bound, and
    a zlib stream HDF5's gzip filter reads."""
    import zlib

    from kd_core.h5cache.format import codec, deflate_bound
    from kd_core.h5cache.writer import encode_chunk

    for rows in (1, 333, 4096, 1 << 17):
        chunk = np.random.default_rng(rows).integers(0, 256, rows * 16, dtype=np.uint8).view(dtype)
        stored = encode_chunk(chunk, codec(name, np.dtype(dtype)))
        assert len(stored) <= deflate_bound(chunk.nbytes)
        assert len(zlib.decompress(stored)) == chunk.nbytes


def test_uint16_ids_are_stored_shuffled_or_not_whichever_is_smaller_and_read_the_same(tmp_path):
    """Per group of chunks the writer tries the ids shuffled and not and keeps the smaller; a chunk stored
    unshuffled says so in its filter mask, and stock h5py, the reader and an export read the same ids either way.
    Ids of a small vocabulary shuffle better (their high bytes are all zero); rows drawn from a few whole top-k
    lists of a large vocabulary are smaller unshuffled (a row is one 16-byte match, two 8-byte ones shuffled)."""
    from kd_core.h5cache import CacheReader, CacheWriter
    from kd_core.h5cache.format import SHUFFLE_SKIPPED

    rng = np.random.default_rng(0)
    small = rng.integers(0, 16, (4096, 8)).astype(np.uint16)  # high bytes all 0: shuffle wins
    repeated = rng.integers(0, 65_000, (32, 8)).astype(np.uint16)[rng.integers(0, 32, 4096)]
    path = tmp_path / "c.h5"
    # chunks of 64 rows (1 KiB of ids) in groups of 16 chunks: each half of the rows is 4 groups
    with CacheWriter(path, top_k=8, vocab_size=65_000, attrs={}, max_length=256, chunk_bytes=16384) as writer:
        for s, ids in enumerate((small, repeated)):
            for lo in range(0, len(ids), 64):
                rows = ids[lo:lo + 64]
                writer.append(2 * s * 64 + lo, rows[:, 0].astype(np.uint32), rows, np.zeros(rows.shape, np.float16) - 1,
                              np.zeros(len(rows), np.float32))
    want = np.concatenate([small, repeated])
    with h5py.File(path) as f:
        d = f["topk_indices"]
        masks = {d.id.get_chunk_info(i).filter_mask for i in range(d.id.get_num_chunks())}
        assert masks == {0, SHUFFLE_SKIPPED} and d.shuffle
        assert np.array_equal(d[:], want)
    with CacheReader(str(path)) as reader:
        assert np.array_equal(np.concatenate([reader[i]["topk_indices"] for i in range(len(reader))]), want)
