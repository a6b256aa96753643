"""build-teacher-cache as users run it: deployed, triggered over the REST API, shards on gpu-pool workers.

Everything goes through HTTP against the real server of tests/e2e/conftest.py (basic auth on), the way
docs/DEPLOYMENT.md's curl example does it.
"""

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd_core.h5cache import CacheReader
from kd_core.config import TeacherConfig, override_strings
from kd_core.store import resolve
from kd_core.teacher import load_teacher
from kd_core.verify import verify_rows

pytestmark = pytest.mark.slow

RUN_SECONDS = 240
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def tiny(small_teacher_dir, corpus_path, out) -> list[str]:
    return override_strings({
        "teacher": {"model": str(small_teacher_dir), "batch_tokens": 2048},
        "dataset": {"name": "parquet", "data_files": str(corpus_path), "streaming": True, "max_samples": 16},
        "cache": {"top_k": 8, "max_length": 64},
        "output": {"uri": str(out)},
        "run": {"num_shards": 2},
    })


def deployment(client, name: str) -> dict:
    response = client.get(f"/deployments/name/{name}")
    response.raise_for_status()
    return response.json()


def trigger(client, parameters: dict):
    dep = deployment(client, "build-teacher-cache/default")
    return client.post(f"/deployments/{dep['id']}/create_flow_run", json={"parameters": parameters})


def wait(stack, client, flow_run_id: str) -> dict:
    deadline = time.monotonic() + RUN_SECONDS
    while time.monotonic() < deadline:
        run = client.get(f"/flow_runs/{flow_run_id}").json()
        if run["state_type"] in FINAL:
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} not final after {RUN_SECONDS} s\n{stack.log_tail()}")


def children(client, flow_run_id: str) -> list[dict]:
    response = client.post("/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}})
    response.raise_for_status()
    return response.json()


def test_deployed_run_fans_out_to_gpu_pool_and_the_cache_verifies(prefect_stack, small_teacher_dir, corpus_path,
                                                                    tmp_path):
    out = tmp_path / "out"
    with prefect_stack.client() as client:
        response = trigger(client, {"profile": "testing", "overrides": tiny(small_teacher_dir, corpus_path, out)})
        assert response.status_code == 201, response.text
        run = wait(prefect_stack, client, response.json()["id"])
        assert run["state_type"] == "COMPLETED", f"{run['state']['message']}\n{prefect_stack.log_tail()}"
        assert run["work_pool_name"] == "cpu-pool"

        # One teacher-inference-shard/gpu flow run per shard, each run by a gpu-pool worker.
        gpu = deployment(client, "teacher-inference-shard/gpu")
        shards = children(client, run["id"])
        assert sorted(s["name"] for s in shards) == ["shard-00000-of-00002", "shard-00001-of-00002"]
        for shard in shards:
            assert shard["deployment_id"] == gpu["id"] and shard["work_pool_name"] == "gpu-pool"
            assert shard["state_type"] == "COMPLETED"

        response = client.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
        listed = response.json()
    artifacts = {artifact["key"]: artifact for artifact in listed}
    assert len(listed) == len(artifacts), "one artifact per key and run, updated in place"
    assert {k: a["type"] for k, a in artifacts.items()} == {
        "storage-estimate": "table", "shard-progress": "progress", "shard-throughput": "table", "cache-summary": "markdown",
    }
    assert artifacts["shard-progress"]["data"] == 100.0
    assert artifacts["shard-progress"]["description"].startswith("2 of 2 shards finished: 14 samples")
    throughput = json.loads(artifacts["shard-throughput"]["data"])
    assert [row["shard"] for row in throughput] == ["shard 0", "shard 1", "all finished (2 of 2)"]
    assert all(set(row) == set(throughput[0]) for row in throughput)  # every figure under a labelled column
    assert all(value != "" for row in throughput for value in row.values())  # every cell filled
    walls = [float(row["wall-clock seconds since the shards started"].replace(",", "")) for row in throughput]
    assert 0 < max(walls[:-1]) <= walls[-1]  # a shard finished after the shards started, before the total's "now"
    assert "| tokens |" in artifacts["cache-summary"]["data"]

    # The published cache: every sample, and it agrees with the teacher recomputed in float32.
    teacher = load_teacher(TeacherConfig(model=str(small_teacher_dir), dtype="float32", device="cpu"))
    with CacheReader(resolve(str(out)).index_uri) as reader:
        assert len(reader) == 14  # 16 rows, two of them blank
        report = verify_rows(teacher, [reader[i] for i in range(len(reader))], top_k=reader.top_k)
    assert report.ok, report


def test_max_samples_over_the_source_fails_in_planning_before_any_shard_runs(prefect_stack, small_teacher_dir,
                                                                           corpus_path, tmp_path):
    short = tmp_path / "short.parquet"  # 5 rows, 8 asked for: the footers say so before any GPU work
    pq.write_table(pa.table({"text": pq.read_table(corpus_path).column("text").to_pylist()[10:15]}), short)
    overrides = [*tiny(small_teacher_dir, short, tmp_path / "out"), "dataset.max_samples=8"]
    with prefect_stack.client() as client:
        response = trigger(client, {"profile": "testing", "overrides": overrides})
        assert response.status_code == 201, response.text
        run = wait(prefect_stack, client, response.json()["id"])
        shards = children(client, run["id"])
    assert run["state_type"] == "FAILED"
    assert run["state"]["message"].startswith("dataset.max_samples (8) is larger than the split, which has 5 samples.")
    assert shards == []
    assert not (tmp_path / "out" / "latest.json").exists()


def test_guard_failure_ends_failed_with_its_message_and_starts_nothing(prefect_stack, small_teacher_dir,
                                                                       corpus_path, tmp_path):
    out = tmp_path / "out"
    overrides = [*tiny(small_teacher_dir, corpus_path, out), "distillation.dataset.max_samples=null"]  # no limit
    with prefect_stack.client() as client:
        response = trigger(client, {"profile": "testing", "overrides": overrides})
        assert response.status_code == 201, response.text
        run = wait(prefect_stack, client, response.json()["id"])
        task_runs = client.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}}).json()
        shards = children(client, run["id"])
    assert run["state_type"] == "FAILED"
    assert run["state"]["message"].startswith("dataset.max_samples is required when dataset.streaming=true.")
    assert [t["name"].rsplit("-", 1)[0] for t in task_runs] == ["validate-config"]
    assert shards == []
    assert not out.exists()


