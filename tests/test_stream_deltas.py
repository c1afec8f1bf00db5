"""A stream's deltas add up to its text: the last token's text comes in a Delta, not in the Final
(issue 24: `"".join(d.text for d in stream)` missed it), for both clients and every way a
request ends."""

import asyncio

import pytest

from semipd.shared.client import AsyncClient
from semipd.shared.tokenizer import load_tokenizer
from tests.serving_fixtures import model, server  # noqa: F401 (fixtures)


@pytest.mark.parametrize("max_tokens", [1, 2, 7])
def test_the_deltas_of_a_thread_stream_add_up_to_its_text(model, server, max_tokens):
    with server.client.generate(prompt_ids=[5, 6, 7], temperature=0, max_tokens=max_tokens,
                                ignore_eos=True) as stream:
        deltas = list(stream)
    result = stream.result()
    assert "".join(d.text for d in deltas) == result.text == load_tokenizer(model).decode(result.token_ids)
    assert [t for d in deltas for t in d.token_ids] == result.token_ids and len(result.token_ids) == max_tokens
    assert deltas[-1].token_ids == result.token_ids[-1:] and deltas[-1].text  # the last token's text


def test_the_deltas_of_an_asyncio_stream_add_up_to_its_text_up_to_a_stop_string(model, server):
    tokenizer = load_tokenizer(model)
    free = server.client.generate(prompt_ids=[8, 9], temperature=0, max_tokens=6, ignore_eos=True).result()
    stop = tokenizer.decode(free.token_ids[3:4]).strip()  # ends the text within the fourth token

    async def run():
        async with AsyncClient(server.address) as client:
            stream = await client.generate(prompt_ids=[8, 9], temperature=0, max_tokens=6, ignore_eos=True,
                                           stop=[stop])
            return [d.text async for d in stream], stream.final
    texts, final = asyncio.run(run())
    assert final.finish_reason == "stop" and final.completion_tokens == 4
    assert "".join(texts) == free.text[:free.text.index(stop)]
    assert not hasattr(final, "text")  # the Final carries no output
