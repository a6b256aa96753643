"""build-teacher-cache: validate-config -> estimate-storage -> shard-dataset -> teacher-inference (per shard)
-> merge-to-hdf5. Thin: every step is one task around one kd_core call."""

import json
import time
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.runtime import deployment
from prefect.states import Failed, State
from pydantic import Field

from flows.fan_out import fan_out
from kd_core.build import Build
from kd_core.config import OVERRIDE_WITHOUT_CREDENTIALS, OVERRIDES_LINE_WITHOUT_CREDENTIALS
from kd_core.data import ShardSpec
from kd_core.errors import ConfigError, KDCacheError, StorageError
from kd_core.merge import published
from kd_core.records import Manifest, ShardRecord
from kd_core.storage import StorageEstimate, human_bytes
from tasks import value
from tasks.estimate_storage import estimate_storage
from tasks.merge_to_hdf5 import merge_to_hdf5
from tasks.shard_dataset import shard_dataset
from tasks.teacher_inference import teacher_inference
from tasks.validate_config import validate_config

# The two fields of the UI's run form (and of the REST API's `parameters`).
# The UI sends null for a field left alone: null means "as the profile has it". Prefect titles each field with
# the parameter's name and describes it with the docstring's Args entry.
Profile = str | None
# Each item is checked by the server against OVERRIDE_WITHOUT_CREDENTIALS before the run is stored: credentials
# never reach Prefect's database (DESIGN.md, Security); the worker's environment or output.credentials hold them.
# (A schema-only pattern: pydantic's regex engine has no look-ahead, and parse_overrides checks the same locally.)
Override = Annotated[str, Field(json_schema_extra={"pattern": OVERRIDE_WITHOUT_CREDENTIALS})]
# Or one line typed into the run form: KEY=VALUE items separated by spaces (or line breaks), split and then parsed
# exactly as a list; no quotes (values with spaces go in the list form), so the same rule checks every item. The
# default "" makes the form open on a text box (a null default opened on "None", and a list needed "Add item" per
# override); the form's null, an empty line and an empty list all mean "as the profile has it".
OverridesLine = Annotated[str, Field(json_schema_extra={"pattern": OVERRIDES_LINE_WITHOUT_CREDENTIALS})]
Overrides = Annotated[OverridesLine | list[Override] | None,
                      Field(examples=["dataset.max_samples=1000 output.uri=./out/run1"])]


@flow(name="build-teacher-cache")
def build_teacher_cache(profile: Profile = "demo", overrides: Overrides = "") -> dict[str, Any] | State:
    """Run a teacher over a dataset and publish its top-k log-probs as an HDF5 cache.

    Args:
        profile: A shipped profile (demo, testing, development, small, medium, large) or the path of a YAML
            profile on the worker. Empty means demo.
        overrides: Config keys to change, exactly as on the command line: one line of KEY=VALUE items separated
            by spaces (e.g. dataset.max_samples=1000 output.uri=s3://bucket/kd/run1), or a list with one KEY=VALUE
            per item. VALUE is YAML; null unsets the key; the seed's distillation.KEY form works too. Empty means
            everything as the profile has it. Never put credentials here: workers take them from their environment.
    """
    try:
        return _build(profile or "demo", overrides.split() if isinstance(overrides, str) else list(overrides or []))
    except KDCacheError as e:
        # The check's own words, on one line, become the run's state message (what the UI's run page and the REST
        # API show first), rather than Prefect's "Flow run encountered an exception: ..."; the whole message and
        # where to change a key go in a `failure` artifact. Callers of the function still get the exception.
        get_run_logger().error("%s", e)
        where = WHERE_DEPLOYED if deployment.id is not None else WHERE_LOCAL
        create_markdown_artifact(key="failure", description="Why this run failed, and how to fix it",
                                 markdown=f"**This run failed:**\n\n```\n{e}\n```\n\n**How to set a key:** {where}")
        return Failed(message=one_line(str(e), where if deployment.id is not None and _names_a_key(e) else None),
                      data=e)


# Where a user who must change a config key does it, by where the run came from.
WHERE_DEPLOYED = ("in the Prefect UI, Run > Custom run, type it into the overrides field as KEY=VALUE (several "
                  "separated by spaces); over the REST API, add it to parameters.overrides in the body of POST "
                  '/api/deployments/{id}/create_flow_run, e.g. {"parameters": {"overrides": '
                  '["dataset.max_samples=1000"]}}.')
WHERE_LOCAL = "on the command line, append KEY=VALUE to the command, e.g. kd-cache run dataset.max_samples=1000."


