"""Stop a server with SIGTERM while streams are open, many times: each stop's time, and what it
left behind (shared-memory segments, files in its runtime folder).

    PYTHONPATH=$PWD python tests/stop_repeatedly.py COUNT [--model tiny] [--streams 4]

prints one line per stop and the worst time; exits 1 if a stop took longer than the bound or
left anything. tests/test_stop_path.py runs it for as many stops as fit in a minute.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import time

from tests.serving import Server
from tests.stop_tools import STOP_BOUND_S


def shm_segments(pid: int) -> set[str]:
    """The /dev/shm files a process has mapped."""
    with open(f"/proc/{pid}/maps") as f:
        return set(re.findall(r"(/dev/shm/\S+)", f.read()))


def stop_once(model: str, num_streams: int) -> tuple[float, list[str]]:
    """(seconds from SIGTERM to the server's exit, what it left behind, then the end of its
    stderr if it left anything)."""
    server = Server(model)
    streams = [server.client.generate(prompt_ids=[5 + i, 6, 7], temperature=0, max_tokens=400, ignore_eos=True)
               for i in range(num_streams)]
    for s in streams:
        next(s)
    segments = shm_segments(server.proc.pid)
    folder = os.path.dirname(server.address.removeprefix("ipc://"))
    began = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(STOP_BOUND_S * 4)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
    took = time.monotonic() - began
    server.client.close()
    left = [p for p in segments if os.path.exists(p)]
    for root, _, files in os.walk(folder):
        left += [os.path.join(root, f) for f in files]
    if left or took > STOP_BOUND_S:
        left.append(server.proc.stderr.read()[-3000:])
    return took, left


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("count", type=int)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--streams", type=int, default=4)
    args = ap.parse_args()
    worst, failures = 0.0, 0
    for i in range(args.count):
        took, left = stop_once(args.model, args.streams)
        worst = max(worst, took)
        bad = took > STOP_BOUND_S or left
        failures += bool(bad)
        print(f"stop {i + 1}: {took:.2f} s{' left ' + ' '.join(left) if left else ''}"
              f"{'  FAILED' if bad else ''}", flush=True)
    print(f"{args.count} stops, worst {worst:.2f} s, {failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
