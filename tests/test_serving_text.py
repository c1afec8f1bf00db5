"""The text of served streams, made on the controller's detokenizer thread: stop strings end
requests (in prefill's first token or in decode) as the in-process engine does and free their
pages, and an abort's last Delta carries the text that was held back."""

import asyncio

from semipd.shared import protocol
from semipd.shared.client import AsyncClient
from semipd.shared.engine import Engine
from semipd.shared.engine_config import EngineConfig
from semipd.shared.sampling_params import SamplingParams
from semipd.shared.tokenizer import Detokenizer, load_tokenizer
from tests.serving_fixtures import generate, model, raw_socket, server, workload  # noqa: F401 (fixtures)


def stop_strings(engine: Engine, work) -> list[SamplingParams]:
    """Greedy parameters per request whose stop string is the text of one of its free run's
    tokens: its first for some requests (found in prefill's token), a later one for others."""
    free = engine.generate([p for p, _ in work], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    params = []
    for i, out in enumerate(free):
        words = [engine.tokenizer.decode([t]) for t in out.token_ids]
        at = next(j for j in range(0 if i % 3 == 0 else len(words) // 2, len(words)) if words[j])
        params.append(SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[words[at]]))
    return params


def test_stop_strings_end_requests_as_generate_does_and_free_their_pages(model, server):
    work = workload(24, seed=5)
    engine = Engine(EngineConfig(model=model, device="cpu", progress=False))
    try:
        params = stop_strings(engine, work)
        expected = engine.generate([p for p, _ in work], params)
    finally:
        engine.close()
    assert all(o.finish_reason == "stop" for o in expected)
    assert any(len(o.token_ids) == 1 for o in expected) and any(len(o.token_ids) > 6 for o in expected)

    async def serve() -> list:
        async with AsyncClient(server.address) as client:
            streams = [await client.generate(prompt_ids=p, **vars(sp)) for (p, _), sp in zip(work, params)]
            return await asyncio.gather(*(s.result() for s in streams))
    results = asyncio.run(serve())
    assert [(r.token_ids, r.text, r.finish_reason) for r in results] == \
        [(o.token_ids, o.text, o.finish_reason) for o in expected]
    assert all(r.final.completion_tokens == len(r.token_ids) == len(r.final.itl_s) + 1 for r in results)
    stats = server.wait_idle()
    assert stats["kv_pages_free"] == stats["kv_pages_total"]


def test_an_aborts_last_delta_carries_the_text_held_back(model, server):
    """A stop string of 40 characters holds back the last 39 characters of text: a Delta
    without tokens carries them before the abort's Final, so the stream's text is its tokens'."""
    stop = ["x" * 40]
    sock = raw_socket(server.address)
    sock.send(generate("a", prompt_ids=[5, 6, 7], params={"temperature": 0, "max_tokens": 400,
                                                           "ignore_eos": True, "stop": stop}))
    messages = []
    while not (messages and isinstance(messages[-1], protocol.Final)):
        assert sock.poll(30_000), messages
        messages.append(protocol.decode(sock.recv()))
        if len(messages) == 3:
            sock.send(protocol.encode(protocol.AbortRequest("a")))
    sock.close()
    final = messages[-1]
    ids = [t for m in messages[:-1] for t in m.token_ids]
    # every token the controller had when the abort came still goes out, before the Final
    assert final.finish_reason == "abort" and final.completion_tokens == len(ids) >= 3
    detok = Detokenizer(load_tokenizer(model), stop)
    text = "".join(detok.add([t])[0] for t in ids) + detok.flush()
    held = messages[-2]
    assert held.token_ids == [] and held.text and held.text == text[-len(held.text):]
    assert "".join(m.text for m in messages[:-1]) == text
    assert server.wait_idle()["kv_pages_free"] == server.stats()["kv_pages_total"]
