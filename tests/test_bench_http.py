"""`semipd bench --backend openai` against a real gateway in front of a real server: the same run
through the SDK and over HTTP completes the same requests with the same token counts, and
reports them in the same shape; a sweep works over HTTP too."""

import asyncio
import json

import pytest

from semipd.cli.bench.openai_backend import OpenAIBackend
from semipd.cli.main import main
from tests.gateway import running_gateway
from tests.serving import Server

KEY = "bench-key"
RUN = ["--workload", "6req@8:24/12", "--seed", "3"]


@pytest.fixture(scope="module")
def server():
    s = Server("tiny")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def gateway(server):
    with running_gateway(server.address, "--api-key", KEY) as g:
        yield g


def http_flags(gateway, key: str = KEY) -> list[str]:
    return ["--backend", "openai", "--base-url", f"{gateway.url}/v1", "--api-key", key]


def test_a_run_over_http_equals_the_same_run_through_the_sdk(server, gateway, tmp_path):
    assert main(["bench", "--address", server.address, *RUN, "--out", str(tmp_path / "sdk.json")]) == 0
    assert main(["bench", *http_flags(gateway), *RUN, "--out", str(tmp_path / "http.json")]) == 0
    sdk, over_http = (json.loads((tmp_path / name).read_text()) for name in ("sdk.json", "http.json"))

    for report in (sdk, over_http):
        assert (report["summary"]["completed"], report["summary"]["failed"]) == (6, 0)
        for r in report["requests"]:
            # ignore_eos: every answer as long as planned; an ITL per token after the first
            assert r["output_tokens"] == r["output_len"] and len(r["itl_s"]) == r["output_tokens"] - 1
            assert r["ttft_s"] <= r["e2e_s"] and r["finish_reason"] == "length"
    assert [(r["input_len"], r["output_tokens"]) for r in sdk["requests"]] == \
        [(r["input_len"], r["output_tokens"]) for r in over_http["requests"]]
    assert sdk["summary"].keys() == over_http["summary"].keys()
    assert sdk["requests"][0].keys() == over_http["requests"][0].keys()
    assert sdk["config"].keys() - {"api_key"} == over_http["config"].keys()  # the key stays out of reports
    # The model and its context length come from /v1/models; the server's own clock only via the SDK.
    assert over_http["config"]["max_model_len"] == sdk["config"]["max_model_len"] == server.stats()["max_model_len"]
    assert over_http["summary"]["server_ttft_s"]["p50"] is None and sdk["summary"]["server_ttft_s"]["p50"] > 0


def test_a_sweep_over_http_and_its_refusals(server, gateway, tmp_path, capsys):
    assert main(["bench", *http_flags(gateway), *RUN, "--rates", "4,8", "--ttft-slo", "60",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    mode = report["modes"]["server"]
    assert mode["address"] == f"{gateway.url}/v1" and mode["partition"] is None and mode["split_samples"] == []
    assert [(run["rate"], run["summary"]["completed"]) for run in mode["runs"]] == [(4, 6), (8, 6)]
    assert "api_key" not in report["config"]
    capsys.readouterr()

    for flags, error in [(http_flags(gateway, "wrong"), "refused the API key"),
                         (["--backend", "openai"], "needs --base-url"),
                         (["--base-url", f"{gateway.url}/v1"], "are for --backend openai"),
                         (["--model", "tiny"], "--model is only for --launch or --backend openai"),
                         (http_flags(gateway) + ["--model", "other"], "404")]:
        assert main(["bench", *flags, *RUN, "--rate", "8"]) == 2
        assert error in capsys.readouterr().err


# A server of another kind than ours, in raw HTTP/1.1: a chunked event stream that opens with an
# empty chunk that is no token, writes CRLF line ends, splits an event across two writes and
# sends a comment. The usage says 3 tokens.
OTHER_SERVER_EVENTS = [
    b'data: {"choices": [{"index": 0, "text": "", "finish_reason": null}]}\r\n\r\n',
    b'data: {"choices": [{"index": 0, "text": "a", "finish_reason": null}]}\n\n: keep-alive\n\n',
    b'data: {"choices": [{"index": 0, "te', b'xt": "b", "finish_reason": null}]}\n\n',
    b'data: {"choices": [{"index": 0, "text": "c", "finish_reason": "length"}]}\n\n',
    b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}\n\n',
    b"data: [DONE]\n\n",
]


async def _serve_other(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    for part in OTHER_SERVER_EVENTS:
        writer.write(b"%x\r\n%s\r\n" % (len(part), part))
        await writer.drain()
        await asyncio.sleep(0.01)
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    writer.close()


def test_a_leading_chunk_that_is_no_token_counts_none():
    async def run():
        server = await asyncio.start_server(_serve_other, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, OpenAIBackend(f"http://127.0.0.1:{port}/v1", "other", None) as backend:
            return await backend.send([1, 2, 3], {"max_tokens": 3, "ignore_eos": True})
    answer = asyncio.run(run())
    assert [k for _, k in answer.chunks] == [0, 1, 1, 1] and answer.output_tokens == 3
    assert answer.finish_reason == "length" and answer.chunks[1][0] < answer.chunks[2][0] <= answer.ended
