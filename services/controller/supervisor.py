"""Starts the worker processes, notices when one dies, and starts its replacement.

Messages for a worker that is starting wait in its queue and go out once it reports ready.
A worker is known by its socket identity (role-pid), so anything its dead predecessor still had
in flight is recognised and ignored.
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from shared import protocol

ROLES = ("prefill", "decode")


@dataclass
class WorkerHandle:
    role: str
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    identity: bytes | None = None      # set by the worker's hello
    ready: bool = False
    queue: list = field(default_factory=list)
    sm_percent: int | None = None


class Supervisor:
    def __init__(self, worker_address: str, send):
        self.worker_address = worker_address
        self._send = send              # send(identity, message) on the controller's worker socket
        self.workers: dict[str, WorkerHandle] = {}
        self.restarts = 0

    def start(self, role: str) -> None:
        cmd = [sys.executable, "-m", f"services.{role}", "--controller", self.worker_address]
        self.workers[role] = WorkerHandle(role, subprocess.Popen(cmd, env=dict(os.environ)))

    def start_all(self) -> None:
        for role in ROLES:
            self.start(role)

    def role_of(self, identity: bytes) -> str | None:
        """The role of the current worker with this identity; None for a dead predecessor."""
        return next((r for r, w in self.workers.items() if w.identity == identity), None)

    def hello(self, identity: bytes, msg: protocol.WorkerHello, init: protocol.WorkerInit) -> None:
        worker = self.workers.get(msg.role)
        if worker is not None and worker.proc.pid == msg.pid:
            worker.identity = identity
            self._send(identity, init)

    def mark_ready(self, role: str) -> None:
        worker = self.workers[role]
        worker.ready = True
        for msg in worker.queue:
            self._send(worker.identity, msg)
        worker.queue.clear()

    def send(self, role: str, msg) -> None:
        worker = self.workers[role]
        if worker.ready:
            self._send(worker.identity, msg)
        else:
            worker.queue.append(msg)

    def dead(self) -> list[str]:
        """Roles whose process has exited since the last call; each is restarted already."""
        died = [r for r, w in self.workers.items() if w.proc.poll() is not None]
        for role in died:
            print(f"semipd: {role} worker (pid {self.workers[role].proc.pid}) exited with "
                  f"{self.workers[role].proc.returncode}; starting a new one", file=sys.stderr, flush=True)
            self.restarts += 1
            self.start(role)
        return died

    def all_ready(self) -> bool:
        return all(w.ready for w in self.workers.values())

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask politely (Shutdown), then SIGTERM, then SIGKILL, as honcho does."""
        for w in self.workers.values():
            if w.ready:
                self._send(w.identity, protocol.Shutdown())
        deadline = time.monotonic() + timeout_s
        for signal_next in ("terminate", "kill"):
            for w in self.workers.values():
                while w.proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                if w.proc.poll() is None:
                    getattr(w.proc, signal_next)()
            deadline = time.monotonic() + timeout_s
        for w in self.workers.values():
            w.proc.wait()
