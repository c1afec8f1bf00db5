"""A simulated semi-PD server for the partitioner's tests: requests queue at prefill, which
computes up to a token budget of prompts per step at a speed set by its SM share, and decode
steps its whole batch at a time, each step longer with a larger batch and fewer SMs. Where the
two caps overlap, each phase slows the other while both run. TTFT and TPOT follow from the
split and the load; nothing about them is drawn at random but the arrivals and the lengths.

The controller's part is played as server.py plays it: every arrival goes to arrived(), every
finished request to observe(), the load signals (load_signals.gather over the request table) to
tick() when due, none of it while a switch is under way, which takes SWITCH_S to take effect; and,
with `prime`, workers primed SWITCH_S after the partitioner names their shares, which a switch
to those shares takes over in HANDOVER_S."""

import functools
import itertools
import math
from dataclasses import dataclass, field, replace

import numpy as np

from semipd.services.controller.load_signals import gather
from semipd.services.controller.partitioner import Decision, Partitioner
from semipd.services.controller.requests import Request
from semipd.shared.protocol import StepTimes

SWITCH_S = 3.0        # a split takes effect this long after it is decided (a standby prepares)
HANDOVER_S = 0.05     # ...or this long, to a primed worker's share
TICK_S = 0.05         # the controller's poll
REPORT_S = 1.0        # a worker's StepTimes, about once a second while it works


@dataclass(frozen=True)
class Mix:
    rate: float         # requests per second (Poisson)
    prompt: int         # mean prompt tokens (lognormal lengths)
    output: int         # mean output tokens
    seconds: float      # how long this mix lasts


@dataclass
class Gpu:
    prefill_tokens_per_s: float = 40_000   # all SMs, alone
    prefill_step_s: float = 0.004          # a prefill step's fixed cost
    budget: int = 8192                     # prompt tokens per prefill step
    decode_step_s: float = 0.004           # a decode step's fixed cost, all SMs
    decode_per_seq_s: float = 0.00008      # ...and per sequence in the batch
    max_batch: int = 256

    def prefill_time(self, tokens: int, x: int, y: int, decode_busy: bool) -> float:
        if decode_busy:
            x = _shares_beside(x, y)[0]
        return self.prefill_step_s + tokens / (self.prefill_tokens_per_s * min(1.0, x / 78))  # compute-bound

    def decode_time(self, batch: int, x: int, y: int, prefill_busy: bool) -> float:
        if prefill_busy:
            y = _shares_beside(x, y)[1]
        return (self.decode_step_s + self.decode_per_seq_s * batch) * (0.56 + 44 / y)  # bandwidth-bound


def _shares_beside(x: int, y: int) -> tuple[float, float]:
    """The SMs each phase gets while both run: those only its cap covers, and of those both caps
    cover, 70% for prefill (compute-bound, it takes more of them) and 30% for decode."""
    overlap = max(0, x + y - 100)
    return 100 - y + 0.7 * overlap, 100 - x + 0.3 * overlap


@dataclass
class Served:
    arrival: float
    ttft_s: float
    tpot_s: float | None


@dataclass
class Run:
    decisions: list[Decision] = field(default_factory=list)
    splits: list[tuple[float, tuple[int, int]]] = field(default_factory=list)  # (time, split in effect)
    served: list[Served] = field(default_factory=list)

    def percentiles(self, lo: float, hi: float, p: float = 90) -> tuple[float, float]:
        """TTFT and TPOT percentiles of the requests that arrived in [lo, hi)."""
        reqs = [s for s in self.served if lo <= s.arrival < hi]
        return (float(np.percentile([s.ttft_s for s in reqs], p)),
                float(np.percentile([s.tpot_s for s in reqs if s.tpot_s is not None], p)))

    def split_at(self, t: float) -> tuple[int, int]:
        return [s for when, s in self.splits if when <= t][-1]

    def feasible_from(self, start: float, end: float, mix: "Mix", slos: tuple[float, float]) -> float | None:
        """From when in [start, end) every split in effect meets both SLOs under `mix` (None: not
        by the end)."""
        since = None
        for when, split in [(start, self.split_at(start))] + [(t, s) for t, s in self.splits if start < t < end]:
            since = (since or when) if meets(mix, split, slos) else None
        return since


@functools.lru_cache(maxsize=None)
def meets(mix: "Mix", split: tuple[int, int], slos: tuple[float, float]) -> bool:
    """Whether the split, held, meets both SLOs under the mix: two runs of two minutes each."""
    held = replace(mix, seconds=120.0)
    return all(ttft <= slos[0] and tpot <= slos[1]
               for ttft, tpot in (simulate(None, split, [held], seed).percentiles(20, 100) for seed in (0, 1)))


def arrivals(mixes: list[Mix], seed: int) -> list[tuple[float, int, int]]:
    rng, t, out, start = np.random.default_rng(seed), 0.0, [], 0.0
    for mix in mixes:
        t = start
        while True:
            t += rng.exponential(1 / mix.rate)
            if t >= start + mix.seconds:
                break
            lengths = np.maximum(1, np.round(rng.lognormal(0, 0.3, 2) * (mix.prompt, mix.output)))
            out.append((t, int(lengths[0]), int(lengths[1])))
        start += mix.seconds
    return out


