"""Where a user's semipd runtime files live (ipc:// sockets and allocator lock files), how they and
shared-memory segments are named after the process that owns them, and how a server's child
processes die with it."""

import ctypes
import glob
import os
import secrets
import signal
import socket
import sys
import tempfile

from semipd.shared.errors import UserError


def runtime_dir() -> str:
    """$XDG_RUNTIME_DIR/semipd, else <tmp>/semipd-<uid>; created private (0700) if missing."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(base, "semipd") if base else os.path.join(tempfile.gettempdir(), f"semipd-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared-memory segments


def owned_name(kind: str) -> str:
    """A fresh name for a shared-memory segment or runtime file of this process,
    semipd-PID-KIND-RANDOM: the pid in it lets the next server on the same address find what a
    killed one left (owned_paths)."""
    return f"semipd-{os.getpid()}-{kind}-{secrets.token_hex(4)}"


def owned_paths(pid: int) -> list[str]:
    """What process pid made under owned_name and has not removed: /dev/shm segments, files in
    the runtime folder."""
    return [p for folder in (SHM_DIR, runtime_dir()) for p in glob.glob(os.path.join(folder, f"semipd-{pid}-*"))]


def remove_paths(paths: list[str]) -> list[str]:
    """Unlink each path; returns those this call removed (others may be gone already)."""
    removed = []
    for path in paths:
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def ipc_address(name: str) -> str:
    """An ipc:// endpoint for socket file `name` in the runtime folder."""
    return "ipc://" + os.path.join(runtime_dir(), name)


def default_server_address() -> str:
    """Where `semipd serve` listens and clients connect unless told otherwise."""
    return ipc_address("semipd.sock")


def default_monitor_address() -> str:
    """Where `semipd scm` listens and `semipd serve --scm` connects unless told otherwise."""
    return ipc_address("scm.sock")


def ipc_listening(address: str) -> bool:
    """Whether a process accepts connections on this ipc:// socket file. A file nobody listens on
    is left behind by a process that was killed; binding anew silently takes over a live one."""
    path = address.removeprefix("ipc://")
    path = "\0" + path[1:] if path.startswith("@") else path  # Linux's abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
            return True
        except OSError:
            return False


def refuse_if_listening(address: str) -> None:
    """Before loading anything: UserError if a server already listens at this ipc:// address."""
    if address.startswith("ipc://") and ipc_listening(address):
        raise UserError(f"a server is already listening at {address}")


PARENT_ENV = "SEMIPD_PARENT_PID"  # set for a child by child_env(): the pid it must not outlive
PR_SET_PDEATHSIG = 1               # from <linux/prctl.h>


def child_env() -> dict[str, str]:
    """The environment for a child process that must die with this one (die_with_parent)."""
    return dict(os.environ, **{PARENT_ENV: str(os.getpid())})


def parent_pid() -> int:
    """The pid this process must not outlive: the one child_env() named, else its parent now."""
    return int(os.environ.get(PARENT_ENV) or os.getppid())


def die_with_parent() -> None:
    """First thing in a child started with child_env(): on Linux the kernel SIGKILLs it when the
    parent dies, even while it is deep in an import. A parent that died before the request was
    made is noticed here (the child has been handed to another process). Elsewhere only the
    workers' poll of their parent remains. Note: Linux sends the signal when the *thread* that
    started the child ends, so parents start children from their main thread."""
    if PARENT_ENV not in os.environ:
        return
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid():
        os._exit(0)
