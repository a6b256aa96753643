"""The cache file format, version 1 (HDF5), in modules short enough to read at once:

    format   datasets, dtypes, the row spec of each mode, fill value, attributes, byte arithmetic
    writer   CacheWriter (one file) and SplitWriter (files of at most output.max_object_bytes)
    index    the index of a version: virtual datasets over its part files
    reader   CacheReader (random access by sample, any URI form) and whole-file iteration
    chunks   rows of a dataset from its raw chunks, inflated by libdeflate (what the reader reads with)
    verify   a file against its structure and checksums
    export   a version as one self-contained file

docs/FORMAT.md describes the files; kd_core.h5cache.format is the one place in the code that knows them.
"""

from kd_core.h5cache.export import export, export_cache
from kd_core.h5cache.format import (FORMAT_VERSION, TOKEN_DATASETS, bytes_per_token, count_dtype, entry_layout,
                                    index_dtype, read_attrs, row_layout, temporary_path)
from kd_core.h5cache.index import index_entry, write_index
from kd_core.h5cache.reader import CacheInfo, CacheReader, as_read, iter_samples
from kd_core.h5cache.verify import verify_file
from kd_core.h5cache.writer import CacheWriter, SplitWriter

# What the rest of the code uses; the modules' other names are the package's own.
__all__ = [
    "FORMAT_VERSION", "TOKEN_DATASETS", "CacheInfo", "CacheReader", "CacheWriter", "SplitWriter", "as_read",
    "bytes_per_token", "count_dtype", "entry_layout", "export", "export_cache", "index_dtype", "index_entry",
    "iter_samples", "read_attrs", "row_layout", "temporary_path", "verify_file", "write_index",
]
