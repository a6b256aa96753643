"""How big a cache will be, from the format's own arithmetic, and how much teacher compute it takes.

upper_bound_bytes: every sample at max_length, uncompressed: exact for the worst case.
expected_bytes:    mean tokens per sample from tokenizing a probe of real samples, times the stored (compressed)
                   bytes per token from a model of how shuffle+gzip compresses each array (below).
teacher_flops:     2 x teacher parameters x expected tokens (one forward pass), and from it GPU hours per
                   accelerator at a stated peak throughput and the utilisation measured on our own runs.

The seed system's table was ~1000x low: 1M samples x 2048 tokens x top-64 is 802.8 GB with uint32 ids, input ids
and logsumexp (786 GB for the top-k entries alone), not 768 MB.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from kd_core import h5cache

# Stored bytes per value after shuffle+gzip, measured on real caches (docs/FORMAT.md, "Size"):
#  - ids carry at most log2(vocab) bits; shuffle groups their always-zero high bytes, which then cost nothing.
#    Input tokens are close to that entropy; a teacher's top-k ids are skewed towards frequent tokens and
#    measured at 0.42-0.65 of it on trained teachers (about 1.0 on an untrained one), so 0.65 is assumed;
#  - fp16 log-probs: the sign/exponent byte compresses well (sorted, similar magnitudes), the mantissa byte
#    does not: 1.0-1.2 bytes measured;
#  - float32 logsumexp: only its exponent byte compresses: 2.7-3.0 bytes measured.
# The estimate is tested within 25% of real files (tests/test_pipeline.py).
TOPK_ID_ENTROPY_FRACTION = 0.58
LOGPROB_STORED_BYTES = 1.1
LOGSUMEXP_STORED_BYTES = 2.8
FILE_OVERHEAD_BYTES = 32 * 1024  # HDF5 superblock, object headers, chunk index, attributes (~25 KB measured)

# Peak dense bf16 tensor throughput (FLOP/s, no sparsity) from the vendors' datasheets: H100 SXM, A100 SXM/PCIe,
# L4. GPU hours = teacher FLOPs / (peak x MFU).
PEAK_BF16_FLOPS = {"H100": 989e12, "A100": 312e12, "L4": 121e12}
# Model FLOPs utilisation of the whole pipeline (run_teacher + CacheWriter), measured on an H100 with a 1.0B
# Llama at k=64, max_length 2048: 109,964 tokens/s incl. close (docs/PERFORMANCE.md), i.e.
# 2 x 1.0e9 x 109,964 / 989e12 = 0.22. A 110M teacher reached only 0.07 (the top-k and the writer dominate);
# multi-billion teachers usually run at or above 0.22, so the hours below are on the safe side for them.
# The same MFU is assumed on A100 and L4 (not measured there).
MEASURED_MFU = 0.22

# Sampled mode (bench/bench_sampled.py, docs/FORMAT.md "Sampled mode"). A row stores m distinct ids; m depends on
# how peaked the teacher is, which nothing before the run knows. Measured on the demo corpus: m = 46 at N = 64
# for the demo teacher (200 training steps), 29 for the same model trained 2000 steps; "Sparse Logit Sampling"
# reports about 12 for large LMs. m grows about as N**0.8 (m at N = 16, 64, 256: 13.5, 46, 147 and 10, 29, 77).
# The estimate assumes the least trained of them, so it errs high (a size limit then refuses rather than
# overflows) and is about 3x high for a large, confident teacher.
SAMPLED_DISTINCT_AT_64 = 46.0
SAMPLED_DISTINCT_EXPONENT = 0.8
#  - an id stored as the gap to the previous id of its row: a random m-subset of V costs about log2(e V / m)
#    bits per id, and gzip gets close to it (1.0 B measured at V = 4096, m = 46; the formula says 0.99);
#  - counts (mostly 1): 0.22 B each; per-row lengths: 0.7 B measured.
SAMPLED_COUNT_STORED_BYTES = 0.22
SAMPLED_LENGTH_STORED_BYTES = 0.7


def upper_bound_bytes(*, num_samples: int, max_length: int, top_k: int, vocab_size: int,
                      samples: int | None = None) -> int:
    """Every sample at max_length, uncompressed (sampled: every draw a distinct id)."""
    tokens = num_samples * max_length
    per_sample = h5cache.BYTES_PER_SAMPLE + (8 if samples is not None else 0)  # + /sampled_offsets
    return (tokens * h5cache.bytes_per_token(top_k, vocab_size, samples) + num_samples * per_sample + 16
            + FILE_OVERHEAD_BYTES)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def expected_distinct(samples: int, vocab_size: int) -> float:
    """The model's distinct ids per row among `samples` draws (see SAMPLED_DISTINCT_AT_64)."""
    return min(samples, vocab_size, SAMPLED_DISTINCT_AT_64 * (samples / 64) ** SAMPLED_DISTINCT_EXPONENT)


