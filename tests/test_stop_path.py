"""SIGTERM with streams open, over and over: every stop within the bound, nothing left behind in
/dev/shm or the runtime folder (issue 25: about 1 stop in 10 hung the controller)."""

import time

from tests.stop_repeatedly import STOP_BOUND_S, stop_once

BUDGET_S = 60  # as many stops as fit; tests/stop_repeatedly.py runs a given count


def test_repeated_stops_with_streams_open():
    began, stops = time.monotonic(), 0
    while stops < 2 or time.monotonic() - began < BUDGET_S:
        took, left = stop_once("tiny", num_streams=8)
        stops += 1
        assert took < STOP_BOUND_S and not left, (stops, took, left)
