"""The semi-PD partitioner: picks the SM split, x = prefill % and y = decode %, that keeps the
TTFT and TPOT percentiles within their SLOs. Pure logic: the controller feeds it every arrival
and each finished request, and applies the splits it returns.

Rule (semi-PD, arXiv 2504.19867), every `window` finished requests: if the window's TTFT
percentile misses its SLO, raise x by the fewest of 1 to `max_steps` steps that the latency model
(latency_model.py) predicts meet it (one step without a usable model); else if TPOT misses, the
same for y. TTFT goes first; if x cannot rise, y may. A raise past 100, or past what `max_total`
leaves, lowers the other share. When both are met and one phase is below GIVE_BACK of its SLO
while the other is not, the comfortable phase gives the other a step, unless its model predicts
it would then pass GIVE_BACK of its SLO or the step deepens the overlap of the two caps.
Otherwise the split holds.

Evidence keeps the moves from cycling: a miss at a share bans that split and every lower share
of that phase while that phase's load (prompt tokens per second for prefill, requests per
second for decode) stays within `tolerance` of the load it was seen at, and a
give-back never re-enters a visited split. A miss with no allowed move holds the split
("stuck"). docs/architecture.md, "The partitioner", says why each part is as it is.
"""
import bisect
import math
from collections import deque

import numpy as np

from semipd.services.controller.evidence import LOAD_WINDOWS, Evidence
from semipd.services.controller.latency_model import Fit, fit_latency
from semipd.services.controller.partition_config import Decision, PartitionConfig
from semipd.shared.errors import UserError

GIVE_BACK = 0.5        # a phase below this fraction of its SLO may give a step to the other
FIT_WINDOWS = 16       # recent windows the model is fitted over
MAX_ARRIVALS = 1 << 16  # arrival times kept for measuring the rate
OVERLOADED = 10        # a window with TTFT over this many SLOs had a growing queue: not fitted
PHASES = ("prefill", "decode")
METRICS = ("TTFT", "TPOT")