def one_line(message: str, where: str | None = None) -> str:
    """A multi-line message as the one line a run page shows first: its first line and its 'Fix:' line (a guard's
    table of examples stays in the failure artifact); `where` tells a UI or REST user where keys go."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    fix = next((line for line in lines[1:] if line.startswith("Fix:")), None)
    text = " ".join([lines[0], fix.removesuffix(", e.g.").removesuffix(" e.g.")] if fix else lines[:1])
    return f"{text} (To set a key {where.removesuffix('.')})" if where else text


def _names_a_key(e: KDCacheError) -> bool:
    """Whether the fix is to change a config key (a config or size error), not, say, a damaged file."""
    return isinstance(e, (ConfigError, StorageError))


def _build(profile: str, overrides: list[str]) -> dict[str, Any]:
    logger = get_run_logger()
    started = time.perf_counter()
    build = value(validate_config(profile, overrides))
    if (manifest := published(build)) is not None:
        logger.info("up to date: %s already holds this cache (key %s); no teacher work", manifest.uri, manifest.key)
        create_markdown_artifact(key="cache-summary", description="Cache build summary",
                                 markdown=f"Up to date: `{manifest.uri}` already holds this cache (key "
                                          f"`{manifest.key}`). No teacher work was done.")
        return {**manifest.model_dump(mode="json"), "up_to_date": True}

    try:
        return _run(build, started)
    except KDCacheError:
        if (manifest := published(build)) is None:
            raise
        # A same-config run published this version while ours ran (its shards then refuse to redo the work).
        logger.info("up to date: another run published %s (key %s) meanwhile", manifest.uri, manifest.key)
        return {**manifest.model_dump(mode="json"), "up_to_date": True}


def _run(build: Build, started: float) -> dict[str, Any]:
    estimate = value(estimate_storage(build))
    shards = value(shard_dataset(build))
    progress = ShardProgress(shards, estimate)
    if deployment.id is None:  # a local run: shards one after another in this process
        for shard in shards:
            progress.done(value(teacher_inference(build, shard)))
    else:  # deployed: one teacher-inference-shard/gpu flow run per shard, all scheduled at once
        fan_out(build, shards, progress.done)

    manifest = value(merge_to_hdf5(build, progress.records))
    wall = time.perf_counter() - started
    create_markdown_artifact(key="cache-summary", description="Cache build summary",
                             markdown=_summary(manifest, progress.records, wall))
    return {**manifest.model_dump(mode="json"), "wall_seconds": wall, "up_to_date": False}


class ShardProgress:
    """The parent run's view of its shards as they finish, in two artifacts created once and updated in place:
    `shard-progress` (share of shards done; its description says samples, tokens and the projected cache size)
    and `shard-throughput` (a table: one row per finished shard and a total)."""

    def __init__(self, shards: list[ShardSpec], estimate: StorageEstimate):
        self.shards, self.estimate, self.records, self.started = shards, estimate, [], time.perf_counter()
        self.finished: dict[int, float] = {}  # shard index -> seconds after the shards started that it finished
        self.bar = create_progress_artifact(progress=0.0, key="shard-progress", description=self._description())
        self.table = create_table_artifact(key="shard-throughput", table=self._rows(), description=THROUGHPUT_HELP)

    def done(self, record: ShardRecord) -> None:
        self.records.append(record)
        self.finished[record.shard.index] = time.perf_counter() - self.started
        update_progress_artifact(self.bar, 100.0 * len(self.records) / len(self.shards), self._description())
        # A keyed table artifact created again would be a new version (a new card per shard): update this one.
        with get_client(sync_client=True) as client:
            client.update_artifact(self.table, ArtifactUpdate(data=json.dumps(self._rows())))
        get_run_logger().info("%d/%d shards done", len(self.records), len(self.shards))

    def _description(self) -> str:
        samples, tokens = sum(r.num_samples for r in self.records), sum(r.num_tokens for r in self.records)
        projected = [p.projected_cache_bytes for r in self.records for p in r.parts if p.projected_cache_bytes]
        text = (f"{len(self.records):,} of {len(self.shards):,} shards finished: {samples:,} samples, "
                f"{tokens:,} tokens. Expected cache size (estimate): {human_bytes(self.estimate.expected_bytes)}")
        if projected:
            text += f"; projected from the real size of the first parts: {human_bytes(max(projected))}"
        return text + "."

    def _rows(self) -> list[dict[str, str]]:
        rows = [_row(f"shard {r.shard.index:,}", r.num_samples, r.num_tokens, r.seconds, self.finished[r.shard.index])
                for r in sorted(self.records, key=lambda r: r.shard.index)]
        total = _row(f"all finished ({len(self.records):,} of {len(self.shards):,})",
                     sum(r.num_samples for r in self.records), sum(r.num_tokens for r in self.records),
                     sum(r.seconds for r in self.records), time.perf_counter() - self.started)
        return [*rows, total]


THROUGHPUT_HELP = ("Finished shards. Teacher seconds: the time a shard spent loading data, running the teacher and "
                   "writing its parts (summed over shards in the total row). Tokens per teacher-second: tokens / "
                   "teacher seconds, the speed of one worker. Wall-clock seconds: when the shard finished, counted from the "
                   "start of the shards (the total row: now), so they show how long the shards took side by side.")


def _row(shard: str, samples: int, tokens: int, seconds: float, wall: float) -> dict[str, str]:
    """wall: when the shard finished (the total row: now), in seconds after the shards started."""
    return {"shard": shard, "samples": f"{samples:,}", "tokens": f"{tokens:,}", "teacher seconds": f"{seconds:,.1f}",
            "tokens per teacher-second": f"{tokens / max(seconds, 1e-9):,.0f}",
            "wall-clock seconds since the shards started": f"{wall:,.1f}"}


def _summary(manifest: Manifest, records: list[ShardRecord], wall: float) -> str:
    shard_seconds = sum(r.seconds for r in records)
    return "\n".join([
        "| what | value |", "|---|---|",
        f"| output | `{manifest.uri}` |",
        f"| samples | {manifest.num_samples:,} ({manifest.skipped_empty:,} empty skipped) |",
        f"| tokens | {manifest.num_tokens:,} |",
        f"| size | {human_bytes(manifest.file_bytes)} in {len(manifest.parts):,} part files + a "
        f"{human_bytes(manifest.index.bytes)} index ({manifest.bytes_per_token:.1f} B/token) |",
        f"| tokens per teacher-second | {manifest.num_tokens / max(shard_seconds, 1e-9):,.0f} (all tokens / "
        f"teacher seconds summed over {len(records):,} shards: one worker's speed) |",
        f"| wall-clock time | {wall:,.1f} s (the whole run, validation to publication) |",
    ])
