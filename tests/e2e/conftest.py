"""A real Prefect deployment for the end-to-end tests, started once per session and torn down whatever happens.

`prefect server start` on a free loopback port (temporary PREFECT_HOME: its own SQLite database) with basic
auth on, the two process work pools, `prefect deploy --all` from this checkout's prefect.yaml, one cpu-pool worker
and two gpu-pool workers, all as separate processes in their own process groups, exactly as docs/DEPLOYMENT.md
tells a user to run them. Every process started here is killed at the end of the session, group and all (a
worker's flow-run subprocesses included), even when startup fails halfway.

`bare_stack` (per module, on SQLite and on PostgreSQL) is the same without gpu-pool workers, for tests that start
and kill their own; `postgres_url` is a throwaway PostgreSQL cluster from Debian's binaries on loopback.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
AUTH = "kd-cache:e2e-password"  # user:password, the server's PREFECT_SERVER_API_AUTH_STRING
STARTUP_SECONDS = 90


class RetryBusyTransport(httpx.HTTPTransport):
    """Retry 429/502/503 with backoff, as Prefect's own client does: a SQLite-backed server answers 503 while its
    database is locked by a concurrent write (workers, the parent's child runs), and a REST caller should retry."""

    RETRY_CODES = {429, 502, 503}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for delay in (0.5, 1, 2, 4, 8):
            response = super().handle_request(request)
            if response.status_code not in self.RETRY_CODES:
                return response
            response.close()
            time.sleep(delay)
        return super().handle_request(request)


@dataclass
class PrefectStack:
    api_url: str
    logs: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    client_env: dict[str, str] = field(default_factory=dict)
    database: str = "sqlite"

    def client(self, auth: tuple[str, str] | None = tuple(AUTH.split(":", 1))) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, auth=auth, timeout=30, transport=RetryBusyTransport())

    def log_tail(self, lines: int = 40) -> str:
        """The end of every process's log, for assertion messages."""
        return "\n".join(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                         for path in sorted(self.logs.glob("*.log")))

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        process = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own process group: killed with its children
        self.processes.append(process)
        return process

    def start_gpu_worker(self, gpu: int, name: str | None = None) -> subprocess.Popen:
        """A gpu-pool worker that runs one flow run at a time and sees only GPU `gpu`."""
        name = name or f"gpu-worker-{gpu}"
        return self.start(name, [PREFECT, "worker", "start", "--pool", "gpu-pool", "--type", "process",
                                 "--name", name, "--limit", "1"], {**self.client_env, "CUDA_VISIBLE_DEVICES": str(gpu)})

    def stop_all(self) -> None:
        for process in self.processes:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)  # the group may outlive its leader (flow-run subprocesses)
            process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(stack: PrefectStack, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.returncode}\n{stack.log_tail()}")
        try:
            if httpx.get(f"{stack.api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {STARTUP_SECONDS} s\n{stack.log_tail()}")


def _run(args: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


@contextlib.contextmanager
def running_stack(tmp_path_factory, *, gpu_workers: int = 2, database_url: str | None = None):
    """Server (SQLite in its PREFECT_HOME, or `database_url`), pools, deployments, a cpu-pool worker and
    `gpu_workers` gpu-pool workers; everything killed on exit."""
    home = tmp_path_factory.mktemp("prefect-home")
    logs = tmp_path_factory.mktemp("prefect-logs")
    stack = PrefectStack(api_url=f"http://127.0.0.1:{_free_port()}/api", logs=logs,
                         database="postgresql" if database_url else "sqlite")
    base = {
        **os.environ,  # tests/conftest.py has set the offline and no-telemetry variables
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    server_env = {
        **base,
        "PREFECT_SERVER_API_AUTH_STRING": AUTH,
        # No scheduler: the nightly deployment's cron must not start a real build during the tests.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        **({"PREFECT_API_DATABASE_CONNECTION_URL": database_url} if database_url else {}),
    }
    stack.client_env = {
        **base,
        "PREFECT_API_URL": stack.api_url,
        "PREFECT_API_AUTH_STRING": AUTH,
        "PREFECT_CLI_PROMPT": "false",
        "KD_CACHE_ROOT": str(REPO),  # the deployments' pull step: run the flows from this checkout
        # The deployment policy (docs/DEPLOYMENT.md): runs may read local files only under pytest's temporary
        # directory (the test teachers and corpora), and may not run a model repository's code.
        "KD_CACHE_ALLOWED_ROOTS": str(tmp_path_factory.getbasetemp()),
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # workers pick up runs within a second (default 10)
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
    }
    try:
        port = stack.api_url.split(":")[-1].split("/")[0]
        server = stack.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port], server_env)
        _wait_healthy(stack, server)
        for pool in ("cpu-pool", "gpu-pool"):
            _run([PREFECT, "work-pool", "create", pool, "--type", "process"], stack.client_env)
        _run([PREFECT, "--no-prompt", "deploy", "--all"], stack.client_env)
        stack.start("worker-cpu", [PREFECT, "worker", "start", "--pool", "cpu-pool", "--type", "process",
                                   "--name", "cpu-worker"], stack.client_env)
        for gpu in range(gpu_workers):  # one worker per GPU, each seeing only its own
            stack.start_gpu_worker(gpu)
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory) -> PrefectStack:
    with running_stack(tmp_path_factory) as stack:
        yield stack


def _postgres_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        pytest.fail("PostgreSQL is not installed: .ci/run installs Debian's postgresql package "
                    "(apt-get install postgresql)")
    return str(found[-1])


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A throwaway PostgreSQL cluster on loopback (Debian's postgresql binaries), removed at the end.

    initdb refuses to run as root, so as root the cluster belongs to the `postgres` user (runuser)."""
    root = Path(tempfile.mkdtemp(prefix="kd-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    try:
        subprocess.run([*as_user, _postgres_bin("initdb"), "-D", str(data), "-U", "prefect", "--auth=trust"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, _postgres_bin("pg_ctl"), "-D", str(data), "-l", str(root / "pg.log"), "-w", "-o",
                        f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c max_connections=200", "start"],
                       check=True, capture_output=True, timeout=120)
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, _postgres_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def bare_stack(request, tmp_path_factory) -> PrefectStack:
    """A server on SQLite or PostgreSQL with the deployments and a cpu-pool worker, and no gpu-pool worker: the
    tests start (and kill) the ones they need."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    with running_stack(tmp_path_factory, gpu_workers=0, database_url=url) as stack:
        yield stack
