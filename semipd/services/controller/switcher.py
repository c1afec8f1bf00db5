"""Moving the SM split without stopping service.

MPS fixes a process's SM quota when its CUDA context is created, so a new share for a phase means
a new worker process. The switch for one role (prefill and decode switch independently):

1. call up the role's standby (already imported everything): its WorkerInit carries the new quota;
   it opens the IPC handles and captures its CUDA graphs while the old worker keeps serving. A
   worker primed ahead at that share (prime(), below) has done all that already: step 2 at once;
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

Preparing takes seconds, which a load that shifts does not wait for. prime() calls a standby up
ahead of any switch, at the share the partitioner expects to ask for next; it prepares, then
waits, holding no request and no page. A switch to its share records a preparation of about 0 s
and, as its parts, those of the preparation ahead. A switch to another share kills it (its
memory goes to the worker that prepares now) and takes the other standby, ready too; the caller
aims the next one once the switch is over.
"""

import sys
import time
from dataclasses import dataclass, field

from semipd.services.controller.lifecycle import CURRENT, PRIMES, SWITCH_MOVES, WAITING, SwitchPhase, WorkerState, advance
from semipd.services.controller.supervisor import Supervisor, WorkerHandle
from semipd.shared import protocol

# A worker reports its steps about once a second while it works: an older report says nothing
# about its current step.
FRESH_STEPS_S = 2.0
PRIME_DEATHS = 3  # primed or priming workers that may die in a row before priming stops


