"""shard-dataset: run.num_shards deterministic shard specs that together cover exactly the run's samples."""

from prefect import get_run_logger, task

from kd_core import pipeline
from kd_core.config import Config
from kd_core.data import ShardSpec
from kd_core.storage import StorageEstimate


@task(name="shard-dataset")
def shard_dataset(config: Config, estimate: StorageEstimate) -> list[ShardSpec]:
    shards = pipeline.plan(config, estimate)
    get_run_logger().info("%d shards: %s", len(shards), ", ".join(f"[{s.start}, {s.stop})" for s in shards))
    return shards
