"""estimate-storage: exact upper bound, expected size and GPU time; fails when over output.max_bytes or free space
(after publishing its numbers as an artifact, so a refused run still shows what it would have taken)."""

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from kd_core.build import Build
from kd_core.estimate import check_space, estimate
from kd_core.storage import StorageEstimate, human_bytes
from tasks import user_errors


@task(name="estimate-storage")
@user_errors
def estimate_storage(build: Build) -> StorageEstimate:
    est = estimate(build, check=False)
    get_run_logger().info("expected cache size %s (upper bound %s) for %s samples", human_bytes(est.expected_bytes),
                          human_bytes(est.upper_bound_bytes), f"{est.num_samples:,}")
    create_table_artifact(key="storage-estimate", table=[{"what": k, "value": v} for k, v in est.rows()],
                          description="Storage and GPU-time estimate for this cache build")
    check_space(build, est)
    return est
