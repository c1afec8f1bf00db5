"""Starts the worker processes, keeps standbys, notices deaths and starts replacements.

A worker process starts, imports everything, says hello and waits for its WorkerInit, which
carries its MPS quota. The current worker of a role gets it at once; a standby gets it only when a
new SM split calls it up (see switcher.py), so calling one up costs no imports. Messages for a
worker that is not open yet wait in its queue. A worker is known by its socket identity
(role-pid), so anything a predecessor still had in flight is recognised.

With tensor parallelism of size N a worker is N processes, ranks 0..N-1 of one process group
(its own rendezvous file), started, switched and ended together: a dead rank fails the others'
collectives, so the death of any is the death of the worker and the rest are killed. Each rank
says hello and gets its own WorkerInit (its shard's handles); rank 0 speaks for the worker after.

Every live worker is one handle in one list; where it is (current, standby, called up, primed
ahead of a switch, handing over) is its state (lifecycle.py), which changes only through `WorkerHandle.move_to`.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace

from semipd.services.controller.lifecycle import CURRENT, PRIMES, WAITING, WORKER_MOVES, WorkerState, advance
from semipd.shared import protocol
from semipd.shared.runtime import child_env, owned_name, remove_paths, runtime_dir

FROZEN_S = 2.0  # a worker holding the page allocator's lock this long is frozen


@dataclass
class WorkerHandle:
    role: str
    procs: list[subprocess.Popen]      # one per tensor-parallel rank
    state: WorkerState
    rendezvous: str = ""               # the ranks' process group's rendezvous file (size > 1)
    sm_percent: int | None = None
    identities: list[bytes | None] = field(default_factory=list)  # per rank, set by its hello
    last_output: float | None = None   # when its last tokens arrived (monotonic s)
    step_times: tuple | None = None    # (its last StepTimes, when it came)
    prepared: dict | None = None       # a primed worker's account of its preparation (WorkerReady)
    queue: list = field(default_factory=list)

    def __post_init__(self):
        self.identities = self.identities or [None] * len(self.procs)

    @property
    def proc(self) -> subprocess.Popen:
        """Rank 0's process, which talks to the controller."""
        return self.procs[0]

    @property
    def identity(self) -> bytes | None:
        return self.identities[0]

    def exited(self) -> bool:
        """Whether any rank has exited: the worker is done for."""
        return any(p.poll() is not None for p in self.procs)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def kill(self) -> None:
        """Kill every rank now (a no-op for those already dead), reap them and remove their
        group's rendezvous file (the ranks exit without removing it)."""
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        remove_paths([self.rendezvous] if self.rendezvous else [])

    def move_to(self, state: WorkerState) -> None:
        advance(f"{self.role} worker (pid {self.proc.pid})", WORKER_MOVES, self.state, state)
        self.state = state

    def summary(self) -> dict:
        return {"pid": self.proc.pid, "state": self.state.value}

    def step_stats(self) -> dict | None:
        """Its last StepTimes as means per step; None before its first report."""
        if self.step_times is None:
            return None
        t, received = self.step_times
        return {"age_s": time.monotonic() - received, "steps_per_s": t.steps / t.span_s,
                "busy": t.busy_s / t.span_s, "mean_batch": t.seqs / t.steps, "step_ms": t.busy_s / t.steps * 1e3,
                "gpu_ms": None if t.gpu_s is None else t.gpu_s / t.steps * 1e3}


