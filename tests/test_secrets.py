"""Credentials are never parameters and never recorded.

A build on S3 (moto's server) is run as a user would, through Prefect, with credentials given in each supported
way: the worker's environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and a Prefect Secret block named by
output.credentials. Every unsupported way (overrides, a profile file, a password inside a URL) is refused before
any flow run exists, without echoing the credential. Then Prefect's database files, its home directory, every
log line, artifact and S3 object, the manifest and the cache's attributes are searched for every credential.
"""

import json
import re
from pathlib import Path

import pytest
import yaml
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.settings import get_current_settings
from prefect.testing.utilities import prefect_test_harness
from s3helpers import ACCESS_KEY, SECRET_KEY, bucket, cache_attrs_text, listing, moto_endpoint, s3_options  # noqa: F401

from flows.build_teacher_cache import build_teacher_cache
from flows import cli
from kd_core import io
from kd_core.config import override_strings

pytestmark = pytest.mark.slow  # two Prefect flow runs against S3: ~40 s

BLOCK_KEY, BLOCK_SECRET = "AKIAKDCACHEBLOCKONLY", "kdcache-block-secret-never-recorded-4242"
REFUSED = ["kdcache-override-secret-never-echoed-7777", "kdcache-profile-secret-never-echoed-8888",
           "kdcache-url-password-never-echoed-9999"]
EVERY_CREDENTIAL = [ACCESS_KEY, SECRET_KEY, BLOCK_KEY, BLOCK_SECRET, *REFUSED]


@pytest.fixture(scope="module")
def prefect_files():
    """A temporary Prefect API; yields the files it keeps (its SQLite database and journal, its home)."""
    with prefect_test_harness():
        settings = get_current_settings()
        url = settings.server.database.connection_url.get_secret_value()
        database = Path(re.sub(r"^sqlite\+aiosqlite:///", "", url))
        yield [database.parent, Path(settings.home)]


def tiny(small_teacher_dir, corpus_path, uri, **output) -> list[str]:
    return override_strings(tiny_dict(small_teacher_dir, corpus_path, uri, **output))


def tiny_dict(small_teacher_dir, corpus_path, uri, **output) -> dict:
    return {
        "teacher": {"model": str(small_teacher_dir), "batch_tokens": 2048},
        "dataset": {"name": "parquet", "data_files": str(corpus_path), "streaming": True, "max_samples": 12},
        "cache": {"top_k": 8, "max_length": 64},
        "output": {"uri": uri, **output},
        "run": {"num_shards": 2},
    }


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and k != "storage_options":
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}={json.dumps(v)}"


def _flow_run_count() -> int:
    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs())


def test_credentials_given_every_way_are_never_recorded(prefect_files, bucket, moto_endpoint, small_teacher_dir,
                                                        corpus_path, tmp_path, capfd, caplog, monkeypatch):
    opts = s3_options(moto_endpoint)
    monkeypatch.chdir(tmp_path)

    # Refused: in overrides, in a profile file, as a password in a URL. One line naming the key, exit 2, no echo,
    # and no flow run created (a run's parameters are stored in Prefect's database the moment it exists).
    base = tiny_dict(small_teacher_dir, corpus_path, f"s3://{bucket}/refused", storage_options=opts)
    profile = tmp_path / "with-secret.yaml"
    profile.write_text(yaml.safe_dump({**base, "output": {**base["output"], "storage_options": {
        **opts, "client_kwargs": {"aws_secret_access_key": REFUSED[1]}}}}))
    attempts = [
        ("output.storage_options.secret", ["--profile", "testing", *_flatten(
            {**base, "output": {**base["output"], "storage_options": {**opts, "secret": REFUSED[0]}}})]),
        ("output.storage_options.client_kwargs.aws_secret_access_key", ["--profile", str(profile)]),
        ("output.storage_options.endpoint_url", ["--profile", "testing", *_flatten({**base, "output": {
            **base["output"], "storage_options": {**opts, "endpoint_url": moto_endpoint.replace(
                "http://", f"http://user:{REFUSED[2]}@")}}})]),
    ]
    before = _flow_run_count()
    for key, argv in attempts:
        capfd.readouterr()
        assert cli.main(["run", *argv]) == 2
        err = capfd.readouterr().err
        assert re.search(rf"{re.escape(key)}: credentials are not accepted (as overrides|in the config)", err), err
        assert "Secret block named by output.credentials" in err and "Traceback" not in err
    assert _flow_run_count() == before

    # Supported: the worker's environment (set by the moto fixture) ...
    from_env = f"s3://{bucket}/from-env"
    state = build_teacher_cache(profile="testing", overrides=tiny(small_teacher_dir, corpus_path, from_env,
                                                                   storage_options=opts), return_state=True)
    assert state.is_completed(), state.message
    # ... and a Prefect Secret block named in the config, read by the worker at run time.
    Secret(value={"key": BLOCK_KEY, "secret": BLOCK_SECRET}).save("kd-cache-test-s3", overwrite=True)
    from_block = f"s3://{bucket}/from-block"
    state = build_teacher_cache(profile="testing", overrides=tiny(
        small_teacher_dir, corpus_path, from_block, storage_options=opts, credentials="kd-cache-test-s3"),
        return_state=True)
    assert state.is_completed(), state.message
    assert io._with_credentials(f"{from_block}/latest.json", {})["secret"] == BLOCK_SECRET  # the block was used

    # Where they must not be: Prefect's database (flow runs' parameters, task runs, logs, artifacts, states),
    # its home, every object written, the manifests, the caches' attributes, and every line printed or logged.
    recorded = [p.read_bytes().decode("latin-1") for root in prefect_files for p in root.rglob("*") if p.is_file()]
    assert any("build-teacher-cache" in text for text in recorded), "the database was not found"
    fs, _ = io.filesystem(f"s3://{bucket}", opts)
    fs.invalidate_cache()
    objects = [fs.cat(f"{bucket}/{name}").decode("latin-1") for name in listing(f"s3://{bucket}", opts)]
    assert any('"config"' in text for text in objects), "no manifest was read"
    attrs = [cache_attrs_text(uri, opts) for uri in (from_env, from_block)]
    with get_client(sync_client=True) as client:
        runs = [run.model_dump_json() for run in client.read_flow_runs()]
        logs = [log.model_dump_json() for log in client.read_logs()]
        artifacts = [a.model_dump_json() for a in client.read_artifacts()]
    printed = capfd.readouterr()
    everywhere = [*recorded, *objects, *attrs, *runs, *logs, *artifacts, printed.out, printed.err, caplog.text]
    for credential in EVERY_CREDENTIAL:
        assert not [text[:200] for text in everywhere if credential in text], credential
