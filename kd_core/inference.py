"""Teacher inference: texts in, each sample's top-k next-token log-probs out, in input order.

The goal is the speed of the teacher's bare forward pass, so everything else hides behind it. Three threads
joined by bounded queues (memory stays flat on a shard of any length):

  tokenizer thread   texts -> token ids, a chunk at a time (the Rust tokenizer runs them in parallel).
  device thread      a look-ahead window of samples, sorted by length, cut into batches (a Batch each) under
                     a token budget (batch_size * longest <= batch_tokens, so little padding); forward; top-k
                     of the real rows only; an asynchronous copy to pinned host memory on a side stream.
                     Batch i's copy is waited for only after batch i+1 is queued on the GPU, so copies hide
                     behind compute.
  caller             this generator: yields a finished window in input order while the device thread runs
                     the next one, so the caller's writes hide behind compute too.

Parts: run_teacher(parts=[n0, n1, ...]) runs a shard's planned parts in one pass (the threads and the first
window's fill are paid once) and yields a PartEnd after each part's rows. A window never holds samples of two
parts, and each part's windows are cut exactly as a run over that part alone cuts them, so a resumed run (which
starts at a part boundary) batches, and so computes, every part as an uninterrupted run does.

Exactness: batches are right-padded. Under a causal mask a real position never sees a pad to its right, so a
sample's rows do not depend on what it is batched with; no padding mask is passed, which keeps SDPA on its
fast is_causal kernels; positions are the model's defaults (0..T-1 in every row). (Packing several samples per
row, with position_ids restarting per sample, is exact too but was slower on an H200 with the attention
transformers offers: docs/PERFORMANCE.md, bench/gpu_packing.py, which builds its packed batches itself.)
The output layer runs in float32 on the body's hidden states (Float32Head), so the log-probs, logsumexp and
draws come from the teacher's own logits to float32 precision even for a bf16 teacher; ties at rank k go to
the lowest id (kd_core.topk: fused Triton kernels on CUDA, one read of each logit). Each row is then either its
top-k (cache.mode topk) or N draws from its softmax, stored as distinct ids and counts (cache.mode sampled,
kd_core.sampling).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from kd_core.sampling import sample_rows
from kd_core.teacher import Teacher, execution_device
from kd_core.topk import row_logsumexp, topk_logprobs

# Logit elements handled at once (rows * V): bounds the head's float32 output (1 GiB; 1,766 rows at V = 151,936).
# Smaller chunks cost the fused top-k: 12.1 ms per 32k rows in chunks of 441 rows, 10.3 in chunks of 1,766 (H200).
CHUNK_ELEMENTS = 2**28
# Sampled mode's integer CDF takes 8 more bytes a logit (kd_core.sampling): its chunks are a quarter of that.
SAMPLED_CHUNK_ELEMENTS = 2**26
# Config attributes of models that post-process logits after the output layer (soft-capping, scaling):
# for them the lm_head cannot be applied on its own, so the full forward is used.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
TOKENIZE_CHUNK = 64  # texts per tokenizer call
_POLL_S = 0.1  # how often a blocked thread checks whether the caller has gone away


@dataclass
class SampleRows:
    """One sample's cache rows. Row t is the teacher's distribution for token t+1 given tokens 0..t.

    Top-k mode fills topk_*, sampled mode sampled_*; the other pair is None.
    """

    sample_index: int
    input_ids: np.ndarray  # (L,) uint32
    topk_indices: np.ndarray | None  # (L, k) uint32, best first (ties: lowest id first)
    topk_logprobs: np.ndarray | None  # (L, k) float16
    logsumexp: np.ndarray  # (L,) float32, of the raw logits
    sampled_ids: np.ndarray | None = None  # (L, m) uint32, distinct drawn ids ascending, 0 where count is 0
    sampled_counts: np.ndarray | None = None  # (L, m) uint16, times drawn; each row sums to N; 0 = padding


@dataclass(frozen=True)
class RowSpec:
    """What a cache row holds: the top_k best ids (mode topk) or `draws` draws at temperature 1 (mode sampled)."""

    mode: str = "topk"
    top_k: int = 64
    draws: int = 64

    def __post_init__(self):
        if self.mode not in ("topk", "sampled"):
            raise ValueError(f"mode must be 'topk' or 'sampled', got {self.mode!r}")
        if not 1 <= self.draws <= 32767:  # counts travel as int16
            raise ValueError(f"draws must be in 1..32767, got {self.draws}")

    @property
    def width(self) -> int:
        return self.top_k if self.mode == "topk" else self.draws


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


@dataclass(frozen=True)
class PartEnd:
    """Yielded by run_teacher(parts=...) after the last rows of a part (also of a part with no rows)."""

    part: int  # position in `parts`
    rows: int  # source rows read for it: fewer than planned when the samples ran out
    skipped_empty: int  # of those, rows with no text (or none after tokenizing): no SampleRows for them


def row_results(logits: torch.Tensor, spec: RowSpec, sample_index: torch.Tensor, position: torch.Tensor):
    """(n, V) logits (float32 from Float32Head) -> what the cache stores for those rows, narrowed for the copy.

    topk:    ids (n, k) int32, log-probs (n, k) float16, logsumexp (n,) float32
    sampled: distinct ids (n, N) int32, counts (n, N) int16 (0 = padding), logsumexp (n,) float32
    sample_index, position (n,) int64 seed the draws (sampled mode only).
    """
    if spec.mode == "topk":
        ids, logprobs, lse = topk_logprobs(logits, spec.top_k, chunk_rows=len(logits) or 1)
        # Narrow on the device: 4 + 2 bytes per entry cross the bus instead of 8 + 4.
        return ids.to(torch.int32), logprobs.to(torch.float16), lse
    logits = logits.float()
    lse = row_logsumexp(logits)
    ids, counts = sample_rows(logits, lse, sample_index, position, spec.draws)
    return ids.to(torch.int32), counts.to(torch.int16), lse


def has_plain_head(model: torch.nn.Module) -> bool:
    """Whether the model is a body (model.base_model) plus a linear head whose output is the logits as they are,
    with the head's weight at hand (not offloaded by device_map: accelerate leaves those on "meta")."""
    config = model.config.get_text_config()
    head = model.get_output_embeddings()
    return (
        model.base_model is not model
        and isinstance(head, torch.nn.Linear)
        and head.weight.device.type != "meta"
        and not any(getattr(config, name, None) for name in _LOGIT_POSTPROCESSING)
    )


