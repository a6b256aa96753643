"""teacher-inference-shard: one shard on a GPU worker (deployment teacher-inference-shard/gpu on gpu-pool).

Started by build-teacher-cache, one flow run per shard. Safe to run twice: a complete shard is not run again.
"""

from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Failed, State

from kd_core.config import ConfigOverrides
from kd_core.data import ShardSpec
from kd_core.errors import KDCacheError
from tasks.teacher_inference import teacher_inference
from tasks.validate_config import validate_config


@flow(name="teacher-inference-shard")
def teacher_inference_shard(profile: str, overrides: ConfigOverrides | None, shard: dict[str, int]) -> dict[str, Any] | State:
    """Run the teacher over rows [shard.start, shard.stop) and publish the shard's files and its record."""
    override_dict = overrides.model_dump(exclude_unset=True) if overrides is not None else {}
    try:
        config = validate_config(profile, override_dict)
        return teacher_inference(config, ShardSpec(**shard))
    except KDCacheError as e:  # the error's own words as the state message, which the parent quotes
        get_run_logger().error("%s", e)
        return Failed(message=str(e), data=e)
