"""The prefix cache end to end, real controller and worker processes: greedy outputs equal those
of the engine without a cache, for shared prefixes, partial pages and prefixes shared with
requests still in prefill, under preemption, aborts, a switch and a killed worker; afterwards
every page is free or cached and no cached page is held."""

import asyncio
import os
import random
import signal

import pytest

from tests.serving import Server, wait_for
from tests.serving_fixtures import engine_greedy
from tests.serving_fixtures import model  # noqa: F401 (a fixture, found by name)
from tests.test_serving import run_concurrently


def shared_work(seed: int = 0) -> list[tuple[list[int], int]]:
    """Three groups of a 40-token prefix with suffixes of 1 to 27 tokens (totals on and off page
    boundaries), a prompt twice, a prompt that is another's prefix; 4 to 24 tokens each."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 300) for _ in range(40)] for _ in range(3)]
    prompts = [p + [rng.randrange(3, 300) for _ in range(n)] for p in prefixes for n in (1, 8, 24, 27)]
    prompts += [prompts[0], prefixes[2][:32]]
    return [(p, rng.randint(4, 24)) for p in prompts]


@pytest.fixture(scope="module")
def reference(model):  # noqa: F811
    return engine_greedy(model, shared_work(), prefix_cache=False)


def settled(server: Server) -> dict:
    """Stats once idle, checked: every page free or cached, no cached page held."""
    stats = server.wait_idle()
    assert stats["kv_pages_free"] == stats["kv_pages_total"] and stats["prefix_cache"]["held_pages"] == 0
    assert stats["running"] == stats["waiting"] == 0
    return stats


@pytest.mark.parametrize("args", [(), ("--mode", "unified"), ("--num-pages", "12")],
                         ids=["semi-pd", "unified", "small-pool-preempts"])
def test_outputs_equal_the_uncached_engine(model, reference, args):  # noqa: F811
    server = Server(model, *args)
    try:
        for _ in range(2):  # the second round finds every prompt's prefix cached
            results = asyncio.run(run_concurrently(server.address, shared_work()))
            assert [r.token_ids for r in results] == reference
            stats = settled(server)
        cache = stats["prefix_cache"]
        assert cache["enabled"] and cache["cached_pages"] > 0 and cache["hit_rate"] > 0.3
    finally:
        assert server.stop() == 0


def test_off_switch(model, reference):  # noqa: F811
    server = Server(model, "--no-prefix-cache")
    try:
        results = asyncio.run(run_concurrently(server.address, shared_work()))
        assert [r.token_ids for r in results] == reference
        cache = settled(server)["prefix_cache"]
        assert not cache["enabled"] and cache["cached_pages"] == cache["hit_tokens"] == 0
    finally:
        assert server.stop() == 0


def test_aborts_leave_the_counts_exact(model):  # noqa: F811
    server = Server(model)
    try:
        rng, streams = random.Random(1), []
        for i in range(4):
            streams += [server.client.generate(prompt_ids=p, temperature=0.8, max_tokens=m + 10, ignore_eos=True)
                        for p, m in shared_work(seed=i)]
        for stream in streams:
            if rng.random() < 0.4:
                for _ in range(rng.randint(0, 3)):
                    if next(stream, None) is None:
                        break
                stream.close()
            else:
                assert stream.result().finish_reason == "length"
        settled(server)
    finally:
        assert server.stop() == 0


def test_a_switch_mid_stream_keeps_outputs_and_the_cache(model, reference):  # noqa: F811
    server = Server(model)
    try:
        client = server.client
        asyncio.run(run_concurrently(server.address, shared_work()))
        before = settled(server)["prefix_cache"]
        streams = [client.generate(prompt_ids=p, temperature=0, max_tokens=m, ignore_eos=True)
                   for p, m in shared_work()]
        next(streams[0])
        client.partition(70, 30)
        assert [s.result().token_ids for s in streams] == reference
        stats = wait_for(lambda s: not s["partition"]["switching"], server)
        assert (stats["partition"]["prefill_sm"], stats["partition"]["decode_sm"]) == (70, 30)
        again = asyncio.run(run_concurrently(server.address, shared_work()))  # served by the new workers
        assert [r.token_ids for r in again] == reference
        after = settled(server)["prefix_cache"]
        assert after["hit_tokens"] - before["hit_tokens"] >= before["hit_tokens"]  # nothing was lost
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_killed_worker_leaves_the_counts_exact(model, reference, role):  # noqa: F811
    server = Server(model)
    try:
        client, old = server.client, server.stats()["workers"][role]["pid"]
        streams = [client.generate(prompt_ids=p, temperature=0, max_tokens=m, ignore_eos=True)
                   for p, m in shared_work()]
        next(streams[0])
        os.kill(old, signal.SIGKILL)
        assert [s.result().token_ids for s in streams] == reference
        # Every stream may end before the supervisor has seen the death: wait for the restart.
        wait_for(lambda s: s["worker_restarts"] == 1 and s["workers"][role]["pid"] != old, server)
        settled(server)
    finally:
        assert server.stop() == 0