class Float32Head:
    """The output layer in float32: logits (n, V) float32 from hidden states (n, H) in the model's dtype.

    A bf16 head rounds every logit to bf16 (up to 0.06 nats at |logit| 16..32) and makes false ties at rank k.
    Products of two bf16 (or fp16) numbers are exact in float32, so a float32 accumulation of them is the
    teacher's own logit to float32 precision. On CUDA that is one matmul with float32 output (torch.mm's
    out_dtype: bf16 tensor cores, float32 accumulate and store); elsewhere, or where that is missing, both sides
    are upcast (a float32 copy of the weight, made once: V * H * 4 bytes).
    """

    def __init__(self, head: torch.nn.Linear):
        self.head = head
        self.bias = head.bias.float() if head.bias is not None else None
        self._weight32: torch.Tensor | None = None
        self._mixed = head.weight.dtype != torch.float32 and head.weight.device.type == "cuda"

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._mixed:
            try:
                logits = torch.mm(hidden, self.head.weight.t(), out_dtype=torch.float32)  # (n, V)
                return logits if self.bias is None else logits + self.bias
            except (RuntimeError, TypeError) as e:  # an older torch or another accelerator
                warnings.warn(f"float32-output matmul unavailable ({e}); upcasting the head instead", stacklevel=2)
                self._mixed = False
        if self._weight32 is None:
            weight = self.head.weight
            self._weight32 = weight if weight.dtype == torch.float32 else weight.float()
        return torch.nn.functional.linear(hidden.float(), self._weight32, self.bias)


@dataclass
class Batch:
    """One forward pass's inputs, on the teacher's input device: built by _DeviceLoop, consumed by Forward.

    Row b of the (B, T) grid holds one right-padded sample from column 0: a real position sees exactly its own
    sample's earlier tokens at the positions it has alone (the model's default 0..T-1), so its row equals the
    sample run alone, and SDPA runs its is_causal kernels.
    """

    input_ids: torch.Tensor  # (B, T) int64, padding 0
    rows: torch.Tensor  # (N,) int64, flat indices b*T+t of the real positions, sample after sample
    sample_index: torch.Tensor  # (N,) int64, each real position's source row (seeds sampled mode's draws)
    position: torch.Tensor  # (N,) int64, each real position's t within its sample


