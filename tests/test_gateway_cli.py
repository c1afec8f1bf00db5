"""The gateway's lifecycle: `semipd api` before, beside and after its server, and the one-command
`semipd serve --http`, which starts a gateway beside the server and stops both."""

import os
import signal
import subprocess
import sys
import time
import urllib.error

import pytest

from tests.gateway import Gateway, http, running_gateway, wait_for_line, wait_healthy
from tests.serving import ROOT, Server, terminate


def completion(url: str) -> tuple[int, dict]:
    return http("POST", f"{url}/v1/completions", {"prompt": "hi", "max_tokens": 2})


def server_up(url: str) -> float:
    status, text = http("GET", f"{url}/metrics")
    assert status == 200
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("semipd_server_up "))


def test_the_gateway_answers_503_while_its_server_is_away(tmp_path):
    address = f"ipc://{tmp_path}/front.sock"
    gateway = Gateway(address)
    try:
        for status, answer in (http("GET", f"{gateway.url}/health"), completion(gateway.url)):
            assert status == 503 and answer["error"]["code"] == "service_unavailable"
        assert server_up(gateway.url) == 0
        server = Server("tiny", address=address)
        try:
            wait_healthy(gateway.url)
            status, answer = completion(gateway.url)
            assert status == 200 and answer["choices"][0]["finish_reason"] in ("length", "stop")
            assert server_up(gateway.url) == 1
        finally:
            assert server.stop() == 0
        deadline = time.monotonic() + 60  # until the gateway's health checks have found it gone
        while (answer := completion(gateway.url))[0] != 503:
            assert answer[0] == 200 and time.monotonic() < deadline, answer
            time.sleep(0.2)
    finally:
        assert gateway.stop() == 0


def test_a_draining_server_refuses_with_a_503(tmp_path):
    """Between two of the gateway's health checks the server starts to drain: its refusal is the
    server's state, not the request's fault (it was a 400)."""
    server = Server("tiny", "--drain-timeout", "60", address=f"ipc://{tmp_path}/front.sock")
    try:
        with running_gateway(server.address) as gateway:
            stream = server.client.generate(prompt_ids=[5] * 8, max_tokens=2000, ignore_eos=True)
            next(stream)
            server.proc.send_signal(signal.SIGTERM)
            while server.client.health()["status"] != "stopping":
                time.sleep(0.01)
            status, answer = completion(gateway.url)
            assert status == 503 and answer["error"]["code"] == "service_unavailable", answer
            assert stream.result().finish_reason == "length"  # the drain serves what it holds
    finally:
        assert server.stop() == 0


def test_serve_http_starts_a_gateway_beside_the_server_and_stops_both(tmp_path):
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "semipd", "serve", "--model", "tiny", "--device", "cpu",
                                 "--address", f"ipc://{tmp_path}/front.sock", "--http", "127.0.0.1:0"],
                                cwd=ROOT, stderr=err, env=dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path)))
    try:
        url = wait_for_line(str(log), proc)
        assert wait_healthy(url)["model"] == "tiny"
        assert completion(url)[0] == 200
    finally:
        assert terminate(proc) == 0
    with pytest.raises(urllib.error.URLError):  # nothing listens there any more
        http("GET", f"{url}/health")


def test_a_port_in_use_is_one_clear_error(tmp_path):
    gateway = Gateway(f"ipc://{tmp_path}/front.sock")
    try:
        port = gateway.url.rsplit(":", 1)[1]
        done = subprocess.run([sys.executable, "-m", "semipd", "api", "--port", port], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.startswith(f"semipd: error: cannot listen on 127.0.0.1:{port}")
    finally:
        assert gateway.stop() == 0
