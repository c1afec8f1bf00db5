"""A text prompt of megabytes, under the message bound, is refused without stalling the streams
beside it: it is not tokenized much past the context, and long prompts are tokenized off the
controller's loop (issue 25)."""

import threading
import time

import pytest

from semipd.shared.client import ServerError
from tests.serving import Server
from tests.serving_fixtures import model  # noqa: F401 (a fixture, found by name)

MAX_GAP_S = 2.0   # a token every few ms here; a prompt tokenized on the loop stalled them 14-47 s


def gaps_beside(server: Server, prompt: str) -> tuple[float, Exception | None]:
    """The longest wait for a token of 4 greedy streams while `prompt` is sent and answered;
    what its request raised."""
    room = server.stats()["max_model_len"] - 2
    streams = [server.client.generate(prompt_ids=[5 + i, 6], temperature=0, max_tokens=room, ignore_eos=True)
               for i in range(4)]
    for s in streams:
        next(s)
    times = [[] for _ in streams]
    done = threading.Event()

    def read(stream, out):
        for _ in stream:
            out.append(time.monotonic())
            if done.is_set():
                return

    readers = [threading.Thread(target=read, args=(s, t)) for s, t in zip(streams, times)]
    for r in readers:
        r.start()
    time.sleep(0.5)
    began = time.monotonic()
    error = None
    try:
        server.client.generate(prompt=prompt, max_tokens=16).result()
    except ServerError as e:
        error = e
    ended = time.monotonic()
    time.sleep(0.5)
    done.set()
    for r in readers:
        r.join(60)
    for s in streams:
        s.close()
    gaps = [b - a for t in times for a, b in zip(t, t[1:]) if b > began and a < ended]
    assert gaps, "no tokens while the prompt was handled"
    return max(gaps), error


@pytest.mark.parametrize("size", [8_000_000, 15_000_000])
def test_a_huge_prompt_is_refused_without_stalling_others_byte_tokenizer(size):
    server = Server("tiny")
    try:
        gap, error = gaps_beside(server, "a" * size)
        assert error is not None and "exceeds the context length" in str(error)
        assert error.final.error_kind == "invalid"  # the request's fault: a 400 at the gateway
        assert gap < MAX_GAP_S
    finally:
        server.stop()


def test_a_huge_prompt_is_refused_without_stalling_others_model_tokenizer(model):
    server = Server(model)
    try:
        gap, error = gaps_beside(server, "t5 t6 " * 2_500_000)  # 15 MB, 5 M tokens
        assert error is not None and "exceeds the context length" in str(error)
        assert gap < MAX_GAP_S
        # Long in characters, short in tokens (one unknown token a word): served, from the thread.
        long_words = " ".join(["q" * 100] * 90)
        result = server.client.generate(prompt=long_words, temperature=0, max_tokens=4).result()
        assert result.finish_reason == "length" and len(result.token_ids) == 4
    finally:
        server.stop()
