"""Starting and stopping a real `semipd api` for tests, and plain HTTP requests to it."""

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.serving import ROOT, terminate

API_LINE = re.compile(r"semipd: OpenAI API at (http://\S+)/v1")


def wait_for_line(log_path: str, proc: subprocess.Popen, timeout_s: float = 120) -> str:
    """The gateway's base URL, from the line it prints once it listens (it is told port 0)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with open(log_path) as f:
            found = API_LINE.search(f.read())
        if found:
            return found.group(1)
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(log_path) as f:
                raise RuntimeError(f"no gateway came up: {f.read()}")
        time.sleep(0.1)


class Gateway:
    def __init__(self, address: str, *args: str):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="semipd-api-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "semipd", "api", "--address", address,
                                      "--port", "0", *args], cwd=ROOT, stderr=self.log, text=True)
        try:
            self.url = wait_for_line(self.log.name, self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int:
        try:
            return terminate(self.proc)
        finally:
            self.log.close()
            os.unlink(self.log.name)


@contextlib.contextmanager
def running_gateway(address: str, *args: str):
    """A Gateway once /health says 200; stopped afterwards, also when it never got there."""
    gateway = Gateway(address, *args)
    try:
        wait_healthy(gateway.url)
        yield gateway
    finally:
        assert gateway.stop() == 0


def http(method: str, url: str, body=None, key: str | None = None, timeout: float = 120) -> tuple[int, object]:
    """(status, decoded JSON body or text) of one request; body: a dict (sent as JSON) or bytes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, kind = response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, raw, kind = e.code, e.read(), e.headers.get("content-type", "")
    return status, json.loads(raw) if kind.startswith("application/json") else raw.decode()


def scrape(gateway: Gateway) -> dict:
    """{(sample name, labels as a sorted tuple): value} of the gateway's /metrics."""
    status, text = http("GET", f"{gateway.url}/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_healthy(url: str, timeout_s: float = 120) -> dict:
    """The controller's health through the gateway once /health says 200."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = http("GET", f"{url}/health")
        if status == 200:
            return body
        assert time.monotonic() < deadline, (status, body)
        time.sleep(0.2)
