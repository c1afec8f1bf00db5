"""What a killed server leaves is removed by the next server on the same address (issue 24):
SIGKILL to the server's process group (honcho's second step, which takes Python's resource
tracker too) leaves its client and worker sockets, the page allocator's lock file and its
/dev/shm segments; its workers die with it at once; a live server's files are never touched."""

import json
import os
import signal
import subprocess
import time

import pytest

from semipd.services.controller.claim import claim, release
from semipd.shared.client import Client
from semipd.shared.errors import UserError
from semipd.shared.runtime import runtime_dir
from tests.stop_tools import (RawStreams, address_in, alive, leftovers, new_folder, process_tree, start,
                              wait_exit, wait_ready)
from tests.stop_tools import no_server_left  # noqa: F401 (autouse: kills what a failed test left)

# Stands in for NVIDIA's nvidia-cuda-mps-control on a machine without it: a "daemon" is a file in
# its pipe folder, and every call is logged.
FAKE_MPS_CONTROL = """#!/bin/sh
daemon="$CUDA_MPS_PIPE_DIRECTORY/daemon"
if [ "$1" = -d ]; then touch "$daemon"; echo "start $CUDA_MPS_PIPE_DIRECTORY" >> "$FAKE_MPS_LOG"; exit 0; fi
read -r command
echo "$command $CUDA_MPS_PIPE_DIRECTORY" >> "$FAKE_MPS_LOG"
[ -e "$daemon" ] || exit 1
[ "$command" != quit ] || rm "$daemon"
"""
GONE_WITHIN_S = 5  # the kernel kills them at once (PR_SET_PDEATHSIG); the rest is this machine's load


def test_the_next_server_removes_what_a_killed_one_left():
    folder = new_folder()
    first = start(folder)
    wait_ready(first, folder)
    tree = process_tree(first.pid)
    streams = RawStreams(folder, 3)
    streams.read(RawStreams.all_streaming)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed = time.monotonic()
    while any(alive(p) for p in tree) and time.monotonic() - killed < GONE_WITHIN_S:
        time.sleep(0.01)
    assert not [p for p in tree if alive(p)], "workers outlived their controller"
    streams.close()
    left = leftovers(folder, {first.pid})
    names = " ".join(os.path.basename(p) for p in left)
    for kind in ("front.sock", "-workers-", "-pages-", "-arena-", "server-"):
        assert kind in names, (kind, left)  # what the kill left: each kind is found below

    second = start(folder)
    wait_ready(second, folder)
    try:
        # The socket file and the state file are the second server's now.
        assert not [p for p in left if os.path.exists(p) and not p.endswith(("front.sock", ".json"))]
        with open(next(p for p in left if p.endswith(".json"))) as f:
            assert json.load(f)["pid"] == second.pid
        with Client(address_in(folder)) as client:
            result = client.generate(prompt_ids=[5, 6], max_tokens=4, temperature=0).result()
        assert len(result.token_ids) == 4
    finally:
        second.send_signal(signal.SIGTERM)
        wait_exit(second)
    stderr = second.stderr.read()
    assert f"semipd: removed what a stopped server (pid {first.pid}) left at {address_in(folder)}" in stderr
    assert second.returncode == 0 and not leftovers(folder, {first.pid, second.pid}), stderr


def test_a_live_server_is_not_cleaned_up(monkeypatch):
    """A second server on the address of one still loading (not listening yet) is refused by the
    state file, before it touches anything."""
    folder = new_folder()
    monkeypatch.setenv("XDG_RUNTIME_DIR", folder)
    path = claim(address_in(folder))
    with pytest.raises(UserError, match=f"a server \\(pid {os.getpid()}\\) is already starting"):
        claim(address_in(folder))
    assert os.path.exists(path)
    release(path)
    assert not leftovers(folder, set())


def test_a_draft_of_a_dead_claim_is_removed(monkeypatch):
    """A server killed while writing its state file leaves the draft: the next claim removes it,
    not the draft of a live process (which may be claiming another address)."""
    folder = new_folder()
    monkeypatch.setenv("XDG_RUNTIME_DIR", folder)
    dead = subprocess.Popen(["true"])
    dead.wait()
    drafts = {pid: os.path.join(runtime_dir(), f"semipd-{pid}-claim-0") for pid in (dead.pid, os.getppid())}
    for path in drafts.values():
        open(path, "w").close()
    release(claim(address_in(folder)))
    assert sorted(os.listdir(runtime_dir())) == [os.path.basename(drafts[os.getppid()])]
    os.remove(drafts[os.getppid()])


def test_the_next_server_stops_the_mps_daemon_a_killed_one_left(tmp_path, monkeypatch):
    """A --start-mps server killed with SIGKILL leaves its MPS daemon running; the next server,
    with or without --start-mps, asks it to quit, and a later claim removes its folder."""
    control = tmp_path / "nvidia-cuda-mps-control"
    control.write_text(FAKE_MPS_CONTROL)
    control.chmod(0o755)
    log = tmp_path / "mps.log"
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_LOG", str(log))
    folder = new_folder()
    first = start(folder, "--start-mps")
    wait_ready(first, folder)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    daemon_folder = os.path.join(folder, "semipd", f"mps-{first.pid}")  # in runtime_dir()
    pipes = os.path.join(daemon_folder, "pipe")
    assert f"start {pipes}" in log.read_text().splitlines() and os.path.exists(os.path.join(pipes, "daemon"))

    second = start(folder)
    wait_ready(second, folder)
    second.send_signal(signal.SIGTERM)
    wait_exit(second)
    stderr = second.stderr.read()
    assert f"semipd: asked the MPS daemon of a server that is gone (pid {first.pid}) to quit" in stderr
    assert second.returncode == 0, stderr
    asked = time.monotonic()  # the quit is not waited for
    while f"quit {pipes}" not in log.read_text().splitlines() and time.monotonic() - asked < 10:
        time.sleep(0.05)
    assert f"quit {pipes}" in log.read_text().splitlines() and os.path.exists(daemon_folder)
    monkeypatch.setenv("XDG_RUNTIME_DIR", folder)
    release(claim(address_in(folder)))  # the next claim finds no daemon there: the folder goes
    assert not os.path.exists(daemon_folder)
