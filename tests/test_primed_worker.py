"""Workers primed ahead of a switch, end to end with real processes: a dynamic server keeps
one prepared at each share the partitioner names (prefill's top, then a step off decode's cap); a switch to that share takes it over with
no preparation and loses nothing; a switch elsewhere kills it, takes the other standby, ready
too, and the next one is aimed again; a primed worker that dies is replaced and counted, and
neither its death nor a standby's clears the partitioner's window. SLOs nothing misses: no
decision moves the split, manual switches on the grid do."""

import os
import signal

from tests.serving import Server, wait_for
from tests.serving_fixtures import engine_greedy, workload
from tests.serving_fixtures import model  # noqa: F401 (a fixture, found by name)
from tests.stop_tools import alive
from tests.test_lifecycle import cli_stats

DYNAMIC = ("--dynamic", "--ttft-slo", "1000", "--tpot-slo", "1000", "--window", "1000")


def primed_at(share: int, role: str = "prefill"):
    """A predicate on stats: the role has a primed worker, prepared, at this share."""
    def holds(stats) -> bool:
        primed = stats["workers"][role]["primed"]
        return primed is not None and primed["state"] == "primed" and primed["sm_percent"] == share
    return holds


def switched(stats) -> bool:
    return not stats["partition"]["switching"]


def switch_mid_stream(server: Server, model_path: str, split: tuple[int, int], seed: int) -> dict:
    """Switch to `split` while greedy streams run; they match the engine's. The stats once done."""
    work = [(p * 3, 60) for p, _ in workload(8, seed=seed)]
    streams = [server.client.generate(prompt_ids=p, temperature=0, max_tokens=m, ignore_eos=True) for p, m in work]
    next(streams[0])
    server.client.partition(*split)
    assert [s.result().token_ids for s in streams] == engine_greedy(model_path, work)
    return wait_for(switched, server)


def test_a_switch_to_the_primed_share_takes_the_primed_worker(model):  # noqa: F811
    server = Server(model, "--max-num-seqs", "16", *DYNAMIC)
    try:
        client = server.client
        primed = wait_for(primed_at(100), server)["workers"]["prefill"]["primed"]["pid"]  # the top, at first
        assert f"pid {primed} primed at 100%" in cli_stats(server)["prefill"]
        stats = switch_mid_stream(server, model, (100, 100), seed=5)
        record = stats["partition"]["history"][-1]
        assert (record["role"], record["to_sm"], record["primed"], record["error"]) == ("prefill", 100, True, None)
        assert stats["workers"]["prefill"]["pid"] == primed and stats["workers"]["prefill"]["primed"] is None
        client.partition(60, 100)  # no worker primed at 60: a standby prepares
        stats = wait_for(switched, server)
        assert stats["partition"]["history"][-1]["primed"] is False
        wait_for(primed_at(100), server)  # the highest share held so far, primed again
        stats = server.wait_idle()
        assert stats["kv_pages_free"] == stats["kv_pages_total"]
    finally:
        assert server.stop() == 0


def test_a_switch_elsewhere_kills_the_primed_worker_and_one_dying_is_replaced(model):  # noqa: F811
    server = Server(model, *DYNAMIC)
    try:
        client = server.client
        first = wait_for(primed_at(100), server)["workers"]["prefill"]["primed"]["pid"]
        os.kill(first, signal.SIGKILL)
        wait_for(lambda s: s["partition"]["primed_deaths"]["prefill"] == 1, server)  # counted...
        stats = wait_for(lambda s: primed_at(100)(s) and s["workers"]["prefill"]["primed"]["pid"] != first, server)
        second = stats["workers"]["prefill"]["primed"]["pid"]
        assert stats["partition"]["primed_deaths"] == {"prefill": 0, "decode": 0}  # ...as one in a row, until one is primed
        assert stats["worker_restarts"] == 0  # it served nothing: no restart, no recovery
        wait_for(lambda s: s["workers"]["prefill"]["standby"]["ready"], server)  # the second standby
        client.partition(70, 100)
        stats = wait_for(switched, server)
        record = stats["partition"]["history"][-1]
        assert (record["to_sm"], record["primed"], record["cold_start"], record["error"]) == (70, False, False, None)
        assert not alive(second) and stats["partition"]["prefill_sm"] == 70
        wait_for(primed_at(100), server)  # aimed again from 70
        result = client.generate(prompt_ids=[7, 8, 9], temperature=0, max_tokens=5).result()
        assert len(result.token_ids) == 5
    finally:
        assert server.stop() == 0


def test_with_prefill_at_the_top_decode_is_primed_a_step_down(model):  # noqa: F811
    server = Server(model, "--prefill-sm", "100", *DYNAMIC)
    try:
        stats = wait_for(primed_at(90, "decode"), server)
        primed = stats["workers"]["decode"]["primed"]["pid"]
        assert stats["workers"]["prefill"]["primed"] is None  # prefill is at its top already
        stats = switch_mid_stream(server, model, (100, 90), seed=6)
        record = stats["partition"]["history"][-1]
        assert (record["role"], record["to_sm"], record["primed"], record["error"]) == ("decode", 90, True, None)
        assert stats["workers"]["decode"]["pid"] == primed
        wait_for(primed_at(80, "decode"), server)  # the next step down
        stats = server.wait_idle()
        assert stats["kv_pages_free"] == stats["kv_pages_total"]
    finally:
        assert server.stop() == 0


def test_a_standby_or_primed_worker_dying_keeps_the_decision_window(model):  # noqa: F811
    """Neither held a request or changed the split: requests finished before either died still
    count toward the partitioner's next decision (a window of 3 here)."""
    server = Server(model, "--dynamic", "--ttft-slo", "1000", "--tpot-slo", "1000", "--window", "3")
    try:
        def finish_one():
            server.client.generate(prompt_ids=[7, 8, 9], temperature=0, max_tokens=3).result()

        def kill_and_wait(kind: str, stats: dict):
            pid = stats["workers"]["prefill"][kind]["pid"]
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda s: (s["workers"]["prefill"][kind] or {}).get("pid") != pid, server)  # death handled
        stats = wait_for(lambda s: primed_at(100)(s) and s["workers"]["prefill"]["standby"]["ready"], server)
        finish_one()
        kill_and_wait("standby", stats)
        finish_one()
        kill_and_wait("primed", stats)
        assert server.stats()["partition"]["decisions"] == []
        finish_one()
        decisions = server.stats()["partition"]["decisions"]
        assert [(d["trigger"], d["requests"], d["action"]) for d in decisions] == [("window", 3, "hold")]
    finally:
        assert server.stop() == 0
