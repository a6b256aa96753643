"""The command line as a user runs it, in a subprocess."""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import cli
from kd_core.config import override_strings
from kd_core.errors import ConfigError


def _env(tmp_path, **extra):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), **extra}
    env.pop("PREFECT_API_URL", None)
    return env


def _gone(pid: int, within: float = 30.0) -> bool:
    """The process has exited (a zombie waiting for its new parent to reap it counts as exited)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.2)
    return False


def _server_pid(stderr: str) -> int:
    return int(re.search(r"temporary Prefect server starting at \S+ \(pid (\d+)\)", stderr)[1])


def _local_overrides(small_teacher_dir, corpus_path, out) -> list[str]:
    return override_strings({
        "teacher": {"model": str(small_teacher_dir), "batch_tokens": 2048},
        "dataset": {"name": "parquet", "data_files": str(corpus_path), "streaming": True, "max_samples": 4},
        "cache": {"top_k": 4, "max_length": 32},
        "output": {"uri": str(out)},
    })


def test_a_bad_run_fails_before_any_server_starts(tmp_path):
    """The guard (and every config check that needs nothing loaded) runs in the command's process first: one
    message, exit 2, no Prefect server started, nothing written."""
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "testing", "dataset.max_samples=null"],
                          env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("kd-cache run: dataset.max_samples") and "Traceback" not in done.stderr
    assert "Prefect server" not in done.stderr and not (tmp_path / "prefect").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_run_that_fails_validation_after_the_server_started_leaves_no_process_behind(tmp_path):
    """`kd-cache run` starts the temporary Prefect server beside the slower config checks. When one of them
    fails, the server must still be stopped, and the command must not wait for it."""
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "demo",
                           f"teacher.model={tmp_path / 'no-such-teacher'}", f"output.uri={tmp_path / 'out'}"],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=180)
    assert done.returncode == 2
    assert "kd-cache run: teacher.model: local path" in done.stderr and "Traceback" not in done.stderr
    assert _gone(_server_pid(done.stderr))


@pytest.mark.slow
def test_a_server_that_does_not_start_in_time_is_one_line_with_the_fix(small_teacher_dir, corpus_path, tmp_path):
    """Prefect's limit (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS) passed: one line, exit 2, the server
    stopped, and no second server started by the flow."""
    env = _env(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run",
                           *_local_overrides(small_teacher_dir, corpus_path, tmp_path / "out")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("temporary Prefect server starting") == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kd-cache run: the temporary Prefect server did not answer within 1 s. Fix: ")
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in last and "PREFECT_API_URL" in last
    assert "Traceback" not in done.stderr and "Beginning flow run" not in done.stderr
    assert _gone(_server_pid(done.stderr))
    assert not (tmp_path / "out").exists()


def test_output_piped_to_a_closed_reader_exits_quietly(corpus_path, tmp_path):
    """`kd-cache plan --json | head -c0`: the reader is gone before the first write; no traceback."""
    args = ["plan", "--json", "dataset.name=parquet", f"dataset.data_files={corpus_path}", "dataset.max_samples=8"]
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=_env(tmp_path), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr


def _picked(*argv):
    args = argparse.Namespace(profile=None, overrides=list(argv))
    for i, a in enumerate(argv):
        if a.startswith("--profile="):
            args.profile, args.overrides = a.split("=", 1)[1], list(argv[:i] + argv[i + 1:])
    cli._pick_profile(args)
    return args.profile, args.overrides


def test_the_seeds_distillation_equals_profile_picks_the_profile():
    assert _picked("distillation=medium", "dataset.max_samples=5") == ("medium", ["dataset.max_samples=5"])
    assert _picked("distillation.dataset.max_samples=5") == ("demo", ["distillation.dataset.max_samples=5"])
    assert _picked("--profile=small", "distillation=small") == ("small", [])
    with pytest.raises(ConfigError, match=r"^distillation=NAME picks the profile.*Fix: give one profile"):
        _picked("--profile=small", "distillation=medium")
    with pytest.raises(ConfigError, match=r"^distillation=nope: no profile named 'nope'\. Fix: --profile NAME"):
        _picked("distillation=nope")
