"""Tensor-parallel serving on the CPU, end to end with real processes: `semipd serve -tp 2` runs
each role as two gloo ranks over the controller's two shards and gives the greedy outputs of one
process, in semi-PD and unified modes, on the tiny preset and on a transformers checkpoint. A
switch of the split and a killed rank, both in the middle of streaming, end every stream as at
tp 1: the role's ranks are replaced together, and no page leaks. A stop with streams open ends
each once and leaves no process or file behind (the groups' rendezvous files included)."""

import asyncio
import os
import signal
import time

import pytest

from tests.serving import Server, wait_for
from tests.serving_fixtures import engine_greedy, workload
from tests.serving_fixtures import model  # noqa: F401 (a fixture, found by name)
from tests.stop_tools import RawStreams, alive, leftovers, new_folder, process_tree, start, wait_exit, wait_ready
from tests.stop_tools import no_server_left  # noqa: F401 (autouse: kills what a failed test left)
from tests.test_serving import run_concurrently

WORK = workload(16, seed=7)


def assert_two_ranks_each(stats: dict) -> None:
    for worker in stats["workers"].values():
        assert len(set(worker["ranks"])) == 2 and worker["ranks"][0] == worker["pid"]
        assert all(alive(pid) for pid in worker["ranks"])


@pytest.mark.parametrize("case", ["tiny/semi-pd", "tiny/unified", "checkpoint/semi-pd"])
def test_two_ranks_serve_the_greedy_outputs_of_one_process(model, case):  # noqa: F811
    name, mode = case.split("/")
    model_name = model if name == "checkpoint" else name
    server = Server(model_name, "--mode", mode, "-tp", "2")
    try:
        results = asyncio.run(run_concurrently(server.address, WORK))
        assert [r.token_ids for r in results] == engine_greedy(model_name, WORK)
        stats = server.wait_idle()
        assert stats["kv_pages_free"] == stats["kv_pages_total"]
        assert list(stats["workers"]) == (["unified"] if mode == "unified" else ["prefill", "decode"])
        assert_two_ranks_each(stats)
    finally:
        assert server.stop() == 0


def test_switch_mid_stream_moves_both_ranks(model):  # noqa: F811
    server = Server(model, "-tp", "2")
    try:
        client = server.client
        client.partition(70, 30)  # the first switch also starts the standbys (two ranks each)
        stats = wait_for(lambda s: not s["partition"]["switching"]
                         and all(w["standby"] and w["standby"]["ready"] for w in s["workers"].values()), server)
        old = {p for w in stats["workers"].values() for p in w["ranks"]}
        work = [(p * 3, 60) for p, _ in WORK]
        streams = [client.generate(prompt_ids=p, temperature=0, max_tokens=m, ignore_eos=True) for p, m in work]
        next(streams[0]), next(streams[0])  # decoding is under way
        decode = stats["workers"]["decode"]["pid"]
        os.kill(decode, signal.SIGSTOP)  # hold the hand-over open, with every stream in decode's hands
        try:
            client.partition(40, 60)
            wait_for(lambda s: s["workers"]["decode"]["pid"] != decode, server)
        finally:
            os.kill(decode, signal.SIGCONT)
        results = [s.result() for s in streams]
        assert [r.token_ids for r in results] == engine_greedy(model, work)
        stats = wait_for(lambda s: not s["partition"]["switching"], server)
        assert (stats["workers"]["prefill"]["sm_percent"], stats["workers"]["decode"]["sm_percent"]) == (40, 60)
        last = {h["role"]: h for h in stats["partition"]["history"][-2:]}
        assert last["decode"]["moved_seqs"] > 0 and last["decode"]["error"] is None  # it was mid-stream
        assert_two_ranks_each(stats)
        assert not {p for w in stats["workers"].values() for p in w["ranks"]} & old
        wait_for(lambda s: not any(alive(pid) for pid in old), server)  # once the old ranks are reaped
        stats = server.wait_idle()
        assert stats["kv_pages_free"] == stats["kv_pages_total"]
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("role, rank", [("decode", 1), ("prefill", 0)])
def test_a_killed_rank_takes_its_role_down_and_the_role_recovers(model, role, rank):  # noqa: F811
    server = Server(model, "-tp", "2")
    try:
        client = server.client
        old = server.stats()["workers"][role]["ranks"]
        work = [(p * 4, 80) for p, _ in WORK]
        streams = [client.generate(prompt_ids=p, temperature=0, max_tokens=m, ignore_eos=True) for p, m in work]
        next(streams[0]), next(streams[0])  # its second token came from decode, which holds it
        wait_for(lambda s: s["running"] + s["waiting"] == len(work), server)
        os.kill(old[rank], signal.SIGKILL)
        results = [s.result() for s in streams]  # raises if any stream gets no Final
        assert [r.token_ids for r in results] == engine_greedy(model, work)
        wait_for(lambda s: s["worker_restarts"] == 1, server)  # streams may end before it is seen
        stats = server.wait_idle()
        assert not any(alive(pid) for pid in old)
        assert stats["kv_pages_free"] == stats["kv_pages_total"]
        assert_two_ranks_each(stats)
        assert len(client.generate(prompt_ids=[7, 8, 9], temperature=0, max_tokens=5).result().token_ids) == 5
    finally:
        assert server.stop() == 0


def test_sigterm_with_streams_open_stops_every_rank_and_leaves_nothing():
    folder = new_folder()
    proc = start(folder, "-tp", "2")
    wait_ready(proc, folder)
    tree = process_tree(proc.pid)
    streams = RawStreams(folder, 8)
    streams.read(RawStreams.all_streaming)
    proc.send_signal(signal.SIGTERM)
    streams.read(RawStreams.all_final)
    wait_exit(proc)
    time.sleep(0.2)  # anything after a Final would have come with it
    streams.read(lambda s: not s.sock.poll(0), timeout_s=5)
    streams.close()
    assert all(len(streams.finals(r)) == 1 for r in streams.messages)
    assert proc.returncode == 0 and not [p for p in tree if alive(p)]
    assert not leftovers(folder, tree)
