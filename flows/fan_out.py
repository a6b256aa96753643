"""The deployed parent's shards: one `teacher-inference-shard/gpu` flow run each on gpu-pool, watched until done.

The fan-out schedules every shard's run at once (one API write each, under one task run of the parent, so they
show as its subflows), then polls their states in bulk: nothing caps the runs in flight but gpu-pool's own limits.
A run whose worker died is re-submitted once the shard's lease has lapsed (it resumes from its finished parts), at
most run.shard_restarts times; a run that FAILED fails the build with its own message. Every call to Prefect's API
is retried on transient errors (io.retrying).
"""

import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar
from uuid import UUID

import httpx
from prefect import Task, get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.runtime import flow_run as this_flow_run
from prefect.states import Crashed, Pending

from kd_core import io, locks
from kd_core.build import Build
from kd_core.data import ShardSpec
from kd_core.errors import KDCacheError
from kd_core.records import ShardRecord
from kd_core.shard import shard_state

SHARD_DEPLOYMENT = "teacher-inference-shard/gpu"
POLL_SECONDS = 5
SUBMIT_CONCURRENCY = 8  # shard runs being created at once
READ_BATCH = 200      # flow runs read per API call (the server's default page limit)
API_TRIES = 10        # a transient API error is retried with backoff for about 4 minutes in all
T = TypeVar("T")
log = logging.getLogger("kd_cache.fan_out")
FAN_OUT_TASK = Task(name=f"run {SHARD_DEPLOYMENT}", fn=lambda: None)  # only names the parent task run


class ShardFailedError(KDCacheError):
    """A shard's flow run on gpu-pool FAILED or was cancelled, or crashed more often than run.shard_restarts."""


def _transient(e: BaseException) -> bool:
    """429, 5xx or a dropped connection: worth another try."""
    if isinstance(e, httpx.HTTPStatusError):  # PrefectHTTPStatusError included
        return e.response.status_code == 429 or e.response.status_code >= 500
    return isinstance(e, httpx.TransportError)


