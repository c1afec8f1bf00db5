"""Errors at once, each saying what to do (issue 24): a bad model, address or flag fails before
torch is imported, text that is not UTF-8 is one `semipd: error:` line from the CLI and a
ClientError from the SDK, and --timeout bounds the wait on a port where nobody answers."""

import asyncio
import socket
import subprocess
import sys
import time

import pytest

from semipd.shared.client import AsyncClient, Client, ClientError, ServerTimeout, ServerUnavailable
from tests.serving import ROOT, Server

NOT_UTF8 = b"caf\xe9"  # Latin-1


def semipd(*args, stdin: bytes = b"", importtime: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI; with importtime, Python lists every module it imported on stderr."""
    return subprocess.run([sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "semipd", *args],
                          input=stdin, capture_output=True, cwd=ROOT, timeout=300)


def error_lines(err: bytes) -> list[str]:
    return [line for line in err.decode(errors="replace").splitlines() if "import time:" not in line]


def imported_torch(err: bytes) -> bool:
    return any(line.rstrip().endswith("| torch") for line in err.decode(errors="replace").splitlines())


@pytest.mark.parametrize("args,says", [
    (["--model", "nosuchmodel"], ["unknown model 'nosuchmodel'", "a GGUF file", "tiny"]),
    (["--model", "Qwen/Qwen2.5-0.5B-Instruct"],
     ["hub name", "does not download", "--local-dir DIR", "pass --model DIR", "tiny, qwen2.5-0.5b"]),
    (["--model", "missing.gguf"], ["missing.gguf: no such GGUF file"]),
    (["--model", "tiny", "--dynamic"], ["--dynamic needs --ttft-slo and --tpot-slo"]),
    (["--model", "tiny", "--moderate", "all"], ["--moderate all needs a content monitor"]),
    (["--model", "tiny", "--mode", "unified", "--max-batched-tokens", "8", "--max-num-seqs", "16"],
     ["--mode unified needs --max-batched-tokens (8) at least --max-num-seqs (16)"]),
], ids=["unknown", "hub-name", "gguf", "dynamic", "moderate", "batched-tokens"])
def test_serve_refuses_a_bad_model_or_flag_before_importing_torch(args, says):
    run = semipd("serve", *args, importtime=True)
    lines = error_lines(run.stderr)
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("semipd: error:"), lines
    assert all(s in lines[0] for s in says), lines[0]
    assert not imported_torch(run.stderr)


@pytest.mark.parametrize("command", [["serve", "--model", "tiny"], ["stats"], ["complete", "--prompt", "hi"]])
def test_a_malformed_address_says_what_addresses_look_like(command):
    run = semipd(*command, "--address", "foo", importtime=True)
    err = "\n".join(error_lines(run.stderr))
    assert run.returncode == 2 and "'foo' is not an address" in err
    assert "ipc:///path/to/socket" in err and "tcp://HOST:PORT" in err
    assert not imported_torch(run.stderr)


def test_the_sdk_says_what_addresses_look_like():
    with pytest.raises(ServerUnavailable, match=r"look like ipc:///path/to/socket .* or tcp://HOST:PORT"):
        Client("localhost:5555")


def test_generate_refuses_a_prompt_that_is_not_utf8_in_one_line():
    run = semipd("generate", "--model", "tiny", "--prompt", NOT_UTF8)
    lines = error_lines(run.stderr)
    assert run.returncode == 2 and lines == ["semipd: error: --prompt is not UTF-8 text (byte e9 at character 3); "
                                             "convert it first, e.g. with iconv -t UTF-8"]


@pytest.fixture(scope="module")
def server():
    s = Server("tiny")
    yield s
    assert s.stop() == 0


@pytest.mark.parametrize("args,flag", [(["complete", "--prompt", NOT_UTF8], "--prompt"),
                                       (["complete", "--prompt", "hi", "--stop", NOT_UTF8], "--stop"),
                                       (["chat", "--system", NOT_UTF8], "--system")])
def test_client_commands_refuse_arguments_that_are_not_utf8_in_one_line(server, args, flag):
    run = semipd(*args, "--address", server.address)
    lines = error_lines(run.stderr)
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"semipd: error: {flag} is not UTF-8")


def test_chat_refuses_input_that_is_not_utf8_in_one_line(server):
    run = semipd("chat", "--address", server.address, stdin=NOT_UTF8 + b"\n")
    lines = error_lines(run.stderr)
    assert run.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("semipd: error: a line of input is not UTF-8 text (byte e9")


def test_the_sdk_raises_a_client_error_for_text_it_cannot_send(server):
    text = NOT_UTF8.decode(errors="surrogateescape")  # what Python makes of such an argument
    with pytest.raises(ClientError, match="not valid Unicode"):
        server.client.generate(prompt=text)
    with pytest.raises(ClientError, match="not valid Unicode"):
        server.client.chat([{"role": "user", "content": "\ud800"}])
    with pytest.raises(ClientError, match="invalid request"):
        server.client.generate(prompt_ids=["a"])
    assert server.client.generate(prompt="hi", max_tokens=2).result().final.completion_tokens == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_timeout_bounds_the_wait_on_a_port_where_nobody_answers():
    address = f"tcp://127.0.0.1:{free_port()}"
    for command in (["stats"], ["complete", "--prompt", "hi"]):
        run = semipd(*command, "--address", address, "--timeout", "0.5")
        lines = error_lines(run.stderr)
        assert run.returncode == 2 and lines == [f"semipd: error: no answer from the server at {address} for 0.5 s "
                                                 "(is it running?)"]
    with Client(address, timeout_s=0.5) as client, pytest.raises(ServerTimeout):
        client.health()

    async def ask():
        async with AsyncClient(address, timeout_s=0.5) as client:
            await client.health()
    with pytest.raises(ServerTimeout):
        asyncio.run(ask())

    async def close_while_waiting():
        """A stream waiting when its client closes ends at once, with a clear error."""
        client = AsyncClient(address, timeout_s=30)
        stream = await client.generate(prompt_ids=[1, 2, 3], max_tokens=2)
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await client.close()
        with pytest.raises(ClientError, match="the client is closed"):
            await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - started < 2
    asyncio.run(close_while_waiting())
