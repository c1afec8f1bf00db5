"""Chat end to end: messages rendered by the controller with the model's chat template, answers
that end at its end-of-turn token with `stop`, through the SDK and through the gateway.

The test model has random weights, so its tokenizer is made to fit it: the chat tokenizer's
end-of-turn token is a token the model's greedy answer to QUESTION reaches after a few others."""

import asyncio

import openai
import pytest

from semipd.shared.engine import Engine
from semipd.shared.engine_config import EngineConfig
from semipd.shared.sampling_params import SamplingParams
from tests.conftest import CHAT_ROLES, make_checkpoint, save_tokenizer
from tests.gateway import running_gateway
from tests.serving import Server

QUESTION = [{"role": "user", "content": "t5 t6 t7"}]
QUESTION_IDS = [CHAT_ROLES["<|user|>"], 5, 6, 7, CHAT_ROLES["<|assistant|>"]]  # as CHAT_TEMPLATE renders it


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """(checkpoint path, the greedy answer's ids up to and including the end-of-turn token)."""
    path = str(tmp_path_factory.mktemp("chat-llama"))
    make_checkpoint(path, "llama")
    engine = Engine(EngineConfig(model=path, device="cpu", progress=False))
    try:
        [out] = engine.generate([QUESTION_IDS], [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)])
    finally:
        engine.close()
    ids = out.token_ids[:out.token_ids.index(1)] if 1 in out.token_ids else out.token_ids  # before EOS (t1)
    taken = set(QUESTION_IDS) | {0, 1, 2} | set(CHAT_ROLES.values())
    end = next(i for i, t in enumerate(ids) if i >= 2 and t not in ids[:i] and t not in taken)
    save_tokenizer(path, end_of_turn=ids[end])
    return path, ids[:end + 1]


@pytest.fixture(scope="module")
def server(chat_model):
    s = Server(chat_model[0])
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def gateway(server):
    with running_gateway(server.address) as g:
        yield g


def words(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def test_the_sdk_chat_ends_its_answer_at_the_end_of_turn_token(server, chat_model):
    _, answer = chat_model
    result = server.client.chat(QUESTION, temperature=0, max_tokens=16).result()
    assert (result.token_ids, result.finish_reason) == (answer, "stop")
    assert result.text == words(answer[:-1])  # the end-of-turn token is special: not in the text
    assert result.final.prompt_tokens == len(QUESTION_IDS)
    # Without max_tokens the answer may fill the context; it still ends at the end of its turn.
    assert server.client.chat(QUESTION, temperature=0).result().token_ids == answer
    # ignore_eos ignores the end of turn too: the answer runs to max_tokens.
    assert server.client.chat(QUESTION, temperature=0, max_tokens=16, ignore_eos=True).result().finish_reason == "length"


def test_the_gateway_chat_equals_the_sdks(server, gateway, chat_model):
    _, answer = chat_model
    api = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    model = api.models.list().data[0].id
    whole = api.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_completion_tokens=16)
    choice = whole.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", words(answer[:-1]), "stop")
    assert (whole.object, whole.usage.prompt_tokens, whole.usage.completion_tokens) == \
        ("chat.completion", len(QUESTION_IDS), len(answer))
    chunks = list(api.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == words(answer[:-1])
    assert chunks[-1].choices[0].finish_reason == "stop"
    # A chunk per token, the end-of-turn token's (no text) too, with content "" as vLLM sends it;
    # the last only ends the choice.
    assert [c.choices[0].delta.content for c in chunks[-2:]] == ["", None]
    assert len(chunks) == len(answer) + 1


def test_conversations_and_content_parts_render_alike(server, gateway):
    chat = [{"role": "system", "content": "t30"}, {"role": "user", "content": "t31 t32"},
            {"role": "assistant", "content": "t33"}, {"role": "user", "content": "t34"}]
    want = server.client.chat(chat, temperature=0, max_tokens=6).result()
    parts = chat[:-1] + [{"role": "user", "content": [{"type": "text", "text": "t34"}]}]

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0) as api:
            model = (await api.models.list()).data[0].id
            whole = await api.chat.completions.create(model=model, messages=parts, temperature=0, max_tokens=6)
            stream = await api.chat.completions.create(model=model, messages=chat, temperature=0, max_tokens=6,
                                                       stream=True, stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            return whole, chunks
    whole, chunks = asyncio.run(main())
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (want.text, want.finish_reason)
    assert whole.usage.prompt_tokens == want.final.prompt_tokens == 11  # 5 role markers, 5 words and <|end|>
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == want.final.completion_tokens


def test_messages_the_engine_cannot_take_are_refused(gateway):
    api = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    model = api.models.list().data[0].id
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    for messages, error in [([], "non-empty"), ([{"role": "user", "content": image}], "only text"),
                            ([{"role": "user", "content": "t5", "tool_calls": [{"id": "x"}]}], "tool_calls")]:
        with pytest.raises(openai.BadRequestError, match=error):
            api.chat.completions.create(model=model, messages=messages)
