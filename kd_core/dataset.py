"""A torch Dataset over a cache, and a collate that pads, for training a student.

    ds = CacheDataset("./out/demo")                      # an output.uri (its latest version) or a cache.h5
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
    """Sample i of a cache as tensors: input_ids (L,), topk_indices (L, k), topk_logprobs (L, k), logsumexp (L,).

    The HDF5 file is opened lazily in each process, so the dataset is safe with DataLoader workers.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        from kd_core.pipeline import resolve_cache_uri

        self.uri = resolve_cache_uri(str(uri), storage_options)
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

    Padded rows hold topk_indices 0 and topk_logprobs -inf (no mass), so a loss that forgets the mask still
    cannot learn from them; masked losses ignore them anyway.
    """
    lengths = [len(s["input_ids"]) for s in samples]
    B, T, k = len(samples), max(lengths), samples[0]["topk_indices"].shape[-1]
    batch = {
        "input_ids": torch.full((B, T), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((B, T), dtype=torch.bool),
        "topk_indices": torch.zeros((B, T, k), dtype=torch.long),
        "topk_logprobs": torch.full((B, T, k), float("-inf"), dtype=torch.float32),
        "logsumexp": torch.zeros((B, T), dtype=torch.float32),
        "sample_index": torch.tensor([int(s["sample_index"]) for s in samples], dtype=torch.long),
    }
    for b, (s, L) in enumerate(zip(samples, lengths)):
        batch["input_ids"][b, :L] = s["input_ids"]
        batch["attention_mask"][b, :L] = True
        batch["topk_indices"][b, :L] = s["topk_indices"]
        batch["topk_logprobs"][b, :L] = s["topk_logprobs"]
        batch["logsumexp"][b, :L] = s["logsumexp"]
    return batch
