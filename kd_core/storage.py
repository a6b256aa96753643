"""How big a cache will be, from the format's own arithmetic.

upper_bound_bytes: every sample at max_length, uncompressed: exact for the worst case.
expected_bytes:    mean tokens per sample from tokenizing a probe of real samples, times the stored (compressed)
                   bytes per token from a model of how shuffle+gzip compresses each array (below).

The seed system's table was ~1000x low: 1M samples x 2048 tokens x top-64 at 6 bytes per entry is ~786 GB.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from kd_core import cachefile

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


def upper_bound_bytes(*, num_samples: int, max_length: int, top_k: int, vocab_size: int) -> int:
    tokens = num_samples * max_length
    return tokens * cachefile.bytes_per_token(top_k, vocab_size) + num_samples * cachefile.BYTES_PER_SAMPLE + 8 + FILE_OVERHEAD_BYTES


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def stored_bytes_per_token(top_k: int, vocab_size: int) -> float:
    """Expected bytes one token takes in the file after compression (see the constants above)."""
    id_bytes = math.log2(max(vocab_size, 2)) / 8
    topk_id_bytes = id_bytes * TOPK_ID_ENTROPY_FRACTION
    return id_bytes + top_k * (topk_id_bytes + LOGPROB_STORED_BYTES) + LOGSUMEXP_STORED_BYTES


@dataclass
class StorageEstimate:
    num_samples: int
    max_length: int
    top_k: int
    vocab_size: int
    bytes_per_token: int          # uncompressed, exact
    upper_bound_tokens: int       # every sample at max_length
    upper_bound_bytes: int
    probe_samples: int
    mean_tokens_per_sample: float
    expected_tokens: int
    expected_bytes: int           # after compression
    stored_bytes_per_token: float
    max_bytes: int | None = None
    free_bytes: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) pairs for a table in the terminal or the Prefect UI."""
        return [
            ("samples", f"{self.num_samples:,}"),
            ("top_k / max_length / vocab", f"{self.top_k} / {self.max_length} / {self.vocab_size:,}"),
            ("bytes per token (uncompressed)", f"{self.bytes_per_token}"),
            ("upper bound (every sample at max_length)", f"{human_bytes(self.upper_bound_bytes)} ({self.upper_bound_tokens:,} tokens)"),
            (f"mean tokens per sample ({self.probe_samples} probed)", f"{self.mean_tokens_per_sample:.1f}"),
            (f"expected ({self.stored_bytes_per_token:.0f} B/token compressed)", f"{human_bytes(self.expected_bytes)} ({self.expected_tokens:,} tokens)"),
            ("output.max_bytes", human_bytes(self.max_bytes) if self.max_bytes else "no limit"),
            ("free space at the target", human_bytes(self.free_bytes) if self.free_bytes is not None else "unknown (remote)"),
        ]


def estimate(*, num_samples: int, max_length: int, top_k: int, vocab_size: int, probe_lengths: list[int],
             max_bytes: int | None = None, free_bytes: int | None = None) -> StorageEstimate:
    """probe_lengths: token counts (already truncated to max_length) of real samples from the dataset."""
    mean_tokens = sum(probe_lengths) / len(probe_lengths) if probe_lengths else float(max_length)
    per_token = cachefile.bytes_per_token(top_k, vocab_size)
    expected_tokens = round(mean_tokens * num_samples)
    stored = stored_bytes_per_token(top_k, vocab_size)
    expected = round(expected_tokens * stored) + num_samples * cachefile.BYTES_PER_SAMPLE + FILE_OVERHEAD_BYTES
    return StorageEstimate(
        num_samples=num_samples, max_length=max_length, top_k=top_k, vocab_size=vocab_size,
        bytes_per_token=per_token, upper_bound_tokens=num_samples * max_length,
        upper_bound_bytes=upper_bound_bytes(num_samples=num_samples, max_length=max_length, top_k=top_k, vocab_size=vocab_size),
        probe_samples=len(probe_lengths), mean_tokens_per_sample=mean_tokens, expected_tokens=expected_tokens,
        expected_bytes=expected, stored_bytes_per_token=stored, max_bytes=max_bytes, free_bytes=free_bytes,
    )


def local_free_bytes(path: str | Path) -> int:
    """Free space on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
