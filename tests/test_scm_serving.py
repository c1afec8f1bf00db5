"""Moderation end to end: a real `semipd scm` process beside a real `semipd serve` (controller,
prefill and decode processes), real sockets. Monitors flag everything or nothing; killing the
monitor applies the failure policy. The tests here share two servers, one per monitor; those that
need a server of their own are in tests/test_scm_faults.py."""

import asyncio
import json
import subprocess
import sys
import time

import pytest
import zmq

from semipd.shared import protocol
from semipd.shared.client import ServerError
from tests.scm_moderation import FLAG_ALL, FLAG_NONE, collect, monitor_checkpoint, prompts, served_model, socket_address
from tests.scm_service import MonitorProcess, hello, wait_connected
from tests.serving import ROOT, Server

K = 4


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
            assert outcome.final.verdict["monitored"] is False and outcome.final.error_kind == "unavailable"
            assert len(tokens) < 300
        else:
            assert outcome.finish_reason == "length" and len(tokens) == 300
    # While the monitor is down, a monitored request is refused at once; others are served.
    [(_, refused), (tokens, fine)] = asyncio.run(collect(server.address, [([5, 6], True), ([5, 6], False)], 5))
    assert isinstance(refused, ServerError) and "content monitor unavailable" in str(refused)
    assert refused.final.error_kind == "unavailable"  # a 503 at the gateway, not the request's fault
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
