"""`honcho start` with the repository's Procfile, then Ctrl-C, COUNT times in a row: each stop's
time, and whether any process was left for honcho's SIGKILL or left a socket, a lock file or a
shared-memory segment behind (issue 24 asks for twenty clean cycles).

    PYTHONPATH=$PWD python tests/honcho_cycles.py COUNT

prints one line per cycle; exits 1 if any failed. tests/test_honcho_cycles.py runs two. The
HTTP gateway gets a free port in place of 8000, so that cycles run beside another server.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time

from tests.serving import ROOT
from tests.stop_tools import leftovers, new_folder, process_tree

START_S = 300  # the four processes start together on a small machine


def procfile(folder: str) -> str:
    """The repository's Procfile, its gateway on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(os.path.join(ROOT, "Procfile")) as f:
        text = re.sub(r"^api: semipd api$", f"api: semipd api --port {port}", f.read(), flags=re.M)
    assert f"--port {port}" in text, "the Procfile's api line changed: update this script"
    path = os.path.join(folder, "Procfile")
    with open(path, "w") as f:
        f.write(text)
    return path


def cycle() -> tuple[float, list[str]]:
    """(seconds from Ctrl-C to honcho's exit, what went wrong: leftovers and bad output)."""
    folder = new_folder()
    os.makedirs(folder)
    proc = subprocess.Popen(["honcho", "-f", procfile(folder), "-d", ROOT, "start"], cwd=ROOT,
                            env=dict(os.environ, XDG_RUNTIME_DIR=folder, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own group, as a terminal's foreground job
    out, deadline = [], time.monotonic() + START_S
    while not (any("semipd: serving" in line for line in out) and any("hello.1 | " in line for line in out)):
        line = proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            return 0.0, ["did not start:", *out[-20:]]
        out.append(line)
    tree = process_tree(proc.pid)
    began = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground group
    out += proc.stdout.readlines()
    proc.wait()
    took = time.monotonic() - began
    os.remove(os.path.join(folder, "Procfile"))
    bad = leftovers(folder, tree)
    bad += [line.rstrip() for line in out if "SIGKILL" in line or "Traceback" in line or "Error" in line]
    return took, bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("count", type=int)
    args = ap.parse_args()
    worst, failures = 0.0, 0
    for i in range(args.count):
        took, bad = cycle()
        worst, failures = max(worst, took), failures + bool(bad)
        print(f"cycle {i + 1}: stopped in {took:.2f} s{'  FAILED: ' + ' | '.join(bad) if bad else ''}", flush=True)
    print(f"{args.count} cycles, slowest stop {worst:.2f} s, {failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
