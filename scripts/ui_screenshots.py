"""Drive the real Prefect UI's run form with headless Chromium and save screenshots. Not part of CI.

    apt-get install chromium                 # the Debian package; Playwright drives it, it downloads no browser
    python3 -m venv /tmp/ui && /tmp/ui/bin/pip install playwright httpx
    /tmp/ui/bin/python scripts/ui_screenshots.py [--out ui-screenshots] [--chromium /usr/bin/chromium]

What it does, as a person would: starts `prefect server start` (UI on, basic auth on, a temporary PREFECT_HOME),
creates the two process work pools, `prefect deploy --all` from this checkout, one cpu-pool and one gpu-pool
worker without GPUs (docs/DEPLOYMENT.md's one-machine CPU path). Then in the browser: logs in through the UI's
front page, opens build-teacher-cache/default, Run -> Custom run, leaves `profile` as the deployment has it
(demo), adds two overrides, submits, waits for the run, and opens its artifacts. Every step is a PNG under
--out. Last, it reads the run's parameters back over REST and prints them, so you can see what the form sent.

The Prefect commands come from this checkout's .venv (so run ./scripts/setup.sh first); Playwright may live in
any other environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

REPO = Path(__file__).resolve().parent.parent
PREFECT = str(REPO / ".venv" / "bin" / "prefect")
AUTH = "admin:ui-screenshots"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """The server, the pools, the deployments and two workers, all killed (process groups) at the end."""

    def __init__(self, home: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs = home / "logs"
        self.logs.mkdir(parents=True)
        self.processes: list[subprocess.Popen] = []
        base = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        self.server_env = {**base, "PREFECT_SERVER_API_AUTH_STRING": AUTH, "PREFECT_UI_ENABLED": "true",
                           "PREFECT_UI_API_URL": f"{self.url}/api",  # the UI calls 4200 otherwise
                           "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}  # no 02:00 nightly build here
        self.client_env = {**base, "PREFECT_API_URL": f"{self.url}/api", "PREFECT_API_AUTH_STRING": AUTH,
                           "KD_CACHE_ROOT": str(REPO), "PREFECT_WORKER_QUERY_SECONDS": "2"}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = open(self.logs / f"{name}.log", "w")
        self.processes.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def run(self, args: list[str]) -> None:
        subprocess.run(args, cwd=REPO, env=self.client_env, check=True, capture_output=True, timeout=180)

    def up(self) -> None:
        self.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                   self.server_env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        for pool in ("cpu-pool", "gpu-pool"):
            self.run([PREFECT, "work-pool", "create", pool, "--type", "process"])
        self.run([PREFECT, "--no-prompt", "deploy", "--all"])
        self.start("worker-cpu", [PREFECT, "worker", "start", "--pool", "cpu-pool", "--type", "process"],
                   self.client_env)
        self.start("worker-gpu", [PREFECT, "worker", "start", "--pool", "gpu-pool", "--type", "process",
                                  "--limit", "1"], self.client_env)

    def down(self) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=f"{self.url}/api", auth=tuple(AUTH.split(":", 1)), timeout=30)


def shot(page: Page, out: Path, name: str) -> None:
    page.wait_for_timeout(1500)  # let the UI settle (it fetches after navigation)
    page.screenshot(path=str(out / f"{name}.png"), full_page=True)
    print(f"  {out / name}.png  ({page.url})")


def drive(page: Page, stack: Stack, out: Path, output_uri: str, fail: bool = False) -> str:
    page.goto(stack.url)
    page.wait_for_selector("input[type=password]", timeout=60_000)
    shot(page, out, "01-login")
    page.fill("input[type=password]", AUTH)
    page.keyboard.press("Enter")
    page.wait_for_timeout(3000)
    shot(page, out, "02-after-login")

    page.goto(f"{stack.url}/deployments")
    page.get_by_text("default", exact=True).first.click()
    page.wait_for_timeout(2000)
    shot(page, out, "03-deployment")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").first.click()
    page.wait_for_timeout(2000)
    shot(page, out, "04-custom-run-form")

    # The overrides field opens on a text box (its default is an empty line): the overrides typed as one line, as on
    # the command line. --fail: a run the guard refuses (streaming with no max_samples), to see its run page.
    line = "dataset.max_samples=" + ("null" if fail else "20") + f" output.uri={output_uri}"
    page.locator("textarea").last.fill(line)
    shot(page, out, "05-form-filled")
    page.get_by_role("button", name="Submit").last.click()
    page.wait_for_timeout(3000)  # the UI goes back to the deployment's page, the new run listed
    shot(page, out, "06-run-submitted")
    with stack.api() as api:  # the newest run of the deployment: the one just submitted
        runs = api.post("/flow_runs/filter", json={"sort": "EXPECTED_START_TIME_DESC", "limit": 1}).json()
    run_id = runs[0]["id"]
    page.goto(f"{stack.url}/runs/flow-run/{run_id}")

    with stack.api() as api:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            run = api.get(f"/flow_runs/{run_id}").json()
            if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(3)
    page.reload()
    shot(page, out, "07-run-finished")
    page.get_by_text("Artifacts").first.click()
    shot(page, out, "08-run-artifacts")
    return run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("ui-screenshots"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--fail", action="store_true", help="submit a run the max_samples guard refuses")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="kd-cache-ui-"))
    stack = Stack(home / "prefect")
    try:
        print(f"starting Prefect (UI {stack.url}, logs {stack.logs})")
        stack.up()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            try:
                run_id = drive(page, stack, args.out, str(home / "out"), fail=args.fail)
            except Exception:
                shot(page, args.out, "99-failure")
                raise
            finally:
                browser.close()
        with stack.api() as api:
            run = api.get(f"/flow_runs/{run_id}").json()
        print(f"flow run {run['name']}: {run['state_type']} {run['state'].get('message') or ''}")
        print("parameters the form sent:", json.dumps(run["parameters"]))
    finally:
        stack.down()


if __name__ == "__main__":
    main()