class Forward:
    """The teacher on a Batch -> the cache's results (row_results) for the real rows only.

    When the model is a body plus a plain linear head (most HF causal LMs), the head runs in float32 on the real
    rows alone, a chunk at a time: no (B, T, V) logits for the padding, and peak memory bounded by the chunk.
    Otherwise (logit post-processing, exotic heads, a head offloaded by device_map) it falls back to the model's
    own logits, then gathers: those carry the model dtype's rounding.

    Under device_map the pieces may sit on different devices: accelerate returns only the root module's output
    on the input device, so the body's hidden states come back on its last layer's device and the head may be on
    yet another. Rows follow the hidden states, and the results come out on `self.out_device`.
    """

    def __init__(self, model: torch.nn.Module, spec: RowSpec):
        self.model, self.spec = model, spec
        self.body, self.head = model.base_model, model.get_output_embeddings()
        self.split = has_plain_head(model)
        self.head32 = Float32Head(self.head) if self.split else None
        # The full forward's logits come back on the input device (the root module's hook moves them there).
        self.out_device = self.head.weight.device if self.split else execution_device(model.get_input_embeddings())

    def __call__(self, batch: Batch):
        """-> (N, width) ids int32, (N, width) log-probs float16 or counts int16, (N,) logsumexp float32, in the
        order of batch.rows, on self.out_device."""
        inputs = {"input_ids": batch.input_ids, "use_cache": False}
        if not self.split:
            hidden, project = self.model(**inputs).logits, (lambda x: x)  # (B, T, V)
        else:
            hidden, project = self.body(**inputs).last_hidden_state, self.head32  # (B, T, H)
        hidden = hidden.flatten(0, 1).index_select(0, batch.rows.to(hidden.device)).to(self.out_device)  # (N, ·)
        sample_index, position = batch.sample_index.to(self.out_device), batch.position.to(self.out_device)
        vocab = self.head.out_features if self.split else hidden.shape[-1]
        step = max(1, (CHUNK_ELEMENTS if self.spec.mode == "topk" else SAMPLED_CHUNK_ELEMENTS) // vocab)
        parts = [
            row_results(project(h), self.spec, s, p)  # (n, V) float32 logits in, (n, width) results out
            for h, s, p in zip(hidden.split(step), sample_index.split(step), position.split(step))
        ]
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


def _tokenize_loop(teacher, samples, parts: Sequence[int] | None, max_length, out: queue.Queue, stop,
                   stats: InferenceStats) -> None:
    """samples -> chunks of (sample_index, ids (L,) uint32) on `out`; empty texts counted, never sent. With
    `parts`, chunks never straddle a part and a PartEnd follows each part's chunks."""
    try:
        it = iter(samples)
        for number, size in enumerate(parts if parts is not None else [None]):
            part, rows, skipped = itertools.islice(it, size), 0, 0  # size None: every sample
            while chunk := list(itertools.islice(part, TOKENIZE_CHUNK)):
                kept = [(i, t) for i, t in chunk if isinstance(t, str) and t.strip()]
                ids = teacher.tokenize_many([t for _, t in kept], max_length) if kept else []
                tokenized = [(i, np.asarray(x, dtype=np.uint32)) for (i, _), x in zip(kept, ids) if len(x)]
                rows, skipped = rows + len(chunk), skipped + len(chunk) - len(tokenized)
                stats.skipped_empty += len(chunk) - len(tokenized)  # texts empty or tokenizing to nothing
                if tokenized and not _put(out, tokenized, stop):
                    return
            if parts is not None and not _put(out, PartEnd(number, rows, skipped), stop):
                return
        _put(out, _DONE, stop)
    except BaseException as e:  # handed to the caller, who re-raises it
        _put(out, e, stop)


def _windows(tokenized: queue.Queue, stop, window_tokens: int) -> Iterator[list[tuple[int, np.ndarray]] | PartEnd]:
    """Consecutive look-ahead windows of about window_tokens tokens, in input order; a PartEnd closes the window
    (then comes itself), so the next part's first window starts afresh, as it would in a run of that part alone."""
    window, size = [], 0
    while (item := _get(tokenized, stop)) is not _DONE:
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, PartEnd):
            if window:
                yield window
            yield item
            window, size = [], 0
            continue
        window += item
        size += sum(len(ids) for _, ids in item)
        if size >= window_tokens:
            yield window
            window, size = [], 0
    if window:
        yield window


