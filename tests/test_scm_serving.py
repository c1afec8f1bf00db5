"""Moderation end to end: a real `semipd scm` process beside a real `semipd serve` (controller,
prefill and decode processes), real sockets. Monitors that flag everything or nothing are
checkpoints whose token head has a large bias; killing the monitor applies the failure policy."""

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

import pytest
import zmq

from semipd.shared import protocol
from semipd.shared.client import AsyncClient, ServerError
from tests.conftest import make_checkpoint
from tests.scm_checkpoints import bpe_tokenizer, save_monitor
from tests.scm_service import MonitorProcess, hello, wait_connected
from tests.serving import ROOT, Server

K = 4
FLAG_ALL, FLAG_NONE = (0.0, 30.0), (30.0, 0.0)


def prompts(n: int) -> list[list[int]]:
    return [[3 + (7 * i + j) % 290 for j in range(5 + i % 9)] for i in range(n)]


def served_model(tmp_path_factory, arch: str) -> str:
    path = str(tmp_path_factory.mktemp(f"served-{arch}"))
    make_checkpoint(path, arch)
    return path


def monitor_checkpoint(tmp_path_factory, served, bias, same_tokenizer: bool) -> str:
    """A monitor with the served model's tokenizer (transformers loads both as Qwen2's, so
    their fingerprints match and ids are sent) or with a BPE tokenizer of its own (text)."""
    from transformers import AutoTokenizer
    path = tmp_path_factory.mktemp("monitor")
    tokenizer = AutoTokenizer.from_pretrained(served) if same_tokenizer else bpe_tokenizer()
    save_monitor(path, tokenizer, token_bias=bias)
    return str(path)


def socket_address() -> str:
    folder = os.path.join("/tmp", f"semipd-scm-{uuid.uuid4().hex[:8]}")
    os.makedirs(folder)
    return f"ipc://{folder}/scm.sock"


async def collect(address: str, requests: list[tuple[list[int], bool]], max_tokens: int, after=None):
    """Run requests (prompt ids, moderate) concurrently; per request (token ids received,
    Final or ServerError). after(streams) runs once every stream has shown one token."""
    async with AsyncClient(address) as client:
        streams = [await client.generate(prompt_ids=p, moderate=m, temperature=0, max_tokens=max_tokens,
                                         ignore_eos=True) for p, m in requests]
        tokens = [[] for _ in streams]

        async def read(i, stream):
            try:
                async for delta in stream:
                    tokens[i] += delta.token_ids
                return stream.final
            except ServerError as e:
                return e

        tasks = [asyncio.ensure_future(read(i, s)) for i, s in enumerate(streams)]
        if after is not None:
            while not all(tokens) and not all(t.done() for t in tasks):
                await asyncio.sleep(0.005)
            after()
        finals = await asyncio.gather(*tasks)
    return [(t + (f.token_ids if isinstance(f, protocol.Final) else []), f) for t, f in zip(tokens, finals)]


# ---- a monitor that flags every token, stepping at most every 20 ms; scored mode; closed policy --

def moderated_server(tmp_path_factory, arch: str, bias, same_tokenizer: bool, monitor_args=(), server_args=()):
    """Yield (server, monitor, monitor checkpoint) for a fixture; both stopped afterwards."""
    served = served_model(tmp_path_factory, arch)
    path = monitor_checkpoint(tmp_path_factory, served, bias, same_tokenizer)
    monitor = MonitorProcess(path, socket_address(), *monitor_args)
    try:
        server = Server(served, "--scm", monitor.address, "--scm-timeout", "3", *server_args)
        wait_connected(server)
        yield server, monitor, path
        assert server.stop() == 0
    finally:
        monitor.stop()


@pytest.fixture(scope="module")
def flag_all(tmp_path_factory):
    yield from moderated_server(tmp_path_factory, "qwen2", FLAG_ALL, True, ("--k", str(K), "--step-interval-ms", "20"),
                                ("--scm-failure", "closed"))


def test_flagging_monitor_stops_monitored_requests_within_k_plus_2_tokens(flag_all):
    server = flag_all[0]
    requests = [(p, i % 3 != 2) for i, p in enumerate(prompts(12))]  # opt-in: a third unmonitored
    results = asyncio.run(collect(server.address, requests, max_tokens=40))
    for (_, moderated), (tokens, final) in zip(requests, results):
        if moderated:
            assert final.finish_reason == "content_filter" and final.verdict["flagged"], final
            # Every token is harmful: the K-th one (index K-1) fires; tokens before it are shown.
            assert final.verdict["token_index"] == K - 1 and final.verdict["score"] > 0.99
            assert len(tokens) == K - 1 <= K + 2
        else:
            assert final.finish_reason == "length" and len(tokens) == 40 and final.verdict is None
    stats = server.wait_idle()
    assert stats["kv_pages_free"] == stats["kv_pages_total"]
    assert stats["scm"]["flagged"] == 8 and stats["scm"]["sends"] == "token ids" and stats["scm"]["watching"] == 0


