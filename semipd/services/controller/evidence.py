"""What the partitioner has seen of each split, and for how long it holds: the splits it visited
and those where a phase missed its SLO, each with the load it was seen at. A miss at a share means
every lower share of that phase misses at that load or more, so a miss bans those shares while
the load stays within `tolerance` of it; a visit bans only moves that need no evidence
(give-backs). docs/architecture.md, "The partitioner", says why each part is as it is.
"""
import itertools
import math
from collections import deque

import numpy as np

LOAD_TOLERANCE = 0.25  # evidence holds until the load drops by more than this fraction, or more
MAX_TOLERANCE = 0.5    # ...but never more than this (tiny windows: the median's noise is larger)
LOAD_WINDOWS = 5       # decisions whose median rate is the load evidence is compared with

Split = tuple[int, int]


class Evidence:
    def __init__(self, window: int):
        self._rates: deque[float] = deque(maxlen=LOAD_WINDOWS)
        self.load = math.inf                                     # median of _rates
        self._visited: dict[Split, float] = {}                   # split -> lowest load seen at
        self._missed: dict[tuple[Split, int], float] = {}        # (split, phase) -> lowest load
        self._recent: deque[list] = deque(maxlen=LOAD_WINDOWS)   # newest decisions' [key, own rate, load]
        self._held: dict[tuple[Split, int], float] = {}          # both of the above: what holds
        # Three times the noise of the load median (a window's rate counts about 0.8 * window
        # arrivals), so that noise alone does not forget evidence and let the splits cycle.
        median_noise = 1.25 / math.sqrt(0.8 * window * LOAD_WINDOWS)
        self.tolerance = min(MAX_TOLERANCE, max(LOAD_TOLERANCE, 3 * median_noise))

    def record(self, here: Split, missed: list[int], rate: float) -> None:
        """A decision's evidence: the split it ran under, the phases that missed, its load."""
        self._rates.append(rate)
        self.load = float(np.median(self._rates))
        _keep_lowest(self._visited, here, self.load)
        self._file(here, missed, rate)

    def _file(self, here: Split, missed: list[int], rate: float) -> None:
        """File this decision's misses under the load, and those of the last LOAD_WINDOWS decisions
        again where the load has risen past the tolerance since (the median lags a rise)."""
        for record in itertools.chain.from_iterable(self._recent):
            if (1 - self.tolerance) * self.load > record[2]:
                record[2] = max(record[2], min(record[1], self.load))
        if len(self._recent) == self._recent.maxlen:  # the oldest decision's misses are final
            for key, _, load in self._recent[0]:
                _keep_lowest(self._missed, key, load)
        self._recent.append([[(here, i), rate, self.load] for i in missed])
        self._held = dict(self._missed)
        for key, _, load in itertools.chain.from_iterable(self._recent):
            _keep_lowest(self._held, key, load)

    def _holds(self, seen_load: float | None) -> bool:
        return seen_load is not None and self.load >= (1 - self.tolerance) * seen_load

    def allows(self, here: Split, target: Split, fresh: bool) -> bool:
        """Whether a move from `here` may enter `target`: not a split that missed, no share
        changed to one at or below a share of that phase that missed; `fresh`: nor a split
        visited (for moves that no miss asks for)."""
        if any(self._holds(self._held.get((target, i))) for i in (0, 1)):
            return False
        for i in (0, 1):
            worst = max((s[i] for (s, j), r in self._held.items() if j == i and self._holds(r)), default=0)
            if target[i] != here[i] and target[i] <= worst:
                return False
        return not (fresh and self._holds(self._visited.get(target)))


def _keep_lowest(seen: dict, key, rate: float) -> None:
    seen[key] = min(seen.get(key, math.inf), rate)
