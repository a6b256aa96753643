"""Bad inputs: each is one clear line that names the key, exit code 2 from the CLI without a traceback, and
nothing written at the output. Checked through kd_core.build and through `kd-cache validate/estimate`."""

import logging
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from s3helpers import bucket, build, listing, moto_endpoint, overrides, s3_options  # noqa: F401

from flows import cli
from kd_core.build import validate
from kd_core.config import override_strings
from kd_core.errors import KDCacheError
from kd_core.estimate import estimate


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


def _empty_parquet(tmp_path) -> str:
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    return str(path)


# name -> (overrides on top of a good run, the step that must refuse, what the message must say)
CASES = {
    "unknown key": ({"cache": {"top_kk": 3}}, "validate", r"cache\.top_kk: unknown key\. Did you mean cache\.top_k\?"),
    "wrong type": ({"cache": {"top_k": "many"}}, "validate", r"cache\.top_k: .*integer.*'many'"),
    "nonexistent teacher path": ({"teacher": {"model": "/nonexistent/teacher"}}, "validate",
                                 r"teacher\.model: local path '/nonexistent/teacher' does not exist"),
    "a file as teacher.model": ({"teacher": {"model": "FILE"}}, "validate",
                                r"teacher\.model: '.*model\.safetensors' is a file; a local teacher is a directory"),
    "no text column": ({"dataset": {"text_column": "body"}}, "estimate",
                       r"dataset\.text_column: the dataset has no column 'body'; its columns are \['text'\]"),
    "max_samples over a non-streaming split": ({"dataset": {"streaming": False, "max_samples": 10_000}}, "estimate",
                                              r"dataset\.max_samples \(10,000\) is larger than the split, which has 302 samples"),
    "empty dataset (streaming)": ({"dataset": {"data_files": "EMPTY"}}, "estimate", r"dataset: .*(empty|no samples)"),
    "empty dataset": ({"dataset": {"data_files": "EMPTY", "streaming": False, "max_samples": None}}, "estimate",
                      r"dataset: .*empty"),
    "text column of integers": ({"dataset": {"data_files": "INTS", "streaming": False, "max_samples": 40}},
                                "estimate", r"dataset\.text_column: column 'text' holds int64 values, not text"),
    "text column of integers (streaming)": ({"dataset": {"data_files": "INTS", "max_samples": 20}}, "estimate",
                                            r"dataset\.text_column: column 'text' holds int64 values, not text"),
    "all-empty text column": ({"dataset": {"data_files": "BLANK", "streaming": False, "max_samples": 40}},
                              "estimate", r"dataset\.text_column: all 40 rows of column 'text' are empty"),
    "output.uri with no bucket": ({"output": {"uri": "s3://"}}, "validate", r"output\.uri: 's3://' names no bucket"),
    "empty output.uri": ({"output": {"uri": ""}}, "validate", r"output\.uri is empty \(an unset shell variable\?\)"),
    "output.uri with a slash missing": ({"output": {"uri": "s3:/bucket/kd"}}, "validate",
                                        r"output\.uri: 's3:/bucket/kd' looks like a URL with a slash missing"),
    "output.uri at the filesystem root": ({"output": {"uri": "/"}}, "validate",
                                          r"output\.uri: the filesystem root is not an output directory"),
}


def _parquet(tmp_path, name: str, column) -> str:
    path = tmp_path / f"{name}.parquet"
    pq.write_table(pa.table({"text": column}), path)
    return str(path)


# Stand-ins for data files made per test: a text column of integers, or of 40 empty/blank strings.
DATA_FILES = {
    "INTS": lambda tmp_path: _parquet(tmp_path, "ints", pa.array(range(40), pa.int64())),
    "BLANK": lambda tmp_path: _parquet(tmp_path, "blank", pa.array(["", "  \n"] * 20, pa.string())),
}


def _resolve(extra, tmp_path):
    data_files = (extra.get("dataset") or {}).get("data_files")
    if data_files == "EMPTY":
        extra = {**extra, "dataset": {**extra["dataset"], "data_files": _empty_parquet(tmp_path)}}
    if (extra.get("teacher") or {}).get("model") == "FILE":  # a weights file passed instead of its directory
        (tmp_path / "model.safetensors").write_bytes(b"not a model")
        extra = {**extra, "teacher": {"model": str(tmp_path / "model.safetensors")}}
    if data_files in DATA_FILES:
        extra = {**extra, "dataset": {**extra["dataset"], "data_files": DATA_FILES[data_files](tmp_path)}}
    return extra


def _refuse(step: str, over: dict) -> str:
    with pytest.raises(KDCacheError) as e:
        config = validate("demo", over)
        assert step == "estimate", "validate should have refused"
        estimate(config)
    return str(e.value)


