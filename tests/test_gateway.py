"""The OpenAI-compatible gateway end to end: a real server, a real `semipd api` in front of it, and
the official openai client (sync and async). Chat is in tests/test_gateway_chat.py, a content
monitor's stop in tests/test_gateway_moderation.py, the commands' lifecycles in
tests/test_gateway_cli.py."""

import asyncio
import socket
import time
import urllib.parse

import openai
import pytest

from tests.gateway import http, running_gateway, scrape
from tests.serving import wait_for
from tests.serving_fixtures import model, server  # noqa: F401 (fixtures, found by name)

KEY = "test-key"
NAME = "test-llama"
PROMPTS = ["t5 t6 t7", [3, 9, 27, 81]]


@pytest.fixture(scope="module")
def gateway(server):
    with running_gateway(server.address, "--api-key", KEY, "--served-model-name", NAME) as g:
        yield g


def sdk_greedy(server, prompt, **sampling):
    kind = "prompt" if isinstance(prompt, str) else "prompt_ids"
    return server.client.generate(**{kind: prompt}, temperature=0, **sampling).result()


def client(gateway, cls=openai.OpenAI):
    return cls(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["text", "token ids"])
def test_greedy_completions_equal_the_sdks(server, gateway, prompt):
    want = sdk_greedy(server, prompt, max_tokens=12, ignore_eos=True)
    api = client(gateway)
    whole = api.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, n=2,
                                   extra_body={"ignore_eos": True})
    assert [(c.index, c.text, c.finish_reason) for c in whole.choices] == [(0, want.text, "length"), (1, want.text, "length")]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (want.final.prompt_tokens, 24)
    chunks = list(api.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == want.text
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_a_token_without_text_still_gets_its_chunk(server, gateway):
    """This prompt's greedy answer starts with the end-of-sequence token (no text): its chunk goes
    out when the token comes, not with the next token's text, one chunk per token as the SDK's."""
    prompt = [293, 215, 19, 208, 293]
    with server.client.generate(prompt_ids=prompt, temperature=0, max_tokens=6, ignore_eos=True) as stream:
        deltas = [d.text for d in stream]
    assert deltas[0] == "" and len(deltas) == 6
    chunks = list(client(gateway).completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True}))
    assert [c.choices[0].text for c in chunks] == deltas + [""]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_async_streams_run_concurrently_and_equal_the_sdks(server, gateway):
    prompts = [f"t{i} t{i + 1}" for i in range(30, 36)]
    wants = [sdk_greedy(server, p, max_tokens=8, ignore_eos=True).text for p in prompts]

    async def one(api, prompt, stream):
        args = dict(model=NAME, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        if not stream:
            return (await api.completions.create(**args)).choices[0].text
        return "".join([c.choices[0].text async for c in await api.completions.create(**args, stream=True)])

    async def main():
        async with client(gateway, openai.AsyncOpenAI) as api:
            return await asyncio.gather(*(one(api, p, i % 2 == 0) for i, p in enumerate(prompts)))
    assert asyncio.run(main()) == wants


def test_stop_strings_and_seeds_pass_through(server, gateway):
    words = sdk_greedy(server, "t40 t41", max_tokens=8, ignore_eos=True).text.split()
    want = sdk_greedy(server, "t40 t41", max_tokens=8, stop=[words[3]])
    got = client(gateway).completions.create(model=NAME, prompt="t40 t41", max_tokens=8, temperature=0,
                                              stop=words[3])
    assert (got.choices[0].text, got.choices[0].finish_reason) == (want.text, "stop")
    seeded = server.client.generate(prompt="t40", max_tokens=6, temperature=1.0, seed=7, ignore_eos=True).result()
    got = client(gateway).completions.create(model=NAME, prompt="t40", max_tokens=6, temperature=1.0, seed=7, n=2,
                                              extra_body={"ignore_eos": True})
    assert got.choices[0].text == seeded.text  # the second answer is seeded 8: another one


@pytest.mark.parametrize("body, key, status, code", [
    (b"{not json", KEY, 400, None),
    (b"[1, 2]", KEY, 400, None),
    ({"model": "gpt-4"}, KEY, 404, "model_not_found"),
    ({}, "wrong-key", 401, "invalid_api_key"),
    ({}, None, 401, "invalid_api_key"),
    ({"logprobs": 2}, KEY, 400, None),
    ({"presence_penalty": 0.5}, KEY, 400, None),
    ({"prompt": ["t1", "t2"]}, KEY, 400, None),
    ({"temperature": -1}, KEY, 400, None),            # the controller's refusal
    ({"max_tokens": 100_000}, KEY, 400, None),        # beyond the context: the controller's too
    ({"stream": True, "top_p": 0}, KEY, 400, None),   # refused before any event goes out
    (b" " * (16 << 20) + b"{}", KEY, 413, None),
], ids=["malformed", "not an object", "unknown model", "wrong key", "no key", "logprobs", "penalty",
        "two prompts", "bad temperature", "too long", "refused stream", "too large"])
def test_bad_requests_get_their_status_and_the_gateway_serves_on(gateway, body, key, status, code):
    ok = {"model": NAME, "prompt": "t5", "max_tokens": 2}
    status_got, answer = http("POST", f"{gateway.url}/v1/completions", body if isinstance(body, bytes) else ok | body, key)
    assert status_got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["code"] == code
    assert http("POST", f"{gateway.url}/v1/completions", ok, KEY)[0] == 200


def test_chat_without_a_template_is_refused(gateway):
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client(gateway).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "t5"}])


