"""Reading a cache never leaves it: an HDF5 file can make a reader open other files (external links, a dataset's
external storage, the sources of a virtual dataset). A cache is someone else's data, so every file is checked,
from its metadata alone, before any of its data is read."""

from __future__ import annotations

import posixpath

import h5py

from kd_core.errors import CacheFileError


def safe_name(name: str) -> bool:
    """A file name inside a version: relative, without '..' or backslashes, not empty."""
    return bool(name) and not posixpath.isabs(name) and "\\" not in name and ".." not in name.split("/") \
        and not name.startswith("~")


def check_contained(file: h5py.File, where: str, sources: frozenset[str] = frozenset()) -> None:
    """CacheFileError naming `where` unless every dataset of `file` reads from `file` itself: no external link, no
    external storage, and virtual datasets whose sources are the file itself ('.', an export) or one of `sources`
    (an index: its version's part files, by their name relative to it)."""
    links: list[str] = []
    file.visit_links(lambda path: links.append(path) if isinstance(file.get(path, getlink=True), h5py.ExternalLink)
                     else None)
    if links:
        raise CacheFileError(f"{where}: /{links[0]} is an external link to another file; a cache reads only its own "
                             "files. Refused: this file was crafted or damaged.")
    datasets: list[h5py.Dataset] = []
    file.visititems(lambda _, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
    for dataset in datasets:
        if dataset.external:
            raise CacheFileError(f"{where}: {dataset.name} is stored in another file (HDF5 external storage); a "
                                 "cache reads only its own files. Refused: this file was crafted or damaged.")
        if dataset.is_virtual:
            for source in dataset.virtual_sources():
                if source.file_name != "." and source.file_name not in sources:
                    raise CacheFileError(f"{where}: {dataset.name} is a view of {source.file_name!r}, not a file of "
                                         "this cache; a cache reads only its own files. Refused: this file was "
                                         "crafted or damaged.")
