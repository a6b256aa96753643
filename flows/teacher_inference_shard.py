"""teacher-inference-shard: one shard on a GPU worker (deployment teacher-inference-shard/gpu on gpu-pool).

Started by build-teacher-cache, one flow run per shard, with the parent's resolved config (credentials left out:
this worker's environment supplies them) and the version key the parent computed from it. A worker that resolves
the config to another key (another checkout, other teacher files) refuses before any work. Safe to run twice: a
complete shard is not run again, a partial one resumes after its last finished part.
"""

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.states import Failed, State

from kd_core import pipeline
from kd_core.config import Config
from kd_core.data import ShardSpec
from kd_core.errors import KDCacheError
from kd_core.records import ShardRecord
from tasks.teacher_inference import teacher_inference
from tasks.validate_config import read_secret_block


@task(name="accept-config")
def accept_config(config: dict[str, Any], version_key: str) -> Config:
    """The parent's config, checked here under this worker's policy, with output.credentials read here."""
    return pipeline.accept(config, version_key, read_secret=read_secret_block)


@flow(name="teacher-inference-shard")
def teacher_inference_shard(config: dict[str, Any], version_key: str, shard: dict[str, Any]) -> ShardRecord | State:
    """Run the teacher over rows [shard.start, shard.stop) and publish the shard's parts and its record.

    Args:
        config: the parent's resolved config, credentials left out.
        version_key: the cache version the parent builds; refused when this worker resolves the config otherwise.
        shard: the shard spec from the parent's plan (rows, and the files and row groups that hold them).
    """
    try:
        resolved = accept_config(config, version_key)
        return teacher_inference(resolved, ShardSpec.model_validate(shard))
    except KDCacheError as e:  # the error's own words as the state message, which the parent quotes
        get_run_logger().error("%s", e)
        return Failed(message=str(e), data=e)
