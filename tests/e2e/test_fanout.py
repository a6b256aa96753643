"""The deployed fan-out at scale and under failure: every shard scheduled at once, on SQLite and on PostgreSQL, and
a build whose only GPU worker is killed with -9 mid-shard completes once a fresh worker starts.

Each server here starts with no gpu-pool worker; the tests start (and kill) the ones they need.
"""

import os
import signal
import time
from datetime import datetime

import psutil
import pytest
from test_deployments import FINAL, children, trigger, wait

from kd_core.build import validate
from kd_core.h5cache import CacheReader
from kd_core.config import TeacherConfig, override_strings
from kd_core.store import resolve
from kd_core.teacher import load_teacher
from kd_core.verify import verify_rows

pytestmark = pytest.mark.slow

# The goal, a minute, holds on PostgreSQL (4-29 s measured here), scaled by the load per core (a shared
# 2-core CI box runs at 2-4x). SQLite is not held to a time: the server's late-runs service writes a "Late" state for
# every run that waits past 15 s, and once the creations take longer than that, those writes and the creations
# fight for SQLite's one write lock ("database is locked", 503s that the parent retries): 19-63 s when the burst
# ends before the cliff, 177-206 s on the same machine when it does not (Prefect 3.9.1). On SQLite the test holds
# what a user needs there: every shard's run is scheduled, on gpu-pool, none lost or doubled. docs/SCALE.md.
SCHEDULE_SECONDS = {"postgresql": 60}
SQLITE_WAIT_SECONDS = 480


def schedule_budget(database: str) -> float:
    return SCHEDULE_SECONDS[database] * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


def wait_limit(database: str) -> float:
    """How long the test waits for all 100 runs to exist."""
    return 60 + 2 * schedule_budget(database) if database in SCHEDULE_SECONDS else SQLITE_WAIT_SECONDS


def overrides(teacher_dir, corpus_path, out, **run) -> dict:
    """A run as nested keys (override_strings makes the flow parameter of it)."""
    return {
        "teacher": {"model": str(teacher_dir), "batch_tokens": 2048, "device": "cpu"},
        "dataset": {"name": "parquet", "data_files": str(corpus_path), "streaming": True,
                    "max_samples": run.pop("samples")},
        "cache": {"top_k": 8, "max_length": 64},
        "output": {"uri": str(out)},
        "run": run,
    }


def cancel(client, flow_run_id: str) -> None:
    """Cancel a build and every shard run it scheduled, so that no later worker picks them up."""
    for child in children(client, flow_run_id):
        if child["state_type"] not in FINAL:
            client.post(f"/flow_runs/{child['id']}/set_state", json={"state": {"type": "CANCELLED"}, "force": True})
    client.post(f"/flow_runs/{flow_run_id}/set_state", json={"state": {"type": "CANCELLING"}, "force": True})


def test_every_shard_is_scheduled_at_once(bare_stack, small_teacher_dir, corpus_path, tmp_path):
    with bare_stack.client() as client:
        response = trigger(client, {"profile": "testing", "overrides": override_strings(overrides(
            small_teacher_dir, corpus_path, tmp_path / "out", samples=100, num_shards=100))})
        assert response.status_code == 201, response.text
        build = response.json()["id"]
        triggered, shards = time.monotonic(), []
        try:
            while len(shards) < 100 and time.monotonic() - triggered < wait_limit(bare_stack.database):
                time.sleep(2)
                run = client.get(f"/flow_runs/{build}").json()
                assert run["state_type"] not in FINAL, f"{run['state']['message']}\n{bare_stack.log_tail()}"
                shards = children(client, build)
            assert len(shards) == 100, f"{len(shards)} shard runs\n{bare_stack.log_tail()}"
            # From the first shard run's creation to the last: the fan-out itself (the build's own start, its
            # validate/estimate/plan, take another 15-25 s on the 2-core CI machine).
            created = sorted(datetime.fromisoformat(s["created"]) for s in shards)
            seconds = (created[-1] - created[0]).total_seconds()
            if bare_stack.database in SCHEDULE_SECONDS:
                budget = schedule_budget(bare_stack.database)
                assert seconds < budget, f"100 shard runs took {seconds:.0f} s to schedule (budget {budget:.0f} s)"
            assert {s["work_pool_name"] for s in shards} == {"gpu-pool"}
            assert {s["state_type"] for s in shards} == {"SCHEDULED"}  # no gpu worker: all waiting, none lost
            assert sorted(s["name"] for s in shards) == [f"shard-{i:05d}-of-00100" for i in range(100)]
            print(f"\n{bare_stack.database}: 100 shard runs scheduled in {seconds:.1f} s, all of them "
                  f"{time.monotonic() - triggered:.1f} s after the trigger (load {os.getloadavg()[0]:.1f} on "
                  f"{os.cpu_count()} cores)")
        finally:
            cancel(client, build)


def _wait_mid_shard(bare_stack, worker, out, seconds: float) -> None:
    """Until a shard has published its second part (mid-shard: it has more to do), with the worker alive."""
    deadline = time.monotonic() + seconds
    while not list(out.glob("work/*/shard-*/part-00001.json")):
        assert time.monotonic() < deadline, f"no part written\n{bare_stack.log_tail()}"
        assert worker.poll() is None
        time.sleep(0.2)


