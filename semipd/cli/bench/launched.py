"""A `semipd serve` that a sweep's --launch starts for one mode, waits for and stops."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from semipd.shared.client import Client, ClientError
from semipd.shared.errors import UserError

LAUNCH_TIMEOUT_S = 600   # loading a large model's weights takes minutes


class Launched:
    """`semipd serve` for one mode, with its sockets and log in a fresh folder."""

    def __init__(self, name: str, model: str, flags: list[str], log_path: str):
        self.name, self.folder = name, tempfile.mkdtemp(prefix="semipd-bench-")
        self.address = f"ipc://{self.folder}/front.sock"
        self.log_path, self.log = log_path, open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "semipd", "serve", "--model", model, "--address", self.address,
             *flags], env=dict(os.environ, XDG_RUNTIME_DIR=self.folder),
            stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while self.proc.poll() is None:
            try:
                with Client(self.address, timeout_s=2) as client:
                    if client.health().get("status") == "ok":
                        return
            except ClientError:
                pass
            if time.monotonic() > deadline:
                raise UserError(f"the {self.name} server was not ready within {LAUNCH_TIMEOUT_S} s "
                                f"(log: {self.log_path})")
            time.sleep(0.2)
        with open(self.log_path) as f:
            last = [line for line in f.read().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise UserError(f"the {self.name} server exited with status {self.proc.returncode}: {last[0]} "
                        f"(log: {self.log_path})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)
