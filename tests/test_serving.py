"""The serving system end to end: real controller, prefill and decode processes, real sockets.
Requests served as they should be; tests/test_serving_faults.py has the faults."""

import asyncio
import json
import random
import subprocess
import sys
import time

import pytest

from semipd.shared.client import AsyncClient
from semipd.shared.engine import Engine
from semipd.shared.engine_config import EngineConfig
from semipd.shared.sampling_params import SamplingParams
from tests.serving import ROOT, Server
from tests.serving_fixtures import engine_greedy, workload
from tests.serving_fixtures import model, server  # noqa: F401 (fixtures, found by name)


@pytest.fixture(scope="module")
def reference(model):
    """Greedy outputs of the in-process engine (what `semipd generate` runs)."""
    return engine_greedy(model, workload(32))


async def run_concurrently(address: str, work) -> list:
    async with AsyncClient(address) as client:
        streams = [await client.generate(prompt_ids=p, temperature=0, max_tokens=m, ignore_eos=True)
                   for p, m in work]
        return await asyncio.gather(*(s.result() for s in streams))


def test_concurrent_greedy_equals_generate_in_three_processes(server, reference):
    results = asyncio.run(run_concurrently(server.address, workload(32)))
    assert [r.token_ids for r in results] == reference
    assert all(r.finish_reason == "length" for r in results)
    final = results[0].final
    assert final.ttft_s > 0 and len(final.itl_s) == final.completion_tokens - 1
    pids = {server.proc.pid, *(w["pid"] for w in server.stats()["workers"].values())}
    assert len(pids) == 3


def test_aborts_at_random_points_leak_nothing(server):
    rng = random.Random(1)
    client = server.client
    streams = [client.generate(prompt_ids=p, temperature=0.8, max_tokens=m + 10, ignore_eos=True)
               for p, m in workload(200, seed=2)]
    aborted = set(rng.sample(range(200), 60))
    finals = []
    for i, stream in enumerate(streams):
        if i in aborted:
            for _ in range(rng.randint(0, 4)):
                if next(stream, None) is None:
                    break
            stream.close()
        else:
            finals.append(stream.result().finish_reason)
    assert finals == ["length"] * 140
    stats = server.wait_idle()
    assert stats["kv_pages_free"] == stats["kv_pages_total"]
    assert stats["running"] == stats["waiting"] == 0


def test_seeded_sampling_and_stop_tokens_equal_generate(model, server):
    """Decode runs a step ahead of reading its tokens: a sequence that stops at one step already
    has a row in the next, whose token must vanish; and each token's noise index must count the
    tokens still being sampled. Sampled (seeded) outputs with stop tokens mid-stream must match
    the in-process engine's."""
    work = [(p, 40) for p, _ in workload(24, seed=13)]
    engine = Engine(EngineConfig(model=model, device="cpu", progress=False))
    try:
        free = engine.generate([p for p, _ in work], [SamplingParams(temperature=0.9, seed=i, max_tokens=m,
                                                                     ignore_eos=True) for i, (_, m) in enumerate(work)])
        # each request stops at the first appearance of a token from the middle of its free run
        params = [SamplingParams(temperature=0.9, seed=i, max_tokens=m, ignore_eos=True,
                                 stop_token_ids=[o.token_ids[len(o.token_ids) // 2]])
                  for i, ((_, m), o) in enumerate(zip(work, free))]
        expected = engine.generate([p for p, _ in work], params)
    finally:
        engine.close()
    assert any(o.finish_reason == "stop" and len(o.token_ids) > 2 for o in expected)

    async def serve() -> list:
        async with AsyncClient(server.address) as client:
            streams = [await client.generate(prompt_ids=p, **vars(sp)) for (p, _), sp in zip(work, params)]
            return await asyncio.gather(*(s.result() for s in streams))
    results = asyncio.run(serve())
    assert [r.token_ids for r in results] == [o.token_ids for o in expected]
    assert [r.finish_reason for r in results] == [o.finish_reason for o in expected]
    stats = server.wait_idle()
    assert stats["kv_pages_free"] == stats["kv_pages_total"]


def test_small_kv_pool_gives_the_same_outputs(model, reference):
    """Each request fits alone, the load does not: decode preempts and prefill recomputes."""
    server = Server(model, "--num-pages", "12")
    try:
        results = asyncio.run(run_concurrently(server.address, workload(32)))
        assert [r.token_ids for r in results] == reference
        stats = server.wait_idle()
        assert stats["kv_pages_free"] == stats["kv_pages_total"] == 12
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("mode", ["semi-pd", "unified"])
def test_a_small_step_budget_computes_prompts_in_chunks_with_the_same_outputs(model, mode):
    """--max-batched-tokens 32 (vLLM's --max-num-batched-tokens): prompts of up to 240 tokens
    take several prefill (or unified) steps each."""
    work = [(p * 4, m) for p, m in workload(12, seed=2)]
    server = Server(model, "--mode", mode, "--max-batched-tokens", "32", "--max-num-seqs", "16")
    try:
        results = asyncio.run(run_concurrently(server.address, work))
        assert [r.token_ids for r in results] == engine_greedy(model, work)
        stats = server.wait_idle()
        assert stats["kv_pages_free"] == stats["kv_pages_total"]
    finally:
        assert server.stop() == 0


def test_cli_complete_and_stats(server, reference):
    work = workload(32)[:3]
    args = [a for p, _ in work for a in ("--prompt-ids", ",".join(map(str, p)))]
    r = subprocess.run([sys.executable, "-m", "semipd", "complete", "--address", server.address, *args,
                        "--temperature", "0", "--ignore-eos", "--max-tokens", "20", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    # Greedy prefixes: the reference used per-prompt max_tokens, these ask for 20 each.
    assert [line["token_ids"][:len(ref)] for line, ref in zip(lines, reference)] == reference[:3]
    assert all("ttft_s" in line and "itl_s" in line for line in lines)
    r = subprocess.run([sys.executable, "-m", "semipd", "stats", "--address", server.address, "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    stats = json.loads(r.stdout)
    assert {"kv_pages_total", "kv_pages_free", "running", "waiting", "workers"} <= set(stats)
    assert set(stats["workers"]) == {"prefill", "decode"} and stats["workers"]["decode"]["pid"] > 0


def step_reports(server) -> dict:
    """Keep the workers busy until each has reported its step times (about once a second of
    work); the reports by role."""
    work = [(p, 64) for p, _ in workload(8, seed=11)]
    deadline = time.monotonic() + 60
    while True:
        asyncio.run(run_concurrently(server.address, work))
        steps = {role: w["steps"] for role, w in server.client.stats()["workers"].items()}
        if all(steps.values()) or time.monotonic() > deadline:
            return steps


def test_workers_report_their_step_times(server):
    """Wall time per step and mean batch; GPU time only where there is a GPU."""
    for role, steps in step_reports(server).items():
        assert steps is not None, role
        assert steps["step_ms"] > 0 and steps["mean_batch"] >= 1 and steps["steps_per_s"] > 0, steps
        assert 0 < steps["busy"] <= 1 and steps["gpu_ms"] is None and steps["age_s"] >= 0, steps
