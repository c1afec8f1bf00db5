"""`semipd chat` against real servers: turns piped in, answers streamed out, the conversation
growing turn by turn; a server whose model has no chat template gets one error line."""

import subprocess
import sys

import pytest

from tests.conftest import VOCAB, make_checkpoint, save_tokenizer
from tests.serving import ROOT, Server

SAMPLING = ["--temperature", "0", "--max-tokens", "4"]


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("chat-cli"))
    make_checkpoint(path, "llama")
    save_tokenizer(path, end_of_turn=VOCAB - 4)
    server = Server(path)
    yield server
    assert server.stop() == 0


def chat(address: str, turns: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semipd", "chat", "--address", address, *flags],
                          input=turns, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_each_turn_is_answered_with_the_whole_conversation_before_it(chat_server):
    # A blank line is no turn; /exit ends the chat, so the turn after it is never sent.
    run = chat(chat_server.address, "t5 t6\n\n  t7 t8 t9\n/exit\nt10\n", *SAMPLING, "--system", "t40", "--usage")
    assert run.returncode == 0, run.stderr
    answers = run.stdout.splitlines()
    usages = [line for line in run.stderr.splitlines() if line.startswith("semipd: usage:")]
    assert len(answers) == len(usages) == 2

    # The SDK, asked for the same conversation, answers alike and counts the same prompts.
    conversation = [{"role": "system", "content": "t40"}, {"role": "user", "content": "t5 t6"}]
    first = chat_server.client.chat(conversation, temperature=0, max_tokens=4).result()
    conversation += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "t7 t8 t9"}]
    second = chat_server.client.chat(conversation, temperature=0, max_tokens=4).result()
    assert answers == [first.text, second.text] and first.text
    assert usages == [f"semipd: usage: {r.final.prompt_tokens} prompt tokens, 4 answer tokens"
                      for r in (first, second)]
    # The second prompt holds the first prompt, the answer to it (re-tokenized from its text, so
    # at least one token) and <|end|>, then the new turn: <|user|>, 3 words, <|assistant|>.
    assert second.final.prompt_tokens >= first.final.prompt_tokens + 1 + 1 + 5


def test_a_model_without_a_chat_template_is_one_error_line():
    server = Server("tiny")  # presets have no chat template
    try:
        run = chat(server.address, "hello\nagain\n", *SAMPLING)
    finally:
        assert server.stop() == 0
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.splitlines() == ["semipd: error: this model has no chat template: send a prompt instead "
                                       "of messages"]
