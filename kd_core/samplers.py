"""Orders over a map-style cache (CacheDataset) that a training job can stop and resume mid-epoch.

    sampler = EpochSampler(len(ds), seed=0)                        # one sample at a time, a seeded order per epoch
    batches = TokenBatchSampler(ds.lengths(), max_tokens=16384)    # batches of similar lengths, <= max_tokens padded
    loader = StatefulDataLoader(ds, batch_sampler=batches, collate_fn=pad_collate, num_workers=2)  # torchdata
    ...
    checkpoint["loader"] = loader.state_dict()      # or, in a plain loop without workers: batches.state_dict()
    loader.load_state_dict(checkpoint["loader"])    # the next batch is the one after the last one consumed

Both draw their order from (seed, epoch) alone, so a resumed run sees the same order; state_dict() records where
in it the run stands (how many items the current iterator has handed out) and load_state_dict() makes the next
iter() continue from there, so no sample is seen twice or skipped. Call set_epoch(e) before each epoch, as with
DistributedSampler. With rank/world_size, each rank gets every world_size-th item of the same order (a rank's
share is cut to the shortest rank's, so that all ranks take the same number of steps).

A plain DataLoader with workers fetches ahead of the loop, so the sampler's count runs ahead of what the loop has
consumed: there, save torchdata's StatefulDataLoader.state_dict() (it records the sampler's state as of each batch
it returns), or state_dict(consumed=N) with the loop's own count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from kd_core.h5cache import CacheReader

# Files in a group of file_starts' order: as many as a reader keeps open locally (part-cache copies included), so
# none is opened twice in a group; remote parts read in place (cache_bytes=0) want open_files=MAX_OPEN["remote"].
OPEN_FILES = CacheReader.MAX_OPEN["local"]


class _Resumable:
    """The part both samplers share: (seed, epoch) -> order of items; a position in it; rank slicing."""

    def __init__(self, seed: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self._start = 0  # where the next iter() begins
        self._yielded = 0  # items the current iterator has handed out, counted from 0 of the epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._start, self._yielded = epoch, 0, 0

    def _items(self) -> list:
        raise NotImplementedError

    def _mine(self) -> list:
        items = self._items()
        per_rank = len(items) // self.world_size if self.world_size > 1 else len(items)
        return items[self.rank::self.world_size][:per_rank]

    def __len__(self) -> int:
        return len(self._mine())

    def __iter__(self) -> Iterator:
        mine = self._mine()
        start, self._start = self._start, 0
        self._yielded = start
        for item in mine[start:]:
            self._yielded += 1
            yield item

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """{"seed", "epoch", "world_size", "position"}: position = items handed out this epoch (or `consumed`, the
        loop's count)."""
        return {"seed": self.seed, "epoch": self.epoch, "world_size": self.world_size,
                "position": self._yielded if consumed is None else int(consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at state["position"] of state["epoch"]'s order; the seed and world size must match."""
        if state["seed"] != self.seed or state.get("world_size", 1) != self.world_size:
            raise ValueError(f"sampler state is for seed {state['seed']}, world_size {state.get('world_size', 1)}; "
                             f"this sampler has seed {self.seed}, world_size {self.world_size}: the order would differ")
        self.epoch, self._start, self._yielded = int(state["epoch"]), int(state["position"]), int(state["position"])


def file_groups(rng: np.random.Generator, num_samples: int, file_starts: Sequence[int] | None,
                open_files: int) -> list[np.ndarray]:
    """The samples of an epoch in groups: [all samples] without file_starts; else the files in a random order, cut
    into groups of open_files files, each group's samples (in file order). file_starts: (F,) the first sample of each
    file, ascending from 0 (CacheDataset.file_starts())."""
    if file_starts is None:
        return [np.arange(num_samples)]
    bounds = np.append(np.asarray(file_starts, dtype=np.int64), num_samples)  # (F + 1,)
    if bounds[0] != 0 or (np.diff(bounds) < 0).any():
        raise ValueError(f"file_starts must ascend from 0 to at most {num_samples}, got {list(file_starts)[:8]}...")
    files = rng.permutation(len(bounds) - 1)
    return [np.concatenate([np.arange(bounds[f], bounds[f + 1]) for f in files[g:g + open_files]])
            for g in range(0, len(files), open_files)]


class EpochSampler(_Resumable, Sampler[int]):
    """Sample indices 0..num_samples-1 in a seeded random order per epoch (shuffle=False: in order). Resumable.

    file_starts (CacheDataset.file_starts()): shuffle within groups of `open_files` files, the files in a random
    order, instead of over the whole cache. A reader keeps a few files open (CacheReader.MAX_OPEN); on a cache of
    more files than that, a fully random order reopens a file for almost every sample (several ms each), and this
    order opens each file once per epoch. Every sample still comes once per epoch; a batch mixes samples of
    open_files files drawn from the whole cache (the shuffle-block trade-off of MosaicML's streaming)."""

    def __init__(self, num_samples: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 file_starts: Sequence[int] | None = None, open_files: int = OPEN_FILES):
        _Resumable.__init__(self, seed, rank, world_size)
        self.num_samples, self.shuffle = num_samples, shuffle
        self.file_starts, self.open_files = file_starts, open_files

    def _items(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        rng = np.random.default_rng([self.seed, self.epoch])
        groups = file_groups(rng, self.num_samples, self.file_starts, self.open_files)
        return np.concatenate([rng.permutation(group) for group in groups]).tolist()


class TokenBatchSampler(_Resumable, Sampler[list[int]]):
    """Batches of sample indices whose padded size, batch size x its longest sample, is at most max_tokens.

    Per epoch: the samples in a seeded random order, cut into windows of `window` samples; each window sorted by
    length and cut greedily into batches (so a batch holds samples of similar lengths and little padding); then
    all batches in a seeded random order (so batch sizes and lengths do not trend through the epoch). A sample
    longer than max_tokens is a batch by itself. Larger windows mean less padding and less randomness.

    lengths: (S,) tokens of each sample (CacheDataset.lengths()). Resumable by batch (state_dict's position
    counts batches). file_starts and open_files: as EpochSampler's (all of the above within each group of files,
    the groups one after another).
    """

    def __init__(self, lengths: Sequence[int] | np.ndarray, max_tokens: int, *, seed: int = 0, window: int = 1024,
                 rank: int = 0, world_size: int = 1, file_starts: Sequence[int] | None = None, open_files: int = OPEN_FILES):
        if max_tokens < 1 or window < 1:
            raise ValueError(f"max_tokens and window must be >= 1, got {max_tokens} and {window}")
        _Resumable.__init__(self, seed, rank, world_size)
        self.lengths = np.asarray(lengths, dtype=np.int64)  # (S,)
        self.max_tokens, self.window = max_tokens, window
        self.file_starts, self.open_files = file_starts, open_files

    def _items(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[list[int]] = []
        for group in file_groups(rng, len(self.lengths), self.file_starts, self.open_files):
            batches += self._batches(rng, group)
        return batches

    def _batches(self, rng: np.random.Generator, samples: np.ndarray) -> list[list[int]]:
        """One group's samples in batches: shuffled, windows sorted by length and cut, batches shuffled."""
        order = rng.permutation(samples)
        batches: list[list[int]] = []
        for w in range(0, len(order), self.window):
            chunk = order[w:w + self.window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]  # ascending: the last is the longest
            batch: list[int] = []
            for i in chunk.tolist():
                if batch and (len(batch) + 1) * int(self.lengths[i]) > self.max_tokens:
                    batches.append(batch)
                    batch = []
                batch.append(i)
            if batch:
                batches.append(batch)
        return [batches[b] for b in rng.permutation(len(batches))]
