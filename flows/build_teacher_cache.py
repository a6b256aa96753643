"""build-teacher-cache: validate-config -> estimate-storage -> shard-dataset -> teacher-inference (per shard)
-> merge-to-hdf5. Thin: every step is one task around one kd_core call."""

import time
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.runtime import deployment
from prefect.task_runners import ThreadPoolTaskRunner

from kd_core import pipeline
from kd_core.config import ConfigOverrides, available_profiles
from kd_core.storage import human_bytes
from tasks.estimate_storage import estimate_storage
from tasks.merge_to_hdf5 import merge_to_hdf5
from tasks.shard_dataset import shard_dataset
from tasks.teacher_inference import teacher_inference, teacher_inference_on_pool
from tasks.validate_config import validate_config

# A dropdown in the UI's run form.
ProfileName = Literal[tuple(available_profiles())]  # type: ignore[valid-type]


@flow(name="build-teacher-cache", task_runner=ThreadPoolTaskRunner(max_workers=64))
def build_teacher_cache(profile: ProfileName = "demo", overrides: ConfigOverrides | None = None) -> dict[str, Any]:
    """Run a teacher over a dataset and publish its top-k log-probs as an HDF5 cache.

    Args:
        profile: a profile from profiles/ (demo, testing, development, small, medium, large).
        overrides: config keys to change, nested like the config, e.g. {"dataset": {"max_samples": 1000}}.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    override_dict = overrides.model_dump(exclude_unset=True) if overrides is not None else {}

    config = validate_config(profile, override_dict)
    if (manifest := pipeline.published(config)) is not None:
        logger.info("up to date: %s already holds this cache (key %s)", manifest["uri"], manifest["key"])
        return {**manifest, "up_to_date": True}

    estimate = estimate_storage(config)
    shards = shard_dataset(config, estimate)

    progress_id = create_progress_artifact(progress=0.0, key="shard-progress", description="Shards finished")
    if deployment.id is None:  # a local run: shards one after another in this process
        records = []
        for shard in shards:
            records.append(teacher_inference(config, shard))
            update_progress_artifact(progress_id, 100.0 * len(records) / len(shards))
    else:  # deployed: one teacher-inference-shard/gpu flow run per shard, all in flight at once
        futures = [teacher_inference_on_pool.submit(profile, override_dict, config, shard) for shard in shards]
        records = []
        for future in futures:
            records.append(future.result())  # raises the shard's error if it failed after its retries
            update_progress_artifact(progress_id, 100.0 * len(records) / len(shards))

    manifest = merge_to_hdf5(config, records)
    wall = time.perf_counter() - started
    create_markdown_artifact(key="cache-summary", description="Cache build summary", markdown=_summary(manifest, records, wall))
    return {**manifest, "wall_seconds": wall, "up_to_date": False}


def _summary(manifest: dict[str, Any], records: list[dict[str, Any]], wall: float) -> str:
    shard_seconds = sum(r["seconds"] for r in records)
    return "\n".join([
        "| what | value |", "|---|---|",
        f"| output | `{manifest['uri']}` |",
        f"| samples | {manifest['num_samples']:,} ({manifest['skipped_empty']:,} empty skipped) |",
        f"| tokens | {manifest['num_tokens']:,} |",
        f"| size | {human_bytes(manifest['file_bytes'])} ({manifest['bytes_per_token']:.1f} B/token) |",
        f"| teacher tokens/s | {manifest['num_tokens'] / max(shard_seconds, 1e-9):,.0f} (summed over {len(records)} shards) |",
        f"| wall time | {wall:.1f} s |",
    ])
