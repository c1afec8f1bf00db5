"""Where a user's semipd runtime files live: ipc:// sockets and allocator lock files."""

import os
import tempfile


def runtime_dir() -> str:
    """$XDG_RUNTIME_DIR/semipd, else <tmp>/semipd-<uid>; created private (0700) if missing."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = os.path.join(base, "semipd") if base else os.path.join(tempfile.gettempdir(), f"semipd-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def ipc_address(name: str) -> str:
    """An ipc:// endpoint for socket file `name` in the runtime folder."""
    return "ipc://" + os.path.join(runtime_dir(), name)