class Partitioner:
    def __init__(self, config: PartitionConfig, prefill_sm: int, decode_sm: int):
        self.config = config
        self._slos = (config.ttft_slo, config.tpot_slo)
        self.check((prefill_sm, decode_sm))
        self.split = (prefill_sm, decode_sm)
        self._window: list[tuple[float, float, float | None]] = []  # (arrived, TTFT, TPOT)
        self._arrivals: list[float] = []                             # every arrival, in order
        self._prompts: list[int] = []                                # ...and its prompt tokens
        self._settled_at = -math.inf
        self._points: deque[tuple] = deque(maxlen=FIT_WINDOWS)
        self.evidence = Evidence(config.window)

    def check(self, split: tuple[int, int]) -> None:
        cfg = self.config
        if sum(split) > cfg.max_total or not all(cfg.min_share <= s <= 100 and s % cfg.step == 0
                                                 for s in split):
            raise UserError(f"split {split} needs multiples of {cfg.step} in [{cfg.min_share}, 100] "
                            f"adding up to at most {cfg.max_total}")

    def switched(self, prefill_sm: int, decode_sm: int, now: float) -> None:
        """The split in effect from `now` (call once the workers have switched, or failed to):
        requests that arrived earlier ran partly under the old split and are left out."""
        self.check((prefill_sm, decode_sm))
        self.split, self._settled_at = (prefill_sm, decode_sm), now
        self._window.clear()

    def arrived(self, arrived_s: float, prompt_tokens: int) -> None:
        """A request arrived (times on the clock observe() is given, in increasing order)."""
        self._arrivals.append(arrived_s)
        self._prompts.append(prompt_tokens)
        if len(self._arrivals) > MAX_ARRIVALS:
            del self._arrivals[:MAX_ARRIVALS // 2], self._prompts[:MAX_ARRIVALS // 2]

    def observe(self, arrived_s: float, ttft_s: float, tpot_s: float | None, now: float) -> Decision | None:
        """One finished request (times on one clock); every `window`th counted one returns the
        Decision, whose next split the partitioner assumes in effect from `now`."""
        if arrived_s < self._settled_at:
            return None
        self._window.append((arrived_s, ttft_s, tpot_s))
        if len(self._window) < self.config.window:
            return None
        decision = self._decide(now)
        self._window.clear()
        if (decision.next_prefill_sm, decision.next_decode_sm) != self.split:
            self.switched(decision.next_prefill_sm, decision.next_decode_sm, now)
        return decision

    def _decide(self, now: float) -> Decision:
        cfg, here = self.config, self.split
        # The load the window's requests met: every arrival within the middle 80% of their
        # arrival times (a long request that arrived long before would stretch the span).
        lo, hi = np.percentile([a for a, _, _ in self._window], (10, 90))
        first, end = bisect.bisect_left(self._arrivals, lo), bisect.bisect_right(self._arrivals, hi)
        count = end - first
        rate = (count - 1) / (hi - lo) if hi > lo and count > 1 else math.inf
        prompt_rate = rate * float(np.mean(self._prompts[first:end])) if count else math.inf
        tpots = [t for _, _, t in self._window if t is not None]
        observed = (float(np.percentile([t for _, t, _ in self._window], cfg.percentile)),
                    float(np.percentile(tpots, cfg.percentile)) if tpots else None)
        missed = [i for i in (0, 1) if observed[i] is not None and observed[i] > self._slos[i]]
        self.evidence.record(here, missed, (prompt_rate, rate), self._prompt_cv())
        self._points.append((*here, rate, *observed))
        stable = [p for p in self._points if p[3] <= OVERLOADED * cfg.ttft_slo]
        timed = [p for p in self._points if p[4] is not None]
        fits = (fit_latency([p[0] for p in stable], [p[2] for p in stable], [p[3] for p in stable], True),
                fit_latency([p[1] for p in timed], [p[2] for p in timed], [p[4] for p in timed], False))
        usable = [f if f and f.usable else None for f in fits]
        target, action, reason = self._choose(observed, missed, rate, usable)
        predicted = [f.predict(target[i], rate) if f else None for i, f in enumerate(usable)]
        return Decision(now, len(self._window), cfg.percentile, rate, prompt_rate, *observed, *here, *fits, *target,
                        *predicted, action, reason)

    def _prompt_cv(self) -> float:
        """The spread (std / mean) of the prompt lengths of the arrivals the load median counts."""
        recent = np.asarray(self._prompts[-round(0.8 * self.config.window * LOAD_WINDOWS):], dtype=float)
        return float(recent.std() / recent.mean()) if len(recent) > 1 and recent.mean() > 0 else 0.0

    def _choose(self, observed, missed: list[int], rate: float, fits) -> tuple[tuple[int, int], str, str]:
        slos = self._slos

        def said(i, verdict):
            return f"P{self.config.percentile:g} {METRICS[i]} {observed[i]:.4g} s {verdict} SLO {slos[i]:g} s"
        for i in missed:  # TTFT first
            target = self._raise(i, rate, fits[i], slos[i])
            if target is not None:
                return target, f"raise_{PHASES[i]}", said(i, ">")
        if missed:
            return self.split, "stuck", " and ".join(said(i, ">") for i in missed) + \
                ": no allowed split raises " + " or ".join(PHASES[i] for i in missed)
        if observed[1] is not None:
            ratios = (observed[0] / slos[0], observed[1] / slos[1])
            for giver, taker in ((0, 1), (1, 0)):
                target = self._give(giver, rate, fits[giver], slos[giver]) \
                    if ratios[giver] < GIVE_BACK <= ratios[taker] else None
                if target is not None:
                    return target, f"give_to_{PHASES[taker]}", f"{said(giver, '<=')} " \
                        f"({ratios[giver]:.0%}), {METRICS[taker]} at {ratios[taker]:.0%} of its SLO"
        return self.split, "hold", " and ".join(said(i, "<=") for i in (0, 1) if observed[i] is not None)

    def _raise(self, i: int, rate: float, fit: Fit | None, slo: float) -> tuple[int, int] | None:
        """Phase i up by the fewest of 1..max_steps steps the model says meet its SLO."""
        cfg, allowed = self.config, []
        for k in range(1, cfg.max_steps + 1):
            target = self._with(i, self.split[i] + k * cfg.step)
            if target is None:
                break
            # The model sees phase i's share only: a step past 100, which comes off the other
            # phase, changes nothing it can predict, so it never justifies one.
            if self.evidence.allows(self.split, target, fresh=False) and (not allowed or allowed[-1][i] < target[i]):
                allowed.append(target)
        if not allowed or fit is None:
            return allowed[0] if allowed else None
        return next((t for t in allowed if fit.predict(t[i], rate) <= slo), allowed[-1])

    def _give(self, giver: int, rate: float, fit: Fit | None, slo: float) -> tuple[int, int] | None:
        """One step to the other phase; from the giver where the taker holds 100 or max_total
        requires. None where it would deepen the overlap of the caps."""
        taker = 1 - giver
        target = self._with(taker, self.split[taker] + self.config.step)
        if (target is None or _overlap(target) > max(_overlap(self.split), 0)
                or not self.evidence.allows(self.split, target, fresh=True)):
            return None
        return None if fit and fit.predict(target[giver], rate) > GIVE_BACK * slo else target

    def _with(self, i: int, share: int) -> tuple[int, int] | None:
        """The split with phase i raised to `share`: what passes 100 comes off the other phase,
        which is also lowered as far as max_total needs."""
        raised = min(share, 100)
        other = min(self.split[1 - i] - (share - raised), self.config.max_total - raised)
        if other < self.config.min_share:
            return None
        return (raised, other) if i == 0 else (other, raised)


def _overlap(split: tuple[int, int]) -> int:
    """SM percent both phases' caps cover (negative: none, with that much to spare)."""
    return sum(split) - 100
