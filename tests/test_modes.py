"""Serving modes and SM-split switching, end to end with real processes: the unified baseline,
a switch in the middle of streaming, and the dynamic partitioner acting on its own."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.serving import ROOT, Server, wait_for
from tests.test_serving import model, reference, run_concurrently, workload  # noqa: F401 (fixtures)


def standbys_ready(stats) -> bool:
    return all(w["standby"] and w["standby"]["ready"] for w in stats["workers"].values())


def test_unified_mode_matches_generate_in_one_worker(model, reference):  # noqa: F811
    server = Server(model, "--mode", "unified")
    try:
        results = asyncio.run(run_concurrently(server.address, workload(32)))
        assert [r.token_ids for r in results] == reference
        stats = server.wait_idle()
        assert list(stats["workers"]) == ["unified"] and stats["partition"]["mode"] == "unified"
        assert stats["kv_pages_free"] == stats["kv_pages_total"]
        with pytest.raises(Exception, match="unified server has no prefill/decode split"):
            server.client.partition(50, 50)
    finally:
        assert server.stop() == 0


def test_switch_mid_stream_keeps_outputs_and_pages(model):  # noqa: F811
    server = Server(model, "--max-num-seqs", "16")
    try:
        client = server.client
        work = [(p * 3, 300) for p, _ in workload(12, seed=5)]
        unswitched = asyncio.run(run_concurrently(server.address, work))
        client.partition(70, 30)  # the first switch also starts the standbys
        # ...and while the called-up ones prepare, their successors already import
        assert all(w["standby"] for w in server.stats()["workers"].values())
        stats = wait_for(lambda s: not s["partition"]["switching"] and standbys_ready(s), server)
        assert (stats["workers"]["prefill"]["sm_percent"], stats["workers"]["decode"]["sm_percent"]) == (70, 30)
        old_pids = {role: w["pid"] for role, w in stats["workers"].items()}

        streams = [client.generate(prompt_ids=p, temperature=0, max_tokens=m, ignore_eos=True) for p, m in work]
        next(streams[0]), next(streams[0])  # decoding is under way: the second token came from decode
        os.kill(old_pids["decode"], signal.SIGSTOP)  # hold the hand-over open
        try:
            client.partition(40, 60)
            wait_for(lambda s: s["workers"]["decode"]["pid"] != old_pids["decode"], server)
            assert not server.stats()["workers"]["decode"]["ready"]  # the successor waits, closed
            assert client.health()["status"] == "ok"  # the server is serving, not starting
        finally:
            os.kill(old_pids["decode"], signal.SIGCONT)
        results = [s.result() for s in streams]
        assert [r.token_ids for r in results] == [r.token_ids for r in unswitched]
        assert all(r.finish_reason == "length" for r in results)

        server.wait_idle()  # an ended sequence's pages go free when the step in flight is read: after its Final
        stats = wait_for(lambda s: not s["partition"]["switching"], server)
        assert stats["kv_pages_free"] == stats["kv_pages_total"] and stats["running"] == stats["waiting"] == 0
        assert all(stats["workers"][role]["pid"] != pid for role, pid in old_pids.items())
        last = {h["role"]: h for h in stats["partition"]["history"][-2:]}
        assert last["decode"]["moved_seqs"] > 0 and last["decode"]["gap_s"] > 0  # it really was mid-stream
        parts = last["decode"]["gap_parts_s"]  # the gap, split where the controller sees it pass
        assert set(parts) == {"hand_over", "first_step"} and min(parts.values()) >= 0
        assert sum(parts.values()) == pytest.approx(last["decode"]["gap_s"])
        assert not last["decode"]["cold_start"] and last["decode"]["error"] is None
        prepared = last["decode"]["prepare_parts_s"]  # the new worker's own account: on the CPU, no
        assert set(prepared) == {"context_and_map"}  # warm-up or graphs; within the controller's time
        assert 0 < prepared["context_and_map"] < last["decode"]["prepare_s"]
        assert (stats["partition"]["prefill_sm"], stats["partition"]["decode_sm"]) == (40, 60)
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("dies", ["old", "new", "both", "before"])
def test_a_worker_dying_mid_switch_loses_nothing(model, dies):  # noqa: F811
    """The old decode worker dies during its hand-over, or its successor does, or both; or it
    dies just before the switch is asked for, so that the warm standby is ready before the
    replacement (still importing) that should hand over to it."""
    server = Server(model, "--max-num-seqs", "16")
    try:
        client = server.client
        client.partition(70, 30)  # the first switch starts the standbys
        old = wait_for(lambda s: not s["partition"]["switching"] and standbys_ready(s), server)
        old = old["workers"]["decode"]["pid"]
        streams = [client.generate(prompt_ids=p * 3, temperature=0, max_tokens=200, ignore_eos=True)
                   for p, _ in workload(12, seed=5)]
        next(streams[0]), next(streams[0])  # decoding is under way
        if dies == "before":
            os.kill(old, signal.SIGKILL)
            wait_for(lambda s: s["workers"]["decode"]["pid"] != old, server)
            client.partition(40, 60)
        else:
            os.kill(old, signal.SIGSTOP)  # the hand-over waits for the old worker...
            client.partition(40, 60)
            new = wait_for(lambda s: s["workers"]["decode"]["pid"] != old, server)["workers"]["decode"]["pid"]
            for pid in {"old": [old], "new": [new], "both": [new, old]}[dies]:
                os.kill(pid, signal.SIGKILL)  # ...which dies, or its successor does, or both
        results = [s.result() for s in streams]  # raises if any stream gets no Final
        assert all(r.finish_reason == "length" and len(r.token_ids) == 200 for r in results)
        stats = server.wait_idle()
        assert stats["kv_pages_free"] == stats["kv_pages_total"]
        switch = [h for h in stats["partition"]["history"] if h["role"] == "decode"][-1]
        # (a stopped old worker that held the page allocator's lock is killed by the controller
        # after FROZEN_S: then the old one's death ends the switch, whatever the test kills next)
        assert switch["error"] in {"old": ["old decode worker exited before handing over"],
                                   "new": ["new decode worker exited during the hand-over",
                                           "old decode worker exited before handing over"],
                                   "both": ["new decode worker exited during the hand-over",  # whichever
                                            "old decode worker exited before handing over"],  # is seen first
                                   "before": [None]}[dies]
        # a current worker that dies is replaced, once: a death is handled once
        assert stats["worker_restarts"] == (0 if dies == "old" else 1)
        assert stats["partition"]["decode_sm"] == 60  # the new share holds either way
        assert len(client.generate(prompt_ids=[7, 8, 9], temperature=0, max_tokens=5).result().token_ids) == 5
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("hangs", ["new", "old"])
def test_a_switch_held_up_past_its_timeout_is_ended(model, hangs):  # noqa: F811
    """A called-up standby that never becomes ready, or an old worker that never hands over
    (stopped: alive and silent), is killed after --switch-timeout; nothing is lost and the role
    can switch again. --dynamic with SLOs nothing misses: warm standbys from the start, no
    decisions, manual switches on the grid."""
    server = Server(model, "--max-num-seqs", "16", "--switch-timeout", "5", "--dynamic",
                    "--ttft-slo", "1000", "--tpot-slo", "1000", "--window", "1000")
    try:
        client = server.client
        stats = wait_for(standbys_ready, server)
        decode = stats["workers"]["decode"]
        streams = [client.generate(prompt_ids=p * 3, temperature=0, max_tokens=200, ignore_eos=True)
                   for p, _ in workload(12, seed=5)]
        next(streams[0]), next(streams[0])  # decoding is under way
        os.kill(decode["standby"]["pid"] if hangs == "new" else decode["pid"], signal.SIGSTOP)
        cli = subprocess.run([sys.executable, "-m", "semipd", "partition", "--address", server.address,
                              "--prefill-sm", "60", "--decode-sm", "50"], capture_output=True, text=True, cwd=ROOT)
        error = {"new": "new decode worker was not ready after 5 s",
                 "old": "old decode worker did not hand over in 5 s"}[hangs]
        assert cli.returncode == 2 and f"the decode switch failed: {error}" in cli.stderr, cli.stderr
        results = [s.result() for s in streams]  # raises if any stream gets no Final
        assert all(r.finish_reason == "length" and len(r.token_ids) == 200 for r in results)
        stats = wait_for(lambda s: not s["partition"]["switching"], server)
        assert stats["partition"]["history"][-1]["error"] == error
        assert stats["partition"]["decode_sm"] == {"new": 100, "old": 50}[hangs]
        stats = server.wait_idle()
        assert stats["kv_pages_free"] == stats["kv_pages_total"]
        wait_for(standbys_ready, server)
        client.partition(60, 70)  # the role switches again
        stats = wait_for(lambda s: not s["partition"]["switching"], server)
        assert stats["partition"]["decode_sm"] == 70 and stats["partition"]["history"][-1]["error"] is None
        assert len(client.generate(prompt_ids=[7, 8, 9], temperature=0, max_tokens=5).result().token_ids) == 5
    finally:
        assert server.stop() == 0


def test_dynamic_partitioner_moves_the_split_on_its_own(model):  # noqa: F811
    # An SLO no request can meet: every window misses TTFT, so prefill must gain SMs.
    server = Server(model, "--dynamic", "--ttft-slo", "0.000001", "--tpot-slo", "10", "--window", "4")
    try:
        first, during, after = (workload(12, seed=7)[i:i + 4] for i in (0, 4, 8))
        asyncio.run(run_concurrently(server.address, first))  # a full window: the first decision
        # These finish while the first switch is under way (a cold one: seconds). Measured on the
        # old split, they must not make a decision, which would find a switch running and be lost.
        asyncio.run(run_concurrently(server.address, during))
        stats = wait_for(lambda s: s["partition"]["history"] and not s["partition"]["switching"], server)
        decision = stats["partition"]["decisions"][0]
        assert decision["action"] == "raise_prefill" and decision["ttft_s"] > 0.000001
        assert decision["next_prefill_sm"] > decision["prefill_sm"] == 60
        assert stats["partition"]["history"][0]["reason"].startswith("partitioner")
        assert stats["partition"]["prefill_sm"] > 60 and stats["partition"]["dynamic"]
        # The first tick after a switch leaves out what arrived before it (it may have waited
        # behind the old split's prompts): a window sent before that tick would never count.
        time.sleep(1.0)  # four ticks (partitioner.TICK_S)
        results = asyncio.run(run_concurrently(server.address, after))  # still serving
        assert all(r.finish_reason == "length" for r in results)
        stats = wait_for(lambda s: len(s["partition"]["decisions"]) > 1 and not s["partition"]["switching"], server)
        moves = [d["next_prefill_sm"] for d in stats["partition"]["decisions"] if d["action"] == "raise_prefill"]
        assert moves == [h["to_sm"] for h in stats["partition"]["history"]] == [70, 80]
        # A split off the partitioner's grid, asked for by hand, once stopped the server when the
        # switch was over and the partitioner was told of it.
        with pytest.raises(Exception, match=r"moves the split itself \(--dynamic\): split \(55, 100\) needs"):
            server.client.partition(55, 100)
        assert server.client.health()["status"] == "ok"
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("args,message", [
    (["--prefill-sm", "0"], "--prefill-sm is a percentage"),
    (["--switch-timeout", "0"], "--switch-timeout must be positive"),
    (["--dynamic"], "--dynamic needs --ttft-slo and --tpot-slo"),
    (["--mode", "unified", "--dynamic"], "--dynamic needs --mode semi-pd"),
    (["--dynamic", "--ttft-slo", "1", "--tpot-slo", "1", "--prefill-sm", "55"], "multiple of --sm-step"),
])
def test_bad_mode_flags_fail_with_one_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "semipd", "serve", "--model", "tiny", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
