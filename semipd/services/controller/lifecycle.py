"""Where a worker process is in its life, and where a switch of the SM split is.

Each is one enum with its allowed moves in one table; `advance` is the one place that checks a
move against its table and logs it (one `semipd:` line on stderr). A move the table does not allow
is a bug in the controller: it raises rather than leave a worker or a switch in a state nothing
expects. The supervisor and the switcher (supervisor.py, switcher.py) make the moves.
"""

import sys
from enum import Enum


class WorkerState(Enum):
    IMPORTING = "importing"        # spawned to be a standby, still importing
    STANDBY = "standby"            # said hello; waits for a switch to call it up
    PRIMING = "priming"            # called up ahead, at a share a switch is likely to ask for: prepares
    PRIMED = "primed"              # prepared ahead: a switch to its share takes it with no preparation
    STARTING = "starting"          # the role's current worker, not ready yet (its first, or a replacement)
    PREPARING = "preparing"        # called up by a switch: maps memory, captures graphs; the old one serves
    TAKING_OVER = "taking_over"    # the role's current worker, closed until the old one has handed over
    SERVING = "serving"            # the role's current worker, open
    HANDING_OVER = "handing_over"  # told to hand over: passes on what it holds, then its last step
    RETIRING = "retiring"          # its switch is over; it exits
    DEAD = "dead"                  # exited, or killed


WORKER_MOVES: dict[WorkerState, set[WorkerState]] = {
    # called up before its hello: a cold switch, whose WorkerInit goes at the hello
    WorkerState.IMPORTING: {WorkerState.STANDBY, WorkerState.PREPARING, WorkerState.PRIMING, WorkerState.DEAD},
    WorkerState.STANDBY: {WorkerState.PREPARING, WorkerState.PRIMING, WorkerState.DEAD},
    # a switch to its share adopts it, preparing or prepared; one aimed elsewhere is killed
    WorkerState.PRIMING: {WorkerState.PRIMED, WorkerState.PREPARING, WorkerState.DEAD},
    WorkerState.PRIMED: {WorkerState.TAKING_OVER, WorkerState.DEAD},
    WorkerState.STARTING: {WorkerState.SERVING, WorkerState.DEAD},
    WorkerState.PREPARING: {WorkerState.TAKING_OVER, WorkerState.DEAD},
    WorkerState.TAKING_OVER: {WorkerState.SERVING, WorkerState.DEAD},
    WorkerState.SERVING: {WorkerState.HANDING_OVER, WorkerState.DEAD},
    WorkerState.HANDING_OVER: {WorkerState.RETIRING, WorkerState.DEAD},
    WorkerState.RETIRING: {WorkerState.DEAD},
    WorkerState.DEAD: set(),
}
# The role's current worker: the one its messages go to (they queue until it is open).
CURRENT = {WorkerState.STARTING, WorkerState.TAKING_OVER, WorkerState.SERVING}
# A standby, not yet called up.
WAITING = {WorkerState.IMPORTING, WorkerState.STANDBY}
# Called up ahead of any switch: it holds no request and no page.
PRIMES = {WorkerState.PRIMING, WorkerState.PRIMED}


class SwitchPhase(Enum):
    PREPARING = "preparing"        # the called-up standby prepares; the old worker serves
    HANDING_OVER = "handing_over"  # the old worker has its Handover; the role's messages queue
    LAST_STEP = "last_step"        # handed over; the old decode worker's step in flight follows
    DONE = "done"
    FAILED = "failed"


SWITCH_MOVES: dict[SwitchPhase, set[SwitchPhase]] = {
    # done at once where the old worker never opened: it has nothing to hand over
    SwitchPhase.PREPARING: {SwitchPhase.HANDING_OVER, SwitchPhase.DONE, SwitchPhase.FAILED},
    SwitchPhase.HANDING_OVER: {SwitchPhase.LAST_STEP, SwitchPhase.DONE, SwitchPhase.FAILED},
    SwitchPhase.LAST_STEP: {SwitchPhase.DONE, SwitchPhase.FAILED},
    SwitchPhase.DONE: set(),
    SwitchPhase.FAILED: set(),
}


class IllegalMove(RuntimeError):
    pass


def advance(subject: str, moves: dict, old: Enum, new: Enum) -> None:
    """Check a move against its table and log it; IllegalMove if the table does not allow it."""
    if new not in moves[old]:
        raise IllegalMove(f"{subject}: {old.value} -> {new.value} is not an allowed move")
    print(f"semipd: {subject}: {old.value} -> {new.value}", file=sys.stderr, flush=True)