def api_call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs), retried on transient API errors with jittered backoff (Prefect's client retries some
    of them itself, briefly; a busy server can outlast that); other errors, and the last one, as raised."""
    return io.retrying(f"Prefect API ({getattr(fn, '__name__', 'call')})", functools.partial(fn, *args, **kwargs),
                       transient=_transient, delays=io.jittered_backoff(API_TRIES), error=None)


class FanOut:
    """The deployed parent's shards: one flow run each, scheduled at once, watched until every one is done."""

    def __init__(self, build: Build, shards: list[ShardSpec], done: Callable[[ShardRecord], None]):
        self.build, self.shards, self.done = build, {s.index: s for s in shards}, done
        self.params = {"build": build.params()}
        self.restarts = {index: 0 for index in self.shards}
        self.runs: dict[int, FlowRun] = {}
        self.dead_leases: set[str | None] = set()  # lease tokens of runs found dead
        self.logger = get_run_logger()

    def run(self) -> None:
        with get_client(sync_client=True) as client:
            self._submit(client, list(self.shards))
            self.logger.info("%d shard runs scheduled on gpu-pool", len(self.runs))
            while self.runs:
                for run in self._read_states(client):
                    self._check(client, run)
                if self.runs:
                    time.sleep(POLL_SECONDS)

    def _submit(self, client: SyncPrefectClient, indices: list[int]) -> None:
        """Schedule these shards' runs, SUBMIT_CONCURRENCY at a time: one API write each (run_deployment would
        read the deployment and create a task run per shard, three calls; a busy server is the bottleneck)."""
        deployment = api_call(client.read_deployment_by_name, SHARD_DEPLOYMENT)
        parent = self._parent_task_run(client)
        keys = {index: self._key(index) for index in indices}  # here: the run context does not reach the threads

        def submit(index: int) -> FlowRun:
            return api_call(client.create_flow_run_from_deployment, deployment.id, name=self.shards[index].name,
                            parameters={**self.params, "shard": self.shards[index].model_dump()},
                            idempotency_key=keys[index], parent_task_run_id=parent)

        with ThreadPoolExecutor(SUBMIT_CONCURRENCY, thread_name_prefix="kd-submit") as pool:  # httpx: thread-safe
            for index, run in zip(indices, pool.map(submit, indices)):
                self.runs[index] = run

    def _parent_task_run(self, client: SyncPrefectClient) -> UUID:
        """One task run of this flow run that every shard run hangs under as a subflow (the UI shows them there).
        Created once; a restarted parent gets the same one back (same flow run, task key and dynamic key)."""
        task_run = api_call(client.create_task_run, task=FAN_OUT_TASK, flow_run_id=this_flow_run.id,
                            dynamic_key="0", state=Pending())
        return task_run.id

    def _key(self, index: int) -> str:
        """The idempotency key names this parent run, the version, the shard and the attempt, so a parent that
        restarts (a retry of its own flow run) finds its runs instead of doubling them."""
        shard = self.shards[index]
        return f"{this_flow_run.id}/{self.build.key}/{shard.name}/{self.restarts[index]}"

    def _read_states(self, client: SyncPrefectClient) -> list[FlowRun]:
        ids = [run.id for run in self.runs.values()]
        runs = []
        for i in range(0, len(ids), READ_BATCH):
            flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=ids[i:i + READ_BATCH]))
            runs += api_call(client.read_flow_runs, flow_run_filter=flow_filter, limit=READ_BATCH)
        return runs

    def _check(self, client: SyncPrefectClient, run: FlowRun) -> None:
        index = next(i for i, r in self.runs.items() if r.id == run.id)
        shard, state = self.shards[index], run.state
        if state is None:
            return
        if state.type == StateType.COMPLETED:
            record = self.build.store.read_shard(self.build.key, shard)
            if record is None:
                raise ShardFailedError(f"{shard.name} (flow run {run.name}) completed but left no shard record.")
            del self.runs[index]
            self.done(record)
        elif state.type in (StateType.FAILED, StateType.CANCELLED, StateType.CANCELLING):
            raise ShardFailedError(f"{shard.name} (flow run {run.name} on {run.work_pool_name}) ended "
                                   f"{state.name}: {state.message}")
        elif state.type == StateType.RUNNING and self._dead(run, shard):
            # Its worker stopped (SIGTERM: a preempted machine) or died: nothing refreshes the lease, and Prefect would
            # show the run RUNNING forever. Interrupted, not failed: the shard is re-submitted and resumes.
            why = "interrupted: its worker stopped or died (the shard's lease is no longer refreshed)"
            api_call(client.set_flow_run_state, run.id, Crashed(message=why), force=True)
            self._restart(client, index, run, why)
        elif state.type == StateType.CRASHED and shard_state(self.build, shard)[0] != "writing":
            self._restart(client, index, run, state.message or "crashed")

    def _dead(self, run: FlowRun, shard: ShardSpec) -> bool:
        """A RUNNING shard whose lease went stale, or that never took it within two lease periods of starting.
        A stale lease already blamed on an earlier run of this shard says nothing about this one (until this run
        takes the lease over, the dead run's lease is still there)."""
        state, token = shard_state(self.build, shard)
        if state == "dead" and token not in self.dead_leases:
            self.dead_leases.add(token)
            return True
        if state in ("free", "dead") and run.start_time is not None:
            return time.time() - run.start_time.timestamp() > 2 * locks.LEASE_SECONDS
        return False

    def _restart(self, client: SyncPrefectClient, index: int, run: FlowRun, why: str) -> None:
        shard = self.shards[index]
        if self.restarts[index] >= self.build.config.run.shard_restarts:
            raise ShardFailedError(f"{shard.name} (flow run {run.name}) crashed {self.restarts[index] + 1} times, "
                                   f"the last time: {why}. Fix the workers, then run again (finished parts are "
                                   "kept), or raise run.shard_restarts.")
        self.restarts[index] += 1
        self.logger.warning("%s: %s; re-submitting it (restart %d of at most %d); it resumes from its finished parts",
                            shard.name, why, self.restarts[index], self.build.config.run.shard_restarts)
        self._submit(client, [index])


def fan_out(build: Build, shards: list[ShardSpec], done: Callable[[ShardRecord], None]) -> None:
    """Run every shard on gpu-pool; `done(record)` as each finishes. Raises ShardFailedError for a failed shard."""
    FanOut(build, shards, done).run()
