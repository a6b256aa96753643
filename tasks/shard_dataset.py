"""shard-dataset: run.num_shards shard specs from the source's layout, together covering exactly the run's rows."""

from prefect import get_run_logger, task

from kd_core.build import Build
from kd_core.data import ShardSpec
from kd_core.shard import plan as plan_shards
from tasks import user_errors


@task(name="shard-dataset")
@user_errors
def shard_dataset(build: Build) -> list[ShardSpec]:
    plan = plan_shards(build)
    shards = plan.shards
    get_run_logger().info("%d shards planned by %s, %d source rows read in all (%d samples): %s", len(shards),
                          plan.method, sum(s.rows_read for s in shards), shards[-1].stop - shards[0].start,
                          ", ".join(f"[{s.start}, {s.stop})" for s in shards[:8]) + (" ..." if len(shards) > 8 else ""))
    return shards