def _kill_tree(process) -> None:
    """kill -9 a worker and every process under it (the flow run it was running)."""
    tree = psutil.Process(process.pid)
    for proc in [*tree.children(recursive=True), tree]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait()


@pytest.mark.parametrize("bare_stack", ["postgres"], indirect=True)
def test_a_build_survives_its_only_gpu_worker_killed_mid_shard(bare_stack, teacher_dir, corpus_path, tmp_path):
    out = tmp_path / "out"
    config = validate("testing", overrides(teacher_dir, corpus_path, out, samples=120, num_shards=2,
                                                    part_samples=10))
    work = config.store.work_dir(config.key)
    worker = bare_stack.start_gpu_worker(0, "gpu-worker-doomed")
    with bare_stack.client() as client:
        response = trigger(client, {"profile": "testing", "overrides": override_strings(overrides(
            teacher_dir, corpus_path, out, samples=120, num_shards=2, part_samples=10))})
        assert response.status_code == 201, response.text
        build = response.json()["id"]
        _wait_mid_shard(bare_stack, worker, out, seconds=180)
        assert not list(out.glob("work/*/shard-*.json")), "a shard finished before the kill: make the shards longer"
        _kill_tree(worker)
        time.sleep(5)
        assert client.get(f"/flow_runs/{build}").json()["state_type"] == "RUNNING"

        bare_stack.start_gpu_worker(0, "gpu-worker-fresh")
        run = wait(bare_stack, client, build)
        assert run["state_type"] == "COMPLETED", f"{run['state']['message']}\n{bare_stack.log_tail()}"
        runs = children(client, build)
    states = sorted((r["name"], r["state_type"]) for r in runs)
    assert states.count(("shard-00000-of-00002", "COMPLETED")) == 1
    assert states.count(("shard-00001-of-00002", "COMPLETED")) == 1
    assert ("CRASHED" in {s for _, s in states}), states  # the killed shard's first run
    assert not os.path.exists(work)  # published: the work directory is gone

    teacher = load_teacher(TeacherConfig(model=str(teacher_dir), dtype="float32", device="cpu"))
    with CacheReader(resolve(str(out)).index_uri) as reader:
        assert [reader[i]["sample_index"] for i in range(len(reader))] == [i for i in range(120) if i not in (3, 7)]
        report = verify_rows(teacher, [reader[i] for i in range(0, len(reader), 5)], top_k=reader.top_k)
    assert report.ok, report


def _tree(pid: int) -> list[int]:
    """pid and every process under it."""
    try:
        return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize("bare_stack", ["sqlite"], indirect=True)
def test_a_gpu_worker_stopped_with_sigterm_stops_its_shard_within_20_s_and_the_build_completes(
        bare_stack, teacher_dir, corpus_path, tmp_path):
    """A preempted spot machine: SIGTERM to the gpu-pool worker (30-120 s before the machine goes). Its shard's
    flow run stops within 20 s, losing at most the part in flight; the parent reports the shard interrupted and
    re-submits it; a fresh worker finishes it from its complete parts."""
    out = tmp_path / "out"
    run = overrides(teacher_dir, corpus_path, out, samples=120, num_shards=1, part_samples=10)
    worker = bare_stack.start_gpu_worker(0, "gpu-worker-preempted")
    with bare_stack.client() as client:
        response = trigger(client, {"profile": "testing", "overrides": override_strings(run)})
        assert response.status_code == 201, response.text
        build = response.json()["id"]
        _wait_mid_shard(bare_stack, worker, out, seconds=240)
        tree = _tree(worker.pid)
        assert len(tree) > 1, "the worker runs its shard in a subprocess"
        done_before = len(list(out.glob("work/*/shard-*/part-*.json")))
        os.kill(worker.pid, signal.SIGTERM)  # the worker alone, as a container runtime or systemd signals it
        stopped = time.monotonic()
        while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in tree):
            assert time.monotonic() - stopped < 20, f"still running after 20 s\n{bare_stack.log_tail()}"
            time.sleep(0.2)
        worker.wait()
        done_after = len(list(out.glob("work/*/shard-*/part-*.json")))
        assert done_after <= done_before + 1  # at most the part in flight finished meanwhile

        bare_stack.start_gpu_worker(0, "gpu-worker-fresh")
        result = wait(bare_stack, client, build)
        assert result["state_type"] == "COMPLETED", f"{result['state']['message']}\n{bare_stack.log_tail()}"
        runs = children(client, build)
    states = sorted((r["name"], r["state_type"]) for r in runs)
    assert states.count(("shard-00000-of-00001", "COMPLETED")) == 1, states
    assert "interrupted" in bare_stack.log_tail(400), "the parent reports the shard as interrupted"
    with CacheReader(resolve(str(out)).index_uri) as reader:
        assert [reader[i]["sample_index"] for i in range(len(reader))] == [i for i in range(120) if i not in (3, 7)]
