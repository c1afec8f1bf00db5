"""The load signals and a tick's decisions on them: gathering them from the controller's request
table, and what requests still in flight tell (waits, first tokens, gaps so far) before any
has finished."""

import argparse
import json

import pytest

from semipd.services.controller.load_signals import MIN_GAPS, LoadSignals, Started, StepReport, gather
from semipd.services.controller.modes import add_mode_args, mode_from_args
from semipd.services.controller.partitioner import PartitionConfig, Partitioner
from semipd.services.controller.requests import Request
from semipd.shared.errors import UserError
from semipd.shared.protocol import StepTimes


def request(seq_id: int, arrival: float, prompt: int, token_times: list[float]) -> Request:
    req = Request(b"client", str(seq_id), seq_id, list(range(prompt)), None, 0, None, arrival=arrival)
    req.token_times = token_times
    return req


def test_gather_splits_the_table_into_waiting_and_started():
    reqs = [request(0, 1.0, 300, []),                                   # waiting for prefill
            request(1, 2.0, 50, [2.4]),                                 # first token only
            request(2, 3.0, 80, [3.1 + 0.02 * i for i in range(MIN_GAPS)]),      # too few gaps
            request(3, 4.0, 90, [4.5 + 0.03 * i for i in range(MIN_GAPS + 1)])]  # enough
    report = StepTimes(steps=40, seqs=60, busy_s=0.6, gpu_s=None, span_s=1.0)
    signals = gather(reqs, (report, 9.5), now=10.0)
    assert signals.now == 10.0 and signals.waiting == [(1.0, 300)]
    assert [(s.arrival, s.tpot_s) for s in signals.started] == [(2.0, None), (3.0, None), (4.0, pytest.approx(0.03))]
    assert [s.ttft_s for s in signals.started] == pytest.approx([0.4, 0.1, 0.5])
    assert signals.prefill == StepReport(0.6, 1.0, 9.5)
    assert gather([], None, now=1.0).prefill is None


def signals(now: float, waiting: list[tuple[float, int]], started: list[Started]) -> LoadSignals:
    return LoadSignals(now, waiting, started, None)


def test_a_tick_decides_on_the_waits_of_requests_with_no_token_yet():
    """Nothing has finished, and no first token is out: the waits alone show TTFT's miss, once
    `interval` seconds and 0.8 * window arrivals have passed since the last decision."""
    p = Partitioner(PartitionConfig(0.3, 0.1, window=20, interval=2.0), 60, 100)
    assert p.tick(signals(0.0, [], [])) is None and p.due(0.25) and not p.due(0.1)
    arrivals = [0.1 * i for i in range(30)]
    for t in arrivals:
        p.arrived(t, 500)
    waiting = [(t, 500) for t in arrivals]
    assert p.tick(signals(1.9, waiting[:19], [])) is None  # under `interval`
    p2 = Partitioner(PartitionConfig(0.3, 0.1, window=50, interval=2.0), 60, 100)
    p2.tick(signals(0.0, [], []))
    for t in arrivals:
        p2.arrived(t, 500)
    assert p2.tick(signals(3.0, waiting, [])) is None  # 30 arrivals, under 0.8 * 50
    decision = p.tick(signals(3.0, waiting, []))
    assert decision.trigger == "tick" and decision.action == "raise_prefill" and decision.ttft_s > 0.3
    assert decision.tpot_s is None and p.split[0] > 60


def test_a_tick_measures_the_rate_from_the_first_arrival():
    """A window opened on an idle server: the requests' rate, not their number over the idle time."""
    p = Partitioner(PartitionConfig(0.3, 0.1, window=20, interval=2.0), 60, 100)
    p.tick(signals(0.0, [], []))
    arrivals = [100 + 0.1 * i for i in range(30)]
    for t in arrivals:
        p.arrived(t, 500)
    decision = p.tick(signals(103.0, [(t, 500) for t in arrivals], []))
    assert decision.trigger == "tick" and decision.rate == pytest.approx(10, rel=0.05)
    assert decision.prompt_rate == pytest.approx(5000, rel=0.05)


