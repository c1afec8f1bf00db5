"""systemd's service notifications (the sd_notify protocol), for `Type=notify` units.

A service started by systemd with `Type=notify` finds NOTIFY_SOCKET in its environment: an
AF_UNIX datagram socket, a path, or a name in Linux's abstract namespace when it starts with '@'.
Each datagram is newline-separated `NAME=value` lines: `READY=1` (start-up is over; until then
`systemctl start` waits), `STATUS=text` (shown by `systemctl status`), `WATCHDOG=1` (the service
is alive: with `WatchdogSec=` systemd sets WATCHDOG_USEC and restarts a service silent for that
long) and `STOPPING=1` (the stop has begun). Both `semipd serve` and `semipd scm` use it; without
NOTIFY_SOCKET every call here does nothing, so running by hand or under honcho is unchanged.

The few lines of the protocol are written here rather than taken from a library: no dependency
for a datagram. Watchdog pings come from `alive`, which a serving loop calls on every turn, never
from a thread of their own: a loop that stops turning (wedged on a lock, a blocking call) stops
pinging, and systemd restarts it.
"""

import os
import socket
import time
from collections.abc import Callable

STATUS_EVERY_S = 1.0   # how often `alive` refreshes STATUS= (only when the text changed)
SEND_TIMEOUT_S = 1.0   # a manager that stops reading must not hold up the serving loop longer


class Notifier:
    """One process's notifications to its service manager; without an address, none."""

    def __init__(self, address: str | None, watchdog_s: float | None = None):
        self.sock = None
        if address:
            self.address = "\0" + address[1:] if address.startswith("@") else address
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.settimeout(SEND_TIMEOUT_S)
        self.watchdog_s = watchdog_s
        # systemd wants pings at least every WATCHDOG_USEC; half of it leaves room for a slow turn.
        self.beat_s = min(STATUS_EVERY_S, watchdog_s / 2) if watchdog_s else STATUS_EVERY_S
        self.next_beat = 0.0
        self.last_status = None
        self.stopped = False

    @classmethod
    def from_env(cls) -> "Notifier":
        """The notifier systemd's environment asks for, which it then removes from this process's
        environment: the children (workers, a gateway) must not notify in the service's name."""
        address = os.environ.pop("NOTIFY_SOCKET", None)
        usec = os.environ.pop("WATCHDOG_USEC", "")
        pid = os.environ.pop("WATCHDOG_PID", "")
        # WATCHDOG_PID, when set, names the process systemd watches; pings from another are useless.
        mine = not pid or pid == str(os.getpid())
        return cls(address, int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None)

    def send(self, *fields: str) -> None:
        """One datagram of NAME=value lines. A failed send is dropped: systemd is then gone or
        not reading, and the service must go on serving either way."""
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError:
            pass

    def status(self, text: str) -> None:
        self.last_status = text
        self.send(f"STATUS={text}")

    def ready(self, status: str) -> None:
        self.last_status = status
        self.send("READY=1", f"STATUS={status}")

    def alive(self, status: Callable[[], str]) -> None:
        """From every turn of a serving loop: WATCHDOG=1 every beat_s, and status() as STATUS=
        when it has changed. status is called only when a beat is due."""
        if self.sock is None:
            return
        now = time.monotonic()
        if now < self.next_beat:
            return
        self.next_beat = now + self.beat_s
        fields = ["WATCHDOG=1"] if self.watchdog_s else []
        if not self.stopped and (text := status()) != self.last_status:  # "stopping" stays
            self.last_status = text
            fields.append(f"STATUS={text}")
        if fields:
            self.send(*fields)

    def stopping(self) -> None:
        """The stop has begun (once, however many signals or paths announce it)."""
        if not self.stopped:
            self.stopped = True
            self.send("STOPPING=1", "STATUS=stopping")
