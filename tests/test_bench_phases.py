"""`semipd bench` workloads of phases: the spec parser, arrivals and lengths per phase, per-phase
summaries and table rows, the phase plot, and phased runs against a real `tiny` CPU server."""

import json
import re

import numpy as np
import pytest

from semipd.cli.bench.launched import Launched
from semipd.cli.bench.metrics import RequestRecord, format_summary, summarize
from semipd.cli.bench.phases import Phase, parse_phases, plan, resolve, warmup
from semipd.cli.main import main
from semipd.shared.errors import UserError
from tests.test_bench_sweep import assert_png


def test_phase_specs_parse_and_print_back():
    phases = parse_phases("30s@8:1900/40, 200req@16:130/440,0.5s@2.5:8/16")
    assert phases == [Phase(8.0, 1900.0, 40.0, duration_s=30.0), Phase(16.0, 130.0, 440.0, requests=200),
                      Phase(2.5, 8.0, 16.0, duration_s=0.5)]
    assert [p.spec() for p in phases] == ["30s@8:1900/40", "200req@16:130/440", "0.5s@2.5:8/16"]


@pytest.mark.parametrize("spec,message", [
    ("", "at least one phase"),
    ("30@8:1900/40", "phase 1 '30@8:1900/40': expected AMOUNT@RATE:IN/OUT"),
    ("30s@8:1900/40,,", "phase 2 '': expected"),
    ("30s@8:1900", "phase 1 '30s@8:1900': expected"),
    ("30s@8:1900/40,10s@inf:100/40", "phase 2 '10s@inf:100/40': expected"),
    ("2.5req@8:100/40", "a request count is a whole number"),
    ("30s@0:100/40", "its duration and rate must be positive"),
    ("0req@8:100/40", "its count and rate must be positive"),
    ("30s@8:4000/40", "the mean input length must lie strictly between 4 and 2048"),
    ("30s@8:100/1024", "the mean output length must lie strictly between 4 and 1024"),
])
def test_bad_phase_specs_say_what_is_wrong(spec, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_phases(spec)


def test_presets_and_rate_scaling():
    shifting = resolve("shifting", None)
    assert [p.spec() for p in shifting] == ["30s@8:1900/40", "30s@16:130/440", "30s@8:1900/40"]
    # a rate is the first phase's; the others keep their ratio to it, and every phase its duration
    assert [p.spec() for p in resolve("shifting", 12)] == ["30s@12:1900/40", "30s@24:130/440", "30s@12:1900/40"]
    assert resolve(None, 4, 10) == [Phase(4, 251, 203, requests=10)]
    assert resolve("prompt-heavy", 2, 5, output_mean=60) == [Phase(2, 1900, 60, requests=5)]
    # a warm-up spreads its requests over the shapes, never more than a count phase has
    assert [p.spec() for p in warmup(resolve("shifting", 8), 32)] == \
        ["11req@8:1900/40", "11req@16:130/440", "11req@8:1900/40"]
    assert warmup(resolve(None, 4, 10), 32) == [Phase(4, 251, 203, requests=10)]


def test_arrivals_and_lengths_hold_per_phase_back_to_back():
    phases = [Phase(8, 1900, 40, duration_s=1000), Phase(16, 130, 440, duration_s=500),
              Phase(4, 251, 203, requests=3000)]
    planned, sent = plan(phases, np.random.default_rng(3))
    sends = [p.send_s for p in planned]
    assert sends == sorted(sends) and [p.phase for p in planned] == sorted(p.phase for p in planned)
    assert [s["spec"] for s in sent] == [p.spec() for p in phases]
    assert sent[0]["start_s"] == 0 and sent[0]["end_s"] == 1000
    assert sent[1]["start_s"] == 1000 and sent[1]["end_s"] == 1500 and sent[2]["start_s"] == 1500
    for i, (phase, span) in enumerate(zip(phases, sent)):
        mine = [p for p in planned if p.phase == i]
        times = np.array([p.send_s for p in mine])
        assert times[0] == span["start_s"] and (times < span["end_s"]).all()  # each within its own span
        gaps = np.diff(times)
        assert abs(gaps.mean() * phase.rate - 1) < 0.05 and abs(gaps.std() * phase.rate - 1) < 0.05
        if phase.duration_s:  # about rate x duration requests (Poisson: sd 1.1% at 8000)
            assert abs(len(mine) / (phase.rate * phase.duration_s) - 1) < 0.05
        else:
            assert len(mine) == phase.requests
        inputs, outputs = np.array([p.input_len for p in mine]), np.array([p.output_len for p in mine])
        assert abs(inputs.mean() / phase.input_mean - 1) < 0.06 and abs(outputs.mean() / phase.output_mean - 1) < 0.06
        assert inputs.max() <= 2048 and outputs.max() <= 1024 and min(inputs.min(), outputs.min()) >= 4


def test_planned_lengths_fit_the_server_in_every_phase():
    planned, _ = plan(parse_phases("20s@10:1900/40,20s@10:130/440"), np.random.default_rng(4), max_model_len=1024)
    assert {p.phase for p in planned} == {0, 1} and all(p.input_len + p.output_len <= 1024 for p in planned)


def phased_records() -> tuple[list[RequestRecord], list[dict]]:
    """Phase 0: four requests, all within TTFT 0.5 s / TPOT 0.1 s. Phase 1: three that are slow to
    start (TTFT 1 s) and one failed."""
    def done(i, phase, send_s, ttft):
        return RequestRecord(i, 10, 11, send_s, phase, ttft_s=ttft, e2e_s=ttft + 0.5, output_tokens=11,
                             finish_reason="length")
    records = [done(i, 0, i * 0.5, 0.1 * (i + 1)) for i in range(4)]
    records += [done(4 + i, 1, 2 + i * 0.25, 1.0) for i in range(3)]
    records.append(RequestRecord(7, 10, 11, 2.75, 1, finish_reason="error", error="boom"))
    phases = [{"spec": "2s@2:10/11", "rate": 2.0, "input_len_mean": 10.0, "output_len_mean": 11.0,
               "start_s": 0.0, "end_s": 2.0},
              {"spec": "1s@4:10/11", "rate": 4.0, "input_len_mean": 10.0, "output_len_mean": 11.0,
               "start_s": 2.0, "end_s": 3.0}]
    return records, phases


def test_per_phase_summaries_from_records():
    records, phases = phased_records()
    s = summarize(records, 4.0, ttft_slo=0.5, tpot_slo=0.1, phases=phases)
    assert s["slo_attainment"] == pytest.approx(4 / 8) and s["completed"] == 7
    first, second = s["phases"]
    assert first["spec"] == "2s@2:10/11" and first["end_s"] == 2.0  # the phase as sent comes along
    assert (first["completed"], first["failed"], first["slo_attainment"]) == (4, 0, 1.0)
    assert first["ttft_s"]["p90"] == pytest.approx(0.37) and first["e2e_s"]["mean"] == pytest.approx(0.75)
    assert first["tpot_s"]["p90"] == pytest.approx(0.05) and first["offered_rate"] == pytest.approx(2.0)
    assert (second["completed"], second["failed"], second["slo_attainment"]) == (3, 1, 0.0)
    assert second["ttft_s"]["p90"] == pytest.approx(1.0) and second["offered_rate"] == pytest.approx(4.0)
    assert "phases" not in summarize(records, 4.0, 0.5, 0.1, phases[:1])  # one phase: the overall figures
    lines = format_summary(s).splitlines()
    assert lines[-2].split() == ["1:", "2s@2:10/11", "2.00", "4", "0", "750.0", "370.0", "50.0", "100.0%", "-"]
    assert lines[-1].split() == ["2:", "1s@4:10/11", "4.00", "3", "1", "1500.0", "1000.0", "50.0", "0.0%", "-"]


def test_phase_plot_and_table_from_a_synthetic_report(tmp_path, capsys):
    records, phases = phased_records()
    run = {"rate": 2.0, "summary": summarize(records, 4.0, 0.5, 0.1, phases), "started_s": 1.0,
           "requests": [{"phase": r.phase, "send_s": r.send_s, "ttft_s": r.ttft_s, "ok": r.ok} for r in records]}
    samples = [{"time_s": 1.0 + t / 4, "rate": 2.0, "prefill_sm": 40 if t < 8 else 70,
                "decode_sm": 60 if t < 8 else 30} for t in range(16)]
    report = {"config": {"ttft_slo": 0.5, "tpot_slo": 0.1, "workload": "2s@2:10/11,1s@4:10/11"}, "modes": {
        "unified": {"runs": [run], "split_samples": [], "partition": None},
        "dynamic": {"runs": [run], "split_samples": samples, "started_unix": 1.7e9, "partition": None}}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert main(["bench", "--plot", str(path)]) == 0
    assert_png(tmp_path / "phases-2.png")
    out = capsys.readouterr().out
    assert "phases-2.png" in out
    rows = [line.split() for line in out.splitlines()]
    # under each mode's rate row, a row per phase: its means, sent rate, failed, E2E, TTFT, TPOT, SLO met
    assert rows.count(["1:", "10/11", "2.00", "-", "0", "750.0", "370.0", "50.0", "100.0%", "-", "-"]) == 2
    assert rows.count(["2:", "10/11", "4.00", "-", "1", "1500.0", "1000.0", "50.0", "0.0%", "-", "-"]) == 2


@pytest.mark.parametrize("args,message", [
    (["--workload", "30s@8"], "--workload 30s@8: phase 1 '30s@8': expected"),
    (["--workload", "shifting", "--num-requests", "5"], "leave out --num-requests"),
    (["--workload", "shifting", "--rate", "2", "--input-len-mean", "50"], "leave out --input-len-mean"),
    (["--workload", "shifting", "--rate", "inf"], "give a finite --rate"),
    (["--workload", "prompt-heavy", "--rate", "2", "--num-requests", "5", "--dataset", "x.json"],
     "--dataset sets the lengths: leave out --workload"),
    (["--workload", "shifting", "--rates", "2", "--ttft-slo", "1", "--dataset", "x.json"], "leave out --dataset"),
])
def test_workload_flags_are_checked(args, message, capsys):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_phased_runs_against_a_tiny_server(tmp_path, capsys):
    server = Launched("tiny", "tiny", ["--max-num-seqs", "8", "--page-size", "8"], str(tmp_path / "server.log"))
    try:
        server.wait_ready()
        # one run as written: three requests of short answers, then a second of long answers
        single = tmp_path / "single.json"
        assert main(["bench", "--address", server.address, "--workload", "3req@4:16/8,1s@4:8/16",
                     "--ttft-slo", "2", "--out", str(single)]) == 0
        report = json.loads(single.read_text())
        assert report["config"]["phases"] == ["3req@4:16/8", "1s@4:8/16"]
        first, second = report["summary"]["phases"]
        phase_of = [r["phase"] for r in report["requests"]]
        assert phase_of[:3] == [0, 0, 0] and set(phase_of[3:]) == {1}
        assert first["completed"] == 3 and second["completed"] == len(phase_of) - 3 and second["failed"] == 0
        assert second["start_s"] == first["end_s"] and second["end_s"] == pytest.approx(first["end_s"] + 1)
        assert all(first["end_s"] <= r["send_s"] < second["end_s"] for r in report["requests"][3:])
        assert first["ttft_s"]["p90"] > 0 and second["e2e_s"]["mean"] > 0
        assert capsys.readouterr().out.splitlines()[-2].split()[:2] == ["2:", "1s@4:8/16"]  # then "report: "

        # a sweep at twice the spec's first rate: every phase twice as fast
        out = tmp_path / "sweep"
        assert main(["bench", "--servers", f"tiny={server.address}", "--workload", "3req@4:16/8,3req@8:8/16",
                     "--rates", "8", "--ttft-slo", "2", "--tpot-slo", "0.5", "--out", str(out)]) == 0
    finally:
        server.stop()
    run = json.loads((out / "report.json").read_text())["modes"]["tiny"]["runs"][0]
    assert [p["spec"] for p in run["summary"]["phases"]] == ["3req@8:16/8", "3req@16:8/16"]
    assert [p["completed"] for p in run["summary"]["phases"]] == [3, 3]
    assert [r["phase"] for r in run["requests"]] == [0, 0, 0, 1, 1, 1] and all(r["ok"] for r in run["requests"])
    assert_png(out / "phases-8.png")
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert ["1:", "16/8"] in rows and ["2:", "8/16"] in rows
