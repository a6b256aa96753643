"""teacher-inference: one shard in this process (a local run's shards, and the shard of a
teacher-inference-shard flow run on a GPU worker; the deployed fan-out itself is flows/fan_out.py)."""

import contextlib
import logging
import sys
import time

from prefect import get_run_logger, task
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from kd_core.build import Build
from kd_core.data import ShardSpec
from kd_core.errors import KDCacheError
from kd_core.records import ShardRecord
from kd_core.shard import run_shard
from tasks import user_errors

LOG_EVERY_SECONDS = 30


def _not_a_user_error(task, task_run, state) -> bool:
    """Retry crashes and flaky I/O, not config errors: those fail the same way every time."""
    try:
        state.result()
    except KDCacheError:
        return False
    except Exception:
        return True
    return False


@task(name="teacher-inference", retries=2, retry_delay_seconds=10, retry_condition_fn=_not_a_user_error)
@user_errors
def teacher_inference(build: Build, shard: ShardSpec) -> ShardRecord:
    """Run the teacher over one shard in this process, with one progress display."""
    logger = get_run_logger()
    display = ShardDisplay(shard, logger)
    try:
        with display.logs_above_the_bar():
            record = run_shard(build, shard, display.update)
    finally:
        display.close()
    logger.info("%s done: %s samples, %s tokens in %.1f s", shard.name, f"{record.num_samples:,}",
                f"{record.num_tokens:,}", record.seconds)
    return record


class ShardDisplay:
    """One shard's progress: a bar on a terminal (samples, tokens/s, ETA) with log lines printed above it, never
    through it; a log line every LOG_EVERY_SECONDS in any case (the Prefect UI's logs, non-terminal output).

    It starts at the shard's first batch, once the data and the teacher are loaded, so the rate and the ETA
    measure the teacher, not the loading."""

    def __init__(self, shard: ShardSpec, logger):
        self.shard, self.logger, self.bar = shard, logger, None
        self.on_terminal = sys.stderr.isatty()

    def update(self, stats) -> None:
        done, now = stats.samples + stats.skipped_empty, time.monotonic()
        if self.bar is None:  # the first batch: count from here
            self.first, self.first_tokens, self.started, self.last_log = done, stats.tokens, now, now
            self.bar = tqdm(total=self.shard.num_samples, initial=done, desc=self.shard.name, unit=" samples",
                            dynamic_ncols=True, disable=not self.on_terminal)
        elapsed = max(now - self.started, 1e-9)
        tokens_per_second = (stats.tokens - self.first_tokens) / elapsed
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix_str(f"{tokens_per_second:,.0f} tokens/s", refresh=False)
        if now - self.last_log >= LOG_EVERY_SECONDS:
            self.last_log = now
            rate = (done - self.first) / elapsed
            eta = f"{(self.shard.num_samples - done) / rate:,.0f} s left" if rate > 0 else "ETA unknown"
            self.logger.info("%s: %s/%s samples, %s tokens, %s tokens/s, %s", self.shard.name, f"{done:,}",
                             f"{self.shard.num_samples:,}", f"{stats.tokens:,}", f"{tokens_per_second:,.0f}", eta)

    def logs_above_the_bar(self):
        """On a terminal, console log handlers write through tqdm (above the bar); elsewhere nothing changes."""
        if not self.on_terminal:
            return contextlib.nullcontext()
        return logging_redirect_tqdm(loggers=[logging.root, logging.getLogger("prefect")])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
