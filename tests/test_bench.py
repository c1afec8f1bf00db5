"""`semipd bench`'s pure parts: arrivals, length distributions, ShareGPT parsing and metrics."""

import json
import math

import numpy as np
import pytest

from semipd.cli.bench.metrics import RequestRecord, backlog_trend, build_report, summarize, token_timing
from semipd.cli.bench.workload import (INPUT_MEAN, INPUT_RANGE, OUTPUT_MEAN, OUTPUT_RANGE, SIGMA, arrival_times,
                                       clipped_lognormal_mean, lognormal_lengths, load_sharegpt, plan_lengths)
from semipd.shared.errors import UserError


def test_poisson_arrivals_have_the_requested_mean_gap():
    times = arrival_times(8.0, 20001, np.random.default_rng(0))
    gaps = np.diff(times)
    assert times[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 1 / 8) < 0.02 / 8
    assert abs(gaps.std() - 1 / 8) < 0.03 / 8  # exponential: std equals mean (burstiness 1)
    assert (arrival_times(math.inf, 5, np.random.default_rng(0)) == 0).all()


def test_clipped_lognormal_mean_matches_numeric_integration():
    mu, sigma, lo, hi = 5.0, 1.0, 4, 2048
    x = np.exp(np.linspace(math.log(1e-3), math.log(1e6), 400001))
    density = np.exp(-(np.log(x) - mu) ** 2 / (2 * sigma ** 2)) / (x * sigma * math.sqrt(2 * math.pi))
    f = np.clip(x, lo, hi) * density
    numeric = np.sum((f[1:] + f[:-1]) / 2 * np.diff(x))  # trapezoid rule
    assert clipped_lognormal_mean(mu, sigma, lo, hi) == pytest.approx(numeric, rel=1e-4)


@pytest.mark.parametrize("mean,bounds", [(INPUT_MEAN, INPUT_RANGE), (OUTPUT_MEAN, OUTPUT_RANGE), (40.0, OUTPUT_RANGE)])
def test_lognormal_lengths_keep_their_mean_after_clipping(mean, bounds):
    lengths = np.array(lognormal_lengths(mean, SIGMA, bounds, 100_000, np.random.default_rng(1)))
    assert lengths.min() >= bounds[0] and lengths.max() <= bounds[1]
    assert lengths.min() == bounds[0]  # the clip is reached, so it matters for the mean
    assert abs(lengths.mean() - mean) < 0.02 * mean
    with pytest.raises(UserError, match="strictly between"):
        lognormal_lengths(bounds[1] + 1, SIGMA, bounds, 10, np.random.default_rng(1))


def test_planned_lengths_respect_max_model_len():
    rng = np.random.default_rng(2)
    planned = plan_lengths(500, rng, max_model_len=300)
    assert len(planned) == 500 and all(i + o <= 300 for i, o in planned)
    pool = [(10, 10), (400, 10), (20, 30)]
    from_pool = plan_lengths(7, rng, pool, max_model_len=100)
    assert sorted(set(from_pool)) == [(10, 10), (20, 30)] and len(from_pool) == 7
    with pytest.raises(UserError, match="fits max_model_len 5"):
        plan_lengths(3, rng, pool, max_model_len=5)


def test_sharegpt_file_parsing(tmp_path):
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "x" * 400},
                                      {"from": "gpt", "value": "y" * 100},
                                      {"from": "human", "value": "ignored"}]},
        # opens with the bot: the first human turn and the reply after it count
        {"id": "b", "conversations": [{"from": "gpt", "value": "hello " * 50},
                                      {"from": "human", "value": "z" * 41},
                                      {"from": "gpt", "value": "w" * 9000}]},
        {"id": "c", "conversations": [{"from": "human", "value": "no reply"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]},
        {"id": "e"}, "junk",
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    # 4 characters per token, clipped to [4, 2048] input and [4, 1024] output
    assert load_sharegpt(str(path)) == [(100, 25), (10, 1024), (4, 4)]

    path.write_text("{not json")
    with pytest.raises(UserError, match="cannot read it as JSON"):
        load_sharegpt(str(path))
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "q"}]}]))
    with pytest.raises(UserError, match="no conversation"):
        load_sharegpt(str(path))


def test_token_timing_spreads_multi_token_messages():
    ttft, itl = token_timing([(0.10, 1), (0.30, 2), (0.35, 0), (0.40, 1)])
    assert ttft == pytest.approx(0.10)
    assert itl == pytest.approx([0.10, 0.10, 0.10])
    ttft, itl = token_timing([(0.2, 3), (0.5, 1)])
    assert ttft == pytest.approx(0.2) and itl == pytest.approx([0.0, 0.0, 0.3])
    assert token_timing([(0.5, 0)]) == (None, [])


def record(i, ttft, e2e, tokens, send_s=0.0, **kw) -> RequestRecord:
    return RequestRecord(i, 10, tokens, send_s, ttft_s=ttft, e2e_s=e2e, output_tokens=tokens,
                         itl_s=[(e2e - ttft) / (tokens - 1)] * (tokens - 1), finish_reason="length", **kw)


