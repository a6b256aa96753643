"""Teacher inference: texts in, each sample's top-k next-token log-probs out, in input order.

The goal is the speed of the teacher's bare forward pass, so everything else hides behind it. Three threads
joined by bounded queues (memory stays flat on a shard of any length):

  tokenizer thread   texts -> token ids, a chunk at a time (the Rust tokenizer runs them in parallel).
  device thread      a look-ahead window of samples, sorted by length, cut into batches under a token budget
                     (batch_size * longest <= batch_tokens, so little padding); forward; top-k of the real
                     rows only; an asynchronous copy to pinned host memory on a side stream. Batch i's copy is
                     waited for only after batch i+1 is queued on the GPU, so copies hide behind compute.
  caller             this generator: yields a finished window in input order while the device thread runs
                     the next one, so the caller's writes hide behind compute too.

Exactness: batches are right-padded. Under a causal mask a real position never sees a pad to its right, so a
sample's rows do not depend on what it is batched with; no padding mask is passed, which keeps SDPA on its
fast is_causal kernels. Log-probs and logsumexp are computed in float32 from the logits (see topk_logprobs).
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from kd_core.teacher import Teacher

# Logit elements handled at once (rows * V): bounds the head's output and any float32 upcast; 2048 rows at 32k.
CHUNK_ELEMENTS = 2**26
# Config attributes of models that post-process logits after the output layer (soft-capping, scaling):
# for them the lm_head cannot be applied on its own, so the full forward is used.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
_TOKENIZE_CHUNK = 64  # texts per tokenizer call
_POLL_S = 0.1  # how often a blocked thread checks whether the caller has gone away


@dataclass
class SampleRows:
    """One sample's cache rows. Row t is the teacher's distribution for token t+1 given tokens 0..t."""

    sample_index: int
    input_ids: np.ndarray  # (L,) uint32
    topk_indices: np.ndarray  # (L, k) uint32, best first
    topk_logprobs: np.ndarray  # (L, k) float16
    logsumexp: np.ndarray  # (L,) float32, of the raw logits


@dataclass
class InferenceStats:
    """Progress, updated as samples are yielded (skipped_empty as soon as the tokenizer sees them).

    Cumulative: pass the same object to successive run_teacher calls and it adds up (seconds too)."""

    samples: int = 0
    skipped_empty: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def topk_logprobs(
    logits: torch.Tensor, k: int, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(…, V) logits -> top-k ids (…, k) int64, their log-probs (…, k) float32, logsumexp (…) float32.

    Float32 whatever the logits' dtype, without a (…, V) float32 log_softmax: rows are taken a chunk at a
    time, so any upcast is bounded by chunk_rows * V. The top-k is taken on the raw logits (same order as on
    the log-probs, since logsumexp is a per-row constant) and log p = logit - logsumexp.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # (N, V)
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // vocab)
    ids, logprobs, lses = [], [], []
    for chunk in flat.split(chunk_rows) if len(flat) else [flat]:
        lse = _logsumexp(chunk)  # (n,)
        top, idx = chunk.topk(k, dim=-1)  # (n, k), best first
        ids.append(idx)
        logprobs.append(top.float() - lse[:, None])
        lses.append(lse)
    lead = logits.shape[:-1]
    return torch.cat(ids).view(*lead, k), torch.cat(logprobs).view(*lead, k), torch.cat(lses).view(lead)


def _logsumexp_float32(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x.float(), dim=-1)


@functools.cache
def _compiled_logsumexp():
    return torch.compile(_logsumexp_float32, dynamic=True)  # made on first use: importing dynamo takes seconds


_compile_failed = False


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """(n, V) -> (n,) float32. On CUDA a compiled kernel reads the logits once in their own dtype and sums in
    float32; eager upcasts and makes several passes (6x slower on an H100, see docs/PERFORMANCE.md)."""
    global _compile_failed
    if x.device.type != "cuda" or _compile_failed:
        return _logsumexp_float32(x)
    try:
        return _compiled_logsumexp()(x)
    except Exception as e:  # e.g. no Triton for this GPU: same numbers, slower
        _compile_failed = True
        warnings.warn(f"compiled logsumexp unavailable ({type(e).__name__}: {e}); using eager", stacklevel=2)
        return _logsumexp_float32(x)


class _Forward:
    """The teacher on a right-padded batch -> top-k of the real rows only.

    When the model is a body plus a plain linear head (most HF causal LMs), the head runs on the real rows
    alone, a chunk at a time: no (B, T, V) logits for the padding, and peak memory bounded by the chunk.
    Otherwise (logit post-processing, exotic heads) it falls back to the full logits, then gathers.
    """

    def __init__(self, model: torch.nn.Module, top_k: int):
        self.model, self.top_k = model, top_k
        self.body, self.head = model.base_model, model.get_output_embeddings()
        config = model.config.get_text_config()
        self.split = (
            self.body is not model
            and isinstance(self.head, torch.nn.Linear)
            and not any(getattr(config, name, None) for name in _LOGIT_POSTPROCESSING)
        )

    def __call__(self, input_ids: torch.Tensor, rows: torch.Tensor):
        """input_ids (B, T) right-padded; rows (N,) flat indices b*T+t of the real positions."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # (B, T)
        if not self.split:
            logits = self.model(input_ids=input_ids, position_ids=positions, use_cache=False).logits  # (B, T, V)
            return topk_logprobs(logits.flatten(0, 1).index_select(0, rows), self.top_k)
        hidden = self.body(input_ids=input_ids, position_ids=positions, use_cache=False).last_hidden_state
        hidden = hidden.flatten(0, 1).index_select(0, rows)  # (N, H)
        step = max(1, CHUNK_ELEMENTS // self.head.out_features)
        parts = [topk_logprobs(self.head(h), self.top_k, step) for h in hidden.split(step)]  # (n, V) each
        return tuple(torch.cat(p) for p in zip(*parts))


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Blocking put that gives up when the caller has stopped listening."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            pass
    return False


def _get(q: queue.Queue, stop: threading.Event):
    while not stop.is_set():
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            pass
    raise _Stopped


class _Stopped(Exception):
    """The caller closed the generator: worker threads unwind quietly."""


_DONE = object()


def _tokenize_loop(teacher, samples, max_length, out: queue.Queue, stop, stats: InferenceStats) -> None:
    """samples -> chunks of (sample_index, ids (L,) uint32) on `out`; empty texts counted, never sent."""
    try:
        it = iter(samples)
        while chunk := list(itertools.islice(it, _TOKENIZE_CHUNK)):
            kept = [(i, t) for i, t in chunk if isinstance(t, str) and t.strip()]
            stats.skipped_empty += len(chunk) - len(kept)
            ids = teacher.tokenize_many([t for _, t in kept], max_length) if kept else []
            tokenized = [(i, np.asarray(x, dtype=np.uint32)) for (i, _), x in zip(kept, ids) if len(x)]
            stats.skipped_empty += len(kept) - len(tokenized)  # texts that tokenize to nothing
            if tokenized and not _put(out, tokenized, stop):
                return
        _put(out, _DONE, stop)
    except BaseException as e:  # handed to the caller, who re-raises it
        _put(out, e, stop)


def _windows(tokenized: queue.Queue, stop, window_tokens: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    """Consecutive look-ahead windows of about window_tokens tokens, in input order."""
    window, size = [], 0
    while (item := _get(tokenized, stop)) is not _DONE:
        if isinstance(item, BaseException):
            raise item
        window += item
        size += sum(len(ids) for _, ids in item)
        if size >= window_tokens:
            yield window
            window, size = [], 0
    if window:
        yield window


def _batches(window: list, batch_tokens: int) -> Iterator[list[int]]:
    """Positions in `window`, longest first, grouped so that len(batch) * longest <= batch_tokens."""
    order = sorted(range(len(window)), key=lambda j: -len(window[j][1]))
    batch: list[int] = []
    for j in order:
        if batch and (len(batch) + 1) * len(window[batch[0]][1]) > batch_tokens:
            yield batch
            batch = []
        batch.append(j)  # a sample longer than the budget runs alone
    if batch:
        yield batch


class _Window:
    """A look-ahead window's results, filled in batch order, handed on in input order once complete."""

    def __init__(self, samples: list):
        self.samples, self.rows, self.missing = samples, [None] * len(samples), len(samples)


class _DeviceLoop:
    """The device thread: windows -> batches -> forward + async copy -> complete windows on `out`."""

    def __init__(self, teacher: Teacher, top_k: int, batch_tokens: int):
        self.device, self.batch_tokens = teacher.device, batch_tokens
        self.forward = _Forward(teacher.model, top_k)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None

    def run(self, tokenized: queue.Queue, out: queue.Queue, stop, window_tokens: int) -> None:
        try:
            with torch.inference_mode(), torch.cuda.device(self.device) if self.cuda else nullcontext():
                in_flight = None
                for samples in _windows(tokenized, stop, window_tokens):
                    window = _Window(samples)
                    for batch in _batches(samples, self.batch_tokens):
                        launched = self._launch(window, batch)
                        if in_flight is not None:  # wait for the previous copy only now: it ran behind this
                            self._finish(*in_flight, out, stop)
                        in_flight = launched
                if in_flight is not None:
                    self._finish(*in_flight, out, stop)
            _put(out, _DONE, stop)
        except _Stopped:
            pass
        except BaseException as e:
            _put(out, e, stop)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.cuda:  # pinned, so the upload is asynchronous too
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _launch(self, window: _Window, batch: list[int]):
        """Queue one batch's forward and the copy of its results to the host; returns what _finish needs."""
        lengths = [len(window.samples[j][1]) for j in batch]
        width = lengths[0]  # longest first
        ids = np.zeros((len(batch), width), dtype=np.int64)  # (B, T), right-padded with token 0
        for b, j in enumerate(batch):
            ids[b, : lengths[b]] = window.samples[j][1]
        rows = np.concatenate([b * width + np.arange(n) for b, n in enumerate(lengths)])  # (N,)
        top_ids, top_lp, lse = self.forward(self._to_device(ids), self._to_device(rows))
        # Narrow on the device: 4 + 2 bytes per entry cross the bus instead of 8 + 4.
        results = (top_ids.to(torch.int32), top_lp.to(torch.float16), lse)  # (N, k), (N, k), (N,)
        if not self.cuda:
            return window, batch, lengths, results, None
        self.copy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.copy_stream):
            host = tuple(torch.empty(r.shape, dtype=r.dtype, pin_memory=True) for r in results)
            for h, r in zip(host, results):
                h.copy_(r, non_blocking=True)
                r.record_stream(self.copy_stream)  # keep r's memory until the copy is done
            done = torch.cuda.Event()
            done.record()
        return window, batch, lengths, host, done

    def _finish(self, window: _Window, batch, lengths, host, done, out: queue.Queue, stop) -> None:
        """Wait for a batch's copy, split it into samples; hand its window on when that is complete."""
        if done is not None:
            done.synchronize()
        # Copied off the pinned buffers so they go straight back to the allocator for later batches.
        ids, logprobs, lse = (h.numpy().copy() for h in host)
        ids = ids.view(np.uint32)
        start = 0
        for j, n in zip(batch, lengths):
            index, tokens = window.samples[j]
            end = start + n
            window.rows[j] = SampleRows(index, tokens, ids[start:end], logprobs[start:end], lse[start:end])
            start = end
        window.missing -= len(batch)
        if window.missing == 0 and not _put(out, window.rows, stop):
            raise _Stopped


def run_teacher(
    teacher: Teacher,
    samples: Iterable[tuple[int, str]],
    *,
    top_k: int,
    max_length: int,
    batch_tokens: int,
    stats: InferenceStats | None = None,
    window_tokens: int | None = None,
) -> Iterator[SampleRows]:
    """(sample_index, text) pairs -> SampleRows in input order; empty/whitespace texts skipped and counted.

    batch_tokens bounds a batch's padded size (batch_size * longest sample). window_tokens is the look-ahead
    that is sorted by length (default 32 batches' worth): larger means less padding (on stdlib text, real
    tokens are 91% of those computed at 16 batches, 95% at 32, 97% at 64) but more host memory (6 * top_k + 8
    bytes per token for each of up to three windows in flight: ~1.2 GB at 32 x 32768 tokens and k=64).
    """
    if top_k > teacher.vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the teacher's vocab size {teacher.vocab_size}")
    stats = stats if stats is not None else InferenceStats()
    window_tokens = window_tokens or 32 * batch_tokens
    stop = threading.Event()
    tokenized: queue.Queue = queue.Queue(maxsize=max(2, window_tokens // (_TOKENIZE_CHUNK * 64)))
    windows: queue.Queue = queue.Queue(maxsize=1)  # one finished window waits while the caller takes another
    loop = _DeviceLoop(teacher, top_k, batch_tokens)
    threads = [
        threading.Thread(target=_tokenize_loop, args=(teacher, samples, max_length, tokenized, stop, stats)),
        threading.Thread(target=loop.run, args=(tokenized, windows, stop, window_tokens)),
    ]
    start = time.perf_counter() - stats.seconds  # a stats carried over from earlier calls keeps counting
    for t in threads:
        t.daemon = True
        t.start()
    try:
        while (item := windows.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            for rows in item:
                stats.samples += 1
                stats.tokens += len(rows.input_ids)
                stats.seconds = time.perf_counter() - start
                yield rows
        stats.seconds = time.perf_counter() - start
    finally:
        stop.set()  # the caller may have stopped early: let the threads unwind
        for t in threads:
            t.join()
