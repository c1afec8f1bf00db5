"""When and how fast `semipd serve` stops.

A signal (SIGTERM, SIGINT, SIGHUP) is only recorded: the serving loop asks `due` each turn, so a
stop never interrupts a half-done update (issue 25). Without a drain the loop ends at once; with
`--drain-timeout S` it stops admitting requests and ends once none is in flight or S seconds
have passed (a second signal ends the drain). Then the stop path, whose every wait is bounded by
one deadline, STOP_S after the loop ended: Finals out, workers and standbys stopped together,
sockets closed, memory freed. Should it still not be done BACKSTOP_S after the loop ended, a
timer removes what the process owns and exits: the stop has a bound whatever hangs.
"""

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

STOP_S = 2.0      # the stop path's budget after the loop: workers get what the steps before leave
BACKSTOP_S = 2.6  # then the process exits anyway; with the loop's turn, under 3 s from the signal
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class Stop:
    drain_s: float = 0.0
    signals: list[str] = field(default_factory=list)  # those received, in order
    drain_until: float | None = None                  # set when the loop first sees a signal

    def ask(self, signum: int, _frame=None) -> None:
        """The signal handler: records, raises nothing into whatever the loop was doing."""
        self.signals.append(signal.Signals(signum).name)

    @property
    def draining(self) -> bool:
        """Stopping: no new requests are admitted."""
        return self.drain_until is not None

    def due(self, in_flight: int) -> bool:
        """Whether the serving loop ends now, given the requests in flight; asked every turn."""
        if not self.signals:
            return False
        now = time.monotonic()
        if self.drain_until is None:
            self.drain_until = now + self.drain_s
            if in_flight and self.drain_s:
                what = f"draining {in_flight} requests for up to {self.drain_s:g} s (a second signal stops at once)"
            else:
                what = f"stopping, ending {in_flight} requests" if in_flight else "stopping"
            print(f"semipd: {self.signals[0]}: {what}", file=sys.stderr, flush=True)
        return len(self.signals) > 1 or not in_flight or now >= self.drain_until

    def deadline(self) -> float:
        """When the stop path must be done (monotonic s), counted from the loop's end."""
        return time.monotonic() + STOP_S


class StoppedWhileLoading(BaseException):
    """Raised by a signal while the controller loads: the stack unwinds through the cleanups
    (a BaseException, so that no `except Exception` on the way takes it)."""


def stop_loading(signum: int, _frame=None) -> None:
    raise StoppedWhileLoading(signal.Signals(signum).name)


def arm_backstop(remove_leftovers) -> threading.Timer:
    """In BACKSTOP_S, unless cancelled: remove_leftovers(), then exit."""
    def fire() -> None:
        remove_leftovers()
        print("semipd: the stop path overran its bound; exiting", file=sys.stderr, flush=True)
        os._exit(1)
    timer = threading.Timer(BACKSTOP_S, fire)
    timer.daemon = True
    timer.start()
    return timer
