"""Reading checks what it reads: command-line options of the read commands, secrets in what they print."""

import pytest

from flows import cli


def _one_line_exit_2(argv, capsys) -> str:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("command", [["inspect"], ["verify"], ["export", "OUT.h5"]])
def test_a_password_in_the_uri_is_refused_without_echoing_it(command, tmp_path, capsys, monkeypatch):
    """`s3://user:pa/ss@bucket`: the userinfo pattern stopped at the '/', and the password was echoed."""
    monkeypatch.chdir(tmp_path)
    argv = [command[0], "s3://user:Zq9/pw0rd@bucket/kd", *command[1:]]
    err = _one_line_exit_2(argv, capsys)
    assert "credentials inside the URL" in err and "Zq9" not in err and "pw0rd" not in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("option, message", [
    ("endpointUrl=http://127.0.0.1:9", r"--storage-option endpointUrl: .*did you mean --storage-option endpoint_url\?"),
    ("client_kwargs.regionName=eu", r"--storage-option client_kwargs\.regionName: .*client_kwargs\.region_name\?"),
    ("secret=Zq9pw0rd", r"--storage-option secret: credentials are not accepted on the command line"),
    ("client_kwargs.aws_secret_access_key=Zq9pw0rd", r"credentials are not accepted on the command line"),
    ("endpoint_url=http://u:Zq9pw0rd@host", r"credentials are not accepted on the command line"),
    ("Zq9pw0rd", r"--storage-option: expected KEY=VALUE"),
])
def test_storage_options_of_the_read_commands_are_checked_before_anything_is_read(option, message, tmp_path,
                                                                                   capsys):
    import re

    for argv in (["inspect", str(tmp_path)], ["verify", str(tmp_path)], ["export", str(tmp_path), str(tmp_path / "o.h5")]):
        err = _one_line_exit_2([*argv, "--storage-option", option], capsys)
        assert re.search(message, err) and "Zq9" not in err, err


# ------------------------------------------------------------------------------------------------ built caches

import json
import shutil

import h5py
import numpy as np
from s3helpers import build, overrides

from kd_core import io, pipeline
from kd_core.dataset import CacheDataset, StreamingCacheDataset
from kd_core.errors import CacheFileError, KDCacheError
from kd_core.h5cache import CacheReader


@pytest.fixture(scope="module")
def clean(tmp_path_factory, small_teacher_dir, corpus_path):
    """A small top-k cache: 2 shards of 2 parts (10 samples a part)."""
    out = tmp_path_factory.mktemp("readcheck") / "out"
    build(pipeline.validate("demo", overrides(small_teacher_dir, corpus_path, str(out), dataset={"max_samples": 40},
                                              run={"num_shards": 2, "part_samples": 10})))
    return out


@pytest.fixture
def copy(clean, tmp_path):
    """A copy of the clean cache to damage; (output root, its version directory, its part files)."""
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    version = out / "versions" / io.read_json(str(out / "latest.json"))["version"]
    return out, version, sorted((version / "parts").rglob("*.h5"))


def test_a_hole_in_the_index_cannot_read_as_rows_to_stock_h5py(copy):
    """The index's virtual datasets read their fill value where a part is missing: it was 0, a valid id and a valid
    log-prob. Now NaN log-probs and logsumexp and an id no vocabulary has."""
    out, version, parts = copy
    parts[0].unlink()
    with h5py.File(version / "cache.h5", "r") as f:
        vocab = int(f.attrs["vocab_size"])
        hi = int(f["offsets"][1])  # sample 0 lives in the first part
        assert np.isnan(f["topk_logprobs"][:hi]).all() and np.isnan(f["logsumexp"][:hi]).all()
        assert (f["input_ids"][:hi] >= vocab).all() and (f["topk_indices"][:hi] >= vocab).all()
