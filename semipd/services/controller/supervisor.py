"""Starts the worker processes, keeps standbys, notices deaths and starts replacements.

A worker process starts, imports everything, says hello and waits for its WorkerInit, which
carries its MPS quota. The current worker of a role gets it at once; a standby gets it only when a
new SM split calls it up (see switcher.py), so calling one up costs no imports. Messages for a
worker that is not ready yet wait in its queue. A worker is known by its socket identity
(role-pid), so anything a predecessor still had in flight is recognised.
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from semipd.shared import protocol


@dataclass
class WorkerHandle:
    role: str
    proc: subprocess.Popen
    sm_percent: int | None = None
    identity: bytes | None = None      # set by the worker's hello
    activated: float | None = None     # when it was given its WorkerInit (monotonic s)
    ready: bool = False                # open for messages (a successor opens after the handover)
    last_output: float | None = None   # when its last tokens arrived (monotonic s)
    step_times: tuple | None = None    # (its last StepTimes, when it came)
    queue: list = field(default_factory=list)

    def step_stats(self) -> dict | None:
        """Its last StepTimes as means per step; None before its first report."""
        if self.step_times is None:
            return None
        t, received = self.step_times
        return {"age_s": time.monotonic() - received, "steps_per_s": t.steps / t.span_s,
                "busy": t.busy_s / t.span_s, "mean_batch": t.seqs / t.steps, "step_ms": t.busy_s / t.steps * 1e3,
                "gpu_ms": None if t.gpu_s is None else t.gpu_s / t.steps * 1e3}


class Supervisor:
    def __init__(self, worker_address: str, send, init, shares: dict[str, int | None]):
        self.worker_address = worker_address
        self._send = send              # send(identity, message) on the controller's worker socket
        self._init = init              # init(sm_percent) -> WorkerInit
        self.workers: dict[str, WorkerHandle] = {}   # the current worker of each role
        self.standby: dict[str, WorkerHandle] = {}   # imported, waiting to be called up
        self.incoming: dict[str, WorkerHandle] = {}  # called up, not yet current
        self.retiring: list[WorkerHandle] = []       # handing over to a successor
        self.shares = shares
        self.restarts = 0

    def _spawn(self, role: str) -> WorkerHandle:
        cmd = [sys.executable, "-m", f"semipd.services.{role}", "--controller", self.worker_address]
        return WorkerHandle(role, subprocess.Popen(cmd, env=dict(os.environ)))

    def start_all(self) -> None:
        for role, share in self.shares.items():
            self.workers[role] = self._spawn(role)
            self.activate(self.workers[role], share)

    def ensure_standby(self, role: str) -> None:
        if role not in self.standby:
            self.standby[role] = self._spawn(role)

    def activate(self, worker: WorkerHandle, sm_percent: int | None) -> None:
        """Give a worker its quota and the memory handles (at its hello if it has not said it)."""
        worker.sm_percent, worker.activated = sm_percent, time.monotonic()
        if worker.identity is not None:
            self._send(worker.identity, self._init(sm_percent))

    def _all(self):
        yield from self.workers.values()
        yield from self.standby.values()
        yield from self.incoming.values()
        yield from self.retiring

    def live_pids(self) -> set[int]:
        return {w.proc.pid for w in self._all() if w.proc.poll() is None}

    def handle_of(self, identity: bytes) -> WorkerHandle | None:
        """The live worker with this identity; None for a dead one's last words."""
        return next((w for w in self._all() if w.identity == identity), None)

    def hello(self, identity: bytes, msg: protocol.WorkerHello) -> None:
        worker = next((w for w in self._all() if w.proc.pid == msg.pid and w.role == msg.role), None)
        if worker is not None:
            worker.identity = identity
            if worker.activated is not None:
                self._send(identity, self._init(worker.sm_percent))

    def open(self, worker: WorkerHandle) -> None:
        """Mark ready and deliver what waited for it."""
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

    def send_to(self, worker: WorkerHandle, msg) -> None:
        self._send(worker.identity, msg)

    def promote(self, worker: WorkerHandle) -> WorkerHandle | None:
        """Make an incoming worker current (closed until the handover ends); returns the old one.
        None if the old one never opened (a replacement for a dead worker, still starting): it
        holds nothing but its queue, which passes to the new worker, and it is stopped."""
        old = self.workers[worker.role]
        del self.incoming[worker.role]
        self.workers[worker.role] = worker
        if not old.ready:
            worker.queue = old.queue + worker.queue
            self.kill(old)
            return None
        self.retiring.append(old)
        worker.ready = False
        return old

    def dead(self) -> list[tuple[str, WorkerHandle]]:
        """(where it was, handle) for every worker that exited since the last call. A current
        worker is replaced at once, with the same quota; the caller decides about the others."""
        events = []
        for where, pool in (("current", self.workers), ("standby", self.standby), ("incoming", self.incoming)):
            for role, w in list(pool.items()):
                if w.proc.poll() is not None:
                    events.append((where, w))
                    del pool[role]
        for w in [w for w in self.retiring if w.proc.poll() is not None]:
            self.retiring.remove(w)
            events.append(("retiring", w))
        for where, w in events:
            if where == "current":
                self._replace(w, f"exited with {w.proc.returncode}")
        return events

    def kill(self, worker: WorkerHandle) -> None:
        """Kill a worker now. Unlike a death, dead() will not report it: the caller deals with
        what it held. A current worker is replaced at once, with the same quota."""
        worker.proc.kill()
        worker.proc.wait()
        if worker in self.retiring:
            self.retiring.remove(worker)
        if self.workers.get(worker.role) is worker:
            self._replace(worker, "was stopped")

    def _replace(self, worker: WorkerHandle, why: str) -> None:
        print(f"semipd: {worker.role} worker (pid {worker.proc.pid}) {why}; starting a new one",
              file=sys.stderr, flush=True)
        self.restarts += 1
        self.workers[worker.role] = self._spawn(worker.role)
        self.activate(self.workers[worker.role], worker.sm_percent)

    def all_ready(self) -> bool:
        return all(w.ready for w in self.workers.values())

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask politely (Shutdown), then SIGTERM, then SIGKILL, as honcho does."""
        handles = list(self._all())
        for w in handles:
            if w.identity is not None:
                self._send(w.identity, protocol.Shutdown())
        deadline = time.monotonic() + timeout_s
        for signal_next in ("terminate", "kill"):
            for w in handles:
                while w.proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                if w.proc.poll() is None:
                    getattr(w.proc, signal_next)()
            deadline = time.monotonic() + timeout_s
        for w in handles:
            w.proc.wait()
