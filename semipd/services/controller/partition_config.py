"""What the partitioner is configured with (PartitionConfig) and what each of its decisions
records (Decision: the inputs, the predictions, the split chosen and why), as logged and kept in
`semipd stats` -> partition.decisions."""
import math
from dataclasses import asdict, dataclass

from semipd.services.controller.latency_model import Fit
from semipd.services.controller.queue_model import QueueModel
from semipd.shared.errors import UserError


@dataclass
class PartitionConfig:
    ttft_slo: float          # seconds
    tpot_slo: float          # seconds
    percentile: float = 90.0
    window: int = 50         # finished requests per decision, at the latest
    interval: float = 2.0    # seconds a decision on the load signals waits for, at the least
    step: int = 10           # SM percent per step; shares are multiples of it
    max_steps: int | None = None  # most steps one decision moves (None: as far as the prediction says)
    min_share: int = 10      # least SM percent either phase keeps
    max_total: int = 200     # most that x + y may add up to (over 100: overlapping quotas)

    def __post_init__(self):
        if not (self.ttft_slo > 0 and self.tpot_slo > 0):
            raise UserError("the TTFT and TPOT SLOs must be positive")
        if not 0 < self.percentile <= 100:
            raise UserError(f"the SLO percentile must be in (0, 100], got {self.percentile:g}")
        if self.window < 2 or (self.max_steps is not None and self.max_steps < 1) or not self.interval > 0:
            raise UserError("the window needs at least 2 requests, max_steps at least 1 and the "
                            "decision interval more than 0 s")
        if not (0 < self.step <= self.min_share <= 100 and self.min_share % self.step == 0):
            raise UserError(f"min_share ({self.min_share}) must be a multiple of step "
                            f"({self.step}) in (0, 100]")
        if 100 % self.step:  # a raise to the top must land on the grid
            raise UserError(f"the SM step (--sm-step, {self.step}) must divide 100")
        if not 2 * self.min_share <= self.max_total <= 200:
            raise UserError(f"max_total must be in [{2 * self.min_share}, 200], got {self.max_total}")

    def raised(self, split: tuple[int, int], i: int, share: int) -> tuple[int, int] | None:
        """The split with phase i raised to `share`: what passes 100 comes off the other phase,
        which is also lowered as far as max_total needs (None: below min_share)."""
        top = min(share, 100)
        other = min(split[1 - i] - (share - top), self.max_total - top)
        if other < self.min_share:
            return None
        return (top, other) if i == 0 else (other, top)


def overlap(split: tuple[int, int]) -> int:
    """SM percent both phases' caps cover (negative: none, with that much to spare)."""
    return sum(split) - 100


@dataclass
class Decision:
    """One decision: its inputs, the predictions, the chosen split and why."""
    time: float                      # the caller's clock when it was taken
    trigger: str                     # window: `window` requests finished; tick: the load signals
    requests: int                    # requests judged
    percentile: float
    rate: float                      # arrivals per second (inf: all arrived at once)
    prompt_rate: float               # their prompt tokens per second
    ttft_s: float | None             # the TTFT percentile (on a tick, waits so far count)
    tpot_s: float | None             # None: too few requests to tell (on a tick)
    prefill_sm: int                  # the split the requests ran under
    decode_sm: int
    ttft_fit: Fit | None
    tpot_fit: Fit | None
    ttft_queue: QueueModel | None    # the queue at prefill, once its capacity is measured
    ttft_model: str | None           # which predicted TTFT: queue, fit or None
    tpot_model: str | None           # which predicted TPOT: fit, scaled or None
    next_prefill_sm: int             # the split chosen
    next_decode_sm: int
    predicted_ttft_s: float | None   # the predictions at the chosen split
    predicted_tpot_s: float | None
    action: str                      # hold, stuck, raise_/give_to_ + prefill/decode
    reason: str

    def to_dict(self) -> dict:
        """JSON-safe: infinities (no rate, or a queue the model says never drains) become None."""
        def clean(v):
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return clean(asdict(self))
