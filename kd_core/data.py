"""Reading the source dataset, and planning shards that each read only their own rows.

A run covers the first `max_samples` rows of the split (all rows when unset). Shard i of n covers the contiguous
rows [start, stop) of those, so shards are deterministic, disjoint, cover exactly the run's rows between them and
merge back in sample order by concatenation. A row keeps its number in the split (`sample_index`), so a cache row
can always be traced back to its text, and a cache made with 5 shards equals the one made with 1.

How a shard gets to its rows depends on what the source's layout tells before reading any data (`ShardPlan.method`):

    parquet footers   parquet files (local, hub or any fsspec URL): the footers give exact row counts per file and
                      row group. A shard opens only its files and starts at the row group holding its first row: it
                      decodes at most one row group more than its own rows.
    counted files     other file builders (json, text, csv) when streaming: one pass counts the rows of each file, up
                      to max_samples in all. A shard opens only its files and skips within its first file only.
    counted stream    a source without files we can list: one pass counts up to max_samples rows; a shard skips
                      from row 0 (it decodes `stop` rows: avoid this for large runs).
    random access     a non-streaming split without parquet files (datasets has it on disk): select by index.

A max_samples larger than the source is found here, in planning, not by the last shard after its GPU work.
"""

from __future__ import annotations

import bisect
import itertools
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any, Iterator, Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from kd_core.config import DatasetConfig
from kd_core.errors import ConfigError
from kd_core.source import ResolvedDataset, dataset_errors, load_builder, resolve_dataset

Method = Literal["parquet footers", "counted files", "counted stream", "random access"]
FOOTER_THREADS = 16  # footers of remote files are fetched this many at a time (one small read each)
TEXT_TYPES = ("string", "large_string")
BATCH_ROWS = 1024    # rows pyarrow decodes at a time: a shard's last batch decodes at most this many past `stop`


class Segment(BaseModel):
    """Consecutive row groups of one file that a shard reads (a non-parquet file is one group)."""

    model_config = ConfigDict(frozen=True)

    path: str
    first_row: int            # split row number of the first row of the first group listed
    first_group: int | None   # parquet row group index of that group; None for a non-parquet file
    group_rows: list[int]     # rows of each group listed, in order

    @property
    def stop_row(self) -> int:
        return self.first_row + sum(self.group_rows)


class ShardSpec(BaseModel):
    """One shard of a run: the samples of split rows [start, stop), and where those rows are."""

    model_config = ConfigDict(frozen=True)

    index: int                 # this shard's number, 0..world_size-1
    world_size: int            # how many shards the run has
    start: int                 # first row (inclusive) of the split
    stop: int                  # last row (exclusive)
    rows_read: int             # source rows it decodes to produce its samples (>= stop - start)
    method: Method = "random access"
    segments: list[Segment] = []  # the files and row groups to read; empty for "counted stream" and "random access"

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.world_size:05d}"

    @property
    def num_samples(self) -> int:
        return self.stop - self.start


class ShardPlan(BaseModel):
    """What `kd-cache plan --json` prints and shard-dataset returns."""

    method: Method
    source_rows: int | None    # rows in the split, where known without reading it all
    shards: list[ShardSpec]

    def summary(self) -> dict[str, Any]:
        """The plan without per-shard file lists: {"method", "source_rows", "rows_read", "shards": [...]}."""
        return {"method": self.method, "source_rows": self.source_rows,
                "rows_read": sum(s.rows_read for s in self.shards),
                "shards": [s.model_dump(include={"index", "start", "stop", "rows_read"}) for s in self.shards]}


