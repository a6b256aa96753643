"""A torch Dataset over a cache, and a collate that pads, for training a student.

    ds = CacheDataset("./out/demo")       # an output.uri (its latest version), a version directory or a cache.h5
    loader = DataLoader(ds, batch_size=8, collate_fn=pad_collate, num_workers=2)
    for batch in loader:
        logits = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        loss = topk_kd_loss(logits, batch["topk_indices"], batch["topk_logprobs"], mask=batch["attention_mask"])
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import Dataset

from kd_core.cachefile import CacheReader


class CacheDataset(Dataset):
    """Sample i of a cache as tensors: input_ids (L,), logsumexp (L,), sample_index, and per row either
    topk_indices (L, k) and topk_logprobs (L, k) (top-k caches) or sampled_ids (L, m) and sampled_counts (L, m)
    (sampled caches: count 0 marks padding, each row's counts sum to N).

    Files are opened lazily in each process, so the dataset is safe with DataLoader workers; a remote cache is
    read through its manifest (see CacheReader).
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = str(uri)
        self.storage_options = storage_options
        self._reader: CacheReader | None = None
        self._pid: int | None = None
        with CacheReader(self.uri, storage_options) as reader:
            self._len = len(reader)

    @property
    def reader(self) -> CacheReader:
        if self._reader is None or self._pid != os.getpid():  # h5py handles do not survive fork
            self._reader, self._pid = CacheReader(self.uri, self.storage_options), os.getpid()
        return self._reader

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.reader[i]
        return {k: torch.as_tensor(v) for k, v in sample.items()}


def pad_collate(samples: list[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample. attention_mask (B, T) is True on real tokens.

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
        "logsumexp": torch.zeros((B, T), dtype=torch.float32),
        "sample_index": torch.tensor([int(s["sample_index"]) for s in samples], dtype=torch.long),
    }
    # Per-row fields of either mode: (name, padding value, dtype)
    fields = [f for f in (("topk_indices", 0, torch.long), ("topk_logprobs", float("-inf"), torch.float32),
                          ("sampled_ids", 0, torch.long), ("sampled_counts", 0, torch.long))
              if f[0] in samples[0]]
    for name, fill, dtype in fields:
        width = max(s[name].shape[-1] for s in samples)  # k, or the batch's widest sampled row
        batch[name] = torch.full((B, T, width), fill, dtype=dtype)
    for b, (s, L) in enumerate(zip(samples, lengths)):
        batch["input_ids"][b, :L] = s["input_ids"]
        batch["attention_mask"][b, :L] = True
        batch["logsumexp"][b, :L] = s["logsumexp"]
        for name, _, _ in fields:
            batch[name][b, :L, : s[name].shape[-1]] = s[name]
    return batch
