"""Starting and killing a real `semipd scm` process for tests."""

import signal
import subprocess
import sys
import time

import zmq

from semipd.shared import protocol
from tests.serving import ROOT, terminate


def hello(address: str, timeout_s: float = 1.0):
    """The monitor's answer to ScmHello on a fresh connection, or None."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(protocol.encode(protocol.ScmHello(0)))
        return protocol.decode(sock.recv()) if sock.poll(int(timeout_s * 1000)) else None
    finally:
        sock.close()


class MonitorProcess:
    def __init__(self, model: str, address: str, *args: str):
        self.address = address
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "semipd", "scm", "--model", model, "--address", address, "--device", "cpu",
             "--max-streams", "64", "--max-model-len", "1024", *args], cwd=ROOT)
        until(lambda: isinstance(hello(address), protocol.ScmReady), 120, "monitor ready", self.proc)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        return terminate(self.proc)


def until(ready, timeout_s: float, what: str, proc=None) -> None:
    """Poll ready() until it holds; fail after timeout_s or when proc exits."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout_s} s")
        time.sleep(0.1)


def wait_connected(server) -> None:
    """Until the server's controller has shaken hands with its monitor."""
    until(lambda: server.client.health()["scm"] == "ready", 30, "monitor connection")