def split_rows(total: int, world_size: int) -> list[tuple[int, int]]:
    """Rows [0, total) as world_size contiguous ranges whose sizes differ by at most one."""
    bounds = [total * r // world_size for r in range(world_size + 1)]
    return list(zip(bounds, bounds[1:]))


# -- the source ------------------------------------------------------------------------------------------------

class Source:
    """A dataset split as planning sees it: its builder, its files and (parquet) their row groups."""

    def __init__(self, cfg: DatasetConfig, resolved: ResolvedDataset | None = None):
        """resolved: the split as validate resolved it (kd_core.source); resolved now when not given."""
        self.cfg = cfg
        resolved = resolved if resolved is not None else resolve_dataset(cfg)
        self.builder, self.files = resolved.builder, resolved.paths

    @property
    def method(self) -> Method:
        if self.builder == "parquet" and self.files:
            return "parquet footers"
        if not self.cfg.streaming:
            return "random access"
        return "counted files" if self.files else "counted stream"

    @cached_property
    def row_groups(self) -> list[list[int]]:
        """Rows of each row group of each parquet file, from the footers only (fetched in parallel)."""
        with ThreadPoolExecutor(FOOTER_THREADS) as pool:
            return list(pool.map(self._footer_rows, self.files))

    def _footer_rows(self, path: str) -> list[int]:
        meta = _parquet_file(path, self.cfg.name, self.cfg.split).metadata
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

    @cached_property
    def dataset(self):
        """The split through `datasets` (for the methods that need it)."""
        return load_source(self.cfg)

    def column_types(self) -> dict[str, str]:
        """{column: type name}: "string" and "large_string" are text."""
        if self.method == "parquet footers":
            schema = _parquet_file(self.files[0], self.cfg.name, self.cfg.split).schema_arrow
            return {field.name: str(field.type) for field in schema}
        features = getattr(self.dataset, "features", None)
        if features is not None:
            return {name: getattr(f, "dtype", type(f).__name__) for name, f in features.items()}
        # A stream whose schema is unknown until read: look at the first row.
        first = next(iter(self.dataset.take(1)), None) or {}
        return {name: "string" if isinstance(v, (str, type(None))) else type(v).__name__ for name, v in first.items()}

    def known_rows(self) -> int | None:
        """Rows in the split when known without a counting pass."""
        if self.method == "parquet footers":
            return sum(map(sum, self.row_groups))
        if self.method == "random access":
            return len(self.dataset)
        return None

    def check_text_column(self) -> None:
        """The text column exists and holds strings (an integer column would crash tokenization much later)."""
        types = self.column_types()
        names, column = list(types), self.cfg.text_column
        if column not in types:
            raise ConfigError(
                f"dataset.text_column: the dataset has no column {column!r}; its columns are {names}. "
                f"Fix: dataset.text_column={names[0] if names else 'NAME'}."
            )
        if types[column] not in TEXT_TYPES:
            candidates = [name for name, kind in types.items() if kind in TEXT_TYPES]
            fix = f"dataset.text_column={candidates[0]}" if candidates else "dataset.text_column=<a column of strings>"
            raise ConfigError(f"dataset.text_column: column {column!r} holds {types[column]} values, not text. "
                              f"Fix: {fix}.")

    def run_rows(self) -> int:
        """How many rows the run covers: max_samples, checked against the split's size where it is known."""
        return _check_size(self.cfg, self.known_rows())

    def plan(self, num_shards: int, rows: int | None = None) -> ShardPlan:
        """num_shards shards over the run's rows (or over the first `rows` rows, for the storage probe)."""
        method, layout = self.method, None
        if method == "parquet footers":
            layout, size = list(zip(self.files, self.row_groups)), self.known_rows()
        elif method == "random access":
            size = self.known_rows()
        else:  # one counting pass, over at most the rows the run needs
            limit = self.cfg.max_samples if rows is None else rows
            if method == "counted files":
                layout = self._count_files(limit)
                counted = sum(sum(groups) for _, groups in layout)
            else:
                counted = sum(1 for _ in self.dataset.take(limit))
            size = counted if counted < limit else None  # None: the split has at least `limit` rows
        if rows is None:
            total = _check_size(self.cfg, size)
        else:
            total = _check_size(self.cfg.model_copy(update={"max_samples": None}), size) if size is not None else rows
            total = min(rows, total)
        num_shards = max(1, min(num_shards, total))
        shards = [_shard(method, i, num_shards, start, stop, layout)
                  for i, (start, stop) in enumerate(split_rows(total, num_shards))]
        return ShardPlan(method=method, source_rows=self.known_rows(), shards=shards)

    def _count_files(self, limit: int) -> list[tuple[str, list[int]]]:
        """[(file, [rows])] counted file by file, stopping once `limit` rows are counted."""
        import datasets

        layout, counted = [], 0
        for path in self.files:
            stream = datasets.load_dataset(self.builder, data_files=[path], split="train", streaming=True)
            rows = sum(1 for _ in stream.take(limit - counted))
            layout.append((path, [rows]))
            counted += rows
            if counted >= limit:
                break
        return layout


def _check_size(cfg: DatasetConfig, size: int | None) -> int:
    if size == 0:
        raise ConfigError(f"dataset: split {cfg.split!r} of {cfg.name!r} is empty. "
                          "Fix dataset.split or dataset.data_files.")
    if cfg.max_samples is None:
        return size
    if size is not None and cfg.max_samples > size:
        raise ConfigError(
            f"dataset.max_samples ({cfg.max_samples:,}) is larger than the split, which has {size:,} samples. "
            f"Fix: dataset.max_samples={size} (or null to read it all)."
        )
    return cfg.max_samples


def _shard(method: Method, index: int, world_size: int, start: int, stop: int,
           layout: list[tuple[str, list[int]]] | None) -> ShardSpec:
    """The shard over rows [start, stop): the groups it touches, and how many rows it decodes."""
    if layout is None:  # no files: a stream decodes from row 0, random access only its own rows
        rows_read = stop if method == "counted stream" else stop - start
        return ShardSpec(index=index, world_size=world_size, start=start, stop=stop, rows_read=rows_read, method=method)
    segments, first_row = [], 0
    for path, groups in layout:
        group_starts = list(itertools.accumulate(groups, initial=first_row))  # len(groups) + 1
        if group_starts[-1] > start and first_row < stop and stop > start:
            first = max(bisect.bisect_right(group_starts, start) - 1, 0)  # the group holding `start`
            last = min(bisect.bisect_left(group_starts, stop), len(groups)) - 1  # the group holding `stop - 1`
            segments.append(Segment(path=path, first_row=group_starts[first],
                                    first_group=first if method == "parquet footers" else None,
                                    group_rows=groups[first:last + 1]))
        first_row = group_starts[-1]
    rows_read = stop - segments[0].first_row if segments else 0
    return ShardSpec(index=index, world_size=world_size, start=start, stop=stop, rows_read=rows_read,
                     method=method, segments=segments)


def plan(cfg: DatasetConfig, num_shards: int, resolved: ResolvedDataset | None = None) -> ShardPlan:
    return Source(cfg, resolved).plan(num_shards)


# -- reading ---------------------------------------------------------------------------------------------------

def iter_texts(cfg: DatasetConfig, shard: ShardSpec, start: int, stop: int) -> Iterator[tuple[int, Any]]:
    """(row number, text) for rows [start, stop) of the split, within the shard. Never reads past `stop`."""
    if not shard.start <= start <= stop <= shard.stop:
        raise ValueError(f"rows [{start}, {stop}) are not within {shard.name} [{shard.start}, {shard.stop})")
    if shard.method == "parquet footers":
        rows = _parquet_rows(cfg, shard.segments, start, stop)
    elif shard.method == "counted files":
        rows = _file_rows(cfg, shard.segments, start, stop)
    elif shard.method == "counted stream":
        rows = (row[cfg.text_column] for row in load_source(cfg).skip(start).take(stop - start))
    else:
        rows = (row[cfg.text_column] for row in load_source(cfg).select(range(start, stop)))
    with _column_errors(cfg):
        yield from _checked(cfg, zip(range(start, stop), rows))


def _checked(cfg: DatasetConfig, rows: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    for row_number, text in rows:
        if not isinstance(text, (str, type(None))):  # a stream whose schema was not known up front
            raise ConfigError(f"dataset.text_column: row {row_number} of column {cfg.text_column!r} holds "
                              f"{type(text).__name__}, not text. Fix: dataset.text_column=<a column of strings>.")
        yield row_number, text


def _parquet_rows(cfg: DatasetConfig, segments: list[Segment], start: int, stop: int) -> Iterator[Any]:
    """Texts of rows [start, stop): each file opened only if it holds some, from the row group holding `start`."""
    row = start
    for seg in segments:
        if seg.stop_row <= row or row >= stop:
            continue
        starts = list(itertools.accumulate(seg.group_rows, initial=seg.first_row))
        first = bisect.bisect_right(starts, row) - 1
        last = min(bisect.bisect_left(starts, stop), len(seg.group_rows)) - 1
        skip = row - starts[first]  # rows of the first group before ours: decoded and dropped
        groups = list(range(seg.first_group + first, seg.first_group + last + 1))
        file = _parquet_file(seg.path, cfg.name, cfg.split)
        if cfg.text_column not in file.schema_arrow.names:  # pyarrow would return no column at all
            raise _missing_column(cfg, seg.path, f"its columns: {file.schema_arrow.names}")
        batches = file.iter_batches(
            batch_size=BATCH_ROWS, row_groups=groups, columns=[cfg.text_column])
        for batch in batches:
            texts = batch.column(0).to_pylist()[skip:]
            skip = max(0, skip - batch.num_rows)
            take = texts[:stop - row]
            yield from take
            row += len(take)
            if row >= stop:
                return


def _file_rows(cfg: DatasetConfig, segments: list[Segment], start: int, stop: int) -> Iterator[Any]:
    """Texts of rows [start, stop) from counted files: only the files holding them, skipping within the first."""
    import datasets

    paths = [s.path for s in segments if s.stop_row > start and s.first_row < stop]
    first_row = next(s.first_row for s in segments if s.stop_row > start)
    stream = datasets.load_dataset(load_builder(cfg).name, data_files=paths, split="train", streaming=True)
    for row in stream.skip(start - first_row).take(stop - start):
        yield row[cfg.text_column]


def probe_texts(cfg: DatasetConfig, source: Source, n: int) -> list[Any]:
    """The first n texts of the run (for the storage estimate)."""
    limit = n if cfg.max_samples is None else min(n, cfg.max_samples)
    try:
        shard = source.plan(1, rows=limit).shards[0]
        return [text for _, text in iter_texts(cfg, shard, 0, shard.stop)]
    except (OSError, ValueError, pa.ArrowException) as e:  # an empty or damaged parquet file fails this way
        raise ConfigError(f"dataset: could not read {cfg.name!r} split {cfg.split!r} ({type(e).__name__}: {e}). "
                          "An empty or damaged data file reads like this: fix dataset.data_files.") from None


# -- datasets and files ----------------------------------------------------------------------------------------

def _parquet_file(path: str, name: str, split: str) -> pq.ParquetFile:
    """The file, opened for footers and row groups. A missing or damaged file is a data error (not retried); other
    OSErrors (a dropped connection) are left to the caller's retries."""
    try:
        return pq.ParquetFile(fsspec.open(path, "rb").open())
    except (FileNotFoundError, pa.ArrowInvalid) as e:
        raise ConfigError(f"dataset: could not read {name!r} split {split!r} ({path}: {e}). "
                          "A missing, empty or damaged data file reads like this: fix dataset.data_files.") from None


def _missing_column(cfg: DatasetConfig, where: str, columns: str) -> ConfigError:
    return ConfigError(f"dataset.text_column: {where} has no column {cfg.text_column!r} ({columns}): renamed since "
                       "the run was validated, or files with different columns. Fix the file, dataset.text_column or "
                       "dataset.data_files.")


class _column_errors:
    """A text column missing from a later file (or renamed since validation) as one line naming it: pyarrow gives
    an empty batch (IndexError), `datasets` a KeyError per row or a CastError over the file's columns."""

    def __init__(self, cfg: DatasetConfig):
        self.cfg = cfg

    def __enter__(self):
        return self

    def __exit__(self, exc_type, e, tb):
        import datasets

        if exc_type is None:
            return False
        cast = e if isinstance(e, datasets.table.CastError) else e.__cause__
        if isinstance(cast, datasets.table.CastError):
            raise _missing_column(self.cfg, "a data file", f"against the first file, {cast.details()}") from None
        if issubclass(exc_type, KeyError) and e.args == (self.cfg.text_column,):
            raise _missing_column(self.cfg, "a row of the dataset", "a stream without that column") from None
        return False


def load_source(cfg: DatasetConfig):
    """The split as a `datasets` Dataset, or an IterableDataset when streaming."""
    import datasets

    with dataset_errors(cfg), _column_errors(cfg):  # files without the text column: one line naming it
        return datasets.load_dataset(cfg.name, cfg.config, split=cfg.split, data_files=cfg.data_files,
                                     revision=cfg.revision, streaming=cfg.streaming)
