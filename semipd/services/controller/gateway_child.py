"""`semipd serve --http HOST:PORT`: the HTTP gateway (`semipd api`) as a child process, started
once the controller serves and stopped when it stops, for the one-command case."""

import subprocess
import sys
import time

from semipd.shared.runtime import child_env


class GatewayChild:
    def __init__(self, listen: tuple[str, int], address: str):
        self.command = [sys.executable, "-m", "semipd", "api", "--address", address,
                        "--host", listen[0], "--port", str(listen[1])]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Called by the controller once it serves; the key, if any, comes from $SEMIPD_API_KEY."""
        # Dies with this process; in a process group of its own, so that Ctrl-C in a terminal
        # reaches only the controller, which stops it once the HTTP streams have their Finals.
        self.proc = subprocess.Popen(self.command, env=child_env(), stdin=subprocess.DEVNULL, process_group=0)

    def stop(self, deadline: float) -> None:
        """SIGTERM, then SIGKILL at the deadline (monotonic s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
