"""The build-teacher-cache flow in-process (Prefect's test harness: a temporary SQLite API, no workers).

What is checked here: a failing guard ends the run FAILED with its own message and nothing else happens; and the
nightly refresh: same inputs do no teacher work, changed inputs build a new version beside the old one, readers
of `latest` never see the new one before it is complete, and old versions are pruned to output.keep_versions.
"""

import json

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

import kd_core.teacher
import tasks.teacher_inference
import tasks.validate_config
from flows.build_teacher_cache import build_teacher_cache
from kd_core.h5cache import CacheReader
from kd_core.config import override_strings
from kd_core.errors import ConfigError
from kd_core.store import Store, resolve


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness():
        yield


def tiny(small_teacher_dir, corpus_path, out, top_k=8, **output) -> list[str]:
    return override_strings({
        "teacher": {"model": str(small_teacher_dir), "batch_tokens": 2048},
        "dataset": {"name": "parquet", "data_files": str(corpus_path), "streaming": True, "max_samples": 12},
        "cache": {"top_k": top_k, "max_length": 64},
        "output": {"uri": str(out), **output},
        "run": {"num_shards": 2},
    })


def test_the_run_form_has_a_title_and_a_description_for_every_field():
    from prefect.utilities.callables import parameter_schema

    from flows.teacher_inference_shard import teacher_inference_shard

    for flow_ in (build_teacher_cache, teacher_inference_shard):
        schema = parameter_schema(flow_.fn).model_dump()
        assert not schema["definitions"], "no nested models: the UI would show their class names"
        for name, field in schema["properties"].items():
            assert field["title"] == name and len(field.get("description") or "") > 40, (flow_.name, name)
    overrides = parameter_schema(build_teacher_cache.fn).model_dump()["properties"]["overrides"]
    items = next(option["items"] for option in overrides["anyOf"] if option["type"] == "array")
    assert items["type"] == "string"  # a list of KEY=VALUE strings (the pattern keeps credentials out)


def test_a_null_parameter_means_as_the_profile_has_it(small_teacher_dir, corpus_path, tmp_path, monkeypatch):
    """The UI sends null for untouched fields; the profile's values stay (here: its dataset and teacher)."""
    seen = {}
    monkeypatch.setattr(tasks.validate_config, "validate",
                        lambda profile, overrides, **policy: seen.update(p=profile, o=overrides)
                        or (_ for _ in ()).throw(ConfigError("stop here")))
    assert build_teacher_cache(profile=None, overrides=None, return_state=True).is_failed()
    assert seen == {"p": "demo", "o": []}
    assert build_teacher_cache(profile=None, return_state=True).is_failed()  # the default: an empty line
    assert seen == {"p": "demo", "o": []}


def test_overrides_typed_as_one_line_are_the_same_list(monkeypatch):
    """The run form's text box: KEY=VALUE items separated by spaces or line breaks, split and parsed as a list."""
    seen = {}
    monkeypatch.setattr(tasks.validate_config, "validate",
                        lambda profile, overrides, **policy: seen.update(o=overrides)
                        or (_ for _ in ()).throw(ConfigError("stop here")))
    build_teacher_cache(overrides=" dataset.max_samples=20  output.uri=./out/x\ncache.top_k=8 ", return_state=True)
    assert seen["o"] == ["dataset.max_samples=20", "output.uri=./out/x", "cache.top_k=8"]


def test_a_typed_line_with_credentials_is_refused_by_the_schema_before_it_is_stored():
    """Prefect's server checks parameters against the schema before it stores a run: the line's pattern must refuse
    a credential in any of its items, and quotes (the line is split on whitespace alone)."""
    import re

    from prefect.utilities.callables import parameter_schema

    overrides = parameter_schema(build_teacher_cache.fn).model_dump()["properties"]["overrides"]
    line = next(option["pattern"] for option in overrides["anyOf"] if option.get("type") == "string")
    assert re.search(line, "dataset.max_samples=1000 output.uri=s3://bucket/kd/run1")
    for bad in ("dataset.max_samples=1 output.storage_options.secret=x", "output.storage_options={a: 1, secret: 2}",
                "dataset.max_samples=1\noutput.storage_options.awsSecretAccessKey=k", "output.uri=s3://u:pw@b/k",
                "dataset.name='a b'"):
        assert not re.search(line, bad), bad


