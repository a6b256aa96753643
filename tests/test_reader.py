"""The student's reader: chunks sized for random access (and files with the old chunks still read the same),
per-sample lengths, read counters, and remote random access through the local part cache (moto's S3 server)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from kd_core import io
from kd_core.build import validate
from kd_core.dataset import CacheDataset, StreamingCacheDataset
from kd_core.errors import CacheFileError
from kd_core.h5cache import CacheReader, CacheWriter, as_read, iter_samples
from kd_core.h5cache.format import token_chunk_rows
from kd_core.partcache import PartCache
from s3helpers import build, bucket, moto_endpoint, overrides, s3_options  # noqa: F401


def rows(rng, n, length, k=8, vocab=1000):
    for s in range(n):
        L = int(rng.integers(1, 2 * length))
        yield (s, rng.integers(0, vocab, L).astype(np.uint32), rng.integers(0, vocab, (L, k)).astype(np.uint16),
               -np.sort(rng.exponential(2.0, (L, k)), axis=1).astype(np.float16), rng.normal(size=L).astype(np.float32))


@pytest.mark.parametrize("max_length, want", [(None, None), (16, 64), (512, 128), (2048, 512), (1 << 20, 8192)])
def test_chunk_rows_follow_max_length(max_length, want):
    assert token_chunk_rows(max_length) == want


def test_the_torch_datasets_return_what_the_reader_returns(tmp_path):
    """The datasets take samples as stored and convert them themselves (float16 in torch): the same values and
    dtypes as CacheReader's (int64 ids, float32 log-probs), in random order and streamed."""
    path = tmp_path / "c.h5"
    with CacheWriter(path, top_k=8, vocab_size=1000, attrs={}, max_length=64) as writer:
        for row in rows(np.random.default_rng(4), 120, 40):
            writer.append(*row)
    reader, dataset = CacheReader(str(path)), CacheDataset(str(path))
    stored = list(iter_samples(path))
    for i in np.random.default_rng(5).permutation(120):
        want, got = reader[int(i)], dataset[int(i)]
        assert want.keys() == got.keys()
        for name, value in want.items():
            assert got[name].dtype == torch.as_tensor(value).dtype
            assert torch.equal(got[name], torch.as_tensor(value)), name
    assert got["topk_indices"].dtype == torch.int64 and got["topk_logprobs"].dtype == torch.float32
    streamed = {int(s["sample_index"]): s for s in StreamingCacheDataset(str(path))}
    assert len(streamed) == 120
    for s in stored:
        for name, value in as_read(s).items():
            assert torch.equal(streamed[s["sample_index"]][name], torch.as_tensor(value)), name


def test_files_with_sample_sized_chunks_read_like_files_with_the_old_chunks(tmp_path):
    """Same rows, two chunkings: identical arrays and samples; random reads decompress <= ~2x what they return."""
    paths = {}
    for max_length in (None, 256):
        paths[max_length] = tmp_path / f"{max_length}.h5"
        with CacheWriter(paths[max_length], top_k=8, vocab_size=1000, attrs={}, max_length=max_length) as writer:
            for row in rows(np.random.default_rng(0), 300, 100):
                writer.append(*row)
    with h5py.File(paths[None]) as old, h5py.File(paths[256]) as new:
        assert old["topk_logprobs"].chunks == (65536, 8) and new["topk_logprobs"].chunks == (64, 8)
        assert new["input_ids"].chunks == (256,)
    readers = {m: CacheReader(str(p)) for m, p in paths.items()}
    old, new = readers[None], readers[256]
    assert old.read_all().keys() == new.read_all().keys()
    assert all(np.array_equal(old.read_all()[n], new.read_all()[n]) for n in old.read_all())
    for i in np.random.default_rng(1).permutation(300):
        a, b = old[int(i)], new[int(i)]
        assert all(np.array_equal(a[k], b[k]) for k in a)
    stats = new.stats()
    # ~100 rows a sample, 40 B a row: (64 rows x 32 B + 256 rows x 8 B) of other samples' rows per read, about 1x
    assert 1.5 < stats["bytes_decompressed"] / stats["bytes_returned"] < 2.5
    assert np.array_equal(new.lengths(), np.diff(new.read_all()["offsets"]))


def test_cache_dataset_on_s3_downloads_each_part_once_and_matches_local(bucket, moto_endpoint, small_teacher_dir,  # noqa: F811
                                                                         corpus_path, tmp_path, monkeypatch):
    import s3fs

    uri, opts = f"s3://{bucket}/kd", s3_options(moto_endpoint)
    build(validate("demo", overrides(small_teacher_dir, corpus_path, uri, output={"storage_options": opts})))
    local = tmp_path / "local"
    fs, _ = io.filesystem(uri, opts)
    fs.get(f"{bucket}/kd/", str(local), recursive=True)
    gets, real = [], s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        gets.append(method)
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    remote = CacheDataset(uri, opts, cache_dir=str(tmp_path / "parts"))
    copy = CacheDataset(str(local))
    parts = len(remote.reader.files)
    assert parts == 6
    gets.clear()
    for i in np.random.default_rng(0).permutation(len(copy)):
        a, b = remote[int(i)], copy[int(i)]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert remote.reader.part_cache.downloads == parts
    # One GET per part (its sha256 is checked on the local copy), plus the manifest and the index's metadata.
    assert parts <= gets.count("get_object") <= parts + 8, gets
    assert np.array_equal(remote.lengths(), copy.lengths())

    # A second reader (another worker, a later run) finds the parts already there: no download.
    again = CacheDataset(uri, opts, cache_dir=str(tmp_path / "parts"))
    again[0], again[len(again) - 1]
    assert again.reader.part_cache.downloads == 0

    # Bounded: room for two parts; the least recently used go first.
    sizes = [p.bytes for p in remote.reader.source.manifest.parts]
    small = CacheDataset(uri, opts, cache_dir=str(tmp_path / "small"), cache_bytes=2 * max(sizes))
    for i in range(len(small)):
        small[i]
    held = sum(p.stat().st_size for p in (tmp_path / "small").glob("*.h5"))
    assert held <= 2 * max(sizes) and len(list((tmp_path / "small").glob("*.h5"))) <= 2
    too_small = CacheDataset(uri, opts, cache_dir=str(tmp_path / "tiny"), cache_bytes=min(sizes) - 1)
    with pytest.raises(CacheFileError, match=r"more than the local part cache's .*cache_bytes"):
        too_small[0]

    # A part replaced after publishing (same size, other bytes) is refused, and not kept.
    first = remote.reader.source.manifest.parts[0]
    key = f"{bucket}/kd/" + remote.reader.files[0].split("/kd/", 1)[1]
    data = bytearray(fs.cat_file(key))
    data[-100] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    fresh = PartCache(tmp_path / "fresh", 1 << 30, opts)
    with pytest.raises(CacheFileError, match="differs from the manifest"):
        fresh.local(remote.reader.files[0], first.bytes, first.sha256)
    assert not list((tmp_path / "fresh").iterdir())
