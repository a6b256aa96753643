"""The cache file format, version 1: its datasets, their dtypes and row spec per mode, attributes, and the byte
arithmetic kd_core.storage estimates with. The one place that knows these facts; writer, index, reader, verify
and export build on it.

One HDF5 file per cache, samples concatenated CSR-style (no padding stored):

    /input_ids      (T,)    uint32   the tokens, samples back to back
    /offsets        (S+1,)  int64    sample s is rows offsets[s]:offsets[s+1]
    /sample_index   (S,)    int64    the sample's row number in the source split
    /topk_indices   (T, k)  uint16 if vocab <= 65536 else uint32   teacher's top-k next-token ids, best first
    /topk_logprobs  (T, k)  float16  log p_teacher(id) at temperature 1
    /logsumexp      (T,)    float32  logsumexp of the raw logits (raw logit = logprob + logsumexp)

A sampled cache (cache.mode=sampled, N draws per row) has /input_ids, /offsets, /sample_index and, instead of the
top-k datasets and /logsumexp, a second level of CSR over "entries" (one per distinct id drawn in a row):

    /sampled_offsets  (S+1,)  int64    sample s's entries are sampled_offsets[s]:sampled_offsets[s+1]
    /sampled_id_gaps  (E,)    like topk_indices   row's ids ascending, each as its gap to the previous one
    /sampled_counts   (E,)    uint8 if N <= 255 else uint16   times drawn; a row's counts sum to N

Rows are not stored: a row's counts sum to N, so entry e of a sample belongs to row (counts before e) // N.

Row t of a sample is the teacher's distribution for token t+1 given tokens 0..t. Root attributes record
provenance (see docs/FORMAT.md). Datasets are chunked with gzip (deflate streams coded per dataset, see
codec()) and shuffle (uint16 top-k ids: shuffled or not per group of chunks, each chunk's filter mask says
which): lossless, and readable by any stock HDF5 reader. Files are written under a temporary name and renamed
only after their structure checks out, so a file with the final name is always complete. A published version is
part files of this format plus an index (kd_core.h5cache.index): the same datasets as virtual datasets over the
parts (docs/FORMAT.md).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT_VERSION = 1
TOKEN_DATASETS = ("input_ids", "topk_indices", "topk_logprobs", "logsumexp")  # one row per token (top-k mode)
SAMPLE_DATASETS = ("sample_index",)  # one row per sample (plus /offsets, S+1)
# Sampled mode: one row per distinct id drawn ("entry"), sliced per sample by /sampled_offsets (S+1).
ENTRY_DATASETS = ("sampled_id_gaps", "sampled_counts")
ENTRY_OFFSETS = "sampled_offsets"
# One row per sample (or S+1): every other dataset has one row per token, or per entry (ENTRY_DATASETS).
PER_SAMPLE_DATASETS = ("offsets", "sample_index", ENTRY_OFFSETS)
CHUNK_BYTES = 1 << 20  # ~1 MiB chunks (sampled mode, and top-k files written without a max_length)
SAMPLE_CHUNK_ROWS = 1 << 16  # rows per chunk of the per-sample datasets (512 KiB of int64)
# HDF5's filter for every dataset (the level is what HDF5 records; the writer codes chunks itself: Codec)
COMPRESSION = {"compression": "gzip", "compression_opts": 1}
# Sampled caches' layout: part of their version key (a resume never mixes layouts). 2: no /sampled_lengths and no
# /logsumexp (layout 1 had both).
SAMPLED_LAYOUT = 2


@dataclass(frozen=True)
class Codec:
    """How a dataset's chunks are coded: HDF5's shuffle filter or not, and the deflate stream's strategy and level
    (any gives a standard zlib stream that HDF5's gzip filter reads: the writer's choice). The default strategy is
    libdeflate's (level 6: 3-5% smaller than zlib's level 1 on top-k ids and log-probs, and faster; zlib's level 6
    is as small at half zlib-1's speed); another strategy is zlib's, which libdeflate does not offer."""

    shuffle: bool = True
    strategy: int = zlib.Z_DEFAULT_STRATEGY
    level: int = 6
    either: bool = False  # shuffled or not, whichever a trial on each group of chunks finds smaller (the writer's
    # encode_chunks); the dataset's pipeline holds the shuffle, and a chunk stored unshuffled says so in its filter
    # mask, which every HDF5 reader honours
    shuffled_level: int = 6  # with `either`, the shuffled way's level


# A chunk's HDF5 filter mask: bit i set when filter i of its dataset's pipeline was skipped. Shuffle is first.
SHUFFLE_SKIPPED = 0b01


def codec(name: str, dtype: np.dtype) -> Codec:
    """Per dataset, the cheapest coding measured (bench/bench_bytes.py; docs/FORMAT.md "Storage layout"):
    - uint16 top-k ids either way, per group of chunks: unshuffled, whole-id repeats across rows make LZ matches
      (5.0-5.5 B/token smaller at k=64, 32k vocabulary, 1 MiB chunks, on the H100 benchmark, docs/PERFORMANCE.md);
      shuffled, the high bytes of a small vocabulary's ids cost little (-4% at 4,096 and -7% at 8,192 in chunks of
      128-512 rows), at level 4: shuffled ids take libdeflate 25-40% longer at a level, and at 4 they cost what
      unshuffled ids cost at 6, 0.2-1.1% larger than at 6; uint32 ids (vocab > 65536) shuffled: their high bytes are
      nearly constant (-15% on the 70k test teacher);
    - a sampled cache's id gaps and counts: zlib's run-length deflate at level 1 (matches at distance 1 only),
      against zlib's default strategy at level 1: gaps -5 to -9%, counts -25 to -34% (mostly 1s: deflate's
      general matching costs more than it finds), and faster."""
    if name == "topk_indices":
        return Codec(either=True, shuffled_level=4) if dtype.itemsize == 2 else Codec()
    if name in ("sampled_id_gaps", "sampled_counts"):
        return Codec(strategy=zlib.Z_RLE, level=1)
    return Codec()


# Datasets whose every real value is >= 1: an entry is an id drawn at least once.
_NEVER_ZERO = ("sampled_counts",)


def fill_value(name: str, dtype: np.dtype) -> Any:
    """What a virtual dataset of the index (or of an export) reads where no source maps, e.g. a missing part file:
    a value no real row holds, so that stock h5py cannot mistake a hole for rows. NaN for floats (log-probs,
    logsumexp); 0 for sampled_counts (real ones are >= 1); otherwise the dtype's largest value,
    an id outside any vocabulary the dtype is chosen for (input_ids are uint32: 2**32 - 1 always; top-k and sampled
    ids are uint16 only for a vocabulary <= 65,536, so 65,535 is out of vocabulary unless it has exactly 65,536)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.nan
    if name in _NEVER_ZERO:
        return 0
    return np.iinfo(dtype).max


