"""The load signals the partitioner reads between its decisions, gathered from the controller's
state: what is known of the requests in flight before they finish (the first tokens out, the
waits of those still waiting for one, the gaps between the tokens streamed so far) and the
prefill worker's last step report (how busy it was). A finished request tells its latencies
seconds after the load that made them; these tell them as they happen."""
from collections.abc import Iterable
from dataclasses import dataclass

from semipd.services.controller.requests import Request
from semipd.shared.protocol import StepTimes

# A TPOT over fewer gaps is mostly the first one, the hand-off to decode and the wait for a place
# in its batch, which a finished request spreads over all its tokens.
MIN_GAPS = 4


@dataclass
class StepReport:
    """A worker's last StepTimes: busy_s of work within span_s, received at `received`."""
    busy_s: float
    span_s: float
    received: float


@dataclass
class Started:
    """A request past its first token."""
    arrival: float
    ttft_s: float
    tpot_s: float | None   # the mean gap so far; None before MIN_GAPS gaps


@dataclass
class LoadSignals:
    now: float
    waiting: list[tuple[float, int]]   # (arrival, prompt tokens) of each request awaiting its first token
    started: list[Started]
    prefill: StepReport | None         # None before the prefill worker's first report


def gather(requests: Iterable[Request], prefill_steps: tuple[StepTimes, float] | None, now: float) -> LoadSignals:
    """The signals from the request table's values and the prefill worker's last StepTimes with
    the time it came (WorkerHandle.step_times), on the clock of Request.arrival."""
    waiting, started = [], []
    for req in requests:
        times = req.token_times
        if not times:
            waiting.append((req.arrival, len(req.prompt_ids)))
            continue
        gaps = len(times) - 1
        started.append(Started(req.arrival, times[0] - req.arrival,
                               (times[-1] - times[0]) / gaps if gaps >= MIN_GAPS else None))
    report = None
    if prefill_steps is not None:
        steps, received = prefill_steps
        report = StepReport(steps.busy_s, steps.span_s, received)
    return LoadSignals(now, waiting, started, report)
