"""The semi-PD partitioner: picks the SM split, x = prefill % and y = decode %, that keeps the
TTFT and TPOT percentiles within their SLOs. Pure logic: the controller feeds it every arrival,
each finished request and, about every TICK_S, the load signals (load_signals.py); it applies
the splits that come back.

A decision judges the requests that arrived since the last one: once `window` of them have
finished, or sooner, on a tick (`interval` seconds and 0.8 * `window` arrivals in), if those in
flight already show a miss, or the queue at prefill foresees one. A miss raises its phase
(TTFT first) by the fewest steps predicted to bring it under AIM of its SLO; a comfortable
phase may give a step to the other; else the split holds. Evidence (evidence.py) keeps the moves
from cycling; a miss with no allowed move holds the split ("stuck"). docs/architecture.md,
"The partitioner", gives the rule in full and says why each part is as it is.
"""
import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from semipd.services.controller.evidence import LOAD_WINDOWS, Evidence
from semipd.services.controller.latency_model import fit_latency
from semipd.services.controller.load_signals import LoadSignals
from semipd.services.controller.partition_config import Decision, PartitionConfig, overlap
from semipd.services.controller.queue_model import HORIZON_S, SCALE_RANGE, Calibration, PrefillMeter, QueueModel
from semipd.shared.errors import UserError

GIVE_BACK = 0.5        # a phase below this fraction of its SLO may give a step to the other
AIM = 0.8              # a raise aims this far under the SLO: one landing at it misses on noise
TICK_S = 0.25          # least time between two load samples (gathering them walks the request table)
FIT_WINDOWS = 16       # recent windows the model is fitted over
MAX_ARRIVALS = 1 << 16  # arrival times kept for measuring the rate
OVERLOADED = 10        # a window with TTFT over this many SLOs had a growing queue: not fitted
PHASES = ("prefill", "decode")
METRICS = ("TTFT", "TPOT")


@dataclass
class Predictor:
    """A phase's latency percentile at a share of that phase, and what predicts it."""
    name: str                      # queue, fit or scaled
    at: Callable[[int], float]