def hand_made_records() -> list[RequestRecord]:
    return [record(0, 0.1, 1.1, 11),   # TPOT 0.10
            record(1, 0.2, 2.2, 11),   # TPOT 0.20
            record(2, 0.3, 0.7, 5),    # TPOT 0.10
            record(3, 0.4, 4.4, 21),   # TPOT 0.20
            RequestRecord(4, 10, 5, 0.0, finish_reason="error", error="prompt too long")]


def test_summary_percentiles_attainment_and_goodput():
    s = summarize(hand_made_records(), duration_s=5.0, ttft_slo=0.25, tpot_slo=0.15)
    assert (s["requests"], s["completed"], s["failed"]) == (5, 4, 1)
    assert s["output_tokens"] == 48 and s["input_tokens"] == 40
    assert s["request_throughput"] == pytest.approx(0.8)
    assert s["output_token_throughput"] == pytest.approx(9.6)
    # linear-interpolated percentiles of 0.1, 0.2, 0.3, 0.4
    assert s["ttft_s"] == pytest.approx({"mean": 0.25, "p50": 0.25, "p90": 0.37, "p99": 0.397})
    assert s["tpot_s"]["mean"] == pytest.approx(0.15) and s["tpot_s"]["p50"] == pytest.approx(0.15)
    assert s["e2e_s"]["p99"] == pytest.approx(2.2 + 0.97 * (4.4 - 2.2))
    # ITL: 10 + 10 + 4 + 20 gaps, weighted by token, not by request
    assert s["itl_s"]["mean"] == pytest.approx((10 * 0.1 + 10 * 0.2 + 4 * 0.1 + 20 * 0.2) / 44)
    # only request 0 meets TTFT <= 0.25 and TPOT <= 0.15; the failed one counts as a miss
    assert s["slo_attainment"] == pytest.approx(1 / 5)
    assert s["goodput"] == pytest.approx(1 / 5.0)
    loose = summarize(hand_made_records(), 5.0, ttft_slo=0.5)
    assert loose["slo_attainment"] == pytest.approx(4 / 5) and loose["goodput"] == pytest.approx(0.8)
    assert summarize(hand_made_records(), 5.0)["slo_attainment"] is None


def test_backlog_trend_tells_a_kept_up_rate_from_a_growing_queue():
    # 400 arrivals at 10 req/s. Kept up: every request takes 2 s, so about 20 are in the server
    # all along. Falling behind: each waits 0.05 s longer than the one before it (the server
    # finishes 1 request per 0.1 + 0.05 s), so the queue grows for as long as requests arrive.
    kept_up = [record(i, 0.1, 2.0, 11, send_s=i / 10) for i in range(400)]
    behind = [record(i, 0.1, 2.0 + 0.05 * i, 11, send_s=i / 10) for i in range(400)]
    assert backlog_trend(kept_up) == pytest.approx(1.0, abs=0.03)
    # request i ends at 2 + 0.15 i s, so at time t about 13.3 + 3.33 t are in flight: 63 on
    # average over the second quarter of the arrivals (10-20 s), 130 over the last (30-40 s)
    assert backlog_trend(behind) == pytest.approx(2.05, abs=0.05)
    assert backlog_trend(kept_up[:5]) is None  # too few to say
    assert summarize(behind, 60.0)["backlog_trend"] == pytest.approx(backlog_trend(behind))
    # arrivals over 40 s, each request 12 s: the server is still filling up at the second quarter
    assert backlog_trend([record(i, 0.1, 12.0, 11, send_s=i / 10) for i in range(400)]) is None
    assert backlog_trend([record(i, 0.1, 2.0, 11) for i in range(400)]) is None  # all at once
    assert summarize(kept_up, 60.0)["offered_rate"] == pytest.approx(10.0)  # 399 gaps in 39.9 s


def test_report_keys_and_json():
    records = hand_made_records()
    report = build_report({"rate": "inf", "num_requests": 5}, records, summarize(records, 5.0, 0.3, 0.2))
    text = json.dumps(report, allow_nan=False)
    back = json.loads(text)
    assert set(back) == {"config", "summary", "requests"}
    assert {"ttft_s", "tpot_s", "itl_s", "e2e_s", "request_throughput", "output_token_throughput",
            "slo_attainment", "goodput", "completed", "failed", "duration_s"} <= set(back["summary"])
    assert set(back["summary"]["ttft_s"]) == {"mean", "p50", "p90", "p99"}
    first = back["requests"][0]
    assert {"index", "input_len", "output_len", "send_s", "phase", "ttft_s", "tpot_s", "itl_s", "e2e_s",
            "output_tokens", "finish_reason", "error", "server_ttft_s", "server_tpot_s"} == set(first)
    assert first["tpot_s"] == pytest.approx(0.1) and back["requests"][4]["tpot_s"] is None
