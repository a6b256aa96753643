"""teacher-inference-shard: one shard on a GPU worker (deployment teacher-inference-shard/gpu on gpu-pool)."""

from typing import Any

from prefect import flow

from kd_core.config import ConfigOverrides
from kd_core.data import ShardSpec
from tasks.teacher_inference import teacher_inference
from tasks.validate_config import validate_config


@flow(name="teacher-inference-shard")
def teacher_inference_shard(profile: str, overrides: ConfigOverrides | None, shard: dict[str, int]) -> dict[str, Any]:
    """Run the teacher over rows [shard.start, shard.stop) and publish the shard file and its record."""
    override_dict = overrides.model_dump(exclude_unset=True) if overrides is not None else {}
    config = validate_config(profile, override_dict)
    return teacher_inference(config, ShardSpec(**shard))