class Supervisor:
    def __init__(self, worker_address: str, send, init, shares: dict[str, int | None], tp_size: int = 1):
        self.worker_address = worker_address
        self._send = send              # send(identity, message) on the controller's worker socket
        self._init = init              # init(sm_percent, rank) -> WorkerInit
        self.tp_size = tp_size
        self.handles: list[WorkerHandle] = []  # every live worker
        self.shares = shares
        self.restarts = 0

    def _spawn(self, role: str, state: WorkerState) -> WorkerHandle:
        cmd = [sys.executable, "-m", f"semipd.services.{role}", "--controller", self.worker_address]
        # A process group of its own: a terminal's Ctrl-C and honcho's SIGTERM to the server's
        # group are the controller's to handle (stop() ends the workers), even before a worker
        # has set its own handlers. It still dies with the controller (runtime.die_with_parent).
        procs = [subprocess.Popen(cmd, env=child_env(), stdin=subprocess.DEVNULL, process_group=0)
                 for _ in range(self.tp_size)]
        # the ranks' rendezvous, named after this process: a killed controller's is found and removed
        rendezvous = os.path.join(runtime_dir(), owned_name(f"tp-{role}")) if self.tp_size > 1 else ""
        worker = WorkerHandle(role, procs, state, rendezvous)
        self.handles.append(worker)
        return worker

    def _start(self, role: str, sm_percent: int | None) -> None:
        """A new current worker for the role."""
        self.activate(self._spawn(role, WorkerState.STARTING), sm_percent)

    def start_all(self) -> None:
        for role, share in self.shares.items():
            self._start(role, share)

    def current(self, role: str) -> WorkerHandle:
        return next(w for w in self.handles if w.role == role and w.state in CURRENT)

    @property
    def workers(self) -> dict[str, WorkerHandle]:
        """The current worker of each role."""
        return {role: self.current(role) for role in self.shares}

    def standbys_of(self, role: str) -> list[WorkerHandle]:
        """The role's standbys, those that have finished importing first."""
        return sorted((w for w in self.handles if w.role == role and w.state in WAITING),
                      key=lambda w: w.state is not WorkerState.STANDBY)

    def standby_of(self, role: str) -> WorkerHandle | None:
        return next(iter(self.standbys_of(role)), None)

    def ensure_standby(self, role: str, count: int = 1) -> None:
        for _ in range(count - len(self.standbys_of(role))):
            self._spawn(role, WorkerState.IMPORTING)

    def primed_of(self, role: str) -> WorkerHandle | None:
        """The role's worker called up ahead of a switch (priming or primed), if any."""
        return next((w for w in self.handles if w.role == role and w.state in PRIMES), None)

    def call_up(self, role: str, state: WorkerState = WorkerState.PREPARING) -> WorkerHandle:
        """The role's standby, now preparing for a switch (or priming ahead of one: activate it);
        the next standby starts importing at once: switches can come seconds apart."""
        self.ensure_standby(role)
        worker = self.standby_of(role)
        worker.move_to(state)
        self.ensure_standby(role)
        return worker

    def activate(self, worker: WorkerHandle, sm_percent: int | None) -> None:
        """Give a worker its quota and the memory handles (at its hello if it has not said it)."""
        worker.sm_percent = sm_percent
        for rank, identity in enumerate(worker.identities):
            if identity is not None:
                self._send(identity, self._rank_init(worker, rank))

    def _rank_init(self, worker: WorkerHandle, rank: int) -> protocol.WorkerInit:
        init = self._init(worker.sm_percent, rank)
        return replace(init, tp_init=f"file://{worker.rendezvous}") if worker.rendezvous else init

    def stats(self, role: str) -> dict:
        """The role's current worker (with its ranks' pids), its standby and its primed worker,
        each with its state."""
        w, standby, primed = self.current(role), self.standby_of(role), self.primed_of(role)
        return {**w.summary(), "ranks": [p.pid for p in w.procs], "sm_percent": w.sm_percent,
                "ready": w.state is WorkerState.SERVING,
                "standby": standby and {**standby.summary(), "ready": standby.state is WorkerState.STANDBY},
                "primed": primed and {**primed.summary(), "sm_percent": primed.sm_percent},
                "steps": w.step_stats()}

    def live_pids(self) -> set[int]:
        return {p.pid for w in self.handles for p in w.procs if p.poll() is None}

    def kill_frozen(self, pid: int) -> None:
        """A worker has held the page allocator's lock for FROZEN_S (PageAllocator.on_stuck):
        it is frozen inside a critical section, and the controller's loop would wait on it for
        ever. SIGKILL drops the lock; dead() then reports the death like any other."""
        if pid in self.live_pids():
            print(f"semipd: worker pid {pid} has held the page allocator's lock for {FROZEN_S:g} s; "
                  f"killing it", file=sys.stderr, flush=True)
            os.kill(pid, signal.SIGKILL)

    def handle_of(self, identity: bytes) -> WorkerHandle | None:
        """The live worker with this identity; None for a dead one's last words."""
        return next((w for w in self.handles if w.identity == identity), None)

    def hello(self, identity: bytes, msg: protocol.WorkerHello) -> None:
        worker, rank = next(((w, r) for w in self.handles for r, p in enumerate(w.procs)
                             if p.pid == msg.pid and w.role == msg.role), (None, 0))
        if worker is None:
            return
        worker.identities[rank] = identity
        if worker.state is WorkerState.IMPORTING:
            if all(worker.identities):
                worker.move_to(WorkerState.STANDBY)
        elif worker.state in (WorkerState.STARTING, WorkerState.PREPARING, WorkerState.PRIMING):
            self._send(identity, self._rank_init(worker, rank))

    def open(self, worker: WorkerHandle) -> None:
        """Open it for messages and deliver what waited for it."""
        worker.move_to(WorkerState.SERVING)
        for msg in worker.queue:
            self._send(worker.identity, msg)
        worker.queue.clear()

    def send(self, role: str, msg) -> None:
        worker = self.current(role)
        if worker.state is WorkerState.SERVING:
            self._send(worker.identity, msg)
        else:
            worker.queue.append(msg)

    def send_to(self, worker: WorkerHandle, msg) -> None:
        self._send(worker.identity, msg)

    def promote(self, worker: WorkerHandle) -> WorkerHandle | None:
        """Make a called-up worker current (closed until the handover ends); returns the old one,
        now handing over. None if the old one never opened (a replacement for a dead worker,
        still starting): it holds nothing but its queue, which passes to the new worker, and it
        is stopped."""
        old = self.current(worker.role)
        if old.state is WorkerState.STARTING:
            worker.queue = old.queue + worker.queue
            self._end(old)
            old = None
        else:
            old.move_to(WorkerState.HANDING_OVER)
        worker.move_to(WorkerState.TAKING_OVER)
        return old

    def dead(self) -> list[tuple[WorkerState, WorkerHandle]]:
        """(its state when it died, handle) for every worker that exited since the last call,
        current workers first. A current worker is replaced at once, with the same quota; the
        caller decides about the others."""
        exited = [w for w in self.handles if w.exited()]
        events = [(w.state, w) for w in sorted(exited, key=lambda w: w.state not in CURRENT)]
        for was, w in events:
            w.kill()  # a dead rank has taken its group down: the other ranks go with it
            self._bury(w)
            if was in CURRENT:
                self._replace(w, f"exited with {w.proc.returncode}")
        return events

    def kill(self, worker: WorkerHandle) -> None:
        """Kill a worker now (a no-op for one already dead). Unlike a death, dead() will not
        report it: the caller deals with what it held. A current worker is replaced at once,
        with the same quota."""
        if worker.state is WorkerState.DEAD:
            return
        was_current = worker.state in CURRENT
        self._end(worker)
        if was_current:
            self._replace(worker, "was stopped")

    def _end(self, worker: WorkerHandle) -> None:
        worker.kill()
        self._bury(worker)

    def _bury(self, worker: WorkerHandle) -> None:
        worker.move_to(WorkerState.DEAD)
        self.handles.remove(worker)

    def _replace(self, worker: WorkerHandle, why: str) -> None:
        print(f"semipd: {worker.role} worker (pid {worker.proc.pid}) {why}; starting a new one",
              file=sys.stderr, flush=True)
        self.restarts += 1
        self._start(worker.role, worker.sm_percent)

    def all_ready(self) -> bool:
        return all(w.state is WorkerState.SERVING for w in self.workers.values())

    def stop(self, deadline: float) -> int:
        """Stop every worker and standby together, by the deadline (monotonic s): a Shutdown to
        each that has said hello (every rank of it: rank 0 stops the others), SIGKILL at once to
        those that have not (they serve nothing yet) and to any still running at the deadline.
        Returns how many had to be killed then."""
        handles, self.handles = self.handles, []
        for w in handles:
            if all(w.identities):
                self._send(w.identity, protocol.Shutdown())
            else:  # a rank has not said hello: the worker serves nothing yet
                w.kill()
        while any(w.running() for w in handles) and time.monotonic() < deadline:
            time.sleep(0.01)
        late = [w for w in handles if w.running()]
        for w in handles:
            w.kill()  # those still running at the deadline; and every rank is reaped
        return len(late)
