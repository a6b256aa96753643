"""The command line as a user runs it, in a subprocess."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_run_that_fails_validation_after_the_server_started_leaves_no_process_behind(tmp_path):
    """`kd-cache run` starts the temporary Prefect server beside the slower config checks. When one of them
    fails, the server must still be stopped: an orphaned server would also hold this pipe open, and
    subprocess.run would wait for it until the timeout."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "demo",
                           f"teacher.model={tmp_path / 'no-such-teacher'}", f"output.uri={tmp_path / 'out'}"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2
    assert "kd-cache run: teacher.model: local path" in done.stderr and "Traceback" not in done.stderr
    assert "Stopping temporary server" in done.stderr  # Prefect's own stop ran: no server outlives the command
