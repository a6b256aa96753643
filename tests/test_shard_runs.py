"""The pieces of the deployed fan-out that need no server: API retries, the config a shard run receives and
refuses, and how the parent tells a live shard from a dead one. The fan-out itself: tests/e2e/test_fanout.py."""

import os

import httpx
import pytest
from s3helpers import overrides

from flows.fan_out import api_call
from kd_core import io, locks
from kd_core.build import accept, validate
from kd_core.errors import ConfigError
from kd_core.shard import plan, shard_state


def _status_error(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://prefect/api/flow_runs/")
    return httpx.HTTPStatusError(f"{code}", request=request, response=httpx.Response(code, request=request))


def test_transient_api_errors_are_retried_and_others_are_not(monkeypatch):
    monkeypatch.setattr(io.time, "sleep", lambda s: None)
    errors = [_status_error(503), _status_error(429), httpx.RemoteProtocolError("dropped"), _status_error(502)]

    def flaky():
        if errors:
            raise errors.pop(0)
        return "created"

    assert api_call(flaky) == "created" and not errors
    calls = []

    def refused():
        calls.append(1)
        raise _status_error(409)

    with pytest.raises(httpx.HTTPStatusError):
        api_call(refused)
    assert len(calls) == 1


def test_a_shard_run_checks_the_parents_config_and_refuses_another_key(tmp_path, small_teacher_dir, corpus_path,
                                                                      monkeypatch):
    # A shard run is a deployed run: the worker lets it read local files only under its allowed roots.
    monkeypatch.setenv("KD_CACHE_ALLOWED_ROOTS", os.path.commonpath([tmp_path, small_teacher_dir, corpus_path]))
    config = validate("demo", overrides(small_teacher_dir, corpus_path, str(tmp_path / "out")))
    sent = config.params()
    assert sent["config"]["teacher"]["dtype"] == "float32"  # resolved by the parent: `auto` may differ on a GPU
    assert accept(sent).config.dataset == config.config.dataset and accept(sent).key == config.key
    with pytest.raises(ConfigError, match="version key: this worker resolves the parent's config to"):
        accept({**sent, "key": "0123456789abcdef"})


def test_shard_state_tells_live_dead_and_done_shards_apart(tmp_path, small_teacher_dir, corpus_path, monkeypatch):
    config = validate("demo", overrides(small_teacher_dir, corpus_path, str(tmp_path / "out")))
    shard, store, key = plan(config).shards[0], config.store, config.key
    assert shard_state(config, shard)[0] == "free"
    with locks.LeaseLock(store.shard_lock_uri(key, shard), shard.name):
        assert shard_state(config, shard)[0] == "writing"
        monkeypatch.setattr(locks.time, "time", lambda: 1e12)  # long after the lease ran out
        assert shard_state(config, shard)[0] == "dead"
        monkeypatch.undo()
    io.write_json_atomic(store.shard_record(key, shard), {"done": True})
    assert shard_state(config, shard)[0] == "done"