def task_run_names(flow_run_id) -> list[str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [run.name.rsplit("-", 1)[0] for run in runs]  # run names are "<task name>-<3 hex digits>"


def test_failing_guard_fails_the_run_with_its_message_and_does_nothing_else(small_teacher_dir, corpus_path, tmp_path):
    out = tmp_path / "out"
    over = [*tiny(small_teacher_dir, corpus_path, out), "dataset.max_samples=null"]  # streaming, no limit

    state = build_teacher_cache(profile="testing", overrides=over, return_state=True)

    assert state.is_failed()
    # One line, what the run page shows first: the reason and the fix (the guard's table is in the artifact).
    assert state.message.startswith("dataset.max_samples is required when dataset.streaming=true. Fix: set a limit")
    assert "\n" not in state.message
    with pytest.raises(ConfigError):
        state.result()
    assert task_run_names(state.state_details.flow_run_id) == ["validate-config"]
    assert not out.exists()
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts()
                     if a.flow_run_id == state.state_details.flow_run_id}
    failure = artifacts["failure"].data
    assert "dataset.max_samples is required" in failure and "1,000,000" in failure  # the whole message, the table
    assert "kd-cache run dataset.max_samples=1000" in failure  # where a key goes, for a run from the command line


def test_nightly_refresh(small_teacher_dir, corpus_path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = build_teacher_cache(profile="testing", overrides=tiny(small_teacher_dir, corpus_path, out, keep_versions=1))
    assert not first["up_to_date"] and first["num_samples"] == 10  # 12 rows, two of them blank
    assert Store(str(out)).latest_key() == first["key"]

    # Same inputs: no teacher work at all (loading it would fail), "up to date".
    def no_teacher(cfg):
        raise AssertionError("the teacher was loaded for an up-to-date cache")

    monkeypatch.setattr(kd_core.teacher, "load_teacher", no_teacher)
    again = build_teacher_cache(profile="testing", overrides=tiny(small_teacher_dir, corpus_path, out, keep_versions=1))
    assert again["up_to_date"] and again["key"] == first["key"]
    monkeypatch.undo()

    # A changed input builds a new version beside the old; while it builds, `latest` still gives the old one.
    seen_while_building = []
    run_shard = tasks.teacher_inference.run_shard

    def watching_run_shard(config, shard, progress=None):
        with CacheReader(resolve(str(out)).index_uri) as reader:
            seen_while_building.append(reader.attrs["content_key"])
        return run_shard(config, shard, progress)

    monkeypatch.setattr(tasks.teacher_inference, "run_shard", watching_run_shard)
    second = build_teacher_cache(profile="testing", overrides=tiny(small_teacher_dir, corpus_path, out, 4, keep_versions=1))
    assert second["key"] != first["key"] and not second["up_to_date"]
    assert seen_while_building == [first["key"]] * 2
    assert json.loads((out / "latest.json").read_text())["version"] == second["key"]
    with CacheReader(resolve(str(out)).index_uri) as reader:
        assert reader.top_k == 4
    assert {p.name for p in (out / "versions").iterdir()} == {first["key"], second["key"]}  # one old one kept

    # A third version with keep_versions=1: the oldest goes, after latest moved; the previous one stays.
    third = build_teacher_cache(profile="testing", overrides=tiny(small_teacher_dir, corpus_path, out, 2, keep_versions=1))
    assert {p.name for p in (out / "versions").iterdir()} == {second["key"], third["key"]}
    assert Store(str(out)).latest_key() == third["key"]

    # Going back to the previous config is up to date and points latest back at its version.
    back = build_teacher_cache(profile="testing", overrides=tiny(small_teacher_dir, corpus_path, out, 4, keep_versions=1))
    assert back["up_to_date"] and Store(str(out)).latest_key() == second["key"]


def test_a_failure_is_one_line_and_a_deployed_run_says_where_keys_go():
    from flows.build_teacher_cache import WHERE_DEPLOYED, one_line

    guard = "x is required.\n  Why: it is.\n  Fix: set a limit (y=1 works too), e.g.\n         1,000  small\n"
    assert one_line(guard) == "x is required. Fix: set a limit (y=1 works too)"
    deployed = one_line("cache.top_k: must be at least 1. Fix: cache.top_k=1.", WHERE_DEPLOYED)
    assert deployed.startswith("cache.top_k: must be at least 1. Fix: cache.top_k=1. (To set a key in the Prefect UI")
    assert "overrides field" in deployed and "parameters.overrides" in deployed and "\n" not in deployed