@dataclass
class Switch:
    role: str
    from_sm: int | None
    to_sm: int
    reason: str
    worker: WorkerHandle                # the standby called up
    cold: bool                          # the standby had not finished starting
    primed: bool = False                # the worker was primed ahead at this share
    phase: SwitchPhase = SwitchPhase.PREPARING
    # when each phase it has been in began (time.monotonic(), throughout)
    times: dict[SwitchPhase, float] = field(default_factory=lambda: {SwitchPhase.PREPARING: time.monotonic()})
    prepare_parts: dict | None = None     # the new worker's own account of its preparation
    old_step_s: float | None = None       # the old worker's mean step when handing over: the gap's floor
    old: WorkerHandle | None = None
    moved: int = 0                        # live sequences passed on
    ended: list[int] | None = None        # ended in transit: pages freed when the old worker is done
    stalled: str | None = None            # why the timeout stopped a worker of this switch

    def move_to(self, phase: SwitchPhase) -> None:
        advance(f"{self.role} switch to {self.to_sm}% SMs", SWITCH_MOVES, self.phase, phase)
        self.phase, self.times[phase] = phase, time.monotonic()

    def stats(self) -> dict:
        return {"phase": self.phase.value, "from_sm": self.from_sm, "to_sm": self.to_sm,
                "new": self.worker.summary(), "old": self.old and self.old.summary()}


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
        self.prime_deaths = {"prefill": 0, "decode": 0}  # per role, workers that died primed or priming, in a row
        self.on_end = lambda: None           # called once a switch has ended, done or failed

    def request(self, role: str, sm_percent: int, reason: str) -> None:
        """Start moving `role` to a new share; no-op if it has that share or is switching."""
        current = self.sup.current(role)
        if role in self.active or current.sm_percent == sm_percent:
            return
        self.keep_standbys = True
        worker = self.sup.primed_of(role)
        if worker is not None and (worker.sm_percent != sm_percent or worker.exited()):
            self.sup.kill(worker)  # aimed elsewhere (its memory goes to the one preparing), or dead
            worker = None
        if worker is None:
            worker = self.sup.call_up(role)
            self.sup.activate(worker, sm_percent)
        cold = worker.identity is None  # still importing: the switch waits for that
        sw = self.active[role] = Switch(role, current.sm_percent, sm_percent, reason, worker, cold,
                                        primed=worker.state in PRIMES)
        if worker.state is WorkerState.PRIMED:
            self._take_over(sw, worker.prepared)
        elif worker.state is WorkerState.PRIMING:  # the switch waits for it as for any it called up
            worker.move_to(WorkerState.PREPARING)

    def prime(self, role: str, sm_percent: int | None) -> None:
        """Keep the role's primed worker at this share (None: keep none). A worker is primed
        only from a second standby that has finished importing, so that a switch elsewhere still
        finds one ready, and no more once PRIME_DEATHS in a row have died primed or priming (on
        a GPU without room for one more worker they would die one after another); per role, for
        their workers differ."""
        primed = self.sup.primed_of(role)
        if role in self.active or (primed is not None and primed.sm_percent == sm_percent):
            return
        if primed is not None:
            self.sup.kill(primed)
        if sm_percent in (None, self.sup.current(role).sm_percent) or self.prime_deaths[role] >= PRIME_DEATHS:
            return
        self.sup.ensure_standby(role, count=2)
        if sum(w.state is WorkerState.STANDBY for w in self.sup.standbys_of(role)) == 2:
            self.sup.activate(self.sup.call_up(role, WorkerState.PRIMING), sm_percent)

    def on_ready(self, worker: WorkerHandle, prepare_parts: dict) -> None:
        """The new worker has mapped the memory and captured its graphs: retire the old one. A
        primed worker waits for a switch to its share."""
        if worker.state is WorkerState.PRIMING:
            worker.prepared, self.prime_deaths[worker.role] = prepare_parts, 0  # deaths in a row count
            return worker.move_to(WorkerState.PRIMED)
        sw = self.active[worker.role]
        if sw.stalled is not None:  # too late: the timeout has killed it (its death ends the switch)
            return
        self._take_over(sw, prepare_parts)

    def _take_over(self, sw: Switch, prepare_parts: dict) -> None:
        """The switch's worker is ready: it becomes current and the old one hands over."""
        worker = sw.worker
        sw.prepare_parts = prepare_parts
        steps = self.sup.current(worker.role).step_stats()
        if steps and steps["age_s"] < FRESH_STEPS_S:
            sw.old_step_s = steps["step_ms"] / 1e3
        sw.old = self.sup.promote(worker)
        if sw.old is None:  # the old worker never started: nothing to hand over
            return self._finish(sw, 0)
        sw.move_to(SwitchPhase.HANDING_OVER)
        self.sup.send_to(sw.old, protocol.Handover())

    def on_output(self, worker: WorkerHandle) -> None:
        """A PrefillDone or DecodeStep arrived from this worker: track the pause in the stream."""
        now = worker.last_output = time.monotonic()
        gap = self._gap.get(worker.role)
        if gap is not None and worker is gap[1].worker:
            record, sw = gap
            record["gap_s"] = now - sw.old.last_output
            record["gap_parts_s"]["first_step"] = now - sw.times[SwitchPhase.DONE]
            del self._gap[worker.role]

    def on_handed_over(self, worker: WorkerHandle, msg: protocol.HandedOver) -> None:
        sw = self.active.get(worker.role)
        if sw is None or worker is not sw.old:
            return
        live, sw.ended = [], []
        for state in msg.seqs:
            if self.alive(state.seq_id):
                live.append(state)
            else:
                sw.ended.append(state.seq_id)
        sw.moved = len(live)
        if live:
            self.sup.send_to(sw.worker, protocol.RunSeqs(live))
        if msg.last_step_follows:
            sw.move_to(SwitchPhase.LAST_STEP)
        else:
            self._finish(sw, sw.moved)

    def on_last_step(self, worker: WorkerHandle, msg: protocol.DecodeStep) -> None:
        """A DecodeStep arrived: the last one of a worker that has handed over is passed on, and
        the switch is over."""
        sw = self.active.get(worker.role)
        if sw is None or worker is not sw.old or sw.phase is not SwitchPhase.LAST_STEP:
            return
        self.sup.send_to(sw.worker, msg)
        self._finish(sw, sw.moved)

    def _finish(self, sw: Switch, moved: int | None, error: str | None = None) -> None:
        """The old worker is done (or dead): no step of it writes pages any more. Done, the new
        worker has all it needs: the sequences and their last tokens."""
        sw.move_to(SwitchPhase.FAILED if error else SwitchPhase.DONE)
        del self.active[sw.role]
        for seq_id in sw.ended or ():
            self.free_owner(seq_id)
        if self.sup.current(sw.role) is sw.worker:
            self.sup.open(sw.worker)
        if error is None and sw.old is not None:
            sw.old.move_to(WorkerState.RETIRING)
        self.history.append(record := self._record(sw, moved, error))
        if moved and sw.old.last_output is not None:
            record["gap_parts_s"] = {"hand_over": sw.times[SwitchPhase.DONE] - sw.old.last_output}
            self._gap[sw.role] = (record, sw)
        self.on_end()

    def _record(self, sw: Switch, moved: int | None, error: str | None) -> dict:
        """The switch's entry in the history (`semipd stats` -> partition.history)."""
        end, times = sw.times[sw.phase], sw.times
        ready = times.get(SwitchPhase.HANDING_OVER, times.get(SwitchPhase.DONE))  # none: failed preparing
        handover = times.get(SwitchPhase.HANDING_OVER)
        shares = {role: w.sm_percent for role, w in self.sup.workers.items()}
        return {"time": time.time(), "role": sw.role, "from_sm": sw.from_sm, "to_sm": sw.to_sm,
                "prefill_sm": shares.get("prefill"), "decode_sm": shares.get("decode"),
                "reason": sw.reason, "cold_start": sw.cold, "primed": sw.primed,
                "prepare_s": None if ready is None else ready - times[SwitchPhase.PREPARING],
                "prepare_parts_s": sw.prepare_parts,
                "handover_s": None if handover is None else end - handover,
                "moved_seqs": moved, "old_step_s": sw.old_step_s, "gap_s": None, "gap_parts_s": None, "error": error}

    def check_timeouts(self, now: float) -> None:
        """Stop the worker holding up a switch past the timeout; dead() then reports it."""
        for sw in self.active.values():
            if sw.stalled is not None:
                continue
            handover = sw.times.get(SwitchPhase.HANDING_OVER)
            if sw.phase is SwitchPhase.PREPARING and now - sw.times[SwitchPhase.PREPARING] > self.timeout_s:
                stuck, sw.stalled = sw.worker, f"new {sw.role} worker was not ready after {self.timeout_s:g} s"
            elif handover is not None and now - handover > self.timeout_s:
                stuck, sw.stalled = sw.old, f"old {sw.role} worker did not hand over in {self.timeout_s:g} s"
            else:
                continue
            print(f"semipd: {sw.stalled}; stopping it (pid {stuck.proc.pid})", file=sys.stderr, flush=True)
            stuck.kill()

    def on_death(self, was: WorkerState, worker: WorkerHandle) -> bool:
        """A worker exited in state `was` (the supervisor has replaced a current one). True if the
        requests of its role must be recovered (their pages freed and recomputed through prefill)."""
        sw = self.active.get(worker.role)
        if was in PRIMES:
            self.prime_deaths[worker.role] += 1
            if self.prime_deaths[worker.role] == PRIME_DEATHS:
                print(f"semipd: {PRIME_DEATHS} primed {worker.role} workers died: priming no more",
                      file=sys.stderr, flush=True)
        if was in WAITING or was in PRIMES:  # it held nothing; a primed one is aimed again later
            if self.keep_standbys:
                self.sup.ensure_standby(worker.role)
            return False
        if sw is None:
            return was in CURRENT
        if was is WorkerState.PREPARING:  # died while preparing: the old worker simply stays
            self._finish(sw, None, sw.stalled or f"new {worker.role} worker exited while starting")
            return False
        if was is WorkerState.HANDING_OVER:  # died before its hand-over was complete
            sw.worker.queue.clear()   # recovery resends everything the role held...
            # ...some of which the new worker already holds, or it has died too (not yet noticed:
            # recovery must not open it): a fresh one (same share) takes its place
            if sw.phase is SwitchPhase.LAST_STEP or sw.worker.exited():
                self.sup.kill(sw.worker)
            when = "before handing over" if sw.phase is SwitchPhase.HANDING_OVER else "during its last step"
            self._finish(sw, 0, sw.stalled or f"old {worker.role} worker exited {when}")
            return True
        if was is WorkerState.TAKING_OVER:  # the successor died mid-switch
            # The old worker may still be writing into pages that recovery is about to free.
            self.sup.kill(sw.old)
            self._finish(sw, 0, f"new {worker.role} worker exited during the hand-over")
            return True
        return was in CURRENT

    def stats(self, role: str) -> dict | None:
        """The role's switch under way: its phase and the two workers in it; None if none."""
        sw = self.active.get(role)
        return sw and sw.stats()
