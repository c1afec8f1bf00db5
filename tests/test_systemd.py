"""`semipd serve` and `semipd scm` under a `Type=notify` unit: each tells the NOTIFY_SOCKET it was
given READY=1 once it serves, STATUS= lines, WATCHDOG=1 pings from its loop at half of
WATCHDOG_USEC, and STOPPING=1 when a SIGTERM starts its stop (issue 24). The socket here is a real
AF_UNIX datagram socket, as systemd's is; the processes are real too."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from semipd.shared.client import Client
from semipd.shared.sd_notify import Notifier
from tests.serving import ROOT, terminate

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s: several arrive within the test
WAIT_S = 120               # start-up on a loaded machine; never a measure of speed


class NotifySocket:
    """A datagram socket that plays systemd's notify socket; it keeps every field it receives,
    in order, as (NAME, value)."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.fields: list[tuple[str, str]] = []

    def wait_for(self, name: str, value: str | None = None, proc=None, count: int = 1) -> None:
        """Receive until `count` fields NAME(=value) have come, in all; fail after WAIT_S or if
        proc exits first."""
        deadline = time.monotonic() + WAIT_S
        while sum(n == name and value in (None, v) for n, v in self.fields) < count:
            assert proc is None or proc.poll() is None, f"exited ({proc.returncode}) before {name}"
            assert time.monotonic() < deadline, f"no {name}={value} within {WAIT_S} s: {self.fields}"
            self.sock.settimeout(1.0)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.fields += [tuple(line.split("=", 1)) for line in data.decode().splitlines()]

    def count(self, name: str) -> int:
        return sum(n == name for n, _ in self.fields)

    def statuses(self) -> list[str]:
        return [v for n, v in self.fields if n == "STATUS"]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    s = NotifySocket(str(tmp_path / "notify.sock"))
    yield s
    s.close()


def start(command: list[str], notify: str, folder) -> subprocess.Popen:
    env = dict(os.environ, NOTIFY_SOCKET=notify, WATCHDOG_USEC=str(WATCHDOG_USEC), XDG_RUNTIME_DIR=str(folder))
    with open(folder / "stderr.log", "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "semipd", *command], cwd=ROOT, env=env, stderr=log)


def test_serve_tells_systemd_ready_status_watchdog_and_stopping(tmp_path, notify_socket):
    address = f"ipc://{tmp_path}/front.sock"
    proc = start(["serve", "--model", "tiny", "--device", "cpu", "--address", address],
                 str(tmp_path / "notify.sock"), tmp_path)
    try:
        notify_socket.wait_for("READY", "1", proc)
        # Ready means serving: a request made at once is answered, no health polling first.
        with Client(address, timeout_s=60) as client:
            result = client.generate(prompt_ids=[5, 6, 7], max_tokens=4, temperature=0).result()
        assert result.finish_reason in ("length", "stop") and result.token_ids
        # The loop pings while it serves, not only while it starts.
        notify_socket.wait_for("WATCHDOG", "1", proc, count=notify_socket.count("WATCHDOG") + 2)
        statuses = notify_socket.statuses()
        assert statuses[:2] == ["loading weights", "starting workers"], statuses
        assert statuses[2] == "serving: 0 running, 0 waiting, split 60/100", statuses
        proc.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING", "1")
        assert proc.wait(60) == 0
    finally:
        terminate(proc)
    assert notify_socket.count("READY") == notify_socket.count("STOPPING") == 1
    names = [n for n, _ in notify_socket.fields]
    assert names.index("READY") < names.index("STOPPING")


def test_scm_tells_systemd_ready_watchdog_and_stopping(tmp_path, notify_socket):
    proc = start(["scm", "--model", "scm-tiny", "--device", "cpu", "--address", f"ipc://{tmp_path}/scm.sock",
                  "--max-streams", "4", "--max-model-len", "256"], str(tmp_path / "notify.sock"), tmp_path)
    try:
        notify_socket.wait_for("READY", "1", proc)
        notify_socket.wait_for("WATCHDOG", "1", proc, count=notify_socket.count("WATCHDOG") + 2)
        assert notify_socket.statuses()[:2] == ["loading the monitor", "monitoring 0 streams"]
        proc.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING", "1")
        assert proc.wait(60) == 0
    finally:
        terminate(proc)


def test_notifier_reads_and_clears_the_environment(monkeypatch):
    """An abstract-namespace socket ('@'), the watchdog for this pid only, and an environment the
    children no longer see (with NotifyAccess=main only the main process may notify)."""
    name = f"@semipd-test-{uuid.uuid4().hex[:8]}"
    listener = NotifySocket(name)
    try:
        for pid, pings in ((os.getpid(), True), (os.getpid() + 1, False)):
            monkeypatch.setenv("NOTIFY_SOCKET", name)
            monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
            monkeypatch.setenv("WATCHDOG_PID", str(pid))
            notifier = Notifier.from_env()
            assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)
            listener.fields.clear()
            notifier.alive(lambda: "busy")
            notifier.stopping()
            notifier.stopping()
            notifier.status("end")  # what came before it has come once it has
            listener.wait_for("STATUS", "end")
            expected = [("WATCHDOG", "1")] * pings + [("STATUS", "busy"), ("STOPPING", "1"), ("STATUS", "stopping"),
                                                      ("STATUS", "end")]
            assert listener.fields == expected
    finally:
        listener.close()


def test_notifier_without_a_socket_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_env()
    assert notifier.sock is None
    notifier.ready("serving")
    notifier.alive(lambda: "serving")
    notifier.stopping()
