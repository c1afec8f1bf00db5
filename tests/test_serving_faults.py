"""The serving system end to end under faults: bad input, misbehaving clients, a second server
on a live address, workers killed mid-stream (and again and again under one request) and the
server stopped mid-stream."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from semipd.shared import protocol
from semipd.shared.client import AsyncClient, ServerError
from tests.serving import ROOT, Server, wait_for
from tests.serving_fixtures import generate, raw_socket, workload
from tests.serving_fixtures import model, server  # noqa: F401 (fixtures, found by name)


def ask(sock: zmq.Socket, frames) -> object:
    sock.send_multipart(frames if isinstance(frames, list) else [frames])
    assert sock.poll(10_000), "no answer"
    return protocol.decode(sock.recv())


BAD_INPUTS = {
    "not msgpack": (b"\xc1garbage", "not valid msgpack"),
    "unknown type": (msgpack.packb(["LaunchMissiles", {}]), "unknown message type"),
    "not a message": (msgpack.packb({"a": 1}), "a message is"),
    "wrong field type": (generate(prompt_ids="1,2,3"), "expected a list or null, got str"),
    "wrong element type": (generate(prompt_ids=[5, True]), "prompt_ids[]: expected int, got bool"),
    "unknown field": (generate(prompt_ids=[1], colour="red"), "unknown field"),
    "two frames": ([b"a", b"b"], "one frame"),
    "worker message": (protocol.encode(protocol.Shutdown()), "not a client message"),
    "empty prompt": (generate(prompt_ids=[]), "prompt is empty"),
    "empty text": (generate(prompt=""), "prompt is empty"),
    "both prompts": (generate(prompt="t5", prompt_ids=[5]), "exactly one of"),
    "out of vocabulary": (generate(prompt_ids=[5, 300]), "outside the vocabulary"),
    "beyond context": (generate(prompt_ids=[5] * 500, params={"max_tokens": 20}), "exceeds the context"),
    "bad temperature": (generate(prompt_ids=[5], params={"temperature": -1}), "temperature"),
    "bad top_p": (generate(prompt_ids=[5], params={"top_p": 0}), "top_p"),
    "bad top_k type": (generate(prompt_ids=[5], params={"top_k": "x"}), "top_k"),
    "unknown sampling key": (generate(prompt_ids=[5], params={"beam_width": 4}), "beam_width"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_an_error_and_service_continues(server, case):
    frames, message = BAD_INPUTS[case]
    sock = raw_socket(server.address)
    reply = ask(sock, frames)
    if isinstance(reply, protocol.Final):
        assert reply.finish_reason == "error" and message in reply.error and reply.request_id == "r"
    else:
        assert isinstance(reply, protocol.Reply) and not reply.ok and message in reply.error, reply
    sock.close()
    good = server.client.generate(prompt_ids=[5, 6], temperature=0, max_tokens=3).result()
    assert good.finish_reason in ("length", "stop") and good.token_ids


def test_oversized_message_drops_only_that_connection(server):
    sock = raw_socket(server.address)
    sock.send(generate(prompt_ids=[5] * protocol.MAX_MESSAGE_BYTES))  # one byte per id: over the limit
    assert not sock.poll(1000)
    sock.close()
    assert server.client.generate(prompt_ids=[5], temperature=0, max_tokens=2).result().token_ids


def test_a_client_that_stops_reading_is_dropped_and_others_are_served(server):
    """A raw client that asks for 102400 tokens and reads none: once MAX_UNREAD messages queue
    for it, its requests end (their pages freed) instead of queueing in the server for ever."""
    from semipd.services.controller.server import MAX_UNREAD
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 1)  # what it does not read stays queued in the server
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    params = {"temperature": 0, "max_tokens": 400, "ignore_eos": True}
    for i in range(256):
        sock.send(generate(f"r{i}", prompt_ids=[5, 6, 7], params=params))
    wait_for(lambda s: s["running"] + s["waiting"] > 0, server)  # the requests have arrived
    stats = server.wait_idle(timeout_s=300)
    assert stats["kv_pages_free"] == stats["kv_pages_total"] and stats["running"] == stats["waiting"] == 0
    got = []
    while sock.poll(2000):
        got.append(msgpack.unpackb(sock.recv())[0])
    sock.close()
    assert MAX_UNREAD <= len(got) < 256 * 400 and got.count("Final") < 256  # cut off, not served
    assert server.client.generate(prompt_ids=[5], temperature=0, max_tokens=2).result().token_ids


def test_duplicate_request_id_is_rejected(server):
    """With a Reply, not a Final: the live stream of that id still ends with exactly one Final."""
    sock = raw_socket(server.address)
    sock.send(generate("dup", prompt_ids=[5], params={"max_tokens": 40, "ignore_eos": True}))
    sock.send(generate("dup", prompt_ids=[6]))
    answers = []
    while not any(isinstance(m, protocol.Final) for m in answers):
        assert sock.poll(30_000), answers
        answers.append(protocol.decode(sock.recv()))
    replies = [m for m in answers if isinstance(m, protocol.Reply)]
    assert len(replies) == 1 and not replies[0].ok and "already in use" in replies[0].error
    assert answers[-1].finish_reason == "length" and not sock.poll(500)  # no second Final
    sock.close()


def test_a_second_server_on_a_live_address_is_refused(server, model):
    """Binding an ipc:// address anew would take it over from the live server, silently."""
    second = subprocess.run([sys.executable, "-m", "semipd", "serve", "--model", model, "--device", "cpu",
                             "--address", server.address], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "already listening" in second.stderr
    assert server.client.generate(prompt_ids=[5], temperature=0, max_tokens=2).result().token_ids


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_worker_killed_mid_stream(model, role):
    """Its requests resume elsewhere; one that the client ended just before, whose abort the
    worker never read, still has its pages freed."""
    server = Server(model)
    try:
        client, old = server.client, server.stats()["workers"][role]["pid"]
        streams = [client.generate(prompt_ids=p * 4, temperature=0, max_tokens=120, ignore_eos=True)
                   for p, _ in workload(24, seed=3)]
        next(streams[0]), next(streams[0])  # its second token came from decode, which holds it
        wait_for(lambda s: s["running"] + s["waiting"] == 24, server)
        os.kill(old, signal.SIGSTOP)
        ended, streams = (streams[0], streams[1:]) if role == "decode" else (streams[-1], streams[:-1])
        ended.close()
        wait_for(lambda s: s["running"] + s["waiting"] == 23, server)  # the controller has ended it
        os.kill(old, signal.SIGKILL)
        results = [s.result() for s in streams]   # raises if any stream gets no Final
        assert all(r.finish_reason == "length" and len(r.token_ids) == 120 for r in results)
        wait_for(lambda s: s["worker_restarts"] == 1 and s["workers"][role]["pid"] != old, server)
        stats = server.wait_idle()
        assert stats["kv_pages_free"] == stats["kv_pages_total"]
        after = client.generate(prompt_ids=[7, 8, 9], temperature=0, max_tokens=5).result()
        assert len(after.token_ids) == 5
    finally:
        assert server.stop() == 0


def test_a_request_that_workers_keep_dying_under_ends_with_an_error(model):
    """Two decode workers dying under a request are forgiven (it resumes through prefill each
    time), a third ends it with an error Final; the server serves on and every page comes back."""
    server = Server(model)

    async def drain(stream, got: list[int]) -> None:
        """Take what the stopped worker sent: nothing more comes for a while."""
        try:
            while True:
                got += (await asyncio.wait_for(anext(stream), 0.5)).token_ids
        except asyncio.TimeoutError:
            pass

    async def main():
        async with AsyncClient(server.address) as client:
            stream = await client.generate(prompt_ids=[5, 6, 7], temperature=0, max_tokens=500, ignore_eos=True)
            got: list[int] = []
            for death in range(3):
                pid = wait_for(lambda s: s["workers"]["decode"]["ready"], server)["workers"]["decode"]["pid"]
                had = len(got)
                while len(got) < had + 2:  # the first after a recovery is prefill's: the second is decode's
                    got += (await anext(stream)).token_ids
                os.kill(pid, signal.SIGSTOP)
                await drain(stream, got)
                os.kill(pid, signal.SIGKILL)
                if death < 2:
                    wait_for(lambda s: s["workers"]["decode"]["pid"] != pid, server)
            with pytest.raises(ServerError, match="workers died under it 3 times"):
                await anext(stream)
            assert len(got) < 500
    try:
        asyncio.run(main())
        assert len(server.client.generate(prompt_ids=[7, 8, 9], temperature=0, max_tokens=5).result().token_ids) == 5
        stats = server.wait_idle()
        assert stats["kv_pages_free"] == stats["kv_pages_total"]
    finally:
        assert server.stop() == 0


def test_stopping_the_server_ends_every_stream(model):
    """SIGTERM (systemctl stop, Ctrl-C under honcho) sends each open stream its Final at once:
    its client is not left to time out."""
    server = Server(model)
    decode = server.stats()["workers"]["decode"]["pid"]
    try:
        stream = server.client.generate(prompt_ids=[5, 6, 7], temperature=0, max_tokens=400, ignore_eos=True)
        next(stream)
        os.kill(decode, signal.SIGSTOP)  # the stream cannot end on its own
        server.proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        with pytest.raises(ServerError, match="the server is shutting down"):
            stream.result()
        assert time.monotonic() - began < 10  # the Final, not the client's 60 s timeout
    finally:
        os.kill(decode, signal.SIGCONT)
        assert server.stop() == 0
