"""Which server owns an address: a small state file in the runtime folder, so that the next server
on the same address finds and removes what a killed one left.

A server killed with SIGKILL (or by honcho's SIGKILL to its process group, with the resource
tracker that would have unlinked its segments) runs no cleanup: its ipc:// socket files, its
page allocator's lock file and its /dev/shm segments stay. All of them but the client socket are
named after its pid (runtime.owned_name), so the state file needs only the pid, and its start
time: a pid the kernel has since given to another process is not the server's. A server started
with --start-mps also leaves its MPS daemon running (mps-PID in the runtime folder): any next
server asks it to quit, whatever its address, since a second daemon would contend for the same
GPU, and a later one removes its folder once it has.
"""

import glob
import hashlib
import json
import os
import sys

from semipd.services.controller.mps import stop_left_daemon
from semipd.shared.errors import UserError
from semipd.shared.runtime import ipc_listening, owned_name, owned_paths, remove_paths, runtime_dir


def state_path(address: str) -> str:
    key = hashlib.sha256(address.encode()).hexdigest()[:16]
    return os.path.join(runtime_dir(), f"server-{key}.json")


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot); None if there is none, or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZX" else int(fields[19])  # state is field 3, starttime 22


def _alive(pid: int, started: int | None = None) -> bool:
    """Whether the process runs, and started then if that is given (without /proc: whether
    the pid does)."""
    if os.path.isdir("/proc"):
        now = start_time(pid)
        return now is not None and started in (None, now)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process has the pid
        pass
    return True


def claim(address: str) -> str:
    """Record this process as the server at `address`; returns the state file's path (release()
    removes it). UserError while the recorded server lives (it may still be loading, before it
    listens); what a dead one left is removed first."""
    path = state_path(address)
    mine = {"pid": os.getpid(), "start_time": start_time(os.getpid()), "address": address}
    _remove_dead_drafts()
    _stop_dead_daemons()
    draft = os.path.join(runtime_dir(), owned_name("claim"))
    with open(draft, "w") as f:
        json.dump(mine, f)
    try:
        for _ in range(2):  # once more after removing a dead server's file
            try:
                os.link(draft, path)  # fails if the file exists: no two servers both claim
                return path
            except FileExistsError:
                owner = _read(path)
                if owner is not None and _alive(owner["pid"], owner["start_time"]):
                    raise UserError(f"a server (pid {owner['pid']}) is already starting or serving at {address}")
                _remove_leftovers(owner and owner["pid"], address)
                remove_paths([path])
        raise UserError(f"another server is starting at {address}")
    finally:
        os.unlink(draft)


def release(path: str) -> None:
    """Remove the state file at a clean stop, if it is still this process's."""
    owner = _read(path)
    if owner is not None and owner["pid"] == os.getpid():
        remove_paths([path])


def remove_own_leftovers(address: str) -> None:
    """Remove everything this process owns at `address`: for a stop that cannot finish its own
    cleanup in time. Unlinking memory still mapped is safe: it is freed once the last map goes."""
    remove_paths(owned_paths(os.getpid()) + _socket_file(address))
    release(state_path(address))


def _remove_dead_drafts() -> None:
    """Drafts of state files whose writers died before they could link them (a window of
    microseconds, but SIGKILL can land anywhere)."""
    for path in glob.glob(os.path.join(runtime_dir(), "semipd-*-claim-*")):
        pid = int(os.path.basename(path).split("-")[1])
        if not _alive(pid):
            remove_paths([path])


def _stop_dead_daemons() -> None:
    """The MPS daemons (and their folders) of --start-mps servers that are gone: killed, or
    stopped (a daemon quits once its last client has, after the server, and leaves its folder)."""
    for folder in glob.glob(os.path.join(runtime_dir(), "mps-*")):
        pid = os.path.basename(folder).removeprefix("mps-")
        if pid.isdigit() and not _alive(int(pid)) and stop_left_daemon(folder):
            print(f"semipd: asked the MPS daemon of a server that is gone (pid {pid}) to quit",
                  file=sys.stderr, flush=True)


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # gone, or not ours to understand: no owner to respect
        return None


def _socket_file(address: str) -> list[str]:
    """The ipc:// address's socket file, if it has one (the abstract namespace has none)."""
    path = address.removeprefix("ipc://")
    return [path] if address.startswith("ipc://") and not path.startswith("@") else []


def _remove_leftovers(pid: int | None, address: str) -> None:
    """What a dead server left: its pid's files, and the socket file if nobody listens on it."""
    paths = (owned_paths(pid) if pid else []) + ([] if ipc_listening(address) else _socket_file(address))
    removed = remove_paths(paths)
    if removed:
        print(f"semipd: removed what a stopped server (pid {pid}) left at {address}: {' '.join(removed)}",
              file=sys.stderr, flush=True)
