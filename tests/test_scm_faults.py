"""Moderation end to end where each test starts its own server: flags that cannot work, a
monitor peer (a raw socket playing the monitor) that misbehaves or falls silent, and a server
restarted while the monitor holds its streams."""

import asyncio
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import zmq

from semipd.shared import protocol
from semipd.shared.client import ServerError
from tests.scm_moderation import FLAG_NONE, collect, monitor_checkpoint, prompts, served_model, socket_address
from tests.scm_service import MonitorProcess, wait_connected
from tests.serving import ROOT, Server


@pytest.mark.parametrize("flags, message", [(["--moderate", "all"], "needs a content monitor"),
                                            (["--scm", "localhost:5555"], "ipc:// or tcp://"),
                                            (["--scm", "--scm-timeout", "0"], "must be positive")])
def test_bad_moderation_flags_are_one_clear_error(flags, message):
    r = subprocess.run([sys.executable, "-m", "semipd", "serve", "--model", "tiny", "--device", "cpu",
                        "--address", socket_address(), *flags], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@contextmanager
def scripted_monitor(*server_args: str):
    """(a raw ROUTER in the monitor's place, which has said it is ready; a server moderating
    every request with it): the test plays the monitor."""
    address = socket_address()
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    server = Server("tiny", "--scm", address, "--moderate", "all", *server_args)
    try:
        assert sock.poll(30_000)
        peer, _ = sock.recv_multipart()  # a hello
        sock.send_multipart([peer, protocol.encode(protocol.ScmReady("other", 0.5, 1, 100))])
        wait_connected(server)
        yield sock, server
    finally:
        assert server.stop() == 0
        sock.close()


def test_a_verdict_the_controller_cannot_place_fails_that_stream_only():
    """A monitor peer (a raw socket: the real monitor does not send this) whose verdict lacks its
    token_index. That stream ends by the failure policy; the controller keeps serving."""
    with scripted_monitor("--scm-failure", "closed") as (sock, server):
        stream = server.client.generate(prompt_ids=[5, 6], temperature=0, max_tokens=5)
        while True:
            assert sock.poll(30_000)
            peer, data = sock.recv_multipart()
            msg = protocol.decode(data)
            if isinstance(msg, protocol.ScmBatch) and msg.appends:
                a = msg.appends[0]
                sock.send_multipart([peer, protocol.encode(protocol.ScmScored([a.stream_id], [a.upto],
                                                                              [{"score": 0.99}], [None]))])
                break
        with pytest.raises(ServerError, match="a verdict without a token_index"):
            stream.result()
        assert server.client.health()["status"] == "ok"


def test_a_restarted_server_frees_its_streams_in_the_monitor(tmp_path_factory):
    """The monitor holds streams per controller and drops them at that controller's hello. A
    server killed mid-stream and started again on its address must find them gone, not a full
    monitor (here 2 streams) that leaves every new request unmonitored."""
    served = served_model(tmp_path_factory, "qwen2")
    monitor = MonitorProcess(monitor_checkpoint(tmp_path_factory, served, FLAG_NONE, True), socket_address(),
                             "--max-streams", "2")
    try:
        server = Server(served, "--scm", monitor.address, "--moderate", "all")
        wait_connected(server)
        streams = [server.client.generate(prompt_ids=p, temperature=0, max_tokens=400, ignore_eos=True)
                   for p in prompts(2)]
        for stream in streams:
            next(stream)  # both watched now: the monitor is full
        server.proc.kill()
        server.proc.wait()
        server = Server(served, "--scm", monitor.address, "--moderate", "all", address=server.address)
        try:
            wait_connected(server)
            [(_, final)] = asyncio.run(collect(server.address, [([5, 6], True)], 8))
            assert final.finish_reason == "length" and final.verdict["monitored"] is True, final.verdict
        finally:
            assert server.stop() == 0
    finally:
        monitor.stop()


def test_a_monitor_lost_after_its_client_left_leaves_the_server_serving():
    """Two monitored requests of a client that has gone, their tokens held for scores that never
    come. When the monitor is given up on, releasing the first one's tokens fails (the client is
    gone) and ends both requests; failing the second as well crashed the controller."""
    with scripted_monitor("--scm-timeout", "1") as (monitor, server):  # it says nothing more
        client = zmq.Context.instance().socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.connect(server.address)
        params = {"temperature": 0, "max_tokens": 2000, "ignore_eos": True}
        for i in range(2):
            client.send(protocol.encode(protocol.GenerateRequest(f"r{i}", prompt_ids=[5, 6], params=params)))
        appended = 0
        while appended < 2:  # both have tokens held for the monitor
            assert monitor.poll(30_000)
            msg = protocol.decode(monitor.recv_multipart()[1])
            appended += len(msg.appends) if isinstance(msg, protocol.ScmBatch) else 0
        client.close()
        time.sleep(3)  # past the monitor timeout
        assert server.client.health()["status"] == "ok"
        assert server.wait_idle()["kv_pages_free"] == server.stats()["kv_pages_total"]
