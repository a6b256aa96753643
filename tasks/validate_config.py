"""validate-config: the first task and the first to fail (the max_samples guard and every config check)."""

from prefect import get_run_logger, task

from kd_core import pipeline
from kd_core.config import Config


@task(name="validate-config")
def validate_config(profile: str, overrides: list[str]) -> Config:
    config = pipeline.validate(profile, overrides)
    get_run_logger().info("config OK: profile %s, cache key %s, output %s", profile, config.content_key(),
                          config.output.uri)
    return config
