"""validate-config: the first task and the first to fail (the max_samples guard and every config check)."""

from prefect import get_run_logger, task
from prefect.runtime import deployment

from kd_core import pipeline
from kd_core.config import Config


@task(name="validate-config")
def validate_config(profile: str, overrides: list[str]) -> Config:
    # A run of a deployment (UI, REST, schedule, or a shard of one) gets only what the worker's policy allows.
    config = pipeline.validate(profile, overrides, deployed=deployment.id is not None)
    get_run_logger().info("config OK: profile %s, cache key %s, output %s", profile, config.content_key(),
                          config.output.uri)
    return config