def _cli(command: str, over: dict, capsys) -> str:
    argv = [command, "--profile", "demo", *override_strings(over)]
    # main() logs to stderr only where logging is not set up yet (here pytest has): set up as in a fresh process for
    # the call, then put pytest's handlers and level back, so that no handler of ours outlives the test.
    handlers, level = logging.root.handlers[:], logging.root.level
    logging.root.handlers.clear()
    try:
        assert cli.main(argv) == 2
    finally:
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
    err = capsys.readouterr().err
    # No traceback through our code. (Under pytest, `datasets` may report a logging error on a stale captured
    # stream; the real CLI prints its own one-line log there: see test_cli_subprocess_empty_dataset.)
    assert "Traceback" not in err or "--- Logging error ---" in err, err
    # Progress bars of `datasets` may come first (on \r lines); the error is the last line, alone.
    last = re.split(r"[\r\n]", err.strip())[-1]
    assert last.startswith(f"kd-cache {command}: ") and err.count(f"kd-cache {command}: ") == 1, err
    return last


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_writes_nothing(case, tmp_path, out, small_teacher_dir, corpus_path, capsys,
                                                         monkeypatch):
    extra, step, message = CASES[case]
    monkeypatch.chdir(tmp_path)  # a URI that writes elsewhere than meant would write here (./s3:, ./file:)
    monkeypatch.setattr("kd_core.teacher.load_teacher", lambda *a, **k: pytest.fail("the teacher must not load"))
    over = overrides(small_teacher_dir, corpus_path, str(out), **_resolve(extra, tmp_path))
    error = _refuse(step, over)
    assert len(error.splitlines()) == 1 and re.search(message, error), error
    err = _cli(step, over, capsys)
    assert re.search(message, err), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix not in (".parquet", ".safetensors")]


def test_file_uri_is_one_local_directory_for_data_locks_and_clean_up(tmp_path, small_teacher_dir, corpus_path,
                                                                      monkeypatch):
    """output.uri=file://DIR once put the data in ./file:/DIR but its locks and clean-up at DIR."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    config = validate("demo", overrides(small_teacher_dir, corpus_path, f"file://{out}/",
                                                 dataset={"max_samples": 20}, run={"num_shards": 1}))
    assert config.config.output.uri == str(out)  # normalised once; everything below derives from it
    store, key = config.store, config.key
    assert all(p.startswith(f"{out}/") for p in (store.index(key), store.work_dir(key), store.merge_lock_uri(key)))
    manifest = build(config)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert listing(str(out)) == sorted(["latest.json", f"versions/{key}/cache.h5",
                                        f"versions/{key}/manifest.json",
                                        *(f"versions/{key}/{f.name}" for f in manifest.parts)])


def test_unreadable_profile_yaml(tmp_path, capsys):
    profile = tmp_path / "broken.yaml"
    profile.write_text("teacher: {model: [unclosed\n")
    with pytest.raises(KDCacheError, match=r"profile: .*broken\.yaml is not valid YAML"):
        validate(str(profile))
    assert cli.main(["validate", "--profile", str(profile)]) == 2
    err = capsys.readouterr().err
    assert "is not valid YAML" in err and "Traceback" not in err


def test_unwritable_local_path(tmp_path, small_teacher_dir, corpus_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    over = overrides(small_teacher_dir, corpus_path, str(blocker / "out"))
    with pytest.raises(KDCacheError, match=r"output\.uri: .*a-file/out cannot be created, .*a-file is a file"):
        validate("demo", over)
    _cli("validate", over, capsys)
    assert blocker.read_text() == "not a directory"


def test_missing_bucket(moto_endpoint, small_teacher_dir, corpus_path, capsys):
    opts = s3_options(moto_endpoint)
    over = overrides(small_teacher_dir, corpus_path, "s3://no-such-bucket-kd/run", output={"storage_options": opts})
    with pytest.raises(KDCacheError, match=r"output\.uri: bucket 'no-such-bucket-kd' does not exist"):
        validate("demo", over)
    assert "does not exist" in _cli("validate", over, capsys)
    assert not s3fs.S3FileSystem(endpoint_url=moto_endpoint).exists("no-such-bucket-kd")


def test_cli_subprocess_exit_code_and_stderr(tmp_path, small_teacher_dir, corpus_path):
    """The installed entry point, end to end: exit 2, one line on stderr, nothing on stdout, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "validate", f"teacher.model={small_teacher_dir}", "cache.top_kk=3",
         f"output.uri={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "kd-cache validate: invalid config: cache.top_kk: unknown key. Did you mean cache.top_k? "
        "Known keys: mode, top_k, samples, max_length."
    ]
    assert not (tmp_path / "out").exists()


def test_cli_subprocess_empty_dataset(tmp_path, small_teacher_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "estimate", f"teacher.model={small_teacher_dir}", "dataset.name=parquet",
         f"dataset.data_files={_empty_parquet(tmp_path)}", "dataset.streaming=false", "dataset.max_samples=null",
         f"output.uri={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("kd-cache estimate: dataset: split 'train' of 'parquet' is empty")
    assert not (tmp_path / "out").exists()
