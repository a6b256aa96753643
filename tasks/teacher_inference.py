"""teacher-inference: one shard. In-process for local runs; a `teacher-inference-shard/gpu` flow run on
gpu-pool when the parent runs from a deployment (the parent then only waits and checks the child's state)."""

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.deployments import run_deployment
from tqdm.auto import tqdm

from kd_core import pipeline, records
from kd_core.config import Config
from kd_core.data import ShardSpec
from kd_core.errors import KDCacheError
from kd_core.records import ShardRecord

SHARD_DEPLOYMENT = "teacher-inference-shard/gpu"
LOG_EVERY_SECONDS = 30


def _not_a_user_error(task, task_run, state) -> bool:
    """Retry crashes and flaky I/O, not config errors: those fail the same way every time."""
    try:
        state.result()
    except KDCacheError:
        return False
    except Exception:
        return True
    return False


@task(name="teacher-inference", retries=2, retry_delay_seconds=10, retry_condition_fn=_not_a_user_error)
def teacher_inference(config: Config, shard: ShardSpec) -> ShardRecord:
    """Run the teacher over one shard in this process, with a progress bar and periodic log lines."""
    logger = get_run_logger()
    bar = tqdm(total=shard.num_samples, desc=shard.name, unit="sample")
    last_log = time.monotonic()

    def progress(stats) -> None:
        nonlocal last_log
        bar.update(stats.samples + stats.skipped_empty - bar.n)
        bar.set_postfix(tokens=stats.tokens, refresh=False)
        if time.monotonic() - last_log > LOG_EVERY_SECONDS:
            last_log = time.monotonic()
            logger.info("%s: %d/%d samples, %d tokens", shard.name, bar.n, shard.num_samples, stats.tokens)

    try:
        record = pipeline.run_shard(config, shard, progress)
    finally:
        bar.close()
    logger.info("%s done: %d samples, %d tokens in %.1f s", shard.name, record.num_samples,
                record.num_tokens, record.seconds)
    return record


class ShardFailedError(KDCacheError):
    """A shard's flow run on gpu-pool ended in a state other than Completed (after its own retries)."""


@task(name="teacher-inference")
def teacher_inference_on_pool(profile: str, overrides: list[str], config: Config, shard: ShardSpec) -> ShardRecord:
    """Run one shard as a flow run of the GPU deployment and wait for it; fail with the shard's error.

    The child gets the profile and overrides, never the resolved config, so credentials that live in a profile
    file or the worker's environment never travel as parameters. run_deployment returns whatever state the child
    ended in (a failed child does not raise), so the state is checked here. The record is read from the output
    target, not from the child's result, so no result storage has to be shared between machines.
    """
    # teacher.dtype as resolved here: `auto` would resolve on the GPU worker to another dtype, hence another key.
    overrides = [*overrides, f"teacher.dtype={config.teacher.dtype}"]
    child = run_deployment(SHARD_DEPLOYMENT, parameters={"profile": profile, "overrides": overrides,
                                                         "shard": shard.model_dump()},
                           flow_run_name=shard.name, poll_interval=2)
    if not child.state.is_completed():
        raise ShardFailedError(f"{shard.name} (flow run {child.name} on {child.work_pool_name}) ended "
                               f"{child.state.name}: {child.state.message}")
    record = records.read_shard(pipeline.Layout(config).shard_record(shard), config.output.storage_options)
    if record is None:
        raise ShardFailedError(f"{shard.name} (flow run {child.name}) completed but left no shard record.")
    return record
