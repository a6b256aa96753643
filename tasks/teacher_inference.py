"""teacher-inference: one shard. In-process for local runs (and inside a shard's own flow run on a GPU worker);
from a deployment, `fan_out` runs every shard as a `teacher-inference-shard/gpu` flow run on gpu-pool.

The fan-out schedules every shard's run at once (one API write each, under one task run of the parent, so they
show as its subflows), then polls their states in bulk: nothing caps the runs in flight but gpu-pool's own limits.
A run whose worker died is re-submitted once the shard's lease has lapsed (it resumes from its finished parts), at
most run.shard_restarts times; a run that FAILED fails the build with its own message. Every call to Prefect's API
is retried on transient errors.
"""

import asyncio
import contextlib
import itertools
import logging
import random
import sys
import time
from typing import Any, Awaitable, Callable, TypeVar
from uuid import UUID

import httpx
from prefect import Task, get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.runtime import flow_run as this_flow_run
from prefect.states import Crashed, Pending
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from kd_core import locks, pipeline, records
from kd_core.config import Config
from kd_core.data import ShardSpec
from kd_core.errors import KDCacheError
from kd_core.records import ShardRecord

SHARD_DEPLOYMENT = "teacher-inference-shard/gpu"
LOG_EVERY_SECONDS = 30
POLL_SECONDS = 5
SUBMIT_CONCURRENCY = 8  # shard runs being created at once
READ_BATCH = 200      # flow runs read per API call (the server's default page limit)
API_TRIES = 10        # a transient API error is retried with backoff for about 4 minutes in all
T = TypeVar("T")
log = logging.getLogger("kd_cache.fan_out")
FAN_OUT_TASK = Task(name=f"run {SHARD_DEPLOYMENT}", fn=lambda: None)  # only names the parent task run


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
    """Run the teacher over one shard in this process, with one progress display."""
    logger = get_run_logger()
    display = ShardDisplay(shard, logger)
    try:
        with display.logs_above_the_bar():
            record = pipeline.run_shard(config, shard, display.update)
    finally:
        display.close()
    logger.info("%s done: %s samples, %s tokens in %.1f s", shard.name, f"{record.num_samples:,}",
                f"{record.num_tokens:,}", record.seconds)
    return record


class ShardDisplay:
    """One shard's progress: a bar on a terminal (samples, tokens/s, ETA) with log lines printed above it, never
    through it; a log line every LOG_EVERY_SECONDS in any case (the Prefect UI's logs, non-terminal output).

    It starts at the shard's first batch, once the data and the teacher are loaded, so the rate and the ETA
    measure the teacher, not the loading."""

    def __init__(self, shard: ShardSpec, logger):
        self.shard, self.logger, self.bar = shard, logger, None
        self.on_terminal = sys.stderr.isatty()

    def update(self, stats) -> None:
        done, now = stats.samples + stats.skipped_empty, time.monotonic()
        if self.bar is None:  # the first batch: count from here
            self.first, self.first_tokens, self.started, self.last_log = done, stats.tokens, now, now
            self.bar = tqdm(total=self.shard.num_samples, initial=done, desc=self.shard.name, unit=" samples",
                            dynamic_ncols=True, disable=not self.on_terminal)
        elapsed = max(now - self.started, 1e-9)
        tokens_per_second = (stats.tokens - self.first_tokens) / elapsed
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix_str(f"{tokens_per_second:,.0f} tokens/s", refresh=False)
        if now - self.last_log >= LOG_EVERY_SECONDS:
            self.last_log = now
            rate = (done - self.first) / elapsed
            eta = f"{(self.shard.num_samples - done) / rate:,.0f} s left" if rate > 0 else "ETA unknown"
            self.logger.info("%s: %s/%s samples, %s tokens, %s tokens/s, %s", self.shard.name, f"{done:,}",
                             f"{self.shard.num_samples:,}", f"{stats.tokens:,}", f"{tokens_per_second:,.0f}", eta)

    def logs_above_the_bar(self):
        """On a terminal, console log handlers write through tqdm (above the bar); elsewhere nothing changes."""
        if not self.on_terminal:
            return contextlib.nullcontext()
        return logging_redirect_tqdm(loggers=[logging.root, logging.getLogger("prefect")])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ShardFailedError(KDCacheError):
    """A shard's flow run on gpu-pool FAILED or was cancelled, or crashed more often than run.shard_restarts."""


