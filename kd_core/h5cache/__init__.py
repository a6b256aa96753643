"""The cache file format, version 1 (HDF5), in modules short enough to read at once:

    format   datasets, dtypes, the row spec of each mode, fill value, attributes, byte arithmetic
    writer   CacheWriter (one file) and SplitWriter (files of at most output.max_object_bytes)
    index    the index of a version: virtual datasets over its part files
    reader   CacheReader (random access by sample, any URI form) and whole-file iteration
    verify   a file against its structure and checksums
    export   a version as one self-contained file

docs/FORMAT.md describes the files; kd_core.h5cache.format is the one place in the code that knows them.
"""

from kd_core.h5cache.export import export, export_cache
from kd_core.h5cache.format import (ENTRY_DATASETS, ENTRY_OFFSETS, FORMAT_VERSION, METADATA_BYTES, PER_SAMPLE_DATASETS,
                                    SAMPLE_DATASETS, TOKEN_DATASETS, bytes_per_sample, bytes_per_token, count_dtype,
                                    entry_layout, index_dtype, per_sample_bytes, read_attrs, row_datasets, row_layout,
                                    temporary_path, write_attrs)
from kd_core.h5cache.index import index_entry, write_index
from kd_core.h5cache.reader import CacheInfo, CacheReader, as_read, iter_samples
from kd_core.h5cache.verify import verify_file
from kd_core.h5cache.writer import CacheWriter, SplitWriter

__all__ = [
    "ENTRY_DATASETS", "ENTRY_OFFSETS", "FORMAT_VERSION", "METADATA_BYTES", "PER_SAMPLE_DATASETS", "SAMPLE_DATASETS",
    "TOKEN_DATASETS", "CacheInfo", "CacheReader", "CacheWriter", "SplitWriter", "as_read", "bytes_per_sample",
    "bytes_per_token", "count_dtype", "entry_layout", "export", "export_cache", "index_dtype", "index_entry",
    "iter_samples", "per_sample_bytes", "read_attrs", "row_datasets", "row_layout", "temporary_path", "verify_file",
    "write_attrs", "write_index",
]
