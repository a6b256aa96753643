"""Typed records of a build (kd_core.store reads and writes them).

    FileRecord    one part file as published: its name in the version, size, sha256, counts, per-dataset checksums
    PartRecord    one planned part of a shard (run.part_samples rows, one teacher pass): the files it was split
                  into by output.max_object_bytes
    ShardRecord   a finished shard: its parts, in order
    Manifest      a published version: every file (parts, then the index) with size and checksum, counts, config

Every record carries the Provenance of what produced its rows; merge refuses records whose provenance differs
(check_consistent), so parts made by different teachers, tokenizers, dtypes or formats never end up in one cache.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from kd_core.data import ShardSpec
from kd_core.errors import CacheFileError
from kd_core.source import ResolvedSource


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Provenance(_Record):
    """What decides the bytes of a part's rows beyond the config's content key; equal across a version."""

    format_version: int
    vocab_size: int
    top_k: int | None            # None in a sampled cache
    samples: int | None = None   # N draws per row in a sampled cache
    tokenizer: str | None
    teacher_dtype: str


class FileRecord(_Record):
    name: str                    # relative to the version directory: parts/<shard>/part-00003-0000.h5
    bytes: int
    sha256: str                  # of the file's bytes, computed from the local file before it was published
    etag: str | None = None      # the store's ETag right after the upload (S3); None for a local target
    mtime_ns: int | None = None  # a local target's modification time when published
    num_samples: int
    num_tokens: int
    checksums: dict[str, str]    # sha256 of each dataset's raw array bytes, as the writer encoded them


class PartRecord(_Record):
    part: int                    # the part's number within its shard
    start: int                   # source rows [start, stop)
    stop: int
    num_samples: int
    num_tokens: int
    skipped_empty: int
    seconds: float
    provenance: Provenance
    files: list[FileRecord]      # in row order; more than one when the part passed output.max_object_bytes
    projected_cache_bytes: int | None = None  # the shard's first part of a run: the whole cache at its bytes/row
    build_id: str                # the build that wrote it (Store.build_id): a resume keeps only its own build's parts


class ShardRecord(_Record):
    shard: ShardSpec
    num_samples: int
    num_tokens: int
    skipped_empty: int
    seconds: float
    provenance: Provenance
    parts: list[PartRecord]

    @classmethod
    def from_parts(cls, shard: ShardSpec, parts: list[PartRecord]) -> "ShardRecord":
        check_consistent([p.provenance for p in parts], shard.name)
        return cls(shard=shard, parts=parts, provenance=parts[0].provenance,
                   num_samples=sum(p.num_samples for p in parts), num_tokens=sum(p.num_tokens for p in parts),
                   skipped_empty=sum(p.skipped_empty for p in parts),
                   seconds=round(sum(p.seconds for p in parts), 3))

    @property
    def files(self) -> list[FileRecord]:
        return [f for part in self.parts for f in part.files]


class ManifestFile(_Record):
    name: str                    # relative to the version directory
    bytes: int
    sha256: str
    num_samples: int
    num_tokens: int


class Manifest(_Record):
    format_version: int
    key: str
    uri: str                     # the index (cache.h5)
    index: ManifestFile
    parts: list[ManifestFile]    # in sample order: sample s lives in the part whose cumulative range holds it
    num_samples: int
    num_tokens: int
    skipped_empty: int
    shards: int
    file_bytes: int              # parts + index
    bytes_per_token: float
    provenance: Provenance
    config: dict[str, Any]
    published_at: str            # ISO time; orders versions for pruning
    build_id: str | None = None  # stamped into every part and the index (root attribute build_id); None: older
    source: ResolvedSource | None = None  # what was read, as validate resolved it (the version key covers it)

    @property
    def files(self) -> list[ManifestFile]:
        """Everything the version consists of; the manifest itself is written after all of them."""
        return [*self.parts, self.index]


def check_consistent(provenances: list[Provenance], what: str) -> None:
    """CacheFileError when records disagree on how their rows were made (mixed teachers, dtypes, formats)."""
    distinct = {p for p in provenances}
    if len(distinct) > 1:
        fields = sorted({k for a in distinct for b in distinct for k, v in a if getattr(b, k) != v})
        raise CacheFileError(
            f"{what}: its parts were made differently ({', '.join(fields)} differ: "
            f"{sorted(str(p) for p in distinct)}), so they cannot form one cache. Fix: delete the work/ directory "
            "of this version and run again with one setting."
        )
