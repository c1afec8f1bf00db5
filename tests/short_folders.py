"""Short-named temporary folders under /tmp, for what holds ipc:// sockets (a socket's path may
not pass 107 bytes, which pytest's tmp_path can). A server's is removed when it stops; at the
end of the session conftest.py removes what is left and checks that nothing is."""

import os
import shutil
import tempfile

MADE: list[str] = []   # every folder this session made


def short_folder(prefix: str) -> str:
    """A new private folder /tmp/<prefix>XXXXXXXX, noted for the end-of-session sweep."""
    folder = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    MADE.append(folder)
    return folder


def remove(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def sweep() -> list[str]:
    """Remove the folders still there (those of servers a test killed, of monitors and of tests
    that failed half way); return those that could not be removed."""
    for folder in MADE:
        remove(folder)
    return [f for f in MADE if os.path.exists(f)]
