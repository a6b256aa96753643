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
from kd_core.h5cache.format import (CHUNK_INDEX_BYTES, SAMPLE_CHUNK_ROWS, chunk_rows, per_sample_bytes,
                                    per_sample_datasets, sample_bound)
from kd_core.h5cache.format import METADATA_BYTES as HDF5_METADATA_BYTES

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

# Fixed costs of a version beyond its token data, for the upper bound (tested against real files from 1 sample up,
# tests/test_estimate.py): attributes (the config as JSON; callers with a larger config pass its size), a
# virtual-dataset mapping of the index per part file and row dataset (file name, dataset name, two selections:
# ~150 B measured), manifest.json (the config and the source's resolution, then a line per file), latest.json.
METADATA_BYTES = 8 * 1024
VDS_MAPPING_BYTES = 512
MANIFEST_BYTES = 4 * 1024
MANIFEST_FILE_BYTES = 512
LATEST_BYTES = 1024
FILE_PADDING_BYTES = 64 * 1024  # every dataset's last-chunk padding in one file, at most (1% of 1 MiB chunks)

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
#    bits per id, and run-length deflate gets close to it (0.80 B measured at V = 1024, m = 26, the formula says
#    0.85; 0.68 at V = 1000, m = 58, the formula 0.69);
#  - counts (most are 1): 0.10-0.28 B each measured, the more peaked the teacher the more;
#  - no logsumexp and no row lengths (docs/FORMAT.md, "Sampled mode"); 8 B more per sample (/sampled_offsets:
#    h5cache.format.per_sample_bytes).
SAMPLED_COUNT_STORED_BYTES = 0.2
# A top-k cache's size is compared with the sampled mode's at this N (docs/FIDELITY.md recommends it).
SAMPLED_DEFAULT_DRAWS = 64


def upper_bound_bytes(*, num_samples: int, max_length: int, top_k: int, vocab_size: int,
                      samples: int | None = None, num_files: int = 1, metadata_bytes: int = METADATA_BYTES) -> int:
    """Every sample at max_length (sampled: every draw a distinct id): the published version's bytes at most,
    whatever the data: its num_files part files, the index, manifest.json and latest.json.

    Per HDF5 file: h5cache's own metadata allowance and the attributes (the config as JSON: `metadata_bytes`);
    per dataset the raw bytes, zlib's worst case (compressBound: +0.1% and a few bytes per chunk), the chunk
    index, and the zero padding of each file's last chunk (stored whole; compressed at least 100:1, the bound
    h5cache's writer itself uses for output.max_object_bytes). The index adds a virtual-dataset mapping per part
    file and row dataset and its own /offsets and /sample_index; the manifest a line per file.
    """
    tokens = num_samples * max_length
    entries = tokens * min(samples, vocab_size) if samples is not None else 0
    per_file = HDF5_METADATA_BYTES + metadata_bytes + 1024
    parts = num_files * per_file
    for _, row, per_chunk, kind in _datasets(top_k, vocab_size, samples, max_length):
        rows = {"token": tokens, "entry": entries, "sample": num_samples + num_files}[kind]
        parts += _column_bound(rows, row, per_chunk, num_files)
    row_datasets = len(h5cache.row_layout(top_k, vocab_size, samples)) + len(h5cache.entry_layout(vocab_size, samples))
    index = per_file + num_files * row_datasets * VDS_MAPPING_BYTES + sum(
        _column_bound(num_samples + 1, 8, SAMPLE_CHUNK_ROWS, 1) for _, _, _, kind in _datasets(top_k, vocab_size, samples)
        if kind == "sample")
    manifest = MANIFEST_BYTES + metadata_bytes + num_files * MANIFEST_FILE_BYTES
    return parts + index + manifest + LATEST_BYTES


