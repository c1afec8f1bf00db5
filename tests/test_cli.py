"""The `semipd` client commands' edges, against a real tiny server: stale socket files, bad flags,
a reader that closes the pipe, and where bench writes its report."""

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.serving import ROOT, terminate


def semipd(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "semipd", *args], stderr=subprocess.PIPE,
                          text=True, timeout=timeout, cwd=ROOT, **kw)


def stale_socket(path: str) -> str:
    """A socket file nobody listens on, as a killed server leaves behind; its ipc:// address."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
    return "ipc://" + path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(address, `complete --wait` result): a tiny server that starts on a stale socket file while
    a client waits for it."""
    folder = str(tmp_path_factory.mktemp("cli"))
    address = stale_socket(os.path.join(folder, "front.sock"))
    waiting = subprocess.Popen([sys.executable, "-m", "semipd", "complete", "--address", address,
                                "--wait", "120", "--prompt", "hi", "--max-tokens", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(2)
    assert waiting.poll() is None, waiting.communicate()  # still waiting on the stale file
    with open(os.path.join(folder, "server.log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "semipd", "serve", "--model", "tiny",
                                 "--device", "cpu", "--address", address], cwd=ROOT, stderr=log,
                                env=dict(os.environ, XDG_RUNTIME_DIR=folder))  # worker sockets too
    try:
        _, err = waiting.communicate(timeout=150)
        yield address, waiting.returncode, err
    finally:
        waiting.kill()
        assert terminate(proc) == 0


def test_complete_wait_outlasts_a_stale_socket_file(server):
    _, returncode, err = server
    assert (returncode, err) == (0, "")


@pytest.mark.parametrize("command", [["stats"], ["complete", "--prompt", "hi"]])
def test_a_stale_socket_file_fails_at_once(tmp_path, command):
    address = stale_socket(str(tmp_path / "dead.sock"))
    start = time.monotonic()
    r = semipd(*command, "--address", address, timeout=30)  # the client's timeout is 60 s
    assert time.monotonic() - start < 10
    assert r.returncode == 2
    assert r.stderr == f"semipd: error: no server at {address} (nothing listens on that socket; " \
                       "a killed server leaves its file behind)\n"


@pytest.mark.parametrize("flag,value", [("--page-size", "0"), ("--num-pages", "-5"), ("--num-pages", "0"),
                                        ("--max-model-len", "0"), ("--max-num-seqs", "0")])
def test_serve_sizes_must_be_positive(tmp_path, flag, value):
    # A value taken as valid would start a server: the timeout ends the test then.
    r = semipd("serve", "--model", "tiny", "--device", "cpu", "--address", f"ipc://{tmp_path}/s.sock",
               flag, value, timeout=30)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == \
        f"semipd serve: error: argument {flag}: expected a positive integer, got '{value}'"


def test_a_negative_wait_is_refused(tmp_path):
    r = semipd("complete", "--address", f"ipc://{tmp_path}/none.sock", "--wait", "-1", "--prompt", "hi")
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == \
        "semipd complete: error: argument --wait: expected a number of seconds, 0 or more, got '-1'"


@pytest.mark.parametrize("command", [["stats"], ["complete", "--prompt", "hi", "--max-tokens", "4"]])
def test_a_closed_stdout_ends_quietly(server, command):
    read, write = os.pipe()
    os.close(read)  # the reader has gone, as `head` does after its lines: every write fails
    try:
        r = semipd(*command, "--address", server[0], stdout=write)
    finally:
        os.close(write)
    assert (r.returncode, r.stderr) == (1, "")


def test_prompts_are_numbered_in_command_line_order(server):
    r = semipd("complete", "--address", server[0], "--prompt-ids", "1,2,99999", "--prompt", "hi")
    assert r.returncode == 2
    assert r.stderr.startswith("semipd: error: prompt 0: "), r.stderr


def test_bench_creates_the_report_folder_before_the_run(server, tmp_path):
    out = tmp_path / "new" / "report.json"
    r = semipd("bench", "--address", server[0], "--rate", "20", "--num-requests", "2",
               "--input-len-mean", "8", "--output-len-mean", "8", "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(out.read_text())["requests"]) == 2
    r = semipd("bench", "--address", server[0], "--rate", "20", "--num-requests", "2",
               "--out", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr == f"semipd: error: --out {tmp_path} is a folder; one rate writes its report to a file\n"


def test_version_names_the_installed_release():
    r = semipd("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"semipd {importlib.metadata.version('semipd')}"