def simulate(p: Partitioner | None, split: tuple[int, int], mixes: list[Mix], seed: int,
             gpu: Gpu = Gpu(), prime: bool = True) -> Run:
    """Serve the mixes one after the other; with p None, at the fixed split."""
    run, now, x_y = Run(splits=[(0.0, split)]), 0.0, split
    incoming = arrivals(mixes, seed)
    end = sum(m.seconds for m in mixes)
    table: dict[int, Request] = {}
    outputs: dict[int, int] = {}
    queue: list[list] = []                     # [request, prompt tokens left]
    prefill_end, prefilling = math.inf, []
    pending, batch, decode_end = [], [], math.inf
    next_tick, switch_at, target = 0.0, math.inf, None
    primed: dict[int, tuple[int, float]] = {}  # phase -> (share a worker is primed at, when ready)
    timer = {"since": None, "steps": 0, "busy": 0.0}
    report = None                              # the prefill worker's (last StepTimes, received)
    seq_ids = itertools.count()

    def act(decision):
        nonlocal switch_at, target
        if decision is None:
            return
        run.decisions.append(decision)
        wanted = (decision.next_prefill_sm, decision.next_decode_sm)
        if wanted != x_y:
            moving = [i for i in (0, 1) if wanted[i] != x_y[i]]
            instant = all(primed.get(i, (None,))[0] == wanted[i] and primed[i][1] <= now for i in moving)
            switch_at, target = now + (HANDOVER_S if instant else SWITCH_S), wanted
            for i in moving:
                primed.pop(i, None)               # taken over, or killed for the worker preparing

    def aim_primed():
        split = p.prime_split()
        for i in (0, 1):
            share = None if split is None or split[i] == x_y[i] else split[i]
            if share is None:
                primed.pop(i, None)
            elif primed.get(i, (None,))[0] != share:
                primed[i] = (share, now + SWITCH_S)

    def finish(req):
        del table[req.seq_id]
        times = req.token_times
        tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
        run.served.append(Served(req.arrival, times[0] - req.arrival, tpot))
        if p is not None and switch_at == math.inf:
            act(p.observe(req.arrival, times[0] - req.arrival, tpot, now))

    def start_prefill():
        nonlocal prefill_end, prefilling
        budget, prefilling = gpu.budget, []
        for entry in queue:
            if budget == 0:
                break
            take = min(budget, entry[1])
            prefilling.append((entry, take))
            budget -= take
        tokens = gpu.budget - budget
        prefill_end = now + gpu.prefill_time(tokens, *x_y, decode_busy=bool(batch)) if tokens else math.inf
        if tokens and timer["since"] is None:
            timer["since"] = now
        timer["began"] = now

    def start_decode():
        nonlocal decode_end
        while pending and len(batch) < gpu.max_batch:
            batch.append(pending.pop(0))
        decode_end = now + gpu.decode_time(len(batch), *x_y, prefill_busy=prefill_end < math.inf) \
            if batch else math.inf

    while True:
        now = min(incoming[0][0] if incoming else math.inf, prefill_end, decode_end, next_tick, switch_at)
        if now >= end:
            return run
        if switch_at == now:
            x_y, switch_at = target, math.inf
            run.splits.append((now, x_y))
            if p is not None:
                p.switched(*x_y, now)
            if run.splits[-2][1][0] != x_y[0]:
                report = None                     # a new prefill worker: it reports in a second
        elif incoming and incoming[0][0] == now:
            t, prompt, output = incoming.pop(0)
            seq_id = next(seq_ids)
            req = Request(b"", str(seq_id), seq_id, range(prompt), None, 0, None, arrival=t)
            table[req.seq_id], outputs[req.seq_id] = req, output
            queue.append([req, prompt])
            if p is not None:
                p.arrived(t, prompt)
            if prefill_end == math.inf:
                start_prefill()
        elif prefill_end == now:
            for entry, take in prefilling:
                entry[1] -= take
            timer["steps"] += 1
            timer["busy"] += now - timer["began"]
            if now - timer["since"] >= REPORT_S:
                report = (StepTimes(timer["steps"], 0, timer["busy"], None, now - timer["since"]), now)
                timer.update(since=None, steps=0, busy=0.0)
            done = [req for req, left in queue if left == 0]
            queue[:] = [e for e in queue if e[1] > 0]
            for req in done:
                req.token_times.append(now)
                if outputs[req.seq_id] == 1:
                    finish(req)
                else:
                    pending.append(req)
            prefill_end = math.inf
            if queue:
                start_prefill()
            if decode_end == math.inf:
                start_decode()
        elif decode_end == now:
            for req in batch:
                req.token_times.append(now)
            done = [req for req in batch if len(req.token_times) >= outputs[req.seq_id]]
            batch[:] = [req for req in batch if len(req.token_times) < outputs[req.seq_id]]
            for req in done:
                finish(req)
            start_decode()
        else:
            next_tick = now + TICK_S
            if p is not None and switch_at == math.inf and p.due(now):
                if prime:
                    aim_primed()
                act(p.tick(gather(table.values(), report, now)))
