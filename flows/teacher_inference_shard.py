"""teacher-inference-shard: one shard on a GPU worker (deployment teacher-inference-shard/gpu on gpu-pool).

Started by build-teacher-cache, one flow run per shard. Safe to run twice: a complete shard is not run again.
"""

from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Failed, State

from flows.build_teacher_cache import Overrides, Profile
from kd_core.data import ShardSpec
from kd_core.errors import KDCacheError
from kd_core.records import ShardRecord
from tasks.teacher_inference import teacher_inference
from tasks.validate_config import validate_config


@flow(name="teacher-inference-shard")
def teacher_inference_shard(
    profile: Profile, overrides: Overrides, shard: dict[str, Any]
) -> ShardRecord | State:
    """Run the teacher over rows [shard.start, shard.stop) and publish the shard's files and its record.

    Args:
        profile: The parent run's profile (a shipped profile or a YAML path on the worker). Empty means demo.
        overrides: The parent run's KEY=VALUE overrides, unchanged. Empty means none.
        shard: The shard as planned by build-teacher-cache: its rows [start, stop) and the files that hold them.
    """
    try:
        config = validate_config(profile or "demo", list(overrides or []))
        return teacher_inference(config, ShardSpec.model_validate(shard))
    except KDCacheError as e:  # the error's own words as the state message, which the parent quotes
        get_run_logger().error("%s", e)
        return Failed(message=str(e), data=e)
