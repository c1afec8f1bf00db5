"""Every child of a server dies with it, whenever it dies: workers still importing torch, workers
serving open streams, and the HTTP gateway of `semipd serve --http` (issue 25)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.serving import ROOT, Server, wait_for
from tests.short_folders import short_folder
from tests.stop_tools import alive, children

GONE_WITHIN_S = 5  # the kernel kills them at once; the rest is this machine's load


def kill_and_check(proc: subprocess.Popen, kids: set[int]) -> None:
    assert kids
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + GONE_WITHIN_S
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [k for k in kids if alive(k)]
    for k in left:
        os.kill(k, signal.SIGKILL)
    assert not left, f"children outlived their server: {left}"


def start(*args: str) -> subprocess.Popen:
    folder = short_folder("semipd-test-")
    return subprocess.Popen([sys.executable, "-m", "semipd", "serve", "--model", "tiny", "--device", "cpu",
                             "--address", f"ipc://{folder}/front.sock", *args],
                            cwd=ROOT, env=dict(os.environ, XDG_RUNTIME_DIR=folder), stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("after_s", [0.0, 0.5, 2.0])
def test_workers_starting_die_with_a_killed_controller(after_s):
    """Killed just as it spawned its workers, or while they import torch."""
    proc = start()
    deadline = time.monotonic() + 120
    while len(kids := children(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(after_s)
    kill_and_check(proc, children(proc.pid))


def test_serving_workers_die_with_a_killed_controller():
    server = Server("tiny")
    streams = [server.client.generate(prompt_ids=[5, 6], temperature=0, max_tokens=400, ignore_eos=True)
               for _ in range(3)]
    for s in streams:
        next(s)
    kill_and_check(server.proc, children(server.proc.pid))
    server.client.close()


def test_the_gateway_dies_with_a_killed_server():
    proc = start("--http", "127.0.0.1:0")
    deadline = time.monotonic() + 120
    while len(kids := children(proc.pid)) < 3:  # two workers, then the gateway once it serves
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    kill_and_check(proc, kids)


def test_standbys_die_with_a_killed_controller():
    """A switch calls a standby up and starts the next one importing: both die with it too."""
    server = Server("tiny")
    server.client.partition(70, 100)
    wait_for(lambda s: s["workers"]["prefill"]["standby"] is not None, server)
    kill_and_check(server.proc, children(server.proc.pid))
    server.client.close()