class Partitioner:
    def __init__(self, config: PartitionConfig, prefill_sm: int, decode_sm: int):
        self.config = config
        self._slos = (config.ttft_slo, config.tpot_slo)
        self.check((prefill_sm, decode_sm))
        self.split = (prefill_sm, decode_sm)
        self._window: list[tuple[float, float, float | None]] = []  # (arrived, TTFT, TPOT)
        self._arrivals: list[float] = []                             # every arrival, in order
        self._prompts: list[int] = []                                # ...and its prompt tokens
        self._arrived_tokens = 0                                     # prompt tokens ever arrived
        self._settled_at = -math.inf
        self._opened_at: float | None = None   # the last decision or switch: a tick judges arrivals since
        self._cleared = True                    # whether the prompts queued before the switch have started
        self._last_tick = -math.inf
        self._meter = PrefillMeter()
        self._calibration = Calibration()
        self._points: deque[tuple] = deque(maxlen=FIT_WINDOWS)
        self.evidence = Evidence(config.window)
        self._enough = math.ceil(0.8 * config.window)  # arrivals a tick decision needs: a window's rate counts as many
        self._highest = prefill_sm       # the highest prefill share held so far

    def prime_split(self) -> tuple[int, int] | None:
        """The split the next raise of prefill is likely to ask for, whose new shares are worth
        priming workers at: prefill at the highest share a raise has taken it to (a load of long
        prompts seen before will ask for it again), else at the top of its range; once there, a
        step off decode's cap, which a raise then takes (None: decode is at its least)."""
        here = self.split
        top = (self._highest if self._highest > here[0] else 100) if here[0] < 100 else 100 + self.config.step
        return self.config.raised(here, 0, top)

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
        self._highest = max(self._highest, prefill_sm)
        self.split, self._settled_at, self._opened_at, self._cleared = (prefill_sm, decode_sm), now, now, False
        self._window.clear()
        self._meter.restart()

    def arrived(self, arrived_s: float, prompt_tokens: int) -> None:
        """A request arrived (times on the clock observe() is given, in increasing order)."""
        self._arrivals.append(arrived_s)
        self._prompts.append(prompt_tokens)
        self._arrived_tokens += prompt_tokens
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
        cfg = self.config
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
        queue = self._queue_model(now)
        if queue is not None and 0 < rate < math.inf:  # at the load the window's requests met
            met = replace(queue, arrivals=prompt_rate, mean_prompt=prompt_rate / rate)
            self._calibration.observe(met, self.split[0], observed[0])
            queue = replace(queue, scale=self._calibration.scale())
        fits, predictors = self._predict(rate, observed, queue)
        return self._decide(now, "window", len(self._window), rate, prompt_rate, observed, fits, queue, predictors)

    def due(self, now: float) -> bool:
        """Whether to gather the load signals for tick() now."""
        return now - self._last_tick >= TICK_S

    def tick(self, signals: LoadSignals) -> Decision | None:
        """The load signals now; a Decision if the requests that arrived since the last decision
        already show a miss (the split it chose is assumed in effect from now)."""
        cfg, now = self.config, signals.now
        self._last_tick = now
        queued = sum(tokens for _, tokens in signals.waiting)
        self._meter.sample(now, self.split[0], queued, self._arrived_tokens, signals.prefill)
        if self._opened_at is None:
            self._opened_at = now
        if not self._cleared and all(arrival >= self._settled_at for arrival, _ in signals.waiting):
            # Requests that came while prompts of the split before still waited, waited behind
            # them: left out as those that came before the switch are.
            self._cleared, self._settled_at = True, now
            self._window = [w for w in self._window if w[0] >= now]
        start = self._opened_at
        first = bisect.bisect_left(self._arrivals, start)
        if now - start < cfg.interval or len(self._arrivals) - first < self._enough:
            return None
        # Waits so far are TTFTs' lower bounds: a percentile over them can only grow.
        since = max(start, self._settled_at if self._cleared else math.inf)
        ttfts = [s.ttft_s for s in signals.started if s.arrival >= since] + \
            [now - arrival for arrival, _ in signals.waiting if arrival >= since]
        tpots = [s.tpot_s for s in signals.started if s.arrival >= start and s.tpot_s is not None]
        for arrival, ttft, tpot in self._window:  # finished since
            ttfts += [ttft] if arrival >= since else []
            tpots += [tpot] if arrival >= start and tpot is not None else []
        # Decode's batch holds requests from before, whose number sets the steps' length: until
        # most of it came since, the gaps tell more of the split before than of this one.
        if 2 * sum(s.arrival >= self._settled_at for s in signals.started) < len(signals.started):
            tpots = []
        observed = tuple(float(np.percentile(v, cfg.percentile)) if 2 * len(v) >= self._enough else None
                         for v in (ttfts, tpots))
        missed = any(v is not None and v > slo for v, slo in zip(observed, self._slos))
        queue = self._queue_model(now)
        if not missed and self._foreseen(queue) is None:
            return None
        # Counted from the first arrival: a window opened on an idle server (at its start, or in a
        # quiet spell) would spread its requests over the idle time before them. Over at least
        # `interval`, as a window's span is: a burst of a moment is no steady rate.
        span = max(now - max(start, self._arrivals[first]), cfg.interval)
        rate, prompt_rate = (len(self._arrivals) - first) / span, sum(self._prompts[first:]) / span
        fits, predictors = self._predict(rate, observed, queue)
        if not missed and self._raise(0, predictors, fresh=True) is None:
            return None  # a foreseen miss with nowhere new to go: wait for one seen
        return self._decide(now, "tick", len(ttfts), rate, prompt_rate, observed, fits, queue, predictors)

    def _predict(self, rate: float, observed: tuple, queue: QueueModel | None) -> tuple:
        """The fits over the recent decisions and this one, and per phase a Predictor or None."""
        cfg, points = self.config, [*self._points, (*self.split, rate, *observed)]
        stable = [p for p in points if p[3] is not None and p[3] <= OVERLOADED * cfg.ttft_slo]
        timed = [p for p in points if p[4] is not None]
        fits = (fit_latency([p[0] for p in stable], [p[2] for p in stable], [p[3] for p in stable], True),
                fit_latency([p[1] for p in timed], [p[2] for p in timed], [p[4] for p in timed], False))
        usable = [f if f and f.usable else None for f in fits]
        ttft = Predictor("queue", queue.predict) if queue else \
            Predictor("fit", lambda x: usable[0].predict(x, rate)) if usable[0] else None
        # Without a fit, TPOT scaled by 1/y with no floor. A step of decode, bound by memory
        # bandwidth, gains less than that from SMs, so a raise it sizes takes too few steps
        # rather than too many; a jump of prefill it guards is checked only roughly, as a slower
        # step also lets decode's batch grow.
        tpot = Predictor("fit", lambda y: usable[1].predict(y, rate)) if usable[1] else \
            Predictor("scaled", lambda y: observed[1] * self.split[1] / y) if observed[1] is not None else None
        return fits, [ttft, tpot]

    def _foreseen(self, queue: QueueModel | None) -> float | None:
        """The TTFT the queue at prefill predicts here at its least scale (prompts of one length,
        which wait half as long as the M/M/1 queue's), where even that misses, seen or not."""
        least = replace(queue, scale=SCALE_RANGE[0]).predict(self.split[0]) if queue else 0.0
        return least if least > self._slos[0] else None

    def _decide(self, now: float, trigger: str, requests: int, rate: float, prompt_rate: float,
                observed: tuple, fits: tuple, queue: QueueModel | None, predictors: list) -> Decision:
        """Files the evidence, chooses the next split and assumes it in effect from `now`."""
        cfg, here = self.config, self.split
        missed = [i for i in (0, 1) if observed[i] is not None and observed[i] > self._slos[i]]
        self.evidence.record(here, missed, (prompt_rate, rate), self._prompt_cv())
        self._points.append((*here, rate, *observed))
        target, action, reason = self._choose(observed, missed, queue, predictors)
        predicted = [p.at(target[i]) if p else None for i, p in enumerate(predictors)]
        decision = Decision(now, trigger, requests, cfg.percentile, rate, prompt_rate, *observed, *here, *fits,
                            queue, *[p and p.name for p in predictors], *target, *predicted, action, reason)
        self._window.clear()
        self._opened_at = now
        if target != here:
            self.switched(*target, now)
        return decision

    def _queue_model(self, now: float) -> QueueModel | None:
        """The queue at prefill over the last HORIZON_S, once prefill's capacity is measured."""
        first = bisect.bisect_left(self._arrivals, now - HORIZON_S)
        count = len(self._arrivals) - first
        # from the first arrival within the horizon: a load that began after a silence is
        # measured over the time it has run, not diluted by the silence before it
        span = now - self._arrivals[first] if count else 0.0
        if self._meter.measured is None or count < 2 or span <= 0:
            return None
        tokens = sum(self._prompts[first:])
        percentile = min(self.config.percentile, 99.9)  # P100 of an M/M/1 sojourn is unbounded
        return QueueModel(*self._meter.measured, tokens / span, tokens / count, math.log(100 / (100 - percentile)),
                          self._calibration.scale())

    def _prompt_cv(self) -> float:
        """The spread (std / mean) of the prompt lengths of the arrivals the load median counts."""
        recent = np.asarray(self._prompts[-round(0.8 * self.config.window * LOAD_WINDOWS):], dtype=float)
        return float(recent.std() / recent.mean()) if len(recent) > 1 and recent.mean() > 0 else 0.0

    def _choose(self, observed, missed: list[int], queue: QueueModel | None,
                predictors: list) -> tuple[tuple[int, int], str, str]:
        slos = self._slos

        def said(i, verdict):
            return f"P{self.config.percentile:g} {METRICS[i]} {observed[i]:.4g} s {verdict} SLO {slos[i]:g} s"
        for i in missed:  # TTFT first
            target = self._raise(i, predictors, fresh=False)
            if target is not None:
                return target, f"raise_{PHASES[i]}", said(i, ">")
        if missed:
            return self.split, "stuck", " and ".join(said(i, ">") for i in missed) + \
                ": no allowed split raises " + " or ".join(PHASES[i] for i in missed)
        # A raise no miss asks for yet: like a give-back, never to a split visited under this load.
        foreseen = self._foreseen(queue)
        target = self._raise(0, predictors, fresh=True) if foreseen is not None else None
        if target is not None:
            return target, "raise_prefill", f"the queue at prefill predicts P{self.config.percentile:g} " \
                f"TTFT {foreseen:.4g} s or more > SLO {slos[0]:g} s"
        if None not in observed:
            ratios = (observed[0] / slos[0], observed[1] / slos[1])
            for giver, taker in ((0, 1), (1, 0)):
                target = self._give(giver, predictors[giver]) if ratios[giver] < GIVE_BACK <= ratios[taker] else None
                if target is not None:
                    return target, f"give_to_{PHASES[taker]}", f"{said(giver, '<=')} " \
                        f"({ratios[giver]:.0%}), {METRICS[taker]} at {ratios[taker]:.0%} of its SLO"
        return self.split, "hold", " and ".join(said(i, "<=") for i in (0, 1) if observed[i] is not None)

    def _raise(self, i: int, predictors, fresh: bool) -> tuple[int, int] | None:
        """Phase i up by the fewest steps predicted to bring it under AIM of its SLO, none past
        where the other phase's prediction misses (or misses worse); one without a prediction."""
        cfg, allowed, k = self.config, [], 1
        while cfg.max_steps is None or k <= cfg.max_steps:
            target = cfg.raised(self.split, i, self.split[i] + k * cfg.step)
            if target is None:
                break
            # The predictions see phase i's share only: a step past 100, which comes off the
            # other phase, changes nothing they can tell, so they never justify one.
            if self.evidence.allows(self.split, target, fresh) and (not allowed or allowed[-1][i] < target[i]):
                allowed.append(target)
            k += 1
        own, other, j = predictors[i], predictors[1 - i], 1 - i
        if other is not None and allowed:
            bound = max(self._slos[j], other.at(self.split[j]))
            allowed = allowed[:1] + [t for t in allowed[1:] if other.at(t[j]) <= bound]
        if not allowed or own is None:
            return allowed[0] if allowed else None
        return next((t for t in allowed if own.at(t[i]) <= AIM * self._slos[i]), allowed[-1])

    def _give(self, giver: int, predictor: Predictor | None) -> tuple[int, int] | None:
        """One step to the other phase; from the giver where the taker holds 100 or max_total
        requires. None where it would deepen the overlap of the caps."""
        taker = 1 - giver
        target = self.config.raised(self.split, taker, self.split[taker] + self.config.step)
        if (target is None or overlap(target) > max(overlap(self.split), 0)
                or not self.evidence.allows(self.split, target, fresh=True)):
            return None
        return None if predictor and predictor.at(target[giver]) > GIVE_BACK * self._slos[giver] else target