def test_a_tick_holds_its_peace_while_requests_in_flight_meet_the_slos():
    p = Partitioner(PartitionConfig(0.3, 0.1, window=20, interval=2.0), 60, 100)
    p.tick(signals(0.0, [], []))
    for i in range(30):
        p.arrived(0.1 * i, 500)
    started = [Started(0.1 * i, 0.05, 0.02) for i in range(29)]
    assert p.tick(signals(3.0, [(2.9, 500)], started)) is None
    slow = [Started(0.1 * i, 0.05, 0.2) for i in range(29)]  # TPOT misses
    decision = p.tick(signals(3.25, [(2.9, 500)], slow))
    assert decision.action == "raise_decode" and decision.tpot_s == pytest.approx(0.2)


def test_requests_behind_the_queue_left_by_the_split_before_are_not_judged():
    """A switch to 80 while a prompt queued under 60 still waits: those that come meanwhile wait
    behind it, so neither they nor it tell what 80 does. Those that come after it started do."""
    p = Partitioner(PartitionConfig(0.3, 0.1, window=20, interval=2.0), 60, 100)
    p.switched(80, 100, now=10.0)
    meanwhile = [10.0 + 0.1 * i for i in range(30)]
    for t in meanwhile:
        p.arrived(t, 500)
    assert p.tick(signals(13.0, [(9.5, 500)] + [(t, 500) for t in meanwhile], [])) is None
    started = [Started(t, 0.9, None) for t in meanwhile]
    assert p.tick(signals(13.25, [], started)) is None  # all past their first token, slowly
    later = [13.3 + 0.1 * i for i in range(30)]
    for t in later:
        p.arrived(t, 500)
    decision = p.tick(signals(16.5, [(t, 500) for t in later], started))
    assert decision.action == "raise_prefill" and decision.requests == 30


def test_a_tick_raises_prefill_where_the_queue_foresees_a_miss_none_has_shown_yet():
    """20k prompt tokens arrive per second at a prefill that computes 22k per second of work at
    60: even at its least scale the queue predicts a P90 TTFT over a second, though the first
    tokens so far came in 0.1 s."""
    p = Partitioner(PartitionConfig(0.3, 0.1, window=20, interval=2.0), 60, 100)
    decision = None
    for quarter in range(17):
        t = quarter / 4
        for k in range(5):
            p.arrived(t + k / 20, 1000)
        started = [Started(a / 20, 0.1, None) for a in range(5 * quarter)]
        report = StepReport(0.9, 1.0, t) if quarter % 4 == 0 else None
        decision = p.tick(LoadSignals(t + 0.249, [], started, report)) or decision
    assert decision is not None and decision.action == "raise_prefill" and decision.ttft_s < 0.3
    assert decision.ttft_model == "queue" and "the queue at prefill predicts" in decision.reason
    assert decision.ttft_queue.capacity == pytest.approx(20000 / 0.9, rel=0.05)
    assert decision.next_prefill_sm >= 80 and decision.predicted_ttft_s <= 0.8 * 0.3
    record = json.loads(json.dumps(decision.to_dict(), allow_nan=False))  # as logged and in `semipd stats`
    assert record["trigger"] == "tick" and record["ttft_queue"]["share"] == 60 and record["tpot_s"] is None


def test_decision_interval_flag_reaches_the_partitioner():
    parser = argparse.ArgumentParser()
    add_mode_args(parser)
    mode = mode_from_args(parser.parse_args(["--dynamic", "--ttft-slo", "0.3", "--tpot-slo", "0.1",
                                             "--decision-interval", "1.5"]))
    assert mode.partition.interval == 1.5 and mode.partition.max_steps is None
    with pytest.raises(UserError, match="decision interval"):
        mode_from_args(parser.parse_args(["--dynamic", "--ttft-slo", "0.3", "--tpot-slo", "0.1",
                                          "--decision-interval", "0"]))
