"""Moving the SM split without stopping service.

MPS fixes a process's SM quota when its CUDA context is created, so a new share for a phase means
a new worker process. The switch for one role (prefill and decode switch independently):

1. call up the role's standby (already imported everything): its WorkerInit carries the new quota;
   it opens the IPC handles and captures its CUDA graphs while the old worker keeps serving;
2. once it is ready it becomes the role's current worker, closed for now: new messages for the
   role wait in its queue; the old worker gets a Handover;
3. between two steps the old worker sends everything it holds (HandedOver: sequences with their
   block tables; the pages stay allocated and the K/V stays in place). The controller passes the
   live sequences to the new worker, then its queue: it is open;
4. a decode worker has a step in flight then (last_step_follows): the sequences in it go with
   their newest token in flight and wait in the new worker until the old one's last DecodeStep,
   passed on, fills them in. Sending the sequences (every token id) overlaps that last step,
   and only its tokens stand between it and the new worker's first step. The old worker exits.

The token stream of a moved sequence pauses from the old worker's last output to the new
worker's first: that gap, the preparation time and the hand-over time are recorded for every
switch, with the old worker's mean step as it hands over (`old_step_s`: the gap's floor). The
preparation is also given in the parts the new worker reports (`prepare_parts_s`), and the gap
in two parts (`gap_parts_s`): until the new worker has all it needs (`hand_over`: the sequences
and their last tokens passed on) and its first step until its output arrives (`first_step`).
Pages of sequences that ended while they were handed over are freed once no step of the old
worker can write them. A switch held up past its timeout (a new worker that never becomes ready,
an old one that never hands over) is ended by stopping the worker that holds it up: its death is
then handled like any other (the old worker stays, or its requests are recovered).
"""

import sys
import time
from dataclasses import dataclass

from semipd.services.controller.supervisor import Supervisor, WorkerHandle
from semipd.shared import protocol

# A worker reports its steps about once a second while it works: an older report says nothing
# about its current step.
FRESH_STEPS_S = 2.0


@dataclass
class Switch:
    role: str
    from_sm: int | None
    to_sm: int
    reason: str
    worker: WorkerHandle                # the standby called up
    cold: bool                          # the standby had not finished starting
    requested: float                    # time.monotonic() throughout
    ready_at: float | None = None
    prepare_parts: dict | None = None     # the new worker's own account of its preparation
    old_step_s: float | None = None       # the old worker's mean step when handing over: the gap's floor
    old: WorkerHandle | None = None
    handover_at: float | None = None
    handed_over_at: float | None = None   # HandedOver arrived
    resent_at: float | None = None        # the new worker had all it needs: sequences, last tokens
    moved: int = 0                        # live sequences passed on
    ended: list[int] | None = None        # ended in transit: pages freed when the old worker is done
    stalled: str | None = None            # why the timeout stopped a worker of this switch