def test_models_and_health(server, gateway):
    [card] = client(gateway).models.list().data
    assert card.id == NAME and card.max_model_len == server.stats()["max_model_len"]  # as vLLM's card
    assert http("GET", f"{gateway.url}/v1/models")[0] == 401
    status, health = http("GET", f"{gateway.url}/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == server.client.health()["model"]


def test_metrics_count_what_this_gateway_served(server, gateway):
    before = scrape(gateway)
    api = client(gateway)
    api.completions.create(model=NAME, prompt="t7", max_tokens=3, extra_body={"ignore_eos": True})
    list(api.completions.create(model=NAME, prompt="t8", max_tokens=3, stream=True, extra_body={"ignore_eos": True}))
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=NAME, prompt="t9", temperature=-1)
    after = scrape(gateway)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)
    assert moved("semipd_gateway_requests_total", finish_reason="length") == 2
    assert moved("semipd_gateway_requests_total", finish_reason="error") == 1
    assert moved("semipd_gateway_tokens_total", kind="completion") == 6
    for histogram in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        assert moved(f"semipd_gateway_{histogram}_seconds_count") == 2
    stats = server.stats()
    assert after[("semipd_server_up", ())] == 1
    assert after[("semipd_kv_pages_total", ())] == stats["kv_pages_total"]
    assert after[("semipd_sm_share_percent", (("phase", "decode"),))] == stats["partition"]["decode_sm"]
    assert ("semipd_partition_switches_total", ()) in after and ("semipd_requests_running", ()) in after
    assert after[("semipd_prefix_cache_prompt_tokens_total", ())] == stats["prefix_cache"]["prompt_tokens"] > 0
    assert ("semipd_prefix_cache_hit_rate", ()) in after and ("semipd_prefix_cache_evicted_pages_total", ()) in after


def test_several_gateways_front_one_server_and_count_their_own(server, gateway):
    length = ("semipd_gateway_requests_total", (("finish_reason", "length"),))
    before = scrape(gateway).get(length, 0)
    with running_gateway(server.address) as second:
        status, answer = http("POST", f"{second.url}/v1/completions", {"prompt": "t5", "max_tokens": 2, "ignore_eos": True})
        assert status == 200 and answer["model"] == server.client.health()["model"]  # the default name
        assert scrape(second)[length] == 1
    assert scrape(gateway).get(length, 0) == before


def raw_request(url: str, body: bytes) -> socket.socket:
    """A POST sent over a socket that the test can close while the answer is being made."""
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port))
    sock.sendall(f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_clients_that_leave_abort_their_requests_and_free_their_pages(server, gateway):
    abort = ("semipd_gateway_requests_total", (("finish_reason", "abort"),))
    aborts = scrape(gateway).get(abort, 0)
    stream = client(gateway).completions.create(model=NAME, prompt="t5 t6", max_tokens=400, stream=True,
                                                extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    stats = server.wait_idle()
    assert stats["kv_pages_free"] == stats["kv_pages_total"] and stats["running"] == stats["waiting"] == 0
    sock = raw_request(f"{gateway.url}/v1/completions",  # a whole answer, not streamed
                       b'{"prompt": "t7", "max_tokens": 400, "n": 2, "ignore_eos": true}')
    wait_for(lambda s: s["running"] + s["waiting"] == 2, server)
    sock.close()
    stats = server.wait_idle()
    assert stats["kv_pages_free"] == stats["kv_pages_total"] and stats["running"] == stats["waiting"] == 0
    deadline = time.monotonic() + 60  # the gateway counts an abort as it sends it
    while scrape(gateway).get(abort, 0) != aborts + 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
