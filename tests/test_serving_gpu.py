"""Serving on a GPU: workers map the controller's weights and KV pool through CUDA IPC."""

import asyncio
import os
import signal

import pytest

from semipd.shared.engine import Engine
from semipd.shared.engine_config import EngineConfig
from semipd.shared.steps import launch_prefill
from semipd.shared.sampling_params import SamplingParams
from semipd.shared.scheduler import PrefillScheduler
from semipd.shared.sequence import Sequence
from tests.serving import Server, wait_for
from tests.test_modes import standbys_ready
from tests.test_serving import model, reference, run_concurrently, step_reports, workload  # noqa: F401 (fixtures)

pytestmark = pytest.mark.gpu


def test_cuda_ipc_serving_matches_generate_and_survives_a_worker_kill(model, reference):  # noqa: F811
    server = Server(model, "--dtype", "float32", device="cuda")
    try:
        results = asyncio.run(run_concurrently(server.address, workload(32)))
        assert [r.token_ids for r in results] == reference
        old = server.stats()["workers"]["decode"]["pid"]
        streams = [server.client.generate(prompt_ids=p * 4, temperature=0, max_tokens=100, ignore_eos=True)
                   for p, _ in workload(16, seed=3)]
        next(streams[0])
        os.kill(old, signal.SIGKILL)
        assert all(len(s.result().token_ids) == 100 for s in streams)
        stats = server.wait_idle()
        assert stats["workers"]["decode"]["pid"] != old
        assert stats["kv_pages_free"] == stats["kv_pages_total"]
    finally:
        assert server.stop() == 0


def test_switch_under_mps_keeps_outputs_and_pages(model):  # noqa: F811
    """Workers as MPS clients with quotas; a switch mid-stream reopens the IPC handles in the new
    processes and loses nothing."""
    server = Server(model, "--dtype", "float32", "--start-mps", device="cuda")
    try:
        client = server.client
        work = [(p * 3, 300) for p, _ in workload(12, seed=5)]
        unswitched = asyncio.run(run_concurrently(server.address, work))
        client.partition(70, 30)
        wait_for(lambda s: not s["partition"]["switching"] and standbys_ready(s), server)
        streams = [client.generate(prompt_ids=p, temperature=0, max_tokens=m, ignore_eos=True) for p, m in work]
        next(streams[0])
        client.partition(40, 60)
        assert [s.result().token_ids for s in streams] == [r.token_ids for r in unswitched]
        server.wait_idle()  # an ended sequence's pages go free when the step in flight is read: after its Final
        stats = wait_for(lambda s: not s["partition"]["switching"], server)
        assert stats["partition"]["mps"] and (stats["partition"]["prefill_sm"], stats["partition"]["decode_sm"]) == (40, 60)
        assert stats["kv_pages_free"] == stats["kv_pages_total"]
        assert all(h["error"] is None for h in stats["partition"]["history"])
        decode = [h for h in stats["partition"]["history"] if h["role"] == "decode"][-1]
        assert set(decode["prepare_parts_s"]) == {"context_and_map", "warm_up", "cuda_graphs"}
        assert sum(decode["prepare_parts_s"].values()) < decode["prepare_s"]
    finally:
        assert server.stop() == 0


def test_step_times_include_gpu_time(model):  # noqa: F811
    """On CUDA each report also has the GPU time of the forward passes and sampling (CUDA events),
    which lies within the step's wall time."""
    server = Server(model, "--dtype", "float32", device="cuda")
    try:
        for role, steps in step_reports(server).items():
            assert steps is not None, role
            assert 0 < steps["gpu_ms"] <= steps["step_ms"], (role, steps)
    finally:
        assert server.stop() == 0


def test_a_chunk_that_samples_nothing_is_timed_too():
    """A long prompt's first chunk completes no prompt, so nothing is sampled after it; its GPU
    time is counted all the same (it was lost when the next forward began a new span)."""
    engine = Engine(EngineConfig(model="tiny", device="cuda", progress=False))
    try:
        runner, allocator = engine.runner, engine.allocator
        sched = PrefillScheduler(allocator, engine.config.page_size, 32, 8)
        sched.add(Sequence(0, list(range(1, 41)), SamplingParams(temperature=0, max_tokens=4)))
        runner.gpu_spans = []
        assert launch_prefill(runner, sched, sched.schedule()).finish(sched, allocator, True) == []  # 32 of 40 tokens
        assert len(runner.gpu_spans) == 1
        assert len(launch_prefill(runner, sched, sched.schedule()).finish(sched, allocator, True)) == 1
        runner.wait()
        assert len(runner.gpu_spans) == 2 and all(s.elapsed_time(e) > 0 for s, e in runner.gpu_spans)
    finally:
        engine.close()
