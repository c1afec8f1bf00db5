"""`semipd bench --backend openai` against a real gateway in front of a real server: the same run
through the SDK and over HTTP completes the same requests with the same token counts, and
reports them in the same shape; a sweep works over HTTP too."""

import json

import pytest

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
