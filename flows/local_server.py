"""The temporary Prefect server of a local `kd-cache run` (no PREFECT_API_URL set): started once, early, stopped at exit.

Prefect's own ephemeral server (prefect.server.api.server.SubprocessASGIServer) imports the whole server
application into the calling process first (8 s of a 2-core machine's time, measured in docs/PERFORMANCE.md),
waits at most 20 s for it to answer (a first start migrating a fresh database can take longer on a busy machine),
and when that runs out the flow starts a second one. Here the same server command starts as a subprocess before
anything heavy is imported, so its start-up overlaps the config checks and the imports of the flow, and the flow
talks to it through PREFECT_API_URL: nothing can start a second one. A server that does not answer in time is one
line with the fix.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from kd_core.errors import KDCacheError

log = logging.getLogger("kd_cache.server")

# Prefect's own setting for its temporary server's start-up limit, read from the environment; our default is
# longer than Prefect's 20 s: a first start migrates a fresh database (25 s measured on a loaded 2-core machine).
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT_S = 120.0

# What Prefect's SubprocessASGIServer sets for its server: no UI, the services of an ephemeral server only.
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


class TemporaryServer:
    """A Prefect API server on a free loopback port, in a subprocess that dies with this process."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self._log = tempfile.TemporaryFile()  # its output, quoted when it fails to start
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env={**env, **_SERVER_ENV}, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self.started = time.monotonic()
        self.ready_after: float | None = None  # seconds from start to its first healthy answer
        log.info("temporary Prefect server starting at %s (pid %d)", self.api_url, self.process.pid)
        atexit.register(self.stop)

    def wait_ready(self) -> None:
        """Return once the server answers /health; KDCacheError (one line, with the fix) if it does not in time."""
        import httpx

        if self.ready_after is not None:
            return
        limit = float(os.environ.get(STARTUP_TIMEOUT_ENV) or DEFAULT_STARTUP_TIMEOUT_S)
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() - self.started < limit and self.process.poll() is None:
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        self.ready_after = time.monotonic() - self.started
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        code = self.process.poll()
        last = self._last_line()
        self.stop()
        why = (f"exited with code {code}" + (f" ({last})" if last else "")) if code is not None else \
            f"did not answer within {limit:.0f} s"
        raise KDCacheError(
            f"the temporary Prefect server {why}. Fix: run the same command again (a first start migrates the "
            f"database under PREFECT_HOME and later starts are quicker), raise {STARTUP_TIMEOUT_ENV} (now "
            f"{limit:.0f}), or start a server once (`prefect server start`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api so runs use it.")

    def stop(self) -> None:
        """SIGTERM, without waiting for the server's graceful shutdown (seconds): it finishes on its own."""
        if self.process.poll() is None:
            self.process.terminate()
            log.info("temporary Prefect server stopped (pid %d)", self.process.pid)
        self._log.close()

    def _last_line(self) -> str:
        self._log.seek(0)
        lines = [line.strip() for line in self._log.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1][:300] if lines else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, even by SIGKILL (no server left running)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
