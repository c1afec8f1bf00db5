"""What the partitioner has seen of each split, and for how long it holds: the splits it visited
and those where a phase missed its SLO, each with the load it was seen at. A miss at a share means
every lower share of that phase misses at that load or more, so a miss bans those shares while
the load stays within `tolerance` of it; a visit bans only moves that need no evidence
(give-backs). Each phase has its own load: prefill's is the prompt tokens arriving per second
(TTFT follows the work queued at prefill, and a shift to short prompts at more requests per
second is a drop), decode's the requests arriving per second. docs/architecture.md, "The
partitioner", says why each part is as it is.
"""
import itertools
import math
from collections import deque

import numpy as np

LOAD_TOLERANCE = 0.25  # evidence holds until the load drops by more than this fraction, or more
MAX_TOLERANCE = 0.5    # ...but never more than this (tiny windows: the median's noise is larger)
LOAD_WINDOWS = 5       # decisions whose median rate is the load evidence is compared with

Split = tuple[int, int]
Load = tuple[float, float]  # (prompt tokens per second, requests per second): prefill's, decode's


class Evidence:
    def __init__(self, window: int):
        self._rates: deque[Load] = deque(maxlen=LOAD_WINDOWS)
        self.load: Load = (math.inf, math.inf)                   # medians of _rates
        self._visited: dict[Split, list[Load]] = {}              # split -> the lowest loads seen at
        self._missed: dict[tuple[Split, int], float] = {}        # (split, phase) -> lowest load
        self._recent: deque[list] = deque(maxlen=LOAD_WINDOWS)   # newest decisions' [key, own rate, load]
        self._held: dict[tuple[Split, int], float] = {}          # both of the above: what holds
        # Three times the noise of the load median (a decision's rate counts about 0.8 * window
        # arrivals), so that noise alone does not forget evidence and let the splits cycle.
        self._median_noise = 1.25 / math.sqrt(0.8 * window * LOAD_WINDOWS)
        self.tolerance = (_tolerance(self._median_noise), _tolerance(self._median_noise))

    def record(self, here: Split, missed: list[int], rates: Load, prompt_cv: float) -> None:
        """A decision's evidence: the split it ran under, the phases that missed, the load it met
        and the spread of its prompt lengths (coefficient of variation), which adds to the noise
        of a rate of tokens."""
        self.tolerance = (_tolerance(self._median_noise * math.sqrt(1 + prompt_cv ** 2)),
                          _tolerance(self._median_noise))
        self._rates.append(rates)
        self.load = tuple(float(np.median([r[i] for r in self._rates])) for i in (0, 1))
        seen = self._visited.setdefault(here, [])
        if not any(all(v[i] <= self.load[i] for i in (0, 1)) for v in seen):  # keep the lowest loads
            seen[:] = [v for v in seen if not all(self.load[i] <= v[i] for i in (0, 1))] + [self.load]
        self._file(here, missed, rates)

    def _file(self, here: Split, missed: list[int], rates: Load) -> None:
        """File this decision's misses under the load, and those of the last LOAD_WINDOWS decisions
        again where the load has risen past the tolerance since (the median lags a rise)."""
        for record in itertools.chain.from_iterable(self._recent):
            i = record[0][1]
            if (1 - self.tolerance[i]) * self.load[i] > record[2]:
                record[2] = max(record[2], min(record[1], self.load[i]))
        if len(self._recent) == self._recent.maxlen:  # the oldest decision's misses are final
            for key, _, load in self._recent[0]:
                _keep_lowest(self._missed, key, load)
        self._recent.append([[(here, i), rates[i], self.load[i]] for i in missed])
        self._held = dict(self._missed)
        for key, _, load in itertools.chain.from_iterable(self._recent):
            _keep_lowest(self._held, key, load)

    def _holds(self, i: int, seen_load: float | None) -> bool:
        return seen_load is not None and self.load[i] >= (1 - self.tolerance[i]) * seen_load

    def allows(self, here: Split, target: Split, fresh: bool) -> bool:
        """Whether a move from `here` may enter `target`: not a split that missed, no share
        changed to one at or below a share of that phase that missed; `fresh`: nor a split
        visited under this load (for moves that no miss asks for)."""
        if any(self._holds(i, self._held.get((target, i))) for i in (0, 1)):
            return False
        for i in (0, 1):
            worst = max((s[i] for (s, j), r in self._held.items() if j == i and self._holds(i, r)), default=0)
            if target[i] != here[i] and target[i] <= worst:
                return False
        seen = self._visited.get(target, ())
        return not (fresh and any(all(self._holds(i, v[i]) for i in (0, 1)) for v in seen))


def _tolerance(median_noise: float) -> float:
    return min(MAX_TOLERANCE, max(LOAD_TOLERANCE, 3 * median_noise))


def _keep_lowest(seen: dict, key, rate: float) -> None:
    seen[key] = min(seen.get(key, math.inf), rate)
