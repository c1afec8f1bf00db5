"""Incremental detokenization: the deltas a stream shows, and a cost per token that does not grow
with the output."""

import random

import pytest

from semipd.shared.tokenizer import MAX_WAIT_TOKENS, ByteTokenizer, Detokenizer, HFTokenizer
from tests.conftest import VOCAB, save_tokenizer


class CountingTokenizer:
    """A real tokenizer that counts its decode calls and the characters they produce."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls, self.chars = tokenizer, 0, 0

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids)
        self.calls += 1
        self.chars += len(text)
        return text


def stream(tokenizer, ids: list[int], stop: list[str] = ()) -> tuple[list[str], bool, str]:
    """(deltas, whether a stop string ended it, the flushed rest), one token at a time."""
    detok = Detokenizer(tokenizer, stop)
    deltas = []
    for token in ids:
        text, stopped = detok.add([token])
        deltas.append(text)
        if stopped:
            return deltas, True, detok.flush()
    return deltas, False, detok.flush()


def byte_ids(text: str) -> list[int]:
    return list(text.encode())


def test_a_character_split_over_tokens_waits_for_its_last_byte():
    deltas, stopped, rest = stream(ByteTokenizer(), byte_ids("hé日!"))
    assert deltas == ["h", "", "é", "", "", "日", "!"] and not stopped and rest == ""


def test_text_that_may_begin_a_stop_string_is_held_back_until_it_does_not():
    deltas, stopped, rest = stream(ByteTokenizer(), byte_ids("aabx"), stop=["abc"])
    assert deltas == ["", "", "a", "a"] and not stopped and rest == "bx"


def test_a_stop_string_cuts_the_text_before_it():
    tok = ByteTokenizer()
    deltas, stopped, rest = stream(tok, byte_ids("say ab and more"), stop=["zz", "and", "y a"])
    assert stopped and "".join(deltas) + rest == "sa" and deltas[-1] == "" and len(deltas) == 5
    # the earliest of several stop strings wins, wherever the new token completes it
    detok = Detokenizer(tok, ["cd", "bcde"])
    assert detok.add(byte_ids("abcdef")) == ("a", True) and detok.text == "a"


def test_flush_returns_the_held_back_text_and_an_incomplete_character():
    detok = Detokenizer(ByteTokenizer(), ["xyz"])
    assert [detok.add([t]) for t in byte_ids("ab") + [0xC3]] == [("", False)] * 3
    assert detok.flush() == "ab\ufffd" and detok.text == "ab\ufffd" and detok.flush() == ""


def test_several_tokens_at_once_give_the_deltas_of_one_at_a_time_joined():
    tok = ByteTokenizer()
    ids = byte_ids("né 日本 stop here")
    one_by_one, _, _ = stream(tok, ids, stop=["stop"])
    detok = Detokenizer(tok, ["stop"])
    joined = ""
    for i in range(0, len(ids), 3):
        text, stopped = detok.add(ids[i:i + 3])
        joined += text
        if stopped:
            break
    assert joined == "".join(one_by_one) == "né 日本 "


def test_bytes_that_never_form_a_character_are_shown_after_a_bounded_wait():
    deltas, _, rest = stream(ByteTokenizer(), [0xFF] * (3 * MAX_WAIT_TOKENS))
    assert deltas[:MAX_WAIT_TOKENS] == [""] * MAX_WAIT_TOKENS
    assert deltas[MAX_WAIT_TOKENS] == "\ufffd" * (MAX_WAIT_TOKENS + 1)
    assert "".join(deltas) + rest == "\ufffd" * (3 * MAX_WAIT_TOKENS)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(path)
    return HFTokenizer(str(path))


def outputs(kind: str, n: int) -> list[int]:
    """n tokens of an output: mixed text (bytes), text never complete (bytes), or words."""
    rng = random.Random(n)
    if kind == "bytes":
        words = ["the ", "né ", "日本語 ", "ok. ", "\n"]
        ids = []
        while len(ids) < n:
            ids += byte_ids(rng.choice(words))
        return ids[:n]
    if kind == "invalid":
        return [0xFF] * n
    return [rng.randrange(3, VOCAB) for _ in range(n)]  # 0-2 are special: decoded to nothing


@pytest.mark.parametrize("kind", ["bytes", "invalid", "words"])
def test_long_outputs_cost_per_token_what_short_ones_do(kind, hf_tokenizer):
    tok = hf_tokenizer if kind == "words" else ByteTokenizer()
    costs = {}
    for n in (200, 20_000):
        counting = CountingTokenizer(tok)
        ids = outputs(kind, n)
        deltas, stopped, rest = stream(counting, ids, stop=["never appears"])
        assert not stopped and "".join(deltas) + rest == tok.decode(ids)
        costs[n] = (counting.calls / n, counting.chars / n)
    (short_calls, short_chars), (long_calls, long_chars) = costs[200], costs[20_000]
    assert long_calls <= 1.1 * short_calls and long_chars <= 1.5 * short_chars, costs


def test_a_stop_string_at_the_end_of_a_long_output_is_found(hf_tokenizer):
    ids = outputs("words", 20_000)
    stop = hf_tokenizer.decode(ids[-3:])
    deltas, stopped, rest = stream(hf_tokenizer, ids, stop=[stop])
    text = hf_tokenizer.decode(ids)
    assert stopped and "".join(deltas) + rest == text[:text.index(stop)]
