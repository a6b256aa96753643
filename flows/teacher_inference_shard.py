"""teacher-inference-shard: one shard on a GPU worker (deployment teacher-inference-shard/gpu on gpu-pool).

Started by build-teacher-cache, one flow run per shard, with the parent's Build (Build.params(): the resolved
config, credentials left out, which this worker's environment supplies; and the version key the parent resolved).
A worker that resolves the config to another key (another checkout, other teacher files) refuses before any work.
Safe to run twice: a complete shard is not run again, a partial one resumes after its last finished part.
"""

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.states import Failed, State

from kd_core.build import Build, accept
from kd_core.data import ShardSpec
from kd_core.errors import KDCacheError
from kd_core.records import ShardRecord
from tasks import value
from tasks.teacher_inference import teacher_inference
from tasks.validate_config import read_secret_block


@task(name="accept-config")
def accept_config(build: dict[str, Any]) -> Build:
    """The parent's Build, checked here under this worker's policy, with output.credentials read here."""
    return accept(build, read_secret=read_secret_block)


@flow(name="teacher-inference-shard")
def teacher_inference_shard(build: dict[str, Any], shard: dict[str, Any]) -> ShardRecord | State:
    """Run the teacher over rows [shard.start, shard.stop) and publish the shard's parts and its record.

    Args:
        build: the parent's resolved build: its config (credentials left out) and version key; refused when this
            worker resolves the config to another key.
        shard: the shard spec from the parent's plan (rows, and the files and row groups that hold them).
    """
    try:
        resolved = accept_config(build)
        return value(teacher_inference(resolved, ShardSpec.model_validate(shard)))
    except KDCacheError as e:  # the error's own words as the state message, which the parent quotes
        get_run_logger().error("%s", e)
        return Failed(message=str(e), data=e)
