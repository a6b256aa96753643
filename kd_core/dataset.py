"""Torch datasets over a cache, and a collate that pads, for training a student.

    ds = CacheDataset("./out/demo")       # an output.uri (its latest version), a version directory or a cache.h5
    ds = StreamingCacheDataset("s3://bucket/kd/run1", seed=0)   # sequential, for training from object storage
    loader = DataLoader(ds, batch_size=8, collate_fn=pad_collate, num_workers=2)
    # or batches of similar lengths, resumable mid-epoch (kd_core.samplers; torchdata's StatefulDataLoader):
    # StatefulDataLoader(ds, batch_sampler=TokenBatchSampler(ds.lengths(), max_tokens=16384,
    #                    file_starts=ds.file_starts()), collate_fn=pad_collate)    # file_starts: a cache of many files
    for batch in loader:
        logits = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        loss = topk_kd_loss(logits, batch["topk_indices"], batch["topk_logprobs"], mask=batch["attention_mask"])
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from kd_core import io, partcache
from kd_core.errors import CacheFileError
from kd_core.h5cache import CacheReader, iter_samples
from kd_core.h5cache.reader import READ_DTYPES


class CacheDataset(Dataset):
    """Sample i of a cache as tensors: input_ids (L,), sample_index, and per row either topk_indices (L, k),
    topk_logprobs (L, k) and logsumexp (L,) (top-k caches) or sampled_ids (L, m) and sampled_counts (L, m)
    (sampled caches: count 0 marks padding, each row's counts sum to N; no logsumexp).

    Files are opened lazily in each process, so the dataset is safe with DataLoader workers; a remote cache is
    read through its manifest (see CacheReader), its parts from local copies of the whole files: downloaded once
    into cache_dir (default: kd_core.partcache.default_directory(), shared by workers and runs), checked against
    the manifest, the least recently used deleted past cache_bytes. cache_bytes=0 reads remote parts in place
    (ranged GETs through fsspec's block cache: one or more per sample).

    The dataset holds no position: the order of an epoch is the sampler's (kd_core.samplers.EpochSampler or
    TokenBatchSampler, resumable). state_dict() names the cache (samples, version), and load_state_dict() refuses a
    different one, since a saved position in another cache's order would skip or repeat samples.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, *, cache_dir: str | None = None,
                 cache_bytes: int = partcache.DEFAULT_BYTES):
        self.uri = str(uri)
        self.storage_options = storage_options
        self.cache_dir, self.cache_bytes = cache_dir, cache_bytes
        self._reader: CacheReader | None = None
        self._pid: int | None = None
        with CacheReader(self.uri, storage_options) as reader:
            self._len = len(reader)
            self.identity = _identity(reader)

    @property
    def reader(self) -> CacheReader:
        if self._reader is None or self._pid != os.getpid():  # h5py handles do not survive fork
            parts = partcache.PartCache(self.cache_dir, self.cache_bytes, self.storage_options) if self.cache_bytes else None
            self._reader, self._pid = CacheReader(self.uri, self.storage_options, part_cache=parts), os.getpid()
        return self._reader

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return _tensors(self.reader.sample(i, as_stored=True))

    def stats(self) -> dict[str, int]:
        """This process's reads: {bytes_decompressed, bytes_returned, files_opened} (CacheReader.stats)."""
        return self.reader.stats()

    def lengths(self) -> np.ndarray:
        """(S,) int64 tokens of every sample, for TokenBatchSampler."""
        return self.reader.lengths()

    def file_starts(self) -> np.ndarray:
        """(F,) int64 the first sample of each file, for the samplers' file_starts: a random order by groups of
        files, so that a cache of many files is not reopened for almost every sample (kd_core.samplers)."""
        return self.reader.starts[:-1].copy()

    def state_dict(self) -> dict[str, Any]:
        return {"cache": self.identity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _same_cache(state, self.identity, self.uri)


def pad_collate(samples: list[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample. attention_mask (B, T) is True on real tokens; logsumexp (B, T) in top-k
    caches (0 on padding).

    Top-k caches: padded rows hold topk_indices 0 and topk_logprobs -inf (no mass), so a loss that forgets the
    mask still cannot learn from them; masked losses ignore them anyway. Sampled caches: sampled_ids and
    sampled_counts (B, T, m) with m the batch's most distinct ids in a row; count 0 marks padding, both past a
    row's own entries and on padded rows (which therefore carry no draws at all).
    """
    lengths = [len(s["input_ids"]) for s in samples]
    B, T = len(samples), max(lengths)
    batch = {
        "input_ids": torch.full((B, T), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((B, T), dtype=torch.bool),
        "sample_index": torch.tensor([int(s["sample_index"]) for s in samples], dtype=torch.long),
    }
    # Per-row fields of either mode: (name, padding value, dtype)
    fields = [f for f in (("topk_indices", 0, torch.long), ("topk_logprobs", float("-inf"), torch.float32),
                          ("sampled_ids", 0, torch.long), ("sampled_counts", 0, torch.long))
              if f[0] in samples[0]]
    for name, fill, dtype in fields:
        width = max(s[name].shape[-1] for s in samples)  # k, or the batch's widest sampled row
        batch[name] = torch.full((B, T, width), fill, dtype=dtype)
    if "logsumexp" in samples[0]:  # top-k caches
        batch["logsumexp"] = torch.zeros((B, T), dtype=torch.float32)
    for b, (s, L) in enumerate(zip(samples, lengths)):
        batch["input_ids"][b, :L] = s["input_ids"]
        batch["attention_mask"][b, :L] = True
        if "logsumexp" in batch:
            batch["logsumexp"][b, :L] = s["logsumexp"]
        for name, _, _ in fields:
            batch[name][b, :L, : s[name].shape[-1]] = s[name]
    return batch


class StreamingCacheDataset(IterableDataset):
    """Sequential reading for training from object storage: the version's part files in a seeded shuffled order,
    each read front to back (on S3: one GET per file, downloaded to local scratch while the previous file is
    consumed), samples mixed through a shuffle buffer of `shuffle_buffer` samples, held in their stored dtypes:
    memory is about shuffle_buffer x mean tokens x stored bytes per token (400 B at k=64, uint32 ids), plus one
    block of 65,536 tokens being read, plus up to two part files on local disk (the one read, the next one).

    Files are dealt round-robin to (DDP rank, DataLoader worker) slots after the shuffle, so every sample is read
    once per epoch by exactly one slot; slots may differ by up to one file's samples (whole files), and a slot
    gets none when there are fewer files than slots.
    Call set_epoch(e) before each epoch for a new order. Samples are the dicts CacheDataset returns.

    Resuming: state_dict() is this slot's place in its stream (seed, epoch, slot, samples yielded); after
    load_state_dict(), the next iteration replays the slot's stream without returning what was already yielded, so
    it continues with exactly the sample that would have come next (the replay reads those samples again, at
    streaming speed). torchdata's StatefulDataLoader saves and restores this per worker; a plain loop calls both
    itself (num_workers=0). The slots (ranks x workers) must be the same as when the state was saved.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, *, seed: int = 0,
                 shuffle_buffer: int = 256, rank: int | None = None, world_size: int | None = None,
                 scratch: str | None = None):
        self.storage_options, self.seed, self.shuffle_buffer, self.scratch = storage_options, seed, shuffle_buffer, scratch
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.uri = str(uri)
        self._yielded = 0  # samples this slot's current iteration has returned
        self._resume: dict[str, Any] | None = None  # a loaded state, applied by the next __iter__
        with CacheReader(str(uri), storage_options) as reader:  # checks every file's size against the manifest
            self.files = list(reader.files)
            self.num_samples = len(reader)
            self.identity = _identity(reader)
            self.build_id = reader.build_id
            manifest = reader.source.manifest
            # What each downloaded file must weigh (a version's files; None: a single file, not listed)
            self.sizes = {reader.source.join(p.name): p.bytes for p in manifest.parts} if manifest else {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        slot, slots = self._slot()
        return {"cache": self.identity, "seed": self.seed, "epoch": self.epoch, "slot": slot, "slots": slots,
                "shuffle_buffer": self.shuffle_buffer, "yielded": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _same_cache(state, self.identity, self.uri)
        if state["seed"] != self.seed or state["shuffle_buffer"] != self.shuffle_buffer:
            raise ValueError(f"{self.uri}: the saved state is for seed {state['seed']}, shuffle_buffer "
                             f"{state['shuffle_buffer']}; this dataset has {self.seed}, {self.shuffle_buffer}: the order "
                             "would differ")
        self.epoch, self._resume = int(state["epoch"]), dict(state)

    def _slot(self) -> tuple[int, int]:
        """(this process's slot, number of slots) over DDP ranks x DataLoader workers."""
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        return rank * workers + worker_id, world * workers

    def my_files(self) -> list[str]:
        slot, slots = self._slot()
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.files))
        return [self.files[i] for i in order[slot::slots]]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        slot, slots = self._slot()
        skip, self._resume = self._skip(slot, slots), None
        self._yielded = 0
        for sample in self._shuffled(slot):
            self._yielded += 1
            if self._yielded > skip:
                yield _tensors(sample)

    def _skip(self, slot: int, slots: int) -> int:
        """Samples to pass over: those a loaded state says this slot already returned."""
        if self._resume is None:
            return 0
        if (self._resume["slot"], self._resume["slots"]) != (slot, slots):
            raise ValueError(f"{self.uri}: the saved state is slot {self._resume['slot']} of {self._resume['slots']} "
                             f"(DDP ranks x DataLoader workers); this is slot {slot} of {slots}: resume with the same "
                             "ranks and workers")
        return int(self._resume["yielded"])

    def _shuffled(self, slot: int) -> Iterator[dict[str, Any]]:
        """This slot's samples (stored dtypes) through the seeded shuffle buffer: the same order every time."""
        rng = random.Random(f"{self.seed}/{self.epoch}/{slot}")
        buffer: list[dict[str, Any]] = []
        for sample in self._stream(self.my_files()):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], sample = sample, buffer[j]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _stream(self, files: list[str]) -> Iterator[dict[str, Any]]:
        """Samples of `files` in order; a remote file is downloaded while the one before it is read."""
        if all(io.is_local(f) for f in files):
            for f in files:
                yield from iter_samples(io.local_path(f), name=f, build_id=self.build_id)
            return
        with tempfile.TemporaryDirectory(dir=self.scratch, prefix="kd-stream-") as scratch, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="kd-prefetch") as pool:
            def fetch(k: int) -> Path:
                local = Path(scratch) / f"{k}.h5"
                io.fetch_file(files[k], local, self.storage_options)
                if (want := self.sizes.get(files[k])) is not None and local.stat().st_size != want:
                    raise CacheFileError(f"{files[k]}: {local.stat().st_size:,} bytes, the manifest says {want:,} "
                                         "(replaced or truncated since the cache was opened): run the build again.")
                return local

            pending = pool.submit(fetch, 0) if files else None
            for k in range(len(files)):
                local = pending.result()
                pending = pool.submit(fetch, k + 1) if k + 1 < len(files) else None
                yield from iter_samples(local, name=files[k], build_id=self.build_id)
                local.unlink()


