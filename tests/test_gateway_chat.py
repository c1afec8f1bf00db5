"""Chat end to end: messages rendered by the controller with the model's chat template, answers
that end at its end-of-turn token with `stop`.

The test model has random weights, so its tokenizer is made to fit it: the chat tokenizer's
end-of-turn token is a token the model's greedy answer to QUESTION reaches after a few others."""

import pytest

from semipd.shared.engine import Engine
from semipd.shared.engine_config import EngineConfig
from semipd.shared.sampling_params import SamplingParams
from tests.conftest import CHAT_ROLES, make_checkpoint, save_tokenizer
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
