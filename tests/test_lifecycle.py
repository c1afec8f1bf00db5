"""The lifecycle of workers and switches in the controller: its tables refuse moves they do not
list, and a real server's stats and log show each worker's state and each switch's phase."""

import os
import re
import signal
import subprocess
import sys

import pytest

from semipd.services.controller.lifecycle import (CURRENT, SWITCH_MOVES, WAITING, WORKER_MOVES, IllegalMove,
                                                  SwitchPhase, WorkerState)
from semipd.services.controller.supervisor import WorkerHandle
from semipd.services.controller.switcher import Switch
from tests.serving import ROOT, Server, wait_for
from tests.test_serving import model  # noqa: F401 (fixture)


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
    worker = WorkerHandle("decode", [proc], WorkerState.STANDBY)
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


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def cli_stats(server) -> dict:
    """`semipd stats`'s summary lines by their labels."""
    r = subprocess.run([sys.executable, "-m", "semipd", "stats", "--address", server.address],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    return {label: text.strip() for label, text in (line.split(":", 1) for line in r.stdout.splitlines())}


def test_stats_show_the_states_through_a_switch(model):  # noqa: F811
    server = Server(model)
    try:
        client = server.client
        stats = server.stats()
        for w in stats["workers"].values():
            assert (w["state"], w["ready"], w["standby"], w["switch"]) == ("serving", True, None, None)
        old = {role: w["pid"] for role, w in stats["workers"].items()}

        client.partition(70, 30)  # the first switch calls up standbys still importing
        decode = server.stats()["workers"]["decode"]
        assert decode["state"] == "serving" and decode["pid"] == old["decode"]  # the old one serves on
        assert decode["switch"]["phase"] == "preparing" and decode["switch"]["to_sm"] == 30
        assert decode["switch"]["new"]["state"] == "preparing" and decode["switch"]["old"] is None
        assert decode["standby"]["state"] in ("importing", "standby")  # the next one, already started
        stats = wait_for(lambda s: not s["partition"]["switching"]
                         and all(w["standby"]["state"] == "standby" for w in s["workers"].values()), server)
        for role, w in stats["workers"].items():
            assert (w["state"], w["ready"], w["switch"], w["standby"]["ready"]) == ("serving", True, None, True)
            assert w["pid"] != old[role]
        old = stats["workers"]["decode"]

        os.kill(old["pid"], signal.SIGSTOP)  # the old decode worker cannot hand over yet
        try:
            client.partition(70, 60)
            stats = wait_for(lambda s: s["workers"]["decode"]["pid"] != old["pid"], server)
            decode = stats["workers"]["decode"]
            assert (decode["state"], decode["ready"]) == ("taking_over", False)
            assert decode["switch"]["phase"] == "handing_over" and decode["switch"]["new"]["pid"] == decode["pid"]
            assert decode["switch"]["old"] == {"pid": old["pid"], "state": "handing_over"}
            assert stats["workers"]["prefill"]["switch"] is None  # its share did not change
            lines = cli_stats(server)
            assert lines["decode"].startswith(f"pid {decode['pid']}, taking_over")
            assert f"switching to 60% (handing_over, old pid {old['pid']} handing_over)" in lines["decode"]
            assert re.search(r"standby pid \d+ (importing|standby)", lines["decode"]), lines["decode"]
        finally:
            os.kill(old["pid"], signal.SIGCONT)
        stats = wait_for(lambda s: not s["partition"]["switching"], server)
        assert (stats["workers"]["decode"]["state"], stats["workers"]["decode"]["switch"]) == ("serving", None)
        assert stats["partition"]["history"][-1]["error"] is None
        wait_for(lambda s: not pid_exists(old["pid"]), server)  # the controller has reaped it
    finally:
        assert server.stop() == 0
    log = server.proc.stderr.read()
    for move in ("serving -> handing_over", "handing_over -> retiring", "retiring -> dead"):
        assert f"semipd: decode worker (pid {old['pid']}): {move}" in log, log
    assert "semipd: decode switch to 60% SMs: handing_over -> done" in log, log
