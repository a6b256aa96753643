"""merge-to-hdf5: verify every shard (row counts, checksums), merge into one HDF5, publish atomically."""

from typing import Any

from prefect import get_run_logger, task

from kd_core import pipeline
from kd_core.config import Config
from kd_core.storage import human_bytes


@task(name="merge-to-hdf5")
def merge_to_hdf5(config: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    manifest = pipeline.merge(config, records)
    get_run_logger().info("published %s: %d samples, %d tokens, %s (%.1f B/token)", manifest["uri"],
                          manifest["num_samples"], manifest["num_tokens"], human_bytes(manifest["file_bytes"]),
                          manifest["bytes_per_token"])
    return manifest
