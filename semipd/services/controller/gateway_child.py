"""`semipd serve --http HOST:PORT`: the HTTP gateway (`semipd api`) as a child process, started
once the controller serves and stopped when it stops, for the one-command case."""

import subprocess
import sys

from semipd.shared.runtime import child_env

STOP_WAIT_S = 10  # past this the gateway is killed (it gives open answers GRACE_S to end)


class GatewayChild:
    def __init__(self, listen: tuple[str, int], address: str):
        self.command = [sys.executable, "-m", "semipd", "api", "--address", address,
                        "--host", listen[0], "--port", str(listen[1])]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Called by the controller once it serves; the key, if any, comes from $SEMIPD_API_KEY."""
        self.proc = subprocess.Popen(self.command, env=child_env())  # dies with this process

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
