"""Helpers for the reliability tests: a real S3 API (moto's server on loopback), small runs, array comparison.

Import the fixtures into a test module with `from s3helpers import moto_endpoint, bucket  # noqa: F401`.
The server's state lives in this process (moto's backends), so a server stopped and restarted on the same port
keeps its buckets: the endpoint-down tests rely on that.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kd_core import h5cache, io
from kd_core.build import validate
from kd_core.config import deep_merge
from kd_core.estimate import estimate
from kd_core.merge import merge
from kd_core.shard import plan, run_shard

# Fake credentials, distinctive enough to grep for: they must never show up in files, attributes or logs.
ACCESS_KEY = "AKIAKDCACHETESTONLY"
SECRET_KEY = "kdcache-test-secret-never-logged-0123456789"


def start_moto(port: int = 0):
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.fixture(scope="session")
def moto_endpoint():
    """http://127.0.0.1:PORT of a moto S3 server, with fake credentials in the environment for the session."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1")
    server = start_moto()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def s3_options(endpoint: str) -> dict[str, Any]:
    # One botocore attempt per request and a short connect timeout, so that a dead endpoint fails in seconds:
    # the retries under test are kd_core.io's.
    return {"endpoint_url": endpoint, "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}


@pytest.fixture
def bucket(moto_endpoint):
    """A fresh, empty bucket on the moto server."""
    import s3fs

    name = f"kd-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint)
    fs.mkdir(name)
    yield name
    fs.rm(name, recursive=True)


@pytest.fixture(scope="session")
def reference_arrays(tmp_path_factory, small_teacher_dir, corpus_path):
    """The arrays of a clean, uninterrupted local run of `overrides` (same parts)."""
    uri = str(tmp_path_factory.mktemp("reference") / "out")
    build(validate("demo", overrides(small_teacher_dir, corpus_path, uri)))
    return read_arrays(uri)


def overrides(teacher_dir: Path, corpus_path: Path, uri: str, **extra: Any) -> dict[str, Any]:
    """A fast run: the small teacher, 60 streamed docstrings, 2 shards of 3 parts each."""
    base = {
        "teacher": {"model": str(teacher_dir), "batch_tokens": 2048, "device": "cpu"},
        "dataset": {"name": "parquet", "data_files": str(corpus_path), "split": "train", "text_column": "text",
                    "streaming": True, "max_samples": 60},
        "cache": {"top_k": 8, "max_length": 64},
        "output": {"uri": uri},
        "run": {"num_shards": 2, "part_samples": 10},
    }
    return deep_merge(base, extra) if extra else base


def build(config):
    """The whole pipeline, as the flow runs it locally (config: a Build)."""
    estimate(config)
    records = [run_shard(config, shard) for shard in plan(config).shards]
    return merge(config, records)


def read_arrays(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Every dataset of the cache at `uri` (any URI form), read through its manifest and parts."""
    with h5cache.CacheReader(uri, storage_options) as reader:
        return reader.read_all()


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b) and {"offsets", "sample_index"} < set(a), (sorted(a), sorted(b))
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


def listing(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Every file under `uri`, relative to it."""
    fs, root = io.filesystem(uri, storage_options)
    if not fs.exists(root):
        return []
    return sorted(p[len(root.rstrip("/")) + 1:] for p in fs.find(root))


def cache_attrs_text(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The index's attributes and every part file's, as text."""
    with h5cache.CacheReader(uri, storage_options) as reader:
        return repr(reader.attrs) + "".join(repr(h5cache.read_attrs(reader._file(f))) for f in range(len(reader.files)))