@dataclass(frozen=True)
class PaddedBatch:
    """Which samples of a look-ahead window one batch holds: window positions, longest first; sample b is row b
    of the (height, width) grid, right-padded."""

    samples: list[int]
    lengths: list[int]  # lengths[b] of samples[b], descending

    @property
    def height(self) -> int:  # B
        return len(self.samples)

    @property
    def width(self) -> int:  # T: the longest sample
        return self.lengths[0]


def padded_batches(lengths: list[int], batch_tokens: int) -> Iterator[PaddedBatch]:
    """How run_teacher batches a window of samples of these lengths: one sample per row, longest first, grouped
    so that len(batch) * longest <= batch_tokens (a sample longer than the budget runs alone)."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    batch: list[int] = []
    for j in order + [None]:
        if batch and (j is None or (len(batch) + 1) * lengths[batch[0]] > batch_tokens):
            yield PaddedBatch(batch, [lengths[i] for i in batch])
            batch = []
        if j is not None:
            batch.append(j)


def _grid(samples: list[tuple[int, np.ndarray]], layout: PaddedBatch) -> tuple[np.ndarray, ...]:
    """(sample_index, tokens) pairs laid out as `layout` says -> Batch's fields as host arrays:
    input_ids (B, T), rows (N,), sample_index (N,), position (N,), all int64."""
    ids = np.zeros((layout.height, layout.width), dtype=np.int64)  # (B, T), padding 0
    for b, j in enumerate(layout.samples):
        ids[b, : layout.lengths[b]] = samples[j][1]
    rows = np.concatenate([b * layout.width + np.arange(n) for b, n in enumerate(layout.lengths)])  # (N,)
    # Each row's source row and position: the seed of its draws in sampled mode, whatever the batch.
    sample_index = np.repeat([samples[j][0] for j in layout.samples], layout.lengths).astype(np.int64)
    position = np.concatenate([np.arange(n) for n in layout.lengths])  # (N,)
    return ids, rows, sample_index, position


class _Window:
    """A look-ahead window's results, filled in batch order, handed on in input order once complete."""

    def __init__(self, samples: list):
        self.samples, self.rows, self.missing = samples, [None] * len(samples), len(samples)
        self.then: list[PartEnd] = []  # handed on right after this window's rows


