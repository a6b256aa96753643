"""merge-to-hdf5: check every part file cheaply, write the version's index (cache.h5) and manifest, move latest."""

from prefect import get_run_logger, task

from kd_core.build import Build
from kd_core.merge import merge
from kd_core.records import Manifest, ShardRecord
from kd_core.storage import human_bytes
from tasks import user_errors


@task(name="merge-to-hdf5")
@user_errors
def merge_to_hdf5(build: Build, records: list[ShardRecord]) -> Manifest:
    manifest = merge(build, records)
    get_run_logger().info("published %s: %s samples, %s tokens, %s in %s part files (%.1f B/token)", manifest.uri,
                          f"{manifest.num_samples:,}", f"{manifest.num_tokens:,}", human_bytes(manifest.file_bytes),
                          f"{len(manifest.parts):,}", manifest.bytes_per_token)
    return manifest
