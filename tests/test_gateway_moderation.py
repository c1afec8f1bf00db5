"""A content monitor's stop through the gateway: finish_reason `content_filter` in whole and
streamed answers, and the monitor's counts in /metrics. The monitor flags every token."""

import openai
import pytest

from tests.gateway import running_gateway, scrape
from tests.scm_moderation import FLAG_ALL, monitor_checkpoint, served_model, socket_address
from tests.scm_service import MonitorProcess, wait_connected
from tests.serving import Server


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    served = served_model(tmp_path_factory, "qwen2")
    monitor = MonitorProcess(monitor_checkpoint(tmp_path_factory, served, FLAG_ALL, True), socket_address(),
                             "--k", "4")
    try:
        server = Server(served, "--scm", monitor.address, "--moderate", "all")
        try:
            wait_connected(server)
            with running_gateway(server.address) as g:
                yield g
        finally:
            assert server.stop() == 0
    finally:
        monitor.stop()


def test_a_monitor_stop_is_a_content_filter_finish(gateway):
    api = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    model = api.models.list().data[0].id
    args = dict(model=model, prompt=[3, 4, 5], max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    whole = api.completions.create(**args)
    assert whole.choices[0].finish_reason == "content_filter" and whole.usage.completion_tokens < 40
    chunks = list(api.completions.create(**args, stream=True))
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    metrics = scrape(gateway)
    assert metrics[("semipd_gateway_requests_total", (("finish_reason", "content_filter"),))] == 2
    assert metrics[("semipd_monitor_verdicts_total", ())] == 2 == metrics[("semipd_monitor_requests_total", ())]
