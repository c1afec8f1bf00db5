"""The lifecycle of workers and switches in the controller: its tables refuse moves they do not
list."""

import subprocess
import sys

import pytest

from semipd.services.controller.lifecycle import (CURRENT, SWITCH_MOVES, WAITING, WORKER_MOVES, IllegalMove,
                                                  SwitchPhase, WorkerState)
from semipd.services.controller.supervisor import WorkerHandle
from semipd.services.controller.switcher import Switch


def reachable(moves: dict, starts: set) -> set:
    seen, todo = set(starts), list(starts)
    while todo:
        for nxt in moves[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_tables_cover_every_state_and_end_in_death():
    assert set(WORKER_MOVES) == set(WorkerState) and set(SWITCH_MOVES) == set(SwitchPhase)
    # a worker is spawned as a standby or as a role's current worker; any may die at any time
    assert reachable(WORKER_MOVES, {WorkerState.IMPORTING, WorkerState.STARTING}) == set(WorkerState)
    assert all(WorkerState.DEAD in moves for state, moves in WORKER_MOVES.items() if state is not WorkerState.DEAD)
    assert not WORKER_MOVES[WorkerState.DEAD] and not CURRENT & WAITING
    assert reachable(SWITCH_MOVES, {SwitchPhase.PREPARING}) == set(SwitchPhase)
    assert all(SwitchPhase.FAILED in moves for moves in SWITCH_MOVES.values() if moves)
    assert not SWITCH_MOVES[SwitchPhase.DONE] and not SWITCH_MOVES[SwitchPhase.FAILED]


def test_an_illegal_move_is_refused_and_changes_nothing():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    worker = WorkerHandle("decode", proc, WorkerState.STANDBY)
    with pytest.raises(IllegalMove, match=rf"decode worker \(pid {proc.pid}\): standby -> serving"):
        worker.move_to(WorkerState.SERVING)  # a standby serves only once a switch has prepared it
    assert worker.state is WorkerState.STANDBY
    worker.move_to(WorkerState.PREPARING)
    worker.move_to(WorkerState.DEAD)
    with pytest.raises(IllegalMove):
        worker.move_to(WorkerState.STARTING)  # the dead stay dead
    assert worker.state is WorkerState.DEAD

    switch = Switch("decode", 100, 60, "manual", worker, cold=False)
    with pytest.raises(IllegalMove, match="decode switch to 60% SMs: preparing -> last_step"):
        switch.move_to(SwitchPhase.LAST_STEP)  # no last step before the hand-over
    assert switch.phase is SwitchPhase.PREPARING and list(switch.times) == [SwitchPhase.PREPARING]
    switch.move_to(SwitchPhase.FAILED)
    with pytest.raises(IllegalMove):
        switch.move_to(SwitchPhase.DONE)
    assert switch.phase is SwitchPhase.FAILED and list(switch.times) == [SwitchPhase.PREPARING, SwitchPhase.FAILED]
