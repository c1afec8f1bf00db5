"""Where a user's semipd runtime files live: ipc:// sockets and allocator lock files."""

import os
import socket
import tempfile

from semipd.shared.errors import UserError


def runtime_dir() -> str:
    """$XDG_RUNTIME_DIR/semipd, else <tmp>/semipd-<uid>; created private (0700) if missing."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(base, "semipd") if base else os.path.join(tempfile.gettempdir(), f"semipd-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


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