def test_complete_moderate_flag(flag_all):
    server = flag_all[0]
    r = subprocess.run([sys.executable, "-m", "semipd", "complete", "--address", server.address,
                        "--prompt-ids", "5,6,7", "--moderate", "--max-tokens", "30", "--temperature", "0",
                        "--ignore-eos", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout)
    assert line["finish_reason"] == "content_filter" and len(line["token_ids"]) <= K + 2


def test_killed_monitor_with_closed_policy_ends_requests_with_an_error(flag_all):
    server, first, path = flag_all
    first.kill()
    # A monitor that never reaches k at the same address: the controller reconnects to it.
    monitor = MonitorProcess(path, first.address, "--k", "1000000")
    wait_connected(server)
    work = [(p, True) for p in prompts(6)] + [(prompts(1)[0], False)]
    start = time.monotonic()
    results = asyncio.run(collect(server.address, work, max_tokens=300, after=monitor.kill))
    assert time.monotonic() - start < 30
    for (_, moderated), (tokens, outcome) in zip(work, results):
        if moderated:
            assert isinstance(outcome, ServerError) and "content monitor unavailable" in str(outcome)
            assert outcome.final.verdict["monitored"] is False
            assert len(tokens) < 300
        else:
            assert outcome.finish_reason == "length" and len(tokens) == 300
    # While the monitor is down, a monitored request is refused at once; others are served.
    [(_, refused), (tokens, fine)] = asyncio.run(collect(server.address, [([5, 6], True), ([5, 6], False)], 5))
    assert isinstance(refused, ServerError) and "content monitor unavailable" in str(refused)
    assert fine.finish_reason == "length" and len(tokens) == 5
    stats = server.wait_idle()
    assert stats["kv_pages_free"] == stats["kv_pages_total"] and stats["scm"]["status"] == "connecting"


# ---- a monitor that flags nothing, with another tokenizer (text); immediate mode; open policy ---

@pytest.fixture(scope="module")
def flag_none(tmp_path_factory):
    """The Llama test model's word-level tokenizer decodes to words with spaces between."""
    yield from moderated_server(tmp_path_factory, "llama", FLAG_NONE, False, (), ("--scm-show", "immediate"))


def test_silent_monitor_leaves_outputs_identical(flag_none):
    server = flag_none[0]
    work = prompts(10)
    results = asyncio.run(collect(server.address, [(p, m) for m in (True, False) for p in work], max_tokens=24))
    monitored, plain = results[:10], results[10:]
    assert [t for t, _ in monitored] == [t for t, _ in plain]
    assert all(f.finish_reason == "length" and f.verdict is None for _, f in plain)
    for _, final in monitored:
        assert final.finish_reason == "length" and final.verdict["monitored"] and not final.verdict["flagged"]
    stats = server.wait_idle()["scm"]
    assert stats["sends"] == "text" and stats["monitored"] == 10 and stats["flagged"] == 0
    # Immediate mode sends a Final without waiting for the monitor, and scores that arrive later
    # are not counted: short requests may finish before any score. A long one gets scores.
    asyncio.run(collect(server.address, [(work[0], True)], max_tokens=120))
    stats = server.wait_idle()["scm"]
    assert stats["scored_tokens"] > 0 and stats["lag_tokens"]["max"] >= 0


def test_monitor_answers_bad_input_and_keeps_serving(flag_none):
    address = flag_none[1].address
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    for frame in (b"\xc1junk", protocol.encode(protocol.Shutdown()),
                  protocol.encode(protocol.ScmBatch(opens=[protocol.ScmOpen(1)]))):
        sock.send(frame)
        assert sock.poll(10_000)
        reply = protocol.decode(sock.recv())
        assert (isinstance(reply, protocol.Reply) and not reply.ok) or \
            (isinstance(reply, protocol.ScmScored) and "exactly one of" in reply.errors[0]), reply
    sock.close()
    assert isinstance(hello(address), protocol.ScmReady)


def test_a_second_monitor_on_a_live_address_is_refused(flag_none):
    """Binding anew would silently take the socket file over from the live monitor."""
    r = subprocess.run([sys.executable, "-m", "semipd", "scm", "--model", flag_none[2], "--device", "cpu",
                        "--address", flag_none[1].address], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "already listening" in r.stderr, r.stderr
    assert isinstance(hello(flag_none[1].address), protocol.ScmReady)


def test_a_second_open_of_a_stream_drops_it(flag_none):
    """An error means the stream is dropped: after a duplicate open, nothing of it is scored."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(flag_none[1].address)
    try:
        opens = [protocol.ScmOpen(7, prompt_ids=[5, 6])] * 2
        sock.send(protocol.encode(protocol.ScmBatch(opens=opens)))
        assert sock.poll(10_000)
        reply = protocol.decode(sock.recv())
        assert reply.stream_ids == [7] and reply.errors == ["stream 7 was already open (both dropped)"]
        sock.send(protocol.encode(protocol.ScmBatch(appends=[protocol.ScmAppend(7, 1, token_ids=[9])])))
        assert not sock.poll(2_000)  # an open stream would have its token scored by now
    finally:
        sock.close()


def test_killed_monitor_with_open_policy_completes_unmonitored_then_reconnects(flag_none):
    server, monitor, path = flag_none
    work = prompts(6)
    failures_before = server.stats()["scm"]["failures"]
    start = time.monotonic()
    results = asyncio.run(collect(server.address, [(p, True) for p in work], max_tokens=400, after=monitor.kill))
    assert time.monotonic() - start < 30
    for tokens, final in results:
        assert final.finish_reason == "length" and len(tokens) == 400
        assert final.verdict["monitored"] is False and "content monitor" in final.verdict["error"]
    plain = asyncio.run(collect(server.address, [(p, False) for p in work], max_tokens=400))
    assert [t for t, _ in results] == [t for t, _ in plain]
    restarted = MonitorProcess(path, monitor.address)
    try:
        wait_connected(server)
        [(_, final)] = asyncio.run(collect(server.address, [([5, 6], True)], 8))
        assert final.finish_reason == "length" and final.verdict["monitored"] is True
        stats = server.wait_idle()
        assert stats["kv_pages_free"] == stats["kv_pages_total"]
        assert stats["scm"]["failures"] - failures_before == 6
    finally:
        restarted.stop()


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
