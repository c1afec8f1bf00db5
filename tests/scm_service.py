"""Starting and killing a real `semipd scm` process for tests."""

import signal
import subprocess
import sys
import time

import zmq

from shared import protocol
from tests.serving import ROOT


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
            [sys.executable, "-m", "services.scm", "--model", model, "--address", address, "--device", "cpu",
             "--max-streams", "64", "--max-model-len", "1024", *args], cwd=ROOT)
        deadline = time.monotonic() + 120
        while not isinstance(hello(address), protocol.ScmReady):
            if self.proc.poll() is not None:
                raise RuntimeError(f"monitor exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("monitor did not become ready")
            time.sleep(0.2)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def wait_connected(server, timeout_s: float = 30) -> None:
    """Until the server's controller has shaken hands with its monitor."""
    deadline = time.monotonic() + timeout_s
    while server.client.health()["scm"] != "ready":
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not connect to its monitor")
        time.sleep(0.1)