@pytest.mark.parametrize("asks_for, message", [
    (["dataset.data_files=/etc/passwd", "dataset.name=text"],
     "dataset.data_files: '/etc/passwd' is a local path outside the directories this worker lets runs read"),
    (["teacher.trust_remote_code=true"],
     "teacher.trust_remote_code: this worker does not let runs execute code from a model repository"),
])
def test_a_rest_run_asking_for_more_than_the_worker_allows_fails_in_validate_config(
        prefect_stack, small_teacher_dir, corpus_path, tmp_path, asks_for, message):
    """The workers run with KD_CACHE_ALLOWED_ROOTS=<pytest's temp dir> and no KD_CACHE_ALLOW_REMOTE_CODE."""
    out = tmp_path / "out"
    overrides = tiny(small_teacher_dir, corpus_path, out) + asks_for
    with prefect_stack.client() as client:
        response = trigger(client, {"profile": "testing", "overrides": overrides})
        assert response.status_code == 201, response.text
        run = wait(prefect_stack, client, response.json()["id"])
        task_runs = client.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}}).json()
    assert run["state_type"] == "FAILED" and run["state"]["message"].startswith(message), run["state"]["message"]
    assert [t["name"].rsplit("-", 1)[0] for t in task_runs] == ["validate-config"]
    assert not out.exists()


def test_a_ui_form_submission_keeps_the_profiles_values(prefect_stack, small_teacher_dir, corpus_path, tmp_path):
    """What the UI's run form sends: the profile field filled in (a YAML file on the worker), overrides left
    alone, so null. The run must use the profile as it is: its teacher, dataset, sample count and top_k."""
    out = tmp_path / "out"
    profile = tmp_path / "my-profile.yaml"
    profile.write_text(f"""teacher: {{model: '{small_teacher_dir}', batch_tokens: 2048, device: cpu}}
dataset: {{name: parquet, data_files: '{corpus_path}', streaming: true, max_samples: 7}}
cache: {{top_k: 5, max_length: 32}}
output: {{uri: '{out}'}}
""")
    with prefect_stack.client() as client:
        response = trigger(client, {"profile": str(profile), "overrides": None})
        assert response.status_code == 201, response.text
        run = wait(prefect_stack, client, response.json()["id"])
    assert run["state_type"] == "COMPLETED", f"{run['state']['message']}\n{prefect_stack.log_tail()}"
    with CacheReader(resolve(str(out)).index_uri) as reader:
        attrs = reader.attrs
    assert (attrs["max_samples"], attrs["top_k"], attrs["max_length"]) == (7, 5, 32)
    assert attrs["teacher_model"] == str(small_teacher_dir)


def test_bad_parameters_fail_with_the_command_lines_message(prefect_stack):
    with prefect_stack.client() as client:
        nested = trigger(client, {"profile": "demo", "overrides": {"dataset": {"max_samples": 10}}})
        assert nested.status_code == 409 and "overrides" in nested.text  # a list of KEY=VALUE strings, not a dict
        unknown = wait(prefect_stack, client, trigger(client, {"overrides": ["dataset.max_sample=10"]}).json()["id"])
        no_profile = wait(prefect_stack, client, trigger(client, {"profile": "nope"}).json()["id"])
    assert unknown["state_type"] == "FAILED"
    # The command line's message, then where a key goes for a run that came through the UI or REST (one line).
    assert unknown["state"]["message"].startswith("invalid config: dataset.max_sample: unknown key. Did you mean "
                                                  "dataset.max_samples? Known keys: name, config, split, data_files, "
                                                  "revision, text_column, streaming, max_samples. (To set a key in "
                                                  "the Prefect UI, Run > Custom run, type it into the overrides field")
    assert "parameters.overrides" in unknown["state"]["message"] and "\n" not in unknown["state"]["message"]
    assert no_profile["state_type"] == "FAILED" and "no profile named 'nope'" in no_profile["state"]["message"]


def test_nightly_is_deployed_with_its_schedule_paused(prefect_stack):
    with prefect_stack.client() as client:
        nightly = deployment(client, "build-teacher-cache/nightly")
    assert [(s["schedule"]["cron"], s["active"]) for s in nightly["schedules"]] == [("0 2 * * *", False)]


def test_basic_auth_is_required(prefect_stack):
    with prefect_stack.client(auth=None) as anonymous, prefect_stack.client(auth=("kd-cache", "wrong")) as wrong:
        assert anonymous.get("/deployments/name/build-teacher-cache/default").status_code == 401
        assert wrong.get("/deployments/name/build-teacher-cache/default").status_code == 401
        with prefect_stack.client() as client:
            dep_id = deployment(client, "build-teacher-cache/default")["id"]
        response = anonymous.post(f"/deployments/{dep_id}/create_flow_run", json={"parameters": {"profile": "demo"}})
        assert response.status_code == 401
