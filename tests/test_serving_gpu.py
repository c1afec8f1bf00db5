"""Serving on a GPU: workers map the controller's weights and KV pool through CUDA IPC."""

import asyncio
import os
import signal

import pytest

from tests.serving import Server
from tests.test_serving import model, reference, run_concurrently, workload  # noqa: F401 (fixtures)

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
