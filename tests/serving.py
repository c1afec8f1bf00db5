"""Starting and stopping a real `semipd serve` for tests."""

import os
import signal
import subprocess
import sys
import time

from semipd.shared.client import Client, ClientError
from tests.short_folders import remove, short_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Server:
    def __init__(self, model: str, *args: str, device: str = "cpu", address: str | None = None):
        self.folder = short_folder("semipd-test-")
        self.address = address or f"ipc://{self.folder}/front.sock"
        env = dict(os.environ, XDG_RUNTIME_DIR=self.folder)  # worker sockets there too
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "semipd", "serve", "--model", model, "--address", self.address,
             "--device", device, *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                self.client = Client(self.address, timeout_s=60)
                if self.client.health()["status"] == "ok":
                    return
                self.client.close()
            except ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.2)

    def stats(self) -> dict:
        return self.client.stats()

    def wait_idle(self, timeout_s: float = 60) -> dict:
        """Stats once nothing runs or waits (aborts reach the workers asynchronously)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.stats()
            if (stats["running"] == stats["waiting"] == 0 and stats["kv_pages_free"] == stats["kv_pages_total"]) \
                    or time.monotonic() > deadline:
                return stats
            time.sleep(0.1)

    def stop(self) -> int:
        """Stop the server and remove its folder; its exit status."""
        self.client.close()
        try:
            return terminate(self.proc)
        finally:
            remove(self.folder)


def wait_for(predicate, server: Server, timeout_s: float = 120) -> dict:
    """The server's stats once predicate(stats) holds."""
    deadline = time.monotonic() + timeout_s
    while not predicate(stats := server.stats()):
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    return stats


def terminate(proc: subprocess.Popen) -> int:
    """SIGTERM, then the exit status (SIGKILL if it takes over 30 s)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
