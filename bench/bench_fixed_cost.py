"""The fixed cost of `kd-cache run`: a 1-sample demo run against a trivial one-task Prefect flow, same PREFECT_HOME.

    python bench/bench_fixed_cost.py [--repeat 3] [--home DIR] [--baseline CHECKOUT]

Each repeat runs the trivial flow and the kd-cache run one after the other (so both see the same machine load),
in one PREFECT_HOME migrated first (as scripts/setup.sh does), with the same server start-up limit. A 1-sample run's teacher work is a fraction of a
second, so its wall time is its fixed cost. Prints per repeat: both wall times, their difference, and where the
run's time went (from its log's timestamps): before the server answered (imports, config checks, the server's
start-up, overlapped), flow-run creation, each task, and exit; then the import times of the heavy modules, each
in a fresh interpreter. --baseline runs another checkout's `kd-cache run` too, in the same repeats (its column).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRIVIAL = """
from prefect import flow, task

@task
def one():
    return 1

@flow
def trivial():
    return one()

trivial()
"""
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ ([\w.]+): (.*)$")


def timed(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[float, float, str]:
    """(start as epoch seconds, wall seconds, output) of a command that must succeed."""
    start = time.time()
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.time() - start
    if out.returncode:
        sys.exit(f"{cmd[:4]} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return start, wall, out.stdout + out.stderr


def phases(start: float, wall: float, log: str) -> list[tuple[str, float]]:
    """(phase, seconds) from the CLI's log: lines 'YYYY-mm-dd HH:MM:SS,mmm LEVEL logger: message'."""
    marks: list[tuple[str, float]] = [("start", start)]
    task = None
    for line in log.splitlines():
        m = STAMP.match(line)
        if not m:
            continue
        at = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        name, message = m[2], m[3]
        if "temporary Prefect server ready" in message:
            marks.append(("to server ready (imports, checks, server start-up overlapped)", at))
        elif "Beginning flow run" in message:
            marks.append(("flow run created", at))
        elif name == "prefect.task_runs" and "Finished in state" not in message and task is None:
            task = message.split(":")[0][:40]
        elif name == "prefect.task_runs" and "Finished in state" in message:
            marks.append((f"task: {task or '?'}", at))
            task = None
        elif name == "prefect.flow_runs" and "Finished in state" in message:
            marks.append(("flow end", at))
    marks.append(("exit (drain logs, stop server)", start + wall))
    return [(label, at - prev) for (_, prev), (label, at) in zip(marks, marks[1:])]


def import_seconds(module: str, env: dict[str, str]) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--home", help="PREFECT_HOME to use (default: a fresh temporary one)")
    parser.add_argument("--baseline", help="another checkout (e.g. an older commit's worktree) to time as well")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="kd-fixed-cost-")
    env = {**os.environ, "PREFECT_HOME": args.home or os.path.join(work, "prefect"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PYTHONPATH": str(ROOT),
           # The same start-up limit for both (Prefect's 20 s default fails on a busy machine).
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    env.pop("PREFECT_API_URL", None)
    trivial = [sys.executable, "-c", TRIVIAL]
    run = [sys.executable, "-m", "flows.cli", "run", "--profile", "demo", "dataset.max_samples=1", "run.num_shards=1"]
    print(f"PREFECT_HOME {env['PREFECT_HOME']}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    # As scripts/setup.sh does: the database migrated once; then one unmeasured flow registers the block types.
    timed([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env, work)
    timed(trivial, env, work)
    base_env = {**env, "PYTHONPATH": str(Path(args.baseline).resolve())} if args.baseline else None
    print("| repeat | trivial flow s | kd-cache run s | difference s |" + (" baseline run s |" if base_env else "")
          + "\n|---:|---:|---:|---:|" + ("---:|" if base_env else ""))
    breakdowns = []
    for i in range(args.repeat):
        _, t_wall, _ = timed(trivial, env, work)
        start, r_wall, log = timed([*run, f"output.uri={work}/out{i}"], env, work)
        breakdowns.append(phases(start, r_wall, log))
        row = f"| {i} | {t_wall:.1f} | {r_wall:.1f} | {r_wall - t_wall:+.1f} |"
        if base_env:
            row += f" {timed([*run, f'output.uri={work}/base{i}'], base_env, work)[1]:.1f} |"
        print(row, flush=True)
    print("\nkd-cache run, where the time went (mean over repeats)\n| phase | s |\n|---|---:|")
    for j, (label, _) in enumerate(breakdowns[0]):
        print(f"| {label} | {sum(b[j][1] for b in breakdowns if j < len(b)) / len(breakdowns):.1f} |")
    print("\nimport time in a fresh interpreter\n| module | s |\n|---|---:|")
    for module in ("prefect", "prefect.server.api.server", "torch", "transformers", "datasets",
                   "flows.build_teacher_cache", "flows.cli"):
        print(f"| {module} | {import_seconds(module, env):.1f} |", flush=True)


if __name__ == "__main__":
    main()