def part_files(*, num_samples: int, num_shards: int = 1, part_samples: int | None = None,
               max_object_bytes: int | None = None, sample_bytes: int = 0,
               metadata_bytes: int = METADATA_BYTES) -> int:
    """At most how many part files a run writes: each shard's samples in parts of part_samples, and a part split
    into more files when the next sample (at most sample_bytes) would pass output.max_object_bytes."""
    shards = max(1, min(num_shards, num_samples))
    per_shard = -(-num_samples // shards)
    parts = -(-per_shard // part_samples) if part_samples else 1
    per_part = min(per_shard, part_samples or per_shard)
    room = (max_object_bytes or 0) - HDF5_METADATA_BYTES - metadata_bytes - 1024 - FILE_PADDING_BYTES
    per_file = max(1, room // max(sample_bytes, 1)) if max_object_bytes else per_part
    return shards * parts * -(-per_part // per_file)


def _datasets(top_k: int, vocab_size: int, samples: int | None,
              max_length: int | None = None) -> list[tuple[str, int, int, str]]:
    """(name, bytes per row, rows per chunk, what a row is: token | entry | sample) of a part file's datasets."""
    out = []
    for kind, layout in (("token", h5cache.row_layout(top_k, vocab_size, samples)),
                         ("entry", h5cache.entry_layout(vocab_size, samples))):
        for name, (tail, dtype) in layout.items():
            row = max(1, math.prod(tail)) * dtype.itemsize
            per_chunk = chunk_rows(row, narrow=not tail, max_length=max_length, samples=samples)
            out.append((name, row, per_chunk, kind))
    return out + [(name, 8, SAMPLE_CHUNK_ROWS, "sample") for name in per_sample_datasets(samples)]


def _column_bound(rows: int, row_bytes: int, chunk_rows: int, files: int) -> int:
    """One dataset over `files` files holding `rows` rows in all: stored bytes at most."""
    raw = rows * row_bytes
    chunks = -(-rows // chunk_rows) + files  # each file's last chunk may be partial
    return raw + raw // 1000 + chunks * (64 + CHUNK_INDEX_BYTES) + files * (chunk_rows * row_bytes // 100 + 1)


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
        return id_bytes + m * (gap_bytes + SAMPLED_COUNT_STORED_BYTES)
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
    sampled_expected_bytes: int = 0  # the same samples as a sampled cache (N = samples, else SAMPLED_DEFAULT_DRAWS)

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
            self._sampled_row(),
            ("output.max_bytes", human_bytes(self.max_bytes) if self.max_bytes else "no limit"),
            ("free space at the target", human_bytes(self.free_bytes) if self.free_bytes is not None else "unknown (remote)"),
            *self._compute_rows(),
            ("fits", "yes" if self.fits else f"NO: {self.reason}"),
        ]

    def _sampled_row(self) -> tuple[str, str]:
        """Sampled mode: the distinct ids per row the estimate assumes. Top-k mode: what the sampled mode would take."""
        n = self.samples or SAMPLED_DEFAULT_DRAWS
        m = expected_distinct(n, self.vocab_size)
        if self.samples is not None:
            return ("distinct ids per row assumed", f"{m:.0f} of {n} draws (a confident teacher draws fewer: the "
                                                    "estimate errs high; docs/FIDELITY.md)")
        per_token = stored_bytes_per_token(0, self.vocab_size, n)
        return (f"sampled mode instead (cache.mode=sampled cache.samples={n})",
                f"{human_bytes(self.sampled_expected_bytes)} expected ({per_token:.0f} B/token, {m:.0f} distinct ids "
                "per row assumed; unbiased, docs/FIDELITY.md)")

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
             num_shards: int = 1, samples: int | None = None, part_samples: int | None = None,
             max_object_bytes: int | None = None, metadata_bytes: int = METADATA_BYTES) -> StorageEstimate:
    """probe_lengths: token counts (already truncated to max_length) of real samples from the dataset.
    samples=N: a sampled cache (top_k ignored). part_samples, max_object_bytes: how the run splits its part files
    (run.part_samples, output.max_object_bytes); metadata_bytes: the config's size as JSON, if over METADATA_BYTES."""
    mean_tokens = sum(probe_lengths) / len(probe_lengths) if probe_lengths else float(max_length)
    per_token = h5cache.bytes_per_token(top_k, vocab_size, samples)
    expected_tokens = round(mean_tokens * num_samples)
    stored = stored_bytes_per_token(top_k, vocab_size, samples)
    expected = expected_bytes(expected_tokens, num_samples, top_k, vocab_size, samples)
    return StorageEstimate(
        num_samples=num_samples, max_length=max_length, top_k=top_k if samples is None else None,
        vocab_size=vocab_size, bytes_per_token=per_token, upper_bound_tokens=num_samples * max_length,
        upper_bound_bytes=upper_bound_bytes(
            num_samples=num_samples, max_length=max_length, top_k=top_k, vocab_size=vocab_size, samples=samples,
            metadata_bytes=metadata_bytes,
            num_files=part_files(num_samples=num_samples, num_shards=num_shards, part_samples=part_samples,
                                 max_object_bytes=max_object_bytes, metadata_bytes=metadata_bytes,
                                 sample_bytes=sample_bound(max_length, top_k, vocab_size, samples))),
        probe_samples=len(probe_lengths), mean_tokens_per_sample=mean_tokens, expected_tokens=expected_tokens,
        expected_bytes=expected, stored_bytes_per_token=stored, max_bytes=max_bytes, free_bytes=free_bytes,
        teacher_parameters=teacher_parameters, num_shards=num_shards, samples=samples,
        sampled_expected_bytes=expected_bytes(expected_tokens, num_samples, top_k, vocab_size,
                                              samples or SAMPLED_DEFAULT_DRAWS),
    )


def expected_bytes(tokens: int, num_samples: int, top_k: int, vocab_size: int, samples: int | None) -> int:
    """Expected stored bytes of a cache of these tokens and samples (samples=N: a sampled one)."""
    return (round(tokens * stored_bytes_per_token(top_k, vocab_size, samples))
            + per_sample_bytes(num_samples, samples) + HDF5_METADATA_BYTES)


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
