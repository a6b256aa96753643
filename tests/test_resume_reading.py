"""Reading a cache for training: resumable epochs (a loop stopped at a step, resumed, sees the same order with no
sample twice or skipped), token-bucketed batches, remote random access through the local part cache."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from kd_core.build import validate
from kd_core.dataset import CacheDataset, StreamingCacheDataset, pad_collate
from kd_core.samplers import EpochSampler, TokenBatchSampler
from s3helpers import build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(small_teacher_dir, corpus_path, tmp_path_factory) -> str:
    """40 docstrings by the small teacher in 8 part files (2 shards x 4 parts): its output.uri."""
    out = tmp_path_factory.mktemp("resume_cache")
    build(validate("testing", {
        "teacher": {"model": str(small_teacher_dir), "batch_tokens": 2048},
        "dataset": {"name": "parquet", "data_files": str(corpus_path), "streaming": True, "max_samples": 40},
        "cache": {"top_k": 4, "max_length": 48}, "output": {"uri": str(out)},
        "run": {"num_shards": 2, "part_samples": 5},
    }))
    return str(out)


def ids(batch) -> list[int]:
    return [int(x) for x in batch["sample_index"]]


def test_epoch_sampler_resumes_a_plain_loop_mid_epoch(cache):
    def loop(state=None, stop=None):
        ds = CacheDataset(cache)
        sampler = EpochSampler(len(ds), seed=7)
        sampler.set_epoch(1)
        if state:
            ds.load_state_dict(state["dataset"])
            sampler.load_state_dict(state["sampler"])
        seen = []
        for step, batch in enumerate(DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=pad_collate)):
            seen += ids(batch)
            if step + 1 == stop:  # the loop dies here: only what it saved survives
                return seen, json.loads(json.dumps({"dataset": ds.state_dict(), "sampler": sampler.state_dict()}))
        return seen, None

    whole, _ = loop()
    first, state = loop(stop=4)
    rest, _ = loop(state)
    assert first + rest == whole and len(whole) == len(set(whole)) == len(CacheDataset(cache))
    assert first == whole[:12]
    other, _ = loop()
    assert other == whole  # the order is (seed, epoch)'s alone


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_token_batches_and_streaming_mid_epoch(cache, workers):
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def loaders():
        ds = CacheDataset(cache)
        batches = TokenBatchSampler(ds.lengths(), max_tokens=120, seed=3, window=16)
        stream = StreamingCacheDataset(cache, seed=5, shuffle_buffer=4)
        return (stateful.StatefulDataLoader(ds, batch_sampler=batches, collate_fn=pad_collate, num_workers=workers),
                stateful.StatefulDataLoader(stream, batch_size=3, collate_fn=pad_collate, num_workers=workers))

    for k in range(2):
        whole = [ids(b) for b in loaders()[k]]
        loader = loaders()[k]
        it, first = iter(loader), []
        for _ in range(4):
            first.append(ids(next(it)))
        state = loader.state_dict()
        del it, loader  # stopped at step 4
        resumed = loaders()[k]
        resumed.load_state_dict(state)
        rest = [ids(b) for b in resumed]
        flat = [i for b in whole for i in b]
        assert [i for b in first + rest for i in b] == flat, k
        assert sorted(flat) == sorted(set(flat)) and len(flat) == len(CacheDataset(cache))


def test_streaming_resumes_after_a_kill(cache, tmp_path):
    """A real process, killed with SIGKILL after saving its loader state at step 3; a new one resumes from it."""
    pytest.importorskip("torchdata.stateful_dataloader")
    script = f"""
import json, os, signal, sys, torch
from torchdata.stateful_dataloader import StatefulDataLoader
from kd_core.dataset import StreamingCacheDataset, pad_collate
loader = StatefulDataLoader(StreamingCacheDataset({cache!r}, seed=9, shuffle_buffer=4), batch_size=2,
                            collate_fn=pad_collate, num_workers=2)
