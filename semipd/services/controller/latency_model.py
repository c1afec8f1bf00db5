"""The partitioner's latency model: how a phase's latency percentile falls with its SM share.

  TPOT = a2 / y + b2                linear in 1/y
  TTFT = a1 / (x - c * rate) + b1   queueing: c * rate is the share the arrivals keep busy
                                    (M/M/1 with a service rate proportional to x)

Fitted by least squares to recent windows' (share, rate, percentile) points. c is grid-searched
over [0, min_i x_i / rate_i), so that every fitted queue was stable, with a and b solved linearly
at each c; ties go to the smallest c. The partitioner uses a fit only to choose how many steps
to move (docs/architecture.md, "The partitioner").
"""
import math
from dataclasses import dataclass

import numpy as np

C_GRID = 64            # candidate values of c for the TTFT fit
MIN_R2 = 0.5           # a fit explaining less of the variance is logged but not used


@dataclass
class Fit:
    """latency = a / (share - c * rate) + b, fitted to `points` windows at `shares` distinct shares."""
    a: float
    b: float
    c: float
    r2: float | None   # None when every point had the same latency
    points: int
    shares: int

    def predict(self, share: int, rate: float) -> float:
        room = share - self.c * rate if self.c > 0 else share
        return self.a / room + self.b if room > 0 else math.inf

    @property
    def usable(self) -> bool:
        """Whether the fit explains enough of its points' variance to guide a move."""
        return self.r2 is not None and self.r2 >= MIN_R2


def fit_latency(shares: list[int], rates: list[float], values: list[float], queueing: bool) -> Fit | None:
    """Least-squares fit of the latency model; None without two shares or a decreasing fit."""
    s, r, v = (np.asarray(z, dtype=float) for z in (shares, rates, values))
    if queueing:  # a window whose arrivals came all at once has no rate to fit
        keep = np.isfinite(r)
        s, r, v = s[keep], r[keep], v[keep]
    if len(set(s.tolist())) < 2:
        return None
    cs = np.min(s / r) * np.arange(C_GRID) / C_GRID if queueing else np.zeros(1)
    best = None
    for c in cs:
        u = 1.0 / (s - c * r)
        (a, b), *_ = np.linalg.lstsq(np.stack([u, np.ones_like(u)], axis=1), v, rcond=None)
        if b < 0:  # a latency floor is never negative: refit through the origin
            a, b = float(u @ v / (u @ u)), 0.0
        sse = float(np.sum((a * u + b - v) ** 2))
        if a > 0 and (best is None or sse < best[0]):
            best = (sse, float(a), float(b), float(c))
    if best is None:
        return None
    sst = float(np.sum((v - v.mean()) ** 2))
    return Fit(*best[1:], r2=1 - best[0] / sst if sst > 0 else None, points=len(v),
               shares=len(set(s.tolist())))
