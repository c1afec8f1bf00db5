"""TTFT as a queue at prefill, from what is measured rather than fitted: the prompt tokens
arriving per second and prefill's capacity at its share (the tokens it takes off its queue per
second of work, measured from the tokens queued and arrived and its busy time). It has the
semi-PD model's form, a / (x - c * rate), with each part measured at the current load, so it
holds the moment the load's mix shifts, where a fit over past windows mixes the loads before
and after. docs/architecture.md, "The partitioner", says why each part is as it is.
"""
import math
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from semipd.services.controller.load_signals import StepReport

HORIZON_S = 5.0        # capacity and arrivals are measured over the last this many seconds
MIN_SPAN_S = 1.0       # ...and not over less
MIN_BUSY = 0.05        # a prefill busy less than this fraction of the time tells little of its capacity
SCALE_WINDOWS = 5      # windows whose observed / modelled TTFT sets the model's scale (median)
# How far that scale goes: prompts of one length (deterministic service) wait half as long as
# an M/M/1 queue's; lengths spread wider than exponential, longer.
SCALE_RANGE = (0.5, 4.0)


@dataclass
class QueueModel:
    """TTFT's percentile at prefill share x as an M/M/1 queue's sojourn of a mean prompt, with
    prefill's capacity growing with x, scaled by what was observed."""
    share: int           # the prefill share `capacity` was measured at
    capacity: float      # prompt tokens per second of prefill's work at `share`
    arrivals: float      # prompt tokens arriving per second
    mean_prompt: float   # tokens
    z: float             # ln(100 / (100 - percentile)): the sojourn's percentile over its mean
    scale: float = 1.0   # observed / modelled, learnt from recent windows

    def predict(self, x: int) -> float:
        room = self.capacity * x / self.share - self.arrivals
        return self.scale * self.z * self.mean_prompt / room if room > 0 else math.inf


class Calibration:
    """The queue model's scale: the median of observed / modelled TTFT over the last
    SCALE_WINDOWS windows of finished requests where the queue was stable (a tick's percentile
    counts waits so far, lower bounds), and 1, the M/M/1 queue, the cautious end: one window, as
    likely as not seen while a queue still builds up after a shift, does not set it alone."""

    def __init__(self):
        self._ratios: deque[float] = deque(maxlen=SCALE_WINDOWS)

    def observe(self, model: QueueModel, x: int, observed: float) -> None:
        modelled = replace(model, scale=1.0).predict(x)
        if math.isfinite(modelled):
            self._ratios.append(observed / modelled)

    def scale(self) -> float:
        return min(max(float(np.median([1.0, *self._ratios])), SCALE_RANGE[0]), SCALE_RANGE[1])


class PrefillMeter:
    """Prefill's capacity at its current share: the prompt tokens it took off its queue per second
    (those that arrived less the growth of the queue, so an overload counts what was done) over
    the fraction of the time it was busy (its step reports' busy time over the time they cover).
    A measurement is kept with its share until the next one, so that a new share can be
    predicted from the last."""

    def __init__(self):
        self._samples: deque[tuple[float, int, int]] = deque()   # (time, queued, arrived) tokens
        self._reports: deque[StepReport] = deque()
        self.measured: tuple[int, float] | None = None           # (share, capacity)

    def restart(self) -> None:
        """The split changed: what was measured before is the old share's."""
        self._samples.clear()
        self._reports.clear()

    def sample(self, now: float, share: int, queued: int, arrived: int, report: StepReport | None) -> None:
        """The prompt tokens queued now and arrived so far; the prefill worker's last report."""
        self._samples.append((now, queued, arrived))
        while now - self._samples[1 if len(self._samples) > 1 else 0][0] >= HORIZON_S:
            self._samples.popleft()
        start = self._samples[0][0]
        if report is not None and report.received > start and \
                (not self._reports or report.received > self._reports[-1].received):
            self._reports.append(report)
        while self._reports and self._reports[0].received <= start:
            self._reports.popleft()
        (t0, q0, a0), (t1, q1, a1) = self._samples[0], self._samples[-1]
        busy, covered = sum(r.busy_s for r in self._reports), sum(r.span_s for r in self._reports)
        done = a1 - a0 + q0 - q1
        if t1 - t0 >= MIN_SPAN_S and covered >= MIN_SPAN_S and busy >= MIN_BUSY * covered and done > 0:
            self.measured = (share, done / (t1 - t0) / (busy / covered))
