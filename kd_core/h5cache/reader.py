"""Reading caches: CacheReader (random access by sample over any URI form), and whole-file iteration."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from kd_core import io, store
from kd_core.errors import CacheFileError, StorageError
from kd_core.h5cache.chunks import raw_column
from kd_core.h5cache.contained import check_contained, safe_name
from kd_core.h5cache.format import (ENTRY_DATASETS, ENTRY_OFFSETS, FORMAT_VERSION, PER_SAMPLE_DATASETS, read_attr,
                                    read_attrs, row_datasets, sampled_draws, unpack_sampled)
from kd_core.h5cache.verify import verify_file
from kd_core.partcache import PartCache


# How readers return each dataset (others come as stored): ids as int64 for torch indexing, fp16 as float32.
READ_DTYPES = {"input_ids": np.int64, "topk_indices": np.int64, "topk_logprobs": np.float32}


LOAD_SAMPLES = 1 << 21  # per-sample arrays of up to 2M samples (32-48 MB) are loaded when a file is opened


class _Part:
    """One open cache file, with what every sample read needs loaded once: offsets (S+1,), sample_index (S,) and
    the entry offsets of a sampled file (16-24 B per sample of the file, up to LOAD_SAMPLES), and a reader per row
    dataset: a chunks.RawColumn (raw chunks inflated by libdeflate) for every dataset it reads, h5py for any
    other. Counts the bytes its reads decompress (`decompressed`: every chunk a RawColumn inflated; for an h5py
    dataset the chunks spanned, less the chunk the previous read of it ended in) and return (`returned`), both
    as stored."""

    def __init__(self, file: h5py.File, fileobj: Any):
        self.file, self.fileobj = file, fileobj
        # Loaded whole up to LOAD_SAMPLES (a part); a larger single file (an export) is sliced per read instead.
        load = file["offsets"].shape[0] <= LOAD_SAMPLES
        self.offsets, self.sample_index = (_per_sample(file[n], load) for n in ("offsets", "sample_index"))
        self.entry_offsets = _per_sample(file[ENTRY_OFFSETS], load) if ENTRY_OFFSETS in file else None
        self.draws = int(file.attrs["samples"]) if ENTRY_OFFSETS in file else None  # N of a sampled file
        self.datasets = {name: file[name] for name in row_datasets(file)}
        self.columns = {name: column for name, d in self.datasets.items() if (column := raw_column(d)) is not None}
        self.row_bytes = {name: d.dtype.itemsize * int(np.prod(d.shape[1:], dtype=np.int64))
                          for name, d in self.datasets.items()}
        self.last_chunk: dict[str, int] = {}
        self.modelled = self.returned = 0  # bytes h5py's reads decompressed (modelled), bytes returned

    @property
    def decompressed(self) -> int:
        return self.modelled + sum(column.decoded for column in self.columns.values())

    def rows(self, name: str, lo: int, hi: int, dtype: Any = None) -> np.ndarray:
        """Rows [lo, hi) of a row dataset, in `dtype` (default: as stored)."""
        self.returned += (hi - lo) * self.row_bytes[name]
        if name in self.columns:
            return self.columns[name].rows(lo, hi, dtype)
        dataset = self.datasets[name]
        if hi > lo and dataset.chunks:  # h5py decompresses whole chunks; its chunk cache keeps the last one
            chunk_rows = dataset.chunks[0]
            first, last = lo // chunk_rows, (hi - 1) // chunk_rows
            chunks = last - first + 1 - (self.last_chunk.get(name) == first)
            self.last_chunk[name] = last
            self.modelled += chunks * chunk_rows * self.row_bytes[name]
        rows = dataset[lo:hi]
        return rows if dtype is None else rows.astype(dtype)

    def read(self, j: int, dtypes: dict[str, Any] = READ_DTYPES) -> dict[str, Any]:
        """Sample j of this file, its rows in `dtypes` (the rest as stored)."""
        lo, hi = int(self.offsets[j]), int(self.offsets[j + 1])
        sample = {"sample_index": int(self.sample_index[j])}
        for name in self.datasets:
            if name not in ENTRY_DATASETS:
                sample[name] = self.rows(name, lo, hi, dtypes.get(name))
        if self.entry_offsets is not None:  # a sampled cache: its entries, back to (L, m)
            first, last = int(self.entry_offsets[j]), int(self.entry_offsets[j + 1])
            gaps, counts = (self.rows(name, first, last) for name in ENTRY_DATASETS)
            sample["sampled_ids"], sample["sampled_counts"] = unpack_sampled(gaps, counts, hi - lo, self.draws)
        return sample

    def close(self) -> None:
        self.file.close()
        if self.fileobj is not None:
            self.fileobj.close()


def _per_sample(dataset: h5py.Dataset, load: bool) -> Any:
    """A per-sample dataset: loaded whole (through RawColumn when it can: its one chunk of 65,536 entries is 512 KiB
    to inflate even for a part of a few samples, a third of what opening a part cost through h5py), or the dataset
    itself, sliced per read (an export of more than LOAD_SAMPLES samples)."""
    if not load:
        return dataset
    column = raw_column(dataset)
    return dataset[:] if column is None else column.rows(0, dataset.shape[0])


def iter_samples(source, block_tokens: int = 1 << 16, *, name: str | None = None,
                 build_id: str | None = None) -> Iterator[dict[str, Any]]:
    """Every sample of one cache file (a path or a file object), front to back, in its stored dtypes
    (as_read() converts one as CacheReader returns it). Whole samples are read in blocks of about block_tokens
    rows, so each chunk is decompressed once; each sample is copied out, so holding one never holds its block.
    A sampled-mode file is read sample by sample; each dataset keeps its last chunks.KEEP_CHUNKS inflated chunks.

    The file is checked first (nothing outside it; `build_id`, when given, is its own); a file h5py cannot read
    is a CacheFileError naming `name` (the file's URI; default: source)."""
    name = name or str(source)
    try:
        yield from _iter_samples(source, block_tokens, name, build_id)
    except (OSError, KeyError, ValueError, RuntimeError) as e:  # truncated, not HDF5, a damaged chunk
        raise CacheFileError(f"{name}: cannot be read ({_first_line(e)}). The file is damaged: run the build "
                             "again, or `kd-cache inspect --deep` for details.") from None


def _iter_samples(source, block_tokens: int, name: str, build_id: str | None) -> Iterator[dict[str, Any]]:
    with h5py.File(source, "r") as file:
        _check_file(file, name, build_id)
        part = _Part(file, None)
        if part.entry_offsets is not None:
            for j in range(len(part.sample_index)):
                yield part.read(j)
            return
        offsets, sample_index = part.offsets[:], part.sample_index[:]  # loaded, or read whole here (an export)
        names = list(part.datasets)
        s = 0
        while s < len(sample_index):
            e = max(s + 1, int(np.searchsorted(offsets, offsets[s] + block_tokens, side="right")) - 1)
            lo, hi = int(offsets[s]), int(offsets[e])
            block = {name: part.rows(name, lo, hi) for name in names}
            for i in range(s, e):
                a, b = int(offsets[i]) - lo, int(offsets[i + 1]) - lo
                yield {"sample_index": int(sample_index[i]), **{n: block[n][a:b].copy() for n in names}}
            s = e


def _check_file(file: h5py.File, where: str, build_id: str | None, sources: frozenset[str] = frozenset()) -> None:
    """CacheFileError naming `where` unless the file reads nothing outside the cache (check_contained) and, when
    the manifest records one, carries its build id (else it is a part of another build)."""
    check_contained(file, where, sources)
    if build_id is not None and (found := read_attr(file, "build_id")) != build_id:
        raise CacheFileError(f"{where}: build {found!r}, the manifest's is {build_id!r}: a file of another build "
                             "(a foreign part). The version is damaged: run the build again.")


def as_read(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample in the dtypes readers return (READ_DTYPES), from the dtypes stored."""
    return {name: _as_read(name, value) if isinstance(value, np.ndarray) else value for name, value in sample.items()}


def _as_read(name: str, rows: np.ndarray) -> np.ndarray:
    return rows.astype(READ_DTYPES[name]) if name in READ_DTYPES else rows


@dataclass
class CacheInfo:
    path: str
    attrs: dict[str, Any]
    num_samples: int
    num_tokens: int
    top_k: int | None  # None for a sampled cache
    vocab_size: int
    file_bytes: int | None
    samples: int | None = None  # N draws per row of a sampled cache

    @property
    def mode(self) -> str:
        return "topk" if self.samples is None else "sampled"

    @property
    def bytes_per_token(self) -> float | None:
        return self.file_bytes / self.num_tokens if self.file_bytes and self.num_tokens else None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


class CacheReader:
    """Random access to a cache by sample: a published version (its output root, its directory or its cache.h5;
    local or any fsspec URL, always through its manifest) or a single format-v1 file.

    What it reads is checked against the manifest (CacheFileError naming the file, never zeros): on open, that the
    manifest exists and parses, lists at least one part, names files inside the version only, and that every file
    it lists has the listed size (one listing); each file as it is opened, that it carries the manifest's build id
    (manifests that record one) and reads nothing outside the version (no external links or storage, virtual
    sources only among the version's parts). `damage(deep=True)` checks every file's sha256.

    `reader[i]` returns numpy arrays input_ids (L,) int64, sample_index, and either topk_indices (L, k) int64,
    topk_logprobs (L, k) float32 and logsumexp (L,) float32 (a top-k cache) or sampled_ids (L, m) int64 and
    sampled_counts (L, m) int64 (a sampled cache: ids ascending, count 0 = padding, m = the sample's most
    distinct ids in a row); any other row dataset as stored. One sample costs one slice read per row dataset:
    its part file is found by a bisect over the manifest's per-file sample counts (one entry per file), and its
    rows by the offsets of that file, loaded when the file is opened (16 B per sample of the file: never the whole
    cache's, which at 10M samples would be 160 MB in every DataLoader worker); the last MAX_OPEN files stay open.

    part_cache (a kd_core.partcache.PartCache): a remote version's parts are read from local copies of the whole
    files, downloaded once and checked against the manifest, instead of by ranged GETs per sample.
    `stats()` counts the bytes reads decompressed and returned (docs/PERFORMANCE.md: read amplification).
    """

    # Files kept open: a local handle costs its offsets and the last chunks.KEEP_CHUNKS decoded chunks of each row
    # dataset (a few KB to a few MB); a remote one also holds up to io.READ_CACHE_BLOCKS blocks of
    # io.READ_BLOCK_BYTES (16 MiB).
    MAX_OPEN = {"local": 16, "remote": 8}

    def __init__(self, uri: str | Path, storage_options: dict[str, Any] | None = None,
                 part_cache: PartCache | None = None):
        self.uri, self.storage_options, self.part_cache = str(uri), storage_options, part_cache
        self.source = store.resolve(self.uri, storage_options)
        self._open_files: OrderedDict[int, _Part] = OrderedDict()  # file number -> its open part
        self._closed_stats = [0, 0]  # decompressed, returned bytes of the parts closed so far
        self._opened = 0  # files opened for sample reads (a file closed to make room and read again counts again)
        manifest = self.source.manifest
        self.build_id = getattr(manifest, "build_id", None)  # manifests before build ids: sizes only
        if manifest is not None:  # a version: its parts, and the index for the attributes
            self._check_manifest()
            self.files = [self.source.join(part.name) for part in manifest.parts]
            counts = [part.num_samples for part in manifest.parts]
            self.num_tokens, self.file_bytes = manifest.num_tokens, manifest.file_bytes
            index = self._open(self.source.index_uri, frozenset(part.name for part in manifest.parts))
            self.attrs = read_attrs(index[0])
            self._close(index)
        else:  # one self-contained file
            self.files = [self.source.index_uri]
            try:
                file = self._file(0)  # refused when it is a version's index: its sources are no file of its own
            except CacheFileError:
                if self._is_index():  # its parts are known to the manifest only
                    raise self._no_manifest() from None
                raise
            self.attrs = read_attrs(file)
            counts = [file["offsets"].shape[0] - 1]
            self.num_tokens = int(file["offsets"][-1])
            self.file_bytes = self._size(self.source.index_uri)
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise CacheFileError(f"{uri}: format_version {self.attrs.get('format_version')!r}, this reader reads {FORMAT_VERSION}.")
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (files + 1,)
        self.samples = sampled_draws(self.attrs)
        self.top_k = int(self.attrs["top_k"]) if self.samples is None else None
        self.vocab_size = int(self.attrs["vocab_size"])

    def _is_index(self) -> bool:
        """Whether the single file named is a version's index (its attributes say so), read without following it."""
        fileobj = None
        try:
            fileobj, _ = io.open_for_read(self.source.index_uri, self.storage_options)
            with h5py.File(fileobj if fileobj is not None else io.local_path(self.source.index_uri), "r") as f:
                return read_attrs(f).get("index") == "virtual"
        except Exception:
            return False
        finally:
            if fileobj is not None:
                fileobj.close()

    def _no_manifest(self) -> CacheFileError:
        manifest = self.source.join("manifest.json")
        state = "is damaged (not a manifest kd-cache reads)" if io.exists(manifest, self.storage_options) else "is missing"
        return CacheFileError(f"{manifest}: {state}, so {self.source.index_uri} cannot be checked against it and "
                              "is not read (a missing part would read as holes). Fix: run the build again, or "
                              "restore the manifest.")

    def _check_manifest(self) -> None:
        """The manifest's names and parts, and every listed file's size from one listing: CacheFileError."""
        manifest, where = self.source.manifest, self.source.join("manifest.json")
        if not manifest.parts:
            raise CacheFileError(f"{where}: lists no part files; a version has at least one. It is damaged: run the "
                                 "build again.")
        if bad := next((f.name for f in manifest.files if not safe_name(f.name)), None):
            raise CacheFileError(f"{where}: names {bad!r}, a file outside the version directory (absolute, or with "
                                 "'..'); a cache reads only its own files. Refused: it was crafted or damaged.")
        directory = self.source.index_uri.rsplit("/", 1)[0]
        try:
            found = io.stamps(directory, self.storage_options)
        except Exception as e:  # a remote listing that fails: one line, not the client's traceback
            raise StorageError(f"{directory}: cannot be listed ({type(e).__name__}: {_first_line(e)}). Check the "
                               "endpoint, network and credentials (--storage-option, the environment).") from None
        problems = []
        for entry in manifest.files:
            size = found.get(entry.name, {}).get("size")
            if size != entry.bytes:
                problems.append(f"{self.source.join(entry.name)}: " + (
                    "missing" if size is None else f"{size:,} bytes, the manifest says {entry.bytes:,} (truncated, "
                                                   "replaced or from another version)"))
        if problems:
            more = f" (and {len(problems) - 1} more damaged files)" if len(problems) > 1 else ""
            raise CacheFileError(f"{problems[0]}{more}. The version is incomplete or damaged: run the build again.")

    def _size(self, uri: str) -> int:
        fs, path = io.filesystem(uri, self.storage_options)
        return fs.size(path)

    def _open(self, uri: str, sources: frozenset[str] = frozenset()) -> tuple[h5py.File, Any]:
        """(h5py file, the fsspec file object under it or None for a local path), checked: it reads nothing outside
        the cache (virtual sources only among `sources`) and carries the manifest's build id."""
        try:
            fileobj, _ = io.open_for_read(uri, self.storage_options)
        except FileNotFoundError:
            raise CacheFileError(f"{uri}: missing. The cache is incomplete: run the build again.") from None
        except Exception as e:  # a remote store's error: one line, not the client's traceback
            raise StorageError(f"{uri}: cannot be opened ({type(e).__name__}: {_first_line(e)}).") from None
        try:
            file = h5py.File(fileobj if fileobj is not None else io.local_path(uri), "r")
        except Exception as e:  # truncated, overwritten, not HDF5 (h5py raises OSError; a store, its own errors)
            if fileobj is not None:
                fileobj.close()
            raise CacheFileError(f"{uri}: not a readable HDF5 file ({_first_line(e)}). It is damaged: run the build "
                                 "again (a damaged version is rebuilt), or `kd-cache inspect --deep` for details.") from None
        try:
            _check_file(file, uri, self.build_id, sources)
        except BaseException:
            self._close((file, fileobj))
            raise
        return file, fileobj

    @staticmethod
    def _close(handle: tuple[h5py.File, Any]) -> None:
        handle[0].close()
        if handle[1] is not None:
            handle[1].close()

    def _part(self, f: int) -> _Part:
        """File f, opened once and kept among the MAX_OPEN most recently used."""
        if f not in self._open_files:
            uri, local = self.files[f], io.is_local(self.files[f])
            if not local and self.part_cache is not None and self.source.manifest is not None:
                entry = self.source.manifest.parts[f]
                uri, local = str(self.part_cache.local(uri, entry.bytes, entry.sha256)), True
            handle = self._open(uri)
            self._opened += 1
            try:
                self._open_files[f] = _Part(*handle)
            except (OSError, KeyError, ValueError) as e:  # its offsets unreadable: a damaged chunk
                self._close(handle)
                raise CacheFileError(f"{self.files[f]}: its offsets cannot be read ({_first_line(e)}). The file is "
                                     "damaged: run the build again, or `kd-cache inspect --deep` for details.") from None
            limit = self.MAX_OPEN["local" if local else "remote"]
            while len(self._open_files) > limit:
                self._close_part(self._open_files.popitem(last=False)[1])
        self._open_files.move_to_end(f)
        return self._open_files[f]

    def _file(self, f: int) -> h5py.File:
        return self._part(f).file

    def _close_part(self, part: _Part) -> None:
        self._closed_stats[0] += part.decompressed
        self._closed_stats[1] += part.returned
        part.close()

    def stats(self) -> dict[str, int]:
        """{bytes_decompressed, bytes_returned, files_opened} by this reader's sample reads so far (bytes as stored;
        chunks of virtual datasets are not counted): the bytes' ratio is the read amplification; a file reopened
        after MAX_OPEN others pushed it out counts each time (several ms each)."""
        parts = list(self._open_files.values())
        return {"bytes_decompressed": self._closed_stats[0] + sum(p.decompressed for p in parts),
                "bytes_returned": self._closed_stats[1] + sum(p.returned for p in parts), "files_opened": self._opened}

    def lengths(self) -> np.ndarray:
        """(S,) int64 tokens of every sample: from the index's /offsets (a version) or the file's (one file)."""
        if self.source.manifest is None:
            return np.diff(self._file(0)["offsets"][:])
        index = self._open(self.source.index_uri, frozenset(part.name for part in self.source.manifest.parts))
        try:
            return np.diff(index[0]["offsets"][:])
        finally:
            self._close(index)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def info(self) -> CacheInfo:
        return CacheInfo(self.uri, self.attrs, len(self), self.num_tokens, self.top_k, self.vocab_size,
                         self.file_bytes, self.samples)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.sample(i)

    def sample(self, i: int, *, as_stored: bool = False) -> dict[str, np.ndarray]:
        """Sample i in the dtypes readers return (READ_DTYPES), or with `as_stored` as the file stores it, for a
        caller that converts it itself (as_read(); the torch datasets convert float16 in torch, 4x faster)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a cache of {len(self)} samples")
        i %= len(self)
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        part, j = self._part(f), i - int(self.starts[f])
        try:
            sample = part.read(j, {} if as_stored else READ_DTYPES)
        except (OSError, KeyError, ValueError) as e:  # a corrupt chunk (checksum/decompression), a missing dataset
            raise CacheFileError(f"{self.files[f]}: sample {i} cannot be read ({_first_line(e)}). The file is "
                                 "damaged: run the build again, or `kd-cache inspect --deep` for details.") from None
        return sample

    def damage(self, deep: bool = False) -> list[str]:
        """Every file of the cache against the manifest (a version): its size, its metadata as _open checks it
        (nothing outside the cache, the build id), and with `deep` its sha256 (every byte read); a single-file
        cache against its own checksums. One line per damaged file; empty if intact."""
        if self.source.manifest is None:
            if not deep:
                return []
            try:
                verify_file(io.local_path(self.files[0]) if io.is_local(self.files[0]) else self._fetch(0))
            except CacheFileError as e:
                return [f"{self.files[0]}: {e}"]
            return []
        problems, manifest = [], self.source.manifest
        for entry in manifest.files:
            uri = self.source.join(entry.name)
            try:
                size = self._size(uri)
            except FileNotFoundError:
                problems.append(f"{uri}: missing")
                continue
            if size != entry.bytes:
                problems.append(f"{uri}: {size:,} bytes, the manifest says {entry.bytes:,} (truncated or replaced)")
                continue
            try:
                self._close(self._open(uri, frozenset(p.name for p in manifest.parts) if entry is manifest.index
                                       else frozenset()))
            except CacheFileError as e:
                problems.append(str(e))
            else:
                if deep and io.sha256_of(uri, self.storage_options) != entry.sha256:
                    problems.append(f"{uri}: its sha256 differs from the manifest's (the bytes were changed)")
        return problems

    def _fetch(self, f: int):
        raise CacheFileError(f"{self.files[f]}: a remote single-file cache is checked by downloading it first "
                             "(kd-cache export), then inspect --deep on the local copy.")

    def read_all(self) -> dict[str, np.ndarray]:
        """Every dataset of the whole cache as stored, offsets included (small caches: tests, tools)."""
        arrays: dict[str, list[np.ndarray]] = {}
        rows = {"offsets": 0, ENTRY_OFFSETS: 0}  # rows of the files before this one, per offsets dataset
        for f in range(len(self.files)):
            file = self._file(f)
            for name in (*row_datasets(file), *(n for n in PER_SAMPLE_DATASETS if n in file)):
                data = file[name][:]
                if name in rows:
                    data = (data if f == 0 else data[1:]) + rows[name]
                arrays.setdefault(name, []).append(data)
            for name in rows.keys() & file.keys():
                rows[name] += int(file[name][-1])
        return {name: np.concatenate(parts) for name, parts in arrays.items()}

    def close(self) -> None:
        while self._open_files:
            self._close_part(self._open_files.popitem()[1])

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