def _identity(reader: CacheReader) -> dict[str, Any]:
    """What names a cache for resuming: its sample count and, for a published version, its directory's key."""
    key = reader.source.manifest.key if reader.source.manifest is not None else None
    return {"num_samples": len(reader), "version": key}


def _same_cache(state: dict[str, Any], identity: dict[str, Any], uri: str) -> None:
    if state.get("cache") != identity:
        raise ValueError(f"{uri}: the saved state is for another cache ({state.get('cache')}, this one is {identity}): "
                         "a position in its order would skip or repeat samples here. Resume on the same version.")


def _tensors(sample: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A sample as stored -> tensors in the dtypes readers return (READ_DTYPES, as as_read() converts). float16
    goes to float32 in torch: numpy has no vectorized path for it (4x slower; 5% of a random-order read)."""
    tensors = {}
    for name, value in sample.items():
        dtype = READ_DTYPES.get(name)
        if not isinstance(value, np.ndarray):
            tensors[name] = torch.as_tensor(value)
        elif value.dtype == np.float16 and dtype is np.float32:
            tensors[name] = torch.from_numpy(value).float()
        else:  # every array here is the reader's own copy: the tensor may share it
            tensors[name] = torch.from_numpy(value if dtype is None else value.astype(dtype, copy=False))
    return tensors
