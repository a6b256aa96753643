"""validate-config: the first task and the first to fail (the max_samples guard and every config check)."""

from typing import Any

from prefect import get_run_logger, task
from prefect.blocks.system import Secret
from prefect.runtime import deployment

from kd_core.build import Build, validate
from kd_core.errors import ConfigError
from tasks import user_errors


def read_secret_block(name: str) -> Any:
    """The value of the Prefect Secret block `name` (output.credentials), read on this worker at run time."""
    try:
        return Secret.load(name).get()
    except ValueError as e:  # no such block (Prefect's message names it, never a value)
        raise ConfigError(f"output.credentials: cannot read the Prefect Secret block {name!r} ({e}). Create it, e.g. "
                          "Secret(value={\"key\": ..., \"secret\": ...}).save(NAME), or fix the name.") from None


@task(name="validate-config")
@user_errors
def validate_config(profile: str, overrides: list[str]) -> Build:
    # A run of a deployment (UI, REST, schedule, or a shard of one) gets only what the worker's policy allows.
    build = validate(profile, overrides, deployed=deployment.id is not None, read_secret=read_secret_block)
    get_run_logger().info("config OK: profile %s, cache key %s, output %s", profile, build.key, build.store.root)
    return build