class _DeviceLoop:
    """The device thread: windows -> batches -> forward + async copy -> complete windows on `out`."""

    def __init__(self, teacher: Teacher, spec: RowSpec, batch_tokens: int):
        self.device, self.batch_tokens, self.spec = teacher.device, batch_tokens, spec
        self.forward = Forward(teacher.model, spec)
        self.cuda = self.device.type == "cuda"
        out = self.forward.out_device  # device_map: the results may come out on another device than the inputs
        self.copy_stream = torch.cuda.Stream(out) if out.type == "cuda" else None

    def run(self, tokenized: queue.Queue, out: queue.Queue, stop, window_tokens: int) -> None:
        try:
            with torch.inference_mode(), torch.cuda.device(self.device) if self.cuda else nullcontext():
                in_flight = None
                for samples in _windows(tokenized, stop, window_tokens):
                    if isinstance(samples, PartEnd):  # after the rows of the last window, still in flight or not
                        if in_flight is not None:
                            in_flight[0].then.append(samples)
                        elif not _put(out, samples, stop):
                            raise _Stopped
                        continue
                    window = _Window(samples)
                    for layout in padded_batches([len(ids) for _, ids in samples], self.batch_tokens):
                        launched = self._launch(window, layout)
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

    def _batch(self, window: _Window, layout: PaddedBatch) -> Batch:
        """The layout's Batch on the input device."""
        return Batch(*map(self._to_device, _grid(window.samples, layout)))

    def _launch(self, window: _Window, layout: PaddedBatch):
        """Queue one batch's forward and the copy of its results to the host; returns what _finish needs."""
        # (N, width) ids int32, (N, width) log-probs float16 or counts int16, (N,) logsumexp float32
        results = self.forward(self._batch(window, layout))
        if self.copy_stream is None:  # the results are on the host already
            return window, layout, results, None
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.copy_stream.device))
        with torch.cuda.stream(self.copy_stream):
            host = tuple(torch.empty(r.shape, dtype=r.dtype, pin_memory=True) for r in results)
            for h, r in zip(host, results):
                h.copy_(r, non_blocking=True)
                r.record_stream(self.copy_stream)  # keep r's memory until the copy is done
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return window, layout, host, done

    def _finish(self, window: _Window, layout: PaddedBatch, host, done, out: queue.Queue, stop) -> None:
        """Wait for a batch's copy, split it into samples; hand its window on when that is complete."""
        if done is not None:
            done.synchronize()
        # Copied off the pinned buffers so they go straight back to the allocator for later batches.
        ids, values, lse = (h.numpy().copy() for h in host)
        ids = ids.view(np.uint32)
        start = 0
        for j, n in zip(layout.samples, layout.lengths):
            index, tokens = window.samples[j]
            end = start + n
            window.rows[j] = self._sample_rows(index, tokens, ids[start:end], values[start:end], lse[start:end])
            start = end
        window.missing -= len(layout.samples)
        if window.missing == 0 and not all(_put(out, item, stop) for item in [window.rows, *window.then]):
            raise _Stopped

    def _sample_rows(self, index: int, tokens, ids: np.ndarray, values: np.ndarray, lse: np.ndarray) -> SampleRows:
        if self.spec.mode == "topk":
            return SampleRows(index, tokens, ids, values, lse)
        width = max(1, int((values > 0).sum(-1).max()))  # the sample's most distinct ids in a row
        counts = values[:, :width].astype(np.uint16)  # (L, m)
        return SampleRows(index, tokens, None, None, lse, sampled_ids=ids[:, :width].copy(), sampled_counts=counts)


def run_teacher(
    teacher: Teacher,
    samples: Iterable[tuple[int, str]],
    *,
    top_k: int = 64,
    max_length: int,
    batch_tokens: int,
    stats: InferenceStats | None = None,
    window_tokens: int | None = None,
    mode: str = "topk",
    draws: int = 64,
    parts: Sequence[int] | None = None,
) -> Iterator[SampleRows | PartEnd]:
    """(sample_index, text) pairs -> SampleRows in input order; empty/whitespace texts skipped and counted.

    batch_tokens bounds a batch's padded size (batch_size * longest sample). window_tokens is the look-ahead
    that is sorted by length (default 32 batches' worth): larger means less padding (on stdlib text, real
    tokens are 91% of those computed at 16 batches, 95% at 32, 97% at 64) but more host memory (6 * width + 8
    bytes per token for each of up to three windows in flight: ~1.2 GB at 32 x 32768 tokens and width 64).
    mode "topk" keeps each row's top_k; mode "sampled" keeps `draws` draws per row as distinct ids and counts.
    parts: the samples are parts of these many samples each, run as if one run_teacher call each (see the module
    docstring), and a PartEnd is yielded after each; without it, SampleRows only. (bench/devicetime.py times
    each batch's forward from outside, by wrapping Forward.__call__.)
    """
    spec = RowSpec(mode=mode, top_k=top_k, draws=draws)
    if mode == "topk" and top_k > teacher.vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the teacher's vocab size {teacher.vocab_size}")
    stats = stats if stats is not None else InferenceStats()
    window_tokens = window_tokens or 32 * batch_tokens
    stop = threading.Event()
    tokenized: queue.Queue = queue.Queue(maxsize=max(2, window_tokens // (TOKENIZE_CHUNK * 64)))
    windows: queue.Queue = queue.Queue(maxsize=1)  # one finished window waits while the caller takes another
    loop = _DeviceLoop(teacher, spec, batch_tokens)
    threads = [
        threading.Thread(target=_tokenize_loop, args=(teacher, samples, parts, max_length, tokenized, stop, stats)),
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
            if isinstance(item, PartEnd):
                yield item
                continue
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