ckpt = {str(tmp_path / "ckpt.pt")!r}
if sys.argv[1] == "resume":
    loader.load_state_dict(torch.load(ckpt)["loader"])
for step, batch in enumerate(loader):
    print("IDS", json.dumps([int(x) for x in batch["sample_index"]]), flush=True)
    if sys.argv[1] == "kill" and step == 2:
        torch.save({{"loader": loader.state_dict()}}, ckpt)
        os.kill(os.getpid(), signal.SIGKILL)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(mode):
        done = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, env=env, timeout=300)
        lines = [line[4:] for line in done.stdout.splitlines() if line.startswith("IDS ")]
        return done, [i for line in lines for i in json.loads(line)]

    (_, whole), (killed, first), (_, rest) = run("full"), run("kill"), run("resume")
    assert killed.returncode == -signal.SIGKILL
    assert len(first) == 6 and first + rest == whole and sorted(whole) == sorted(set(whole)) and len(whole) == len(CacheDataset(cache))


def test_state_of_another_cache_is_refused(cache, tmp_path):
    ds = CacheDataset(cache)
    with pytest.raises(ValueError, match="another cache"):
        ds.load_state_dict({"cache": {"num_samples": 41, "version": "x"}})
    stream = StreamingCacheDataset(cache, seed=1)
    with pytest.raises(ValueError, match="seed 2"):
        stream.load_state_dict({**stream.state_dict(), "seed": 2})


def test_token_batches_hold_every_sample_once_under_max_tokens():
    lengths = np.random.default_rng(0).integers(5, 200, 500)
    lengths[17] = 900  # longer than max_tokens: a batch by itself
    sampler = TokenBatchSampler(lengths, max_tokens=1000, seed=1, window=64)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(500))
    assert all(len(b) * lengths[b].max() <= 1000 for b in batches)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded < 1.3 * lengths.sum()  # sorted windows: little padding (a random batch of 8 pads ~1.8x here)
    assert list(sampler) == batches  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != batches
    halves = [list(TokenBatchSampler(lengths, 1000, seed=1, window=64, rank=r, world_size=2)) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) and not {i for b in halves[0] for i in b} & {i for b in halves[1] for i in b}


def test_orders_by_groups_of_files_open_each_file_once_per_epoch(cache):
    """file_starts: every sample once, each group's samples together, so a reader that keeps 2 files open opens each
    of the 8 files once per epoch, where a fully random order reopens them; resumable like the plain order."""
    ds = CacheDataset(cache)
    starts = ds.file_starts()
    assert len(starts) == 8 and starts[0] == 0
    file_of = np.searchsorted(starts, np.arange(len(ds)), side="right") - 1  # (S,) each sample's file

    def opened(order) -> int:
        reader = CacheDataset(cache).reader
        reader.MAX_OPEN = {"local": 2, "remote": 2}
        for i in order:
            reader[int(i)]
        return reader.stats()["files_opened"]

    sampler = EpochSampler(len(ds), seed=3, file_starts=starts, open_files=2)
    order = list(sampler)
    assert sorted(order) == list(range(len(ds)))
    groups: list[set] = [set()]  # the order cut greedily into stretches of at most 2 files
    for f in file_of[order]:
        if f not in groups[-1] and len(groups[-1]) == 2:
            groups.append(set())
        groups[-1].add(f)
    assert len(groups) == 4 and set().union(*groups) == set(range(8))  # each file in one stretch
    assert opened(order) == 8 < opened(EpochSampler(len(ds), seed=3))
    sampler.load_state_dict({**sampler.state_dict(consumed=13)})
    assert list(sampler) == order[13:]

    batches = list(TokenBatchSampler(ds.lengths(), max_tokens=200, seed=3, file_starts=starts, open_files=2))
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    assert all(len(set(file_of[b])) <= 2 for b in batches)
    assert opened([i for b in batches for i in b]) == 8
    with pytest.raises(ValueError, match="file_starts"):
        list(EpochSampler(10, file_starts=[1, 5]))
