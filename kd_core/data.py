"""Reading the source dataset and cutting it into shards.

A run covers the first `max_samples` rows of the split (all rows of a non-streaming split when unset). Shard r of
n covers a contiguous range of those rows, so shards are deterministic, disjoint, cover exactly max_samples rows
between them, and merge back in sample order by concatenation. Rows keep their number in the source split
(`sample_index`), so a cache row can always be traced back to its text.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from kd_core.config import DatasetConfig
from kd_core.errors import ConfigError


@dataclass(frozen=True)
class ShardSpec:
    rank: int          # this shard's number, 0..world_size-1
    world_size: int    # how many shards the run has
    start: int         # first row (inclusive) of the split
    stop: int          # last row (exclusive)

    @property
    def name(self) -> str:
        return f"shard-{self.rank:05d}-of-{self.world_size:05d}"

    @property
    def num_samples(self) -> int:
        return self.stop - self.start

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def plan_shards(total: int, world_size: int) -> list[ShardSpec]:
    """Split rows [0, total) into world_size contiguous ranges whose sizes differ by at most one."""
    bounds = [total * r // world_size for r in range(world_size + 1)]
    return [ShardSpec(r, world_size, bounds[r], bounds[r + 1]) for r in range(world_size)]


def load_source(cfg: DatasetConfig):
    """The split as a `datasets` Dataset, or an IterableDataset when streaming."""
    import datasets

    from kd_core.demo import resolve_path

    data_files = cfg.data_files
    if isinstance(data_files, str):
        data_files = resolve_path(data_files)
    elif isinstance(data_files, list):
        data_files = [resolve_path(f) for f in data_files]
    try:
        return datasets.load_dataset(
            cfg.name, cfg.config, split=cfg.split, data_files=data_files, revision=cfg.revision, streaming=cfg.streaming
        )
    except FileNotFoundError as e:
        raise ConfigError(f"dataset.name / dataset.data_files: dataset not found ({e}). Fix the name or the file paths.") from None
    except ValueError as e:
        raise ConfigError(f"dataset: could not load {cfg.name!r} split {cfg.split!r}: {e}") from None
    except datasets.exceptions.DatasetGenerationError as e:  # e.g. an empty parquet file: the cause says which
        raise ConfigError(f"dataset: could not read {cfg.name!r} split {cfg.split!r} ({e.__cause__ or e}). "
                          "An empty or damaged data file reads like this: fix dataset.data_files.") from None


def _column_names(source) -> list[str] | None:
    names = getattr(source, "column_names", None)
    if names is None and getattr(source, "features", None) is not None:
        names = list(source.features)
    return names


def check_text_column(cfg: DatasetConfig, source) -> None:
    """The text column exists and holds strings (an integer column would crash tokenization much later)."""
    names = _column_names(source)
    first = None
    if names is None:  # a stream whose schema is unknown until read: look at the first row
        first = next(iter(source.take(1)), None)
        names = list(first) if first is not None else []
    if cfg.text_column not in names:
        raise ConfigError(
            f"dataset.text_column: the dataset has no column {cfg.text_column!r}; its columns are {names}. "
            f"Fix: dataset.text_column={names[0] if names else 'NAME'}."
        )
    features = getattr(source, "features", None)
    if features is not None and cfg.text_column in features:
        kind = getattr(features[cfg.text_column], "dtype", type(features[cfg.text_column]).__name__)
        if kind not in ("string", "large_string"):
            raise ConfigError(_not_text(cfg, kind, _string_columns(features)))
    elif first is not None and not isinstance(first[cfg.text_column], (str, type(None))):
        raise ConfigError(_not_text(cfg, type(first[cfg.text_column]).__name__, []))


def _string_columns(features) -> list[str]:
    return [name for name, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")]


def _not_text(cfg: DatasetConfig, kind: str, candidates: list[str]) -> str:
    fix = f"dataset.text_column={candidates[0]}" if candidates else "dataset.text_column=<a column of strings>"
    return f"dataset.text_column: column {cfg.text_column!r} holds {kind} values, not text. Fix: {fix}."


def total_samples(cfg: DatasetConfig, source) -> int:
    """How many rows the run covers: max_samples, checked against the split's size when it is known."""
    size = None if cfg.streaming else len(source)
    if size == 0:
        raise ConfigError(f"dataset: split {cfg.split!r} of {cfg.name!r} is empty. Fix dataset.split or dataset.data_files.")
    if cfg.max_samples is None:
        return size
    if size is not None and cfg.max_samples > size:
        raise ConfigError(
            f"dataset.max_samples ({cfg.max_samples:,}) is larger than the split, which has {size:,} samples. "
            f"Fix: dataset.max_samples={size} (or null to read it all)."
        )
    return cfg.max_samples


def iter_texts(cfg: DatasetConfig, source, start: int, stop: int) -> Iterator[tuple[int, Any]]:
    """(row number, text) for rows [start, stop) of the split. Never reads past `stop`."""
    if cfg.streaming:
        rows = source.skip(start).take(stop - start)  # IterableDataset.take: exactly this many, never more
    else:
        rows = source.select(range(start, stop))
    for row_number, row in zip(itertools.count(start), rows):
        text = row[cfg.text_column]
        if not isinstance(text, (str, type(None))):  # a stream whose schema was not known up front
            raise ConfigError(f"dataset.text_column: row {row_number} of column {cfg.text_column!r} holds "
                              f"{type(text).__name__}, not text. Fix: dataset.text_column=<a column of strings>.")
        yield row_number, text


def probe_texts(cfg: DatasetConfig, source, n: int) -> list[str]:
    """The first n texts of the run (for the storage estimate)."""
    stop = n if cfg.max_samples is None else min(n, cfg.max_samples)
    if not cfg.streaming:
        stop = min(stop, len(source))
    try:
        return [text for _, text in iter_texts(cfg, source, 0, stop)]
    except (OSError, ValueError) as e:  # pyarrow's errors are ValueErrors: an empty parquet file fails this way
        raise ConfigError(f"dataset: could not read {cfg.name!r} split {cfg.split!r} ({type(e).__name__}: {e}). "
                          "An empty or damaged data file reads like this: fix dataset.data_files.") from None
