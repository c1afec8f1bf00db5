"""`semipd bench` sweeps end to end on the CPU: a launched `tiny` server swept over two rates, the
report, plots and table; re-plotting a saved report; launch failures and argument checks."""

import json
import os

import pytest

from semipd.cli.bench.metrics import RequestRecord, summarize
from semipd.cli.bench.sweep import step_means
from semipd.cli.main import main
from tests.serving import Server

PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(PNG) and len(data) > 5000, path


def test_launched_server_swept_over_two_rates(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["bench", "--model", "tiny", "--launch", "small=--max-num-seqs 8 --page-size 8",
               "--rates", "16,4", "--num-requests", "6", "--input-len-mean", "16", "--output-len-mean", "8",
               "--ttft-slo", "2", "--tpot-slo", "0.5", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["rates"] == [4.0, 16.0] and report["config"]["num_requests"] == 6
    mode = report["modes"]["small"]
    assert mode["launch"] == "--max-num-seqs 8 --page-size 8"
    assert [run["rate"] for run in mode["runs"]] == [4.0, 16.0]
    for run in mode["runs"]:
        s = run["summary"]
        assert s["completed"] == 6 and s["failed"] == 0 and s["output_tokens"] > 0
        assert 0 < s["ttft_s"]["p90"] < s["e2e_s"]["p99"] and s["tpot_s"]["mean"] > 0
        # the server's clock starts after the client's send and stops before its receipt
        assert 0 < s["server_ttft_s"]["p90"] <= s["ttft_s"]["p90"] and s["server_tpot_s"]["mean"] > 0
        assert set(run["steps"]) <= {"prefill", "decode"}  # workers report after a second of work
        assert all(d["step_ms"] > 0 and d["gpu_ms"] is None for d in run["steps"].values())
        assert s["ttft_slo_s"] == 2 and 0 <= s["slo_attainment"] <= 1 and s["request_throughput"] > 0
    met = [run["rate"] for run in mode["runs"] if run["summary"]["slo_attainment"] >= 0.9]
    assert mode["max_rate_at_goal"] == max(met, default=None)
    # the server was stopped and its socket folder removed; its log was kept
    assert not os.path.exists(os.path.dirname(mode["address"].removeprefix("ipc://")))
    assert "serving tiny" in (out / "small.log").read_text()
    assert_png(out / "latency.png")
    assert_png(out / "attainment.png")
    assert os.path.exists(out / "split-small.png") == bool(mode["split_samples"])
    best = mode["max_rate_at_goal"]
    best = "none of the rates swept" if best is None else f"{best:g} req/s"
    assert captured.out.rstrip().splitlines()[-2:] == ["highest rate with >= 90% SLO attainment:",
                                                  f"  small: {best}"]


def test_every_rate_sends_fresh_prompts(tmp_path, capsys):
    """A sweep's rates share lengths and arrivals, not ids: the server's prefix cache finds
    nothing of the warm-up or of the rate before (random ids never fill a page alike)."""
    server = Server("tiny", "--page-size", "8")
    try:
        rc = main(["bench", "--servers", f"s={server.address}", "--rates", "16,32", "--num-requests", "6",
                   "--input-len-mean", "64", "--output-len-mean", "8", "--ttft-slo", "2", "--tpot-slo", "0.5",
                   "--out", str(tmp_path / "sweep")])
        assert rc == 0, capsys.readouterr().err
        cache = server.wait_idle()["prefix_cache"]
        assert cache["enabled"] and cache["prompt_tokens"] > 0 and cache["hit_tokens"] == 0, cache
    finally:
        assert server.stop() == 0

def summary_at(ttft_s: float, ok: bool) -> dict:
    """Four requests of 11 tokens; all meet TTFT <= 0.5 s and TPOT <= 0.1 s when ok, one when not."""
    ttfts = [ttft_s if ok or i == 0 else 5 * ttft_s for i in range(4)]
    records = [RequestRecord(i, 10, 11, 0.0, ttft_s=t, e2e_s=t + 0.5, output_tokens=11,
                             finish_reason="length") for i, t in enumerate(ttfts)]
    return summarize(records, 2.0, 0.5, 0.1)


def test_plot_redraws_a_saved_report_with_the_split_over_time(tmp_path, capsys):
    start = 1.7e9
    report = {
        "config": {"ttft_slo": 0.5, "tpot_slo": 0.1},
        "modes": {
            "unified": {"runs": [{"rate": 2.0, "summary": summary_at(0.3, False)},
                                 {"rate": 8.0, "summary": summary_at(0.4, False),
                                  "steps": {"unified": {"step_ms": 12.5, "gpu_ms": 9.0, "mean_batch": 4.0,
                                                        "busy": 0.5}}}],
                        "max_rate_at_goal": None, "split_samples": [], "partition": None},
            "dynamic": {"runs": [{"rate": 2.0, "summary": summary_at(0.1, True)},
                                 {"rate": 8.0, "summary": summary_at(0.2, True) | {"backlog_trend": 1.5}}],
                        "max_rate_at_goal": 2.0, "started_unix": start,  # stale, as in a report joined by hand
                        "split_samples": [{"time_s": t / 2, "rate": 2.0 if t < 6 else 8.0,
                                           "prefill_sm": 50 if t < 8 else 70,
                                           "decode_sm": 50 if t < 8 else 30} for t in range(12)],
                        "partition": {"prefill_sm": 70, "decode_sm": 30, "history": [
                            {"time": start + 4.0, "prefill_sm": 70, "decode_sm": 30, "role": "prefill",
                             "prepare_s": 0.2, "gap_s": None, "reason": "TTFT"}]}},
        },
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert main(["bench", "--plot", str(path), "--out", str(tmp_path / "again")]) == 0
    for name in ("latency.png", "attainment.png", "split-dynamic.png"):
        assert_png(tmp_path / "again" / name)
    assert not os.path.exists(tmp_path / "again" / "split-unified.png")
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3:] == ["highest rate with >= 90% SLO attainment:", "  unified: none of the rates swept",
                          "  dynamic: 8 req/s (backlog 1.50x)"]
    row = next(line.split() for line in lines if line.split()[:1] == ["8"])  # unified at 8 req/s
    # "-": sent all at once, so no rate sent at; too few for a backlog trend
    assert row == ["8", "-", "2.00", "0", "2100.0", "2000.0", "50.0", "25.0%", "-", "12.5/9.0"]


def test_a_launch_that_fails_says_why(tmp_path, capsys):
    rc = main(["bench", "--model", "tiny", "--launch", "bad=--no-such-flag", "--rates", "2",
               "--num-requests", "2", "--ttft-slo", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "the bad server exited with status 2" in err and "--no-such-flag" in err
    assert "unrecognized arguments" in (tmp_path / "bad.log").read_text()


@pytest.mark.parametrize("args,message", [
    (["--rates", "2", "--num-requests", "2"], "needs --ttft-slo and/or --tpot-slo"),
    (["--rates", "2", "--num-requests", "2", "--ttft-slo", "1", "--servers", "a=ipc:///x",
      "--launch", "b=--mode unified", "--model", "tiny"], "not both"),
    (["--rates", "2", "--num-requests", "2", "--ttft-slo", "1", "--launch", "b=--mode unified"],
     "needs --model"),
    (["--rates", "2", "--rate", "2", "--num-requests", "2", "--ttft-slo", "1"], "and no --rate"),
    (["--rates", "2", "--num-requests", "2", "--ttft-slo", "1", "--servers", "a=ipc:///x,a=ipc:///y"],
     "must differ"),
    (["--rates", "2", "--ttft-slo", "1"], "--num-requests must be at least 1"),
    (["--num-requests", "2"], "give --rate, or --rates"),
])
def test_sweep_arguments_are_checked(args, message, capsys):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_bad_rates_and_reports_are_refused(tmp_path, capsys):
    for bad in ("0,2", "2,inf", "x"):
        with pytest.raises(SystemExit):
            main(["bench", "--rates", bad])
    path = tmp_path / "single.json"
    path.write_text(json.dumps({"config": {}, "summary": {}, "requests": []}))  # a one-rate report
    assert main(["bench", "--plot", str(path)]) == 2
    assert "not a sweep report" in capsys.readouterr().err


def test_step_means_take_each_report_once_from_the_run_weighted_by_steps():
    """The poller sees a report (about one a second) on every poll until the next one comes,
    and sees the warm-up's last one at first: each counts once, the warm-up's not at all."""
    def report(age_s, steps_per_s, step_ms):
        return {"age_s": age_s, "steps_per_s": steps_per_s, "busy": 0.5, "mean_batch": step_ms / 2,
                "step_ms": step_ms, "gpu_ms": None}
    samples = [{"time_s": 10.0, "steps": {"decode": report(0.5, 100.0, 99.0)}},  # arrived at 9.5: before
               {"time_s": 10.5, "steps": {"decode": report(0.2, 50.0, 10.0)}},   # arrived at 10.3
               {"time_s": 11.0, "steps": {"decode": report(0.7, 50.0, 10.0)}},   # the same one again
               {"time_s": 11.5, "steps": {"decode": report(1.2, 50.0, 10.0)}},   # and again
               {"time_s": 12.0, "steps": {"decode": report(0.1, 150.0, 20.0)}}]
    means = step_means(samples, began_s=10.0)["decode"]
    assert means["step_ms"] == pytest.approx((50 * 10.0 + 150 * 20.0) / 200)  # per step, not per report
    assert means["mean_batch"] == pytest.approx(17.5 / 2) and means["busy"] == 0.5 and means["gpu_ms"] is None