def stored_bytes_per_token(top_k: int, vocab_size: int, samples: int | None = None) -> float:
    """Expected bytes one token takes in the file after compression (see the constants above)."""
    id_bytes = math.log2(max(vocab_size, 2)) / 8
    if samples is not None:
        m = expected_distinct(samples, vocab_size)
        gap_bytes = math.log2(math.e * max(vocab_size, 2) / m) / 8
        return (id_bytes + LOGSUMEXP_STORED_BYTES + SAMPLED_LENGTH_STORED_BYTES
                + m * (gap_bytes + SAMPLED_COUNT_STORED_BYTES))
    topk_id_bytes = id_bytes * TOPK_ID_ENTROPY_FRACTION
    return id_bytes + top_k * (topk_id_bytes + LOGPROB_STORED_BYTES) + LOGSUMEXP_STORED_BYTES


@dataclass
class StorageEstimate:
    num_samples: int
    max_length: int
    top_k: int | None             # None in sampled mode
    vocab_size: int
    bytes_per_token: int          # uncompressed, exact (sampled: at most)
    upper_bound_tokens: int       # every sample at max_length
    upper_bound_bytes: int
    probe_samples: int
    mean_tokens_per_sample: float
    expected_tokens: int
    expected_bytes: int           # after compression
    stored_bytes_per_token: float
    max_bytes: int | None = None
    free_bytes: int | None = None
    teacher_parameters: int | None = None
    num_shards: int = 1
    fits: bool = True
    reason: str | None = None     # why it does not fit, and the fix
    samples: int | None = None    # N draws per row in sampled mode

    @property
    def teacher_flops(self) -> float | None:
        return 2.0 * self.teacher_parameters * self.expected_tokens if self.teacher_parameters else None

    @property
    def gpu_hours(self) -> dict[str, float]:
        """{accelerator: hours on one GPU of that kind} at PEAK_BF16_FLOPS x MEASURED_MFU."""
        if self.teacher_flops is None:
            return {}
        return {gpu: self.teacher_flops / (peak * MEASURED_MFU) / 3600 for gpu, peak in PEAK_BF16_FLOPS.items()}

    @property
    def wall_hours(self) -> dict[str, float]:
        """{accelerator: hours} with each of the run.num_shards shards on a GPU of its own."""
        return {gpu: hours / self.num_shards for gpu, hours in self.gpu_hours.items()}

    def as_dict(self) -> dict:
        return {
            **asdict(self), "teacher_flops": self.teacher_flops, "gpu_hours": self.gpu_hours,
            "wall_hours": self.wall_hours,
            "gpu_hours_assumption": f"2 x teacher parameters x expected tokens at {MEASURED_MFU:.0%} of each "
                                    "GPU's peak dense bf16 throughput (MFU measured on H100, docs/PERFORMANCE.md); "
                                    f"wall_hours: {self.num_shards} shards, each on its own GPU",
        }

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) pairs for a table in the terminal or the Prefect UI."""
        return [
            ("samples", f"{self.num_samples:,}"),
            (("top_k" if self.samples is None else "samples (draws, sampled mode)") + " / max_length / vocab",
             f"{self.top_k if self.samples is None else self.samples} / {self.max_length} / {self.vocab_size:,}"),
            ("bytes per token (uncompressed)", f"{self.bytes_per_token}"),
            ("upper bound (every sample at max_length)", f"{human_bytes(self.upper_bound_bytes)} ({self.upper_bound_tokens:,} tokens)"),
            (f"mean tokens per sample ({self.probe_samples} probed)", f"{self.mean_tokens_per_sample:.1f}"),
            (f"expected ({self.stored_bytes_per_token:.0f} B/token compressed)", f"{human_bytes(self.expected_bytes)} ({self.expected_tokens:,} tokens)"),
            ("output.max_bytes", human_bytes(self.max_bytes) if self.max_bytes else "no limit"),
            ("free space at the target", human_bytes(self.free_bytes) if self.free_bytes is not None else "unknown (remote)"),
            *self._compute_rows(),
            ("fits", "yes" if self.fits else f"NO: {self.reason}"),
        ]

    def _compute_rows(self) -> list[tuple[str, str]]:
        if self.teacher_flops is None:
            return []
        gpus = ", ".join(f"{gpu} {human_hours(h)}" for gpu, h in self.gpu_hours.items())
        wall = ", ".join(f"{gpu} {human_hours(h)}" for gpu, h in self.wall_hours.items())
        return [
            ("teacher parameters", f"{self.teacher_parameters:,}"),
            ("teacher FLOPs (2 x parameters x expected tokens)", f"{self.teacher_flops:.2e}"),
            (f"GPU hours, one GPU (MFU {MEASURED_MFU:.0%})", gpus),
            (f"wall time, {self.num_shards} shard(s) on as many GPUs", wall),
        ]


def human_hours(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:,.1f} s"
    return f"{hours * 60:,.1f} min" if hours < 1 else f"{hours:,.1f} h"


def estimate(*, num_samples: int, max_length: int, top_k: int, vocab_size: int, probe_lengths: list[int],
             max_bytes: int | None = None, free_bytes: int | None = None, teacher_parameters: int | None = None,
             num_shards: int = 1, samples: int | None = None) -> StorageEstimate:
    """probe_lengths: token counts (already truncated to max_length) of real samples from the dataset.
    samples=N: a sampled cache (top_k ignored)."""
    mean_tokens = sum(probe_lengths) / len(probe_lengths) if probe_lengths else float(max_length)
    per_token = h5cache.bytes_per_token(top_k, vocab_size, samples)
    expected_tokens = round(mean_tokens * num_samples)
    stored = stored_bytes_per_token(top_k, vocab_size, samples)
    expected = round(expected_tokens * stored) + num_samples * h5cache.BYTES_PER_SAMPLE + FILE_OVERHEAD_BYTES
    return StorageEstimate(
        num_samples=num_samples, max_length=max_length, top_k=top_k if samples is None else None,
        vocab_size=vocab_size, bytes_per_token=per_token, upper_bound_tokens=num_samples * max_length,
        upper_bound_bytes=upper_bound_bytes(num_samples=num_samples, max_length=max_length, top_k=top_k,
                                            vocab_size=vocab_size, samples=samples),
        probe_samples=len(probe_lengths), mean_tokens_per_sample=mean_tokens, expected_tokens=expected_tokens,
        expected_bytes=expected, stored_bytes_per_token=stored, max_bytes=max_bytes, free_bytes=free_bytes,
        teacher_parameters=teacher_parameters, num_shards=num_shards, samples=samples,
    )


def does_not_fit(est: StorageEstimate) -> str | None:
    """Why a cache of this estimate cannot be written (with the fix), or None when it fits."""
    expected = human_bytes(est.expected_bytes)
    if est.max_bytes is not None and est.expected_bytes > est.max_bytes:
        return (f"output.max_bytes: the cache is expected to take {expected} ({est.num_samples:,} samples, "
                f"{est.mean_tokens_per_sample:,.0f} tokens each on average), over the limit of "
                f"{human_bytes(est.max_bytes)}. Fix: lower dataset.max_samples, cache.top_k (cache.samples when "
                "sampled) or cache.max_length, "
                "or raise output.max_bytes.")
    # Parts are written once, to their final keys, and the merge copies no token data: the target holds the cache
    # once, plus its index (offsets and sample rows: 16 B per sample).
    if est.free_bytes is not None and est.expected_bytes > est.free_bytes:
        return (f"output.uri: the target has {human_bytes(est.free_bytes)} free; the run needs about {expected}. "
                "Fix: free space, choose another output.uri, or lower dataset.max_samples.")
    return None


def projection_over(projected: int, written: int, max_bytes: int | None,
                    free_bytes: int | None) -> tuple[str, str] | None:
    """(key, limit) that a cache projected at `projected` bytes passes, `written` of them on the target already."""
    if max_bytes is not None and projected > max_bytes:
        return "output.max_bytes", f"the limit of {human_bytes(max_bytes)}"
    if free_bytes is not None and projected - written > free_bytes:
        return "output.uri", f"the target's free space ({human_bytes(free_bytes)})"
    return None


def local_free_bytes(path: str | Path) -> int:
    """Free space on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
