"""Stopping `semipd serve` (issues 24 and 25): SIGTERM with streams open ends every stream with
exactly one Final and exits within the bound, over and over, leaving nothing behind; Ctrl-C
prints one line; --drain-timeout lets requests in flight finish and refuses new ones."""

import os
import signal
import time

from semipd.shared import protocol
from semipd.shared.client import Client
from tests.stop_repeatedly import stop_once
from tests.stop_tools import (STOP_BOUND_S, RawStreams, address_in, leftovers, new_folder, process_tree, start,
                              wait_exit, wait_ready)
from tests.stop_tools import no_server_left  # noqa: F401 (autouse: kills what a failed test left)

BUDGET_S = 60  # repeated stops: as many as fit; tests/stop_repeatedly.py runs a given count
# Tokens that take seconds on the CPU (the tiny model's steps take about 1 ms; its context is 2048).
LONG = 2000


def serving(*args: str):
    folder = new_folder()
    proc = start(folder, *args)
    wait_ready(proc, folder)
    return folder, proc


def test_sigterm_with_16_streams_open_ends_each_once_within_the_bound():
    folder, proc = serving()
    tree = process_tree(proc.pid)
    streams = RawStreams(folder, 16)
    streams.read(RawStreams.all_streaming)
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    streams.read(RawStreams.all_final)  # as clients do: a client that does not read may miss it
    took = wait_exit(proc, began)
    time.sleep(0.2)  # anything after a Final would have come with it
    streams.read(lambda s: not s.sock.poll(0), timeout_s=5)
    streams.close()
    for request_id in streams.messages:
        finals = streams.finals(request_id)
        assert [f.error for f in finals] == ["the server is shutting down"], (request_id, finals)
        assert isinstance(streams.messages[request_id][-1], protocol.Final)
    stderr = proc.stderr.read()
    assert proc.returncode == 0 and took < STOP_BOUND_S, (took, stderr)
    assert "semipd: SIGTERM: stopping, ending 16 requests" in stderr
    assert not leftovers(folder, tree)


def test_repeated_stops_with_streams_open():
    began, stops = time.monotonic(), 0
    while stops < 2 or time.monotonic() - began < BUDGET_S:
        took, left = stop_once("tiny", num_streams=8)
        stops += 1
        assert took < STOP_BOUND_S and not left, (stops, took, left)


def test_ctrl_c_prints_one_line():
    """SIGINT to the server's process group, as a terminal sends it: before, each worker printed
    a KeyboardInterrupt traceback."""
    folder, proc = serving()
    streams = RawStreams(folder, 2)
    streams.read(RawStreams.all_streaming)
    os.killpg(proc.pid, signal.SIGINT)
    wait_exit(proc)
    streams.close()
    stderr = proc.stderr.read()
    after = stderr[stderr.index("semipd: serving "):].splitlines()[1:]
    assert after == ["semipd: SIGINT: stopping, ending 2 requests"], stderr
    assert proc.returncode == 0


def draining(drain_s: str):
    """A server with --drain-timeout drain_s and one long stream, once SIGTERM has started the
    drain: (folder, process, streams)."""
    folder, proc = serving("--drain-timeout", drain_s)
    streams = RawStreams(folder, 1, max_tokens=LONG)
    streams.read(RawStreams.all_streaming)
    proc.send_signal(signal.SIGTERM)
    with Client(address_in(folder)) as client:
        while client.health()["status"] != "stopping":
            time.sleep(0.01)
    return folder, proc, streams


def test_drain_lets_requests_in_flight_finish_and_refuses_new_ones():
    folder, proc, streams = draining("60")
    streams.send("late", 8)
    streams.read(RawStreams.all_final)
    took = wait_exit(proc)  # at once: nothing is left in flight
    streams.close()
    stderr = proc.stderr.read()
    assert "semipd: SIGTERM: draining 1 requests for up to 60 s" in stderr, stderr
    assert streams.finals("r0")[0].finish_reason == "length"
    late = streams.finals("late")[0]
    assert (late.error, late.error_kind) == ("the server is stopping: it admits no new requests", "unavailable")
    assert proc.returncode == 0 and took < 30, (took, stderr)
    assert not leftovers(folder, set())


def test_the_drain_timeout_ends_the_rest():
    folder, proc = serving("--drain-timeout", "0.5")
    streams = RawStreams(folder, 2, max_tokens=LONG)
    streams.read(RawStreams.all_streaming)
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    streams.read(RawStreams.all_final)
    took = wait_exit(proc, began)
    streams.close()
    assert [streams.finals(r)[0].error for r in ("r0", "r1")] == ["the server is shutting down"] * 2
    assert proc.returncode == 0 and took < 0.5 + STOP_BOUND_S, took


def test_a_second_signal_ends_the_drain():
    _, proc, streams = draining("600")
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    streams.read(RawStreams.all_final)
    took = wait_exit(proc, began)
    streams.close()
    assert streams.finals("r0")[0].error == "the server is shutting down"
    assert proc.returncode == 0 and took < STOP_BOUND_S
