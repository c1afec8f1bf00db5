"""Real `semipd serve` processes for the stop tests: started in a session of their own (as a
terminal's foreground job, or honcho's child, is a process group of its own), raw streams that
count every Final, and what a server left behind in /dev/shm and its runtime folder."""

import glob
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import zmq

from semipd.shared import protocol
from semipd.shared.client import Client, ClientError
from tests.serving import ROOT

STOP_BOUND_S = 3  # SIGTERM to exit, streams open (issue 24); the stop path's backstop makes it hold
_started: list[subprocess.Popen] = []  # by start(); a failed test's are killed (no_server_left)


def new_folder() -> str:
    """A runtime folder (XDG_RUNTIME_DIR) of a server's own; its address is inside it."""
    return os.path.join("/tmp", f"semipd-test-{uuid.uuid4().hex[:8]}")


def address_in(folder: str) -> str:
    return f"ipc://{folder}/front.sock"


def start(folder: str, *args: str) -> subprocess.Popen:
    """`semipd serve --model tiny` on the CPU at address_in(folder), its own process group."""
    proc = subprocess.Popen([sys.executable, "-m", "semipd", "serve", "--model", "tiny", "--device", "cpu",
                             "--address", address_in(folder), *args],
                            cwd=ROOT, env=dict(os.environ, XDG_RUNTIME_DIR=folder), stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    _started.append(proc)
    return proc


@pytest.fixture(autouse=True)
def no_server_left():
    """Stop what a failed test left running (a test module imports this autouse fixture)."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            wait_exit(proc)


def wait_ready(proc: subprocess.Popen, folder: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            with Client(address_in(folder), timeout_s=10) as client:
                if client.health()["status"] == "ok":
                    return
        except ClientError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.2)


def wait_exit(proc: subprocess.Popen, began: float | None = None, timeout_s: float = 60) -> float:
    """Seconds from `began` (monotonic; default now) until it exited (SIGKILL to its group past
    timeout_s)."""
    began = time.monotonic() if began is None else began
    try:
        proc.wait(timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return time.monotonic() - began


class RawStreams:
    """Greedy streams on one DEALER, every message kept: what reaches a client, Finals counted."""

    def __init__(self, folder: str, n: int, max_tokens: int = 400):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(address_in(folder))
        self.messages: dict[str, list] = {}
        for i in range(n):
            self.send(f"r{i}", max_tokens, 5 + i)

    def send(self, request_id: str, max_tokens: int, first: int = 5) -> None:
        params = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        self.messages[request_id] = []
        self.sock.send(protocol.encode(protocol.GenerateRequest(request_id, prompt_ids=[first, 6, 7], params=params)))

    def read(self, until, timeout_s: float = 60) -> None:
        """Receive until until(self) holds; AssertionError past timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not until(self):
            assert time.monotonic() < deadline, {k: v[-1:] for k, v in self.messages.items()}
            if self.sock.poll(100):
                msg = protocol.decode(self.sock.recv())
                self.messages[msg.request_id].append(msg)

    def all_streaming(self) -> bool:
        return all(any(isinstance(m, protocol.Delta) for m in ms) for ms in self.messages.values())

    def finals(self, request_id: str) -> list:
        return [m for m in self.messages[request_id] if isinstance(m, protocol.Final)]

    def all_final(self) -> bool:
        return all(self.finals(r) for r in self.messages)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def _parents() -> dict[int, int]:
    """{pid: its parent's pid} for every live process."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    return parents


def children(pid: int) -> set[int]:
    return {child for child, parent in _parents().items() if parent == pid}


def process_tree(root: int) -> set[int]:
    """root and every live descendant."""
    parents, tree, grew = _parents(), {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def leftovers(folder: str, pids: set[int]) -> list[str]:
    """Files in the runtime folder (the empty folders themselves may stay) and /dev/shm segments
    named after any of pids."""
    left = [os.path.join(root, f) for root, _, files in os.walk(folder) for f in files]
    return left + [p for pid in pids for p in glob.glob(f"/dev/shm/semipd-{pid}-*")]