class Switcher:
    def __init__(self, supervisor: Supervisor, alive, free_owner, timeout_s: float):
        self.sup = supervisor
        self.timeout_s = timeout_s           # longest a switch may wait for either worker
        self.alive = alive                   # alive(seq_id): its request still wants it
        self.free_owner = free_owner         # free_owner(seq_id): free the pages it holds
        self.active: dict[str, Switch] = {}
        self.history: list[dict] = []
        self._gap: dict[str, tuple[dict, Switch]] = {}  # role -> a finished switch's record, until its first output
        self.keep_standbys = False           # true once switching is in use

    def request(self, role: str, sm_percent: int, reason: str) -> None:
        """Start moving `role` to a new share; no-op if it has that share or is switching."""
        current = self.sup.workers[role]
        if role in self.active or current.sm_percent == sm_percent:
            return
        self.keep_standbys = True
        self.sup.ensure_standby(role)
        worker = self.sup.standby.pop(role)
        cold = worker.identity is None  # still importing: the switch waits for that
        self.sup.ensure_standby(role)   # the next one imports now: switches can come seconds apart
        self.sup.incoming[role] = worker
        self.active[role] = Switch(role, current.sm_percent, sm_percent, reason, worker, cold, time.monotonic())
        self.sup.activate(worker, sm_percent)

    def on_ready(self, worker: WorkerHandle, prepare_parts: dict) -> None:
        """The new worker has mapped the memory and captured its graphs: retire the old one."""
        sw = self.active[worker.role]
        if sw.stalled is not None:  # too late: the timeout has killed it (its death ends the switch)
            return
        sw.ready_at, sw.prepare_parts = time.monotonic(), prepare_parts
        steps = self.sup.workers[worker.role].step_stats()
        if steps and steps["age_s"] < FRESH_STEPS_S:
            sw.old_step_s = steps["step_ms"] / 1e3
        sw.old = self.sup.promote(worker)
        if sw.old is None:  # the old worker never started: nothing to hand over
            return self._finish(sw, 0)
        sw.handover_at = time.monotonic()
        self.sup.send_to(sw.old, protocol.Handover())

    def on_output(self, worker: WorkerHandle) -> None:
        """A PrefillDone or DecodeStep arrived from this worker: track the pause in the stream."""
        now = worker.last_output = time.monotonic()
        gap = self._gap.get(worker.role)
        if gap is not None and worker is gap[1].worker:
            record, sw = gap
            record["gap_s"], record["gap_parts_s"]["first_step"] = now - sw.old.last_output, now - sw.resent_at
            del self._gap[worker.role]

    def on_handed_over(self, worker: WorkerHandle, msg: protocol.HandedOver) -> None:
        sw = self.active.get(worker.role)
        if sw is None or worker is not sw.old:
            return
        sw.handed_over_at = time.monotonic()
        live, sw.ended = [], []
        for state in msg.seqs:
            if self.alive(state.seq_id):
                live.append(state)
            else:
                sw.ended.append(state.seq_id)
        sw.moved = len(live)
        if live:
            self.sup.send_to(sw.worker, protocol.RunSeqs(live))
        if not msg.last_step_follows:
            sw.resent_at = time.monotonic()
            self._finish(sw, sw.moved)

    def on_last_step(self, worker: WorkerHandle, msg: protocol.DecodeStep) -> bool:
        """A DecodeStep arrived: the last one of a worker that has handed over is passed on, and
        the switch is over (True)."""
        sw = self.active.get(worker.role)
        if sw is None or worker is not sw.old or sw.handed_over_at is None:
            return False
        self.sup.send_to(sw.worker, msg)
        sw.resent_at = time.monotonic()
        self._finish(sw, sw.moved)
        return True

    def _finish(self, sw: Switch, moved: int | None, error: str | None = None) -> None:
        """The old worker is done (or dead): no step of it writes pages any more."""
        now = time.monotonic()
        del self.active[sw.role]
        for seq_id in sw.ended or ():
            self.free_owner(seq_id)
        if self.sup.workers.get(sw.role) is sw.worker:
            self.sup.open(sw.worker)
        shares = {role: w.sm_percent for role, w in self.sup.workers.items()}
        record = {"time": time.time(), "role": sw.role, "from_sm": sw.from_sm, "to_sm": sw.to_sm,
                  "prefill_sm": shares.get("prefill"), "decode_sm": shares.get("decode"),
                  "reason": sw.reason, "cold_start": sw.cold,
                  "prepare_s": None if sw.ready_at is None else sw.ready_at - sw.requested,
                  "prepare_parts_s": sw.prepare_parts,
                  "handover_s": None if sw.handover_at is None else now - sw.handover_at,
                  "moved_seqs": moved, "old_step_s": sw.old_step_s, "gap_s": None, "gap_parts_s": None, "error": error}
        self.history.append(record)
        if moved and sw.old.last_output is not None:
            record["gap_parts_s"] = {"hand_over": sw.resent_at - sw.old.last_output}
            self._gap[sw.role] = (record, sw)

    def check_timeouts(self, now: float) -> None:
        """Stop the worker holding up a switch past the timeout; dead() then reports it."""
        for sw in self.active.values():
            if sw.stalled is not None:
                continue
            if sw.ready_at is None and now - sw.requested > self.timeout_s:
                stuck, sw.stalled = sw.worker, f"new {sw.role} worker was not ready after {self.timeout_s:g} s"
            elif sw.handover_at is not None and now - sw.handover_at > self.timeout_s:
                stuck, sw.stalled = sw.old, f"old {sw.role} worker did not hand over in {self.timeout_s:g} s"
            else:
                continue
            print(f"semipd: {sw.stalled}; stopping it (pid {stuck.proc.pid})", file=sys.stderr, flush=True)
            stuck.proc.kill()

    def on_death(self, where: str, worker: WorkerHandle) -> bool:
        """A worker exited (the supervisor has replaced a current one). True if the requests of
        its role must be recovered (their pages freed and recomputed through prefill)."""
        sw = self.active.get(worker.role)
        if where == "standby":
            if self.keep_standbys:
                self.sup.ensure_standby(worker.role)
            return False
        if sw is None:
            return where == "current"
        if where == "incoming":       # died while preparing: the old worker simply stays
            self._finish(sw, None, sw.stalled or f"new {worker.role} worker exited while starting")
            return False
        if where == "retiring" and worker is sw.old:  # died before its hand-over was complete
            sw.worker.queue.clear()   # recovery resends everything the role held...
            # ...some of which the new worker already holds, or it has died too (not yet noticed:
            # recovery must not open it): a fresh one (same share) takes its place
            if sw.handed_over_at is not None or sw.worker.proc.poll() is not None:
                self.sup.kill(sw.worker)
            when = "before handing over" if sw.handed_over_at is None else "during its last step"
            self._finish(sw, 0, sw.stalled or f"old {worker.role} worker exited {when}")
            return True
        if where == "current" and worker is sw.worker:  # the successor died mid-switch
            # The old worker may still be writing into pages that recovery is about to free.
            self.sup.kill(sw.old)
            self._finish(sw, 0, f"new {worker.role} worker exited during the hand-over")
            return True
        return where == "current"

    def busy(self) -> bool:
        return bool(self.active)
