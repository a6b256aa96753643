"""When the device ran each batch's forward, measured from outside the pipeline (bench_inference, bench_upload).

    with device_timeline(cuda=True) as timeline:
        ...run_teacher(...) or a shard run...
    busy, span, longest_gap = timeline.seconds()

It wraps kd_core.inference.Forward.__call__ (the teacher on one batch: body, head, top-k or draws) for the
duration of the block. On CUDA, timing events are recorded on the current (compute) stream before and after the
call, so the times are the GPU's own; elsewhere, perf_counter around the call (which runs synchronously).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from kd_core import inference


@dataclass
class DeviceTimeline:
    cuda: bool = False
    batches: list[tuple] = field(default_factory=list)  # (start, end): torch.cuda.Event pairs or perf_counter floats
    first_launch: float | None = None  # perf_counter when the first batch was queued (the device was idle then)

    def mark(self):
        if self.first_launch is None:
            self.first_launch = time.perf_counter()
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self) -> tuple[float, float, float]:
        """(busy: the sum of every batch's forward, span: from the first batch's start to the last one's end,
        longest gap between two batches), in seconds. On CUDA it waits for the events."""
        if not self.batches:
            return 0.0, 0.0, 0.0
        if self.cuda:
            self.batches[-1][1].synchronize()
            between = lambda a, b: a.elapsed_time(b) / 1e3  # noqa: E731 - ms between two recorded events
        else:
            between = lambda a, b: b - a  # noqa: E731
        busy = sum(between(s, e) for s, e in self.batches)
        span = between(self.batches[0][0], self.batches[-1][1])
        gaps = [between(a[1], b[0]) for a, b in zip(self.batches, self.batches[1:])]
        return busy, span, max(gaps, default=0.0)


@contextmanager
def device_timeline(cuda: bool):
    """A DeviceTimeline of every batch forwarded inside the block (any thread, any run_teacher call)."""
    timeline, original = DeviceTimeline(cuda=cuda), inference.Forward.__call__

    def timed(self, batch):
        start = timeline.mark()
        results = original(self, batch)
        timeline.batches.append((start, timeline.mark()))
        return results

    inference.Forward.__call__ = timed
    try:
        yield timeline
    finally:
        inference.Forward.__call__ = original
