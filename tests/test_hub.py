"""A hub id the hub cannot serve (no network, 404, 401): plan, estimate, validate and run fail in seconds with one
line naming the id and the fix, exit 2, before any Prefect server starts (rather than after ~30 s of retries)."""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cli(args, endpoint, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "PREFECT_HOME": str(tmp_path / "p")}
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "PREFECT_API_URL"):
        env.pop(key, None)
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    return done, time.monotonic() - began


def _refusing_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hub_answering():
    """A loopback HTTP server that answers every request with the status the test sets."""
    class Handler(http.server.BaseHTTPRequestHandler):
        status = 404

        def do_GET(self):
            self.send_response(Handler.status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "no"}')

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def at(status: int) -> str:
        Handler.status = status
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield at
    server.shutdown()


@pytest.mark.parametrize("command,key,hub_id", [
    ("plan", "dataset.name", "HuggingFaceFW/fineweb-edu"),
    ("estimate", "teacher.model", "Qwen/Qwen2.5-0.5B"),
    ("validate", "teacher.model", "Qwen/Qwen2.5-0.5B"),
    ("run", "teacher.model", "Qwen/Qwen2.5-0.5B"),
])
def test_unreachable_hub_is_one_line_with_the_fix(command, key, hub_id, tmp_path):
    done, seconds = _cli([command, "--profile", "testing"], f"http://127.0.0.1:{_refusing_port()}", tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"kd-cache {command}: {key}: cannot reach the Hugging Face Hub")
    assert repr(hub_id) in lines[0] and "HF_HUB_OFFLINE=1" in lines[0] and "local" in lines[0]
    assert seconds < 30  # datasets' and transformers' own retries took ~30 s; one question each takes < 1 s here
    assert not (tmp_path / "out").exists()  # nothing written (the profile's output.uri is ./out/testing)


@pytest.mark.parametrize("status,says", [(404, "was not found on the hub"), (401, "refused access (HTTP 401)")])
def test_hub_answering_404_or_401_is_one_line_with_the_fix(status, says, hub_answering, tmp_path):
    done, _ = _cli(["estimate", "--profile", "testing"], hub_answering(status), tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kd-cache estimate: teacher.model: 'Qwen/Qwen2.5-0.5B'"), lines
    assert says in lines[0] and ("HF_TOKEN" in lines[0] if status == 401 else "Fix the name" in lines[0])