def _transient(e: Exception) -> bool:
    """429, 5xx or a dropped connection: worth another try."""
    if isinstance(e, httpx.HTTPStatusError):  # PrefectHTTPStatusError included
        return e.response.status_code == 429 or e.response.status_code >= 500
    return isinstance(e, httpx.TransportError)


def _backoff(attempt: int, e: Exception) -> float:
    """Exponential backoff with full jitter (capped at 60 s), so that many callers do not retry in step."""
    delay = random.uniform(0, min(60.0, 2.0 ** attempt))
    log.warning("Prefect API: %s; retrying in %.1f s", e, delay)
    return delay


def api_call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs), retried on transient API errors. (Prefect's client retries some of them itself,
    briefly; a busy server can outlast that.)"""
    for attempt in itertools.count():
        try:
            return fn(*args, **kwargs)
        except (httpx.TransportError, httpx.HTTPStatusError) as e:
            if not _transient(e) or attempt == API_TRIES - 1:
                raise
            time.sleep(_backoff(attempt, e))


async def api_call_async(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """api_call for a coroutine function."""
    for attempt in itertools.count():
        try:
            return await fn(*args, **kwargs)
        except (httpx.TransportError, httpx.HTTPStatusError) as e:
            if not _transient(e) or attempt == API_TRIES - 1:
                raise
            await asyncio.sleep(_backoff(attempt, e))


class FanOut:
    """The deployed parent's shards: one flow run each, scheduled at once, watched until every one is done."""

    def __init__(self, config: Config, shards: list[ShardSpec], done: Callable[[ShardRecord], None]):
        self.config, self.shards, self.done = config, {s.index: s for s in shards}, done
        self.params = {"config": pipeline.child_config(config), "version_key": config.content_key()}
        self.restarts = {index: 0 for index in self.shards}
        self.runs: dict[int, FlowRun] = {}
        self.dead_leases: set[str | None] = set()  # lease tokens of runs found dead
        self.logger = get_run_logger()

    def run(self) -> None:
        self._submit(list(self.shards))
        self.logger.info("%d shard runs scheduled on gpu-pool", len(self.runs))
        with get_client(sync_client=True) as client:
            while self.runs:
                for run in self._read_states(client):
                    self._check(client, run)
                if self.runs:
                    time.sleep(POLL_SECONDS)

    def _submit(self, indices: list[int]) -> None:
        """Schedule these shards' runs, SUBMIT_CONCURRENCY at a time: one API write each (run_deployment would
        read the deployment and create a task run per shard, three calls; a busy server is the bottleneck)."""
        async def submit_all() -> list[FlowRun]:
            limit = asyncio.Semaphore(SUBMIT_CONCURRENCY)
            async with get_client() as client:
                deployment = await api_call_async(client.read_deployment_by_name, SHARD_DEPLOYMENT)
                parent = await self._parent_task_run(client)

                async def submit(index: int) -> FlowRun:
                    async with limit:
                        return await api_call_async(
                            client.create_flow_run_from_deployment, deployment.id, name=self.shards[index].name,
                            parameters={**self.params, "shard": self.shards[index].model_dump()},
                            idempotency_key=self._key(index), parent_task_run_id=parent)
                return await asyncio.gather(*map(submit, indices))

        for index, run in zip(indices, asyncio.run(submit_all())):
            self.runs[index] = run

    async def _parent_task_run(self, client) -> UUID:
        """One task run of this flow run that every shard run hangs under as a subflow (the UI shows them there).
        Created once; a restarted parent gets the same one back (same flow run, task key and dynamic key)."""
        task_run = await api_call_async(client.create_task_run, task=FAN_OUT_TASK, flow_run_id=this_flow_run.id,
                                        dynamic_key="0", state=Pending())
        return task_run.id

    def _key(self, index: int) -> str:
        """The idempotency key names this parent run, the version, the shard and the attempt, so a parent that
        restarts (a retry of its own flow run) finds its runs instead of doubling them."""
        shard = self.shards[index]
        return f"{this_flow_run.id}/{self.params['version_key']}/{shard.name}/{self.restarts[index]}"

    def _read_states(self, client) -> list[FlowRun]:
        ids = [run.id for run in self.runs.values()]
        runs = []
        for i in range(0, len(ids), READ_BATCH):
            flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=ids[i:i + READ_BATCH]))
            runs += api_call(client.read_flow_runs, flow_run_filter=flow_filter, limit=READ_BATCH)
        return runs

    def _check(self, client, run: FlowRun) -> None:
        index = next(i for i, r in self.runs.items() if r.id == run.id)
        shard, state = self.shards[index], run.state
        if state is None:
            return
        if state.type == StateType.COMPLETED:
            layout, opts = pipeline.Layout(self.config), self.config.output.storage_options
            record = records.read_shard(layout.shard_record(shard), opts)
            if record is None:
                raise ShardFailedError(f"{shard.name} (flow run {run.name}) completed but left no shard record.")
            del self.runs[index]
            self.done(record)
        elif state.type in (StateType.FAILED, StateType.CANCELLED, StateType.CANCELLING):
            raise ShardFailedError(f"{shard.name} (flow run {run.name} on {run.work_pool_name}) ended "
                                   f"{state.name}: {state.message}")
        elif state.type == StateType.RUNNING and self._dead(run, shard):
            # Its worker died: nothing refreshes the lease. Prefect would show it RUNNING forever.
            api_call(client.set_flow_run_state, run.id,
                     Crashed(message="its worker stopped refreshing the shard's lease (the worker died)"), force=True)
            self._restart(index, run, "its worker stopped refreshing the shard's lease")
        elif state.type == StateType.CRASHED and pipeline.shard_state(self.config, shard)[0] != "writing":
            self._restart(index, run, state.message or "crashed")

    def _dead(self, run: FlowRun, shard: ShardSpec) -> bool:
        """A RUNNING shard whose lease went stale, or that never took it within two lease periods of starting.
        A stale lease already blamed on an earlier run of this shard says nothing about this one (until this run
        takes the lease over, the dead run's lease is still there)."""
        state, token = pipeline.shard_state(self.config, shard)
        if state == "dead" and token not in self.dead_leases:
            self.dead_leases.add(token)
            return True
        if state in ("free", "dead") and run.start_time is not None:
            return time.time() - run.start_time.timestamp() > 2 * locks.LEASE_SECONDS
        return False

    def _restart(self, index: int, run: FlowRun, why: str) -> None:
        shard = self.shards[index]
        if self.restarts[index] >= self.config.run.shard_restarts:
            raise ShardFailedError(f"{shard.name} (flow run {run.name}) crashed {self.restarts[index] + 1} times, "
                                   f"the last time: {why}. Fix the workers, then run again (finished parts are "
                                   "kept), or raise run.shard_restarts.")
        self.restarts[index] += 1
        self.logger.warning("%s: %s; re-submitting it (restart %d of at most %d); it resumes from its finished parts",
                            shard.name, why, self.restarts[index], self.config.run.shard_restarts)
        self._submit([index])


def fan_out(config: Config, shards: list[ShardSpec], done: Callable[[ShardRecord], None]) -> None:
    """Run every shard on gpu-pool; `done(record)` as each finishes. Raises ShardFailedError for a failed shard."""
    FanOut(config, shards, done).run()