def index_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def count_dtype(samples: int) -> np.dtype:
    return np.dtype(np.uint8 if samples <= 255 else np.uint16)


def row_layout(top_k: int, vocab_size: int, samples: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-token datasets: name -> (shape after the row axis, dtype). samples=N: a sampled cache's."""
    if samples is not None:  # no logsumexp: the sampled loss needs none (docs/FORMAT.md, "Sampled mode")
        return {"input_ids": ((), np.dtype(np.uint32))}
    return {
        "input_ids": ((), np.dtype(np.uint32)),
        "topk_indices": ((top_k,), index_dtype(vocab_size)),
        "topk_logprobs": ((top_k,), np.dtype(np.float16)),
        "logsumexp": ((), np.dtype(np.float32)),
    }


def entry_layout(vocab_size: int, samples: int | None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-entry datasets of a sampled cache (none for a top-k cache)."""
    if samples is None:
        return {}
    return {"sampled_id_gaps": ((), index_dtype(vocab_size)), "sampled_counts": ((), count_dtype(samples))}


def pack_sampled(ids: np.ndarray, counts: np.ndarray, samples: int, vocab_size: int) -> dict[str, np.ndarray]:
    """One sample's (L, m) ids ascending + counts (count 0 = padding, at the end of a row) -> the stored arrays:
    sampled_id_gaps (E,), sampled_counts (E,), rows one after the other.

    An id is stored as its gap to the previous id of its row (the first as itself): the gaps between sorted ids
    are small numbers whose high bytes shuffle + gzip remove (15% fewer bytes than the ids on the demo teacher).
    Row lengths are not stored: each row's counts sum to N (unpack_sampled).
    """
    real = counts > 0  # (L, m)
    gaps = np.diff(ids.astype(np.int64), axis=1, prepend=0)  # (L, m)
    return {"sampled_id_gaps": gaps[real].astype(index_dtype(vocab_size)),
            "sampled_counts": counts[real].astype(count_dtype(samples))}


def unpack_sampled(gaps: np.ndarray, counts: np.ndarray, rows: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """pack_sampled's inverse for a sample of `rows` rows of N = `samples` draws: (E,), (E,) -> ids (L, m) int64
    and counts (L, m) int64, m the longest row. Entry e is in row (sum of the counts before e) // N; ValueError
    when the counts do not add up to rows x N (a damaged or foreign file)."""
    counts = counts.astype(np.int64)
    before = np.cumsum(counts) - counts  # (E,) draws of the sample before entry e
    row_of = before // samples  # (E,) row t's entries have draws-before in [t N, (t+1) N)
    first = np.ones(len(counts), bool)
    first[1:] = row_of[1:] != row_of[:-1]  # (E,) the first entry of its row
    lengths = np.bincount(row_of, minlength=rows) if len(counts) else np.zeros(rows, np.int64)  # (L,)
    # Every row starts at a multiple of N, none is empty, the last ends at rows x N: each sums to N.
    if (counts.sum() != rows * samples or len(lengths) != rows or (counts < 1).any() or (lengths < 1).any()
            or (before[first] % samples).any()):
        raise ValueError(f"sampled_counts: the rows' counts do not each sum to {samples} over {rows} rows")
    starts = np.cumsum(lengths) - lengths  # (L,) each row's first entry
    running = np.cumsum(gaps.astype(np.int64))  # (E,)
    offset = np.concatenate([[0], running])[starts]  # (L,) running sum up to the row's start
    column = np.arange(len(gaps)) - starts[row_of]  # (E,)
    width = int(lengths.max()) if rows else 0
    ids, out = np.zeros((rows, width), np.int64), np.zeros((rows, width), np.int64)
    ids[row_of, column] = running - offset[row_of]
    out[row_of, column] = counts
    return ids, out


def row_bytes(layout: dict[str, tuple[tuple[int, ...], np.dtype]]) -> int:
    """Uncompressed bytes of one row of every dataset in `layout`."""
    return sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize for shape, dt in layout.values())


def row_datasets(file: h5py.File) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """A cache file's row datasets as it holds them: name -> (shape after the row axis, dtype). Every root
    dataset but the per-sample ones (an export keeps its parts' copies in a group, not at the root)."""
    return {name: (d.shape[1:], d.dtype) for name, d in file.items()
            if isinstance(d, h5py.Dataset) and name not in PER_SAMPLE_DATASETS}


def bytes_per_token(top_k: int, vocab_size: int, samples: int | None = None) -> int:
    """Uncompressed bytes one token costs in the file, at most (sampled: every draw a distinct id)."""
    entries = min(samples, vocab_size) if samples is not None else 0
    return row_bytes(row_layout(top_k, vocab_size, samples)) + entries * row_bytes(entry_layout(vocab_size, samples))


def per_sample_datasets(samples: int | None = None) -> tuple[str, ...]:
    """The int64 datasets with a row per sample (an offsets dataset has S+1) of a top-k or a sampled cache."""
    return ("offsets", "sample_index") + ((ENTRY_OFFSETS,) if samples is not None else ())


def bytes_per_sample(samples: int | None = None) -> int:
    """Uncompressed bytes one sample adds beside its tokens: a row of each per-sample dataset, 8 bytes each."""
    return 8 * len(per_sample_datasets(samples))


def sample_bound(num_tokens: int, top_k: int, vocab_size: int, samples: int | None = None) -> int:
    """At most the stored bytes of one sample of num_tokens tokens, chunk index aside: deflate's worst case for its
    raw bytes (sampled: every draw a distinct id) and the per-sample rows of a sampled file (the larger, either mode)."""
    return deflate_bound(num_tokens * bytes_per_token(top_k, vocab_size, samples) + bytes_per_sample(samples=1))


def deflate_bound(n: int) -> int:
    """The worst case for n input bytes of zlib (compressBound) and of libdeflate (5 B per 5,000-byte block, a
    zlib header and trailer and 9 B more), rounded up: both are under it."""
    return n + n // 1000 + 64


def token_chunk_rows(max_length: int | None) -> int | None:
    """Rows per chunk of a top-k file's per-token datasets, from cache.max_length: a power of two near a quarter
    of it, in [64, 8192]. Reading a sample of L rows decompresses about L + rows (its own rows, plus the parts of
    the chunks at either end that hold other samples' rows), so chunks no longer than a typical sample keep that
    under twice the sample (docs/FORMAT.md, "Storage layout and chunking"); deflate's 32 KiB window means larger
    chunks gain little. None (no max_length known): CHUNK_BYTES per chunk, as files before this choice."""
    if not max_length:
        return None
    return int(min(8192, max(64, 1 << max(0, int(max_length // 4).bit_length() - 1))))


# A dataset of one value per row (input_ids, logsumexp: 8 of a top-k row's 264+ bytes) gets NARROW_CHUNKS times
# the rows per chunk: chunks of 512 B would compress poorly, and its share of a read stays small.
NARROW_CHUNKS = 4


def chunk_rows(row_bytes: int, chunk_bytes: int = CHUNK_BYTES, *, narrow: bool = False,
               max_length: int | None = None, samples: int | None = None) -> int:
    """Rows per chunk of a row dataset with rows of row_bytes: about chunk_bytes, at least 1024 rows; in a top-k
    file (samples None) with a max_length, at most token_chunk_rows(max_length), NARROW_CHUNKS times that for a
    dataset of one value per row (`narrow`). The writer and kd_core.storage's bound both ask here."""
    rows = max(1024, chunk_bytes // row_bytes)
    sample_rows = token_chunk_rows(max_length) if samples is None else None
    return rows if sample_rows is None else min(rows, sample_rows * (NARROW_CHUNKS if narrow else 1))


def per_sample_bytes(num_samples: int, samples: int | None = None) -> int:
    """Uncompressed bytes of a file's per-sample datasets: bytes_per_sample each, plus the leading 0 of each
    offsets dataset (/offsets, and /sampled_offsets when sampled)."""
    return num_samples * bytes_per_sample(samples) + 8 * (1 if samples is None else 2)


# Size accounting (output.max_object_bytes in the writer, kd_core.storage's estimates): HDF5's own metadata per
# file (superblock, object headers, B-tree nodes, attributes: ~25 KB measured), and the chunk index's cost per chunk.
METADATA_BYTES = 32 * 1024
CHUNK_INDEX_BYTES = 64


def sampled_draws(attrs: dict[str, Any]) -> int | None:
    """N of a sampled cache from its root attributes; None for a top-k cache (files before sampled mode too)."""
    return int(attrs["samples"]) if attrs.get("mode") == "sampled" else None


def dataset_names(attrs: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(per-token, per-entry) dataset names a file with these root attributes holds."""
    samples = sampled_draws(attrs)
    return tuple(row_layout(0, 2, samples)), tuple(entry_layout(2, samples))


def temporary_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


def write_attrs(file: h5py.File, attrs: dict[str, Any]) -> None:
    """HDF5 attributes take no None and no nested objects: skip None, store dicts/lists as JSON."""
    for key, value in attrs.items():
        if value is None:
            continue
        file.attrs[key] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def read_attrs(file: h5py.File) -> dict[str, Any]:
    return {key: _attr_value(value) for key, value in file.attrs.items()}


def read_attr(file: h5py.File, name: str) -> Any:
    """One root attribute (None when absent): what a reader checks on every open, without the config's JSON."""
    return _attr_value(file.attrs[name]) if name in file.attrs else None


def _attr_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value

