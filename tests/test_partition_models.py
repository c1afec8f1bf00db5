"""The partitioner's two latency models: the semi-PD model fitted to windows at several shares
(latency_model.py), and the queue at prefill with its capacity measured from the load signals
(queue_model.py)."""

import math

import numpy as np
import pytest

from semipd.services.controller.latency_model import fit_latency
from semipd.services.controller.load_signals import StepReport
from semipd.services.controller.queue_model import SCALE_RANGE, Calibration, PrefillMeter, QueueModel


def test_fit_recovers_the_model_and_reports_r2():
    xs, rates = [30, 50, 70] * 3, [5] * 3 + [10] * 3 + [15] * 3
    ttft = [5.0 / (x - 1.0 * r) + 0.05 for x, r in zip(xs, rates)]
    fit = fit_latency(xs, rates, ttft, queueing=True)
    assert fit.a == pytest.approx(5.0) and fit.b == pytest.approx(0.05) and fit.c == pytest.approx(1.0)
    assert fit.r2 == pytest.approx(1.0) and (fit.points, fit.shares) == (9, 3)
    assert fit.predict(40, 12) == pytest.approx(5.0 / 28 + 0.05)
    assert fit.predict(20, 25) == math.inf  # the arrivals need more SMs than it has

    rng = np.random.default_rng(0)
    ys = [20, 40, 60, 80] * 4
    tpot = [(1.5 / y + 0.01) * rng.lognormal(0, 0.03) for y in ys]
    fit = fit_latency(ys, [1.0] * len(ys), tpot, queueing=False)
    assert fit.c == 0 and fit.a == pytest.approx(1.5, rel=0.15) and 0.9 < fit.r2 < 1
    assert fit.predict(30, math.inf) == pytest.approx(1.5 / 30 + 0.01, rel=0.05)

    assert fit_latency([50, 50], [5, 6], [0.1, 0.2], queueing=True) is None  # one share only
    assert fit_latency([30, 60], [5, 5], [0.1, 0.2], queueing=False) is None  # more SMs, slower


def test_prefill_capacity_is_the_tokens_it_took_over_its_busy_time():
    """8k prompt tokens arrive per second; prefill, busy half the time, keeps its queue at 2k
    tokens: it computes 16k per second of work. Then 24k arrive per second, and the queue grows
    by 8k per second while it is always busy: still 16k."""
    meter = PrefillMeter()
    arrived = 0
    for tenth in range(31):
        t = tenth / 10
        report = StepReport(0.5, 1.0, t) if tenth in (10, 20, 30) else None
        meter.sample(t, 60, 2000, arrived, report)
        arrived += 800
    assert meter.measured[0] == 60 and meter.measured[1] == pytest.approx(16000, rel=0.01)
    meter.restart()
    assert meter.measured[1] == pytest.approx(16000, rel=0.01)  # kept to predict other shares from
    queued = 0
    for tenth in range(31, 62):
        t = tenth / 10
        meter.sample(t, 80, queued, arrived, StepReport(1.0, 1.0, t) if tenth % 10 == 1 else None)
        arrived, queued = arrived + 2400, queued + 800
    assert meter.measured[0] == 80 and meter.measured[1] == pytest.approx(16000, rel=0.01)


def test_an_idle_prefill_measures_nothing():
    meter = PrefillMeter()
    for tenth in range(31):
        meter.sample(tenth / 10, 60, 0, 10 * tenth, StepReport(0.01, 1.0, tenth / 10) if tenth % 10 == 0 else None)
    assert meter.measured is None


def test_queue_model_falls_with_prefills_share_and_learns_its_scale():
    model = QueueModel(share=50, capacity=10000, arrivals=8000, mean_prompt=1000, z=math.log(10))
    at = [model.predict(x) for x in (40, 50, 60, 80, 100)]
    assert at[0] == math.inf  # 8k arrive, 8k computed: the queue only grows
    assert at[1] == pytest.approx(math.log(10) * 1000 / 2000) and at[1] > at[2] > at[3] > at[4]
    calibration = Calibration()
    assert calibration.scale() == 1.0  # the M/M/1 queue until windows were seen
    calibration.observe(model, 50, 0.1 * at[1])
    assert calibration.scale() == pytest.approx(0.55)  # one window does not set it alone
    for _ in range(4):
        calibration.observe(model, 50, 0.1 * at[1])
    assert calibration.scale() == SCALE_RANGE[0]
    calibration.observe(model, 40, 5.0)  # no stable queue to compare with: not counted
    assert calibration.scale() == SCALE_RANGE[0]
