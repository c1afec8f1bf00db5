"""Incremental re-tokenization: text arriving in arbitrary pieces gives exactly the tokens of the
whole text, and no token handed out ever changes."""

import random

import pytest

from semipd.services.scm.retokenize import MAX_HELD_CHARS, Retokenizer, last_cut
from tests.scm_checkpoints import QWEN2_SPLIT, bpe_tokenizer, sample_text


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def encode(request):
    tok = bpe_tokenizer(QWEN2_SPLIT if request.param == "qwen2" else None)
    return lambda text: tok.encode(text, add_special_tokens=False)


def test_pieces_tokenize_like_the_whole_text(encode):
    rng = random.Random(0)
    for _ in range(150):
        text = sample_text(rng, rng.randint(1, 40))
        retok, got, end = Retokenizer(encode), [], 0
        while end < len(text):
            start, end = end, min(len(text), end + rng.randint(1, 7))
            got += retok.add(text[start:end], end)
        got += retok.flush(end)
        assert [t for t, _ in got] == encode(text), repr(text)


def test_each_token_is_credited_to_the_piece_that_completed_it(encode):
    retok = Retokenizer(encode)
    assert retok.add("harm", 1) == []                     # the word may go on
    first = retok.add("ful the", 2)                       # "harmful" is complete now
    assert [t for t, _ in first] == encode("harmful") and {u for _, u in first} == {2}
    assert retok.add("", 3) == []                         # a token with no text yet
    rest = retok.flush(4)                                 # " the" had all arrived with piece 2
    assert [t for t, _ in rest] == encode(" the") and {u for _, u in rest} == {2}


@pytest.mark.parametrize("text, cut", [("one two", 3), ("one\ntwo", 4), ("a.\n\nb", 0), ("a  b", 2),
                                       ("word", 0), ("trailing ", 0), ("x\n y", 2)])
def test_cuts_only_where_a_pre_token_must_begin(text, cut):
    assert last_cut(text) == cut



@pytest.mark.parametrize("split", [QWEN2_SPLIT, None], ids=["qwen2", "gpt2"])
def test_a_long_run_without_cut_points_is_scored_as_it_comes(split):
    """CJK text has no spaces: held back to the end, it went unscored until the controller gave
    up on the monitor. Cut after MAX_HELD_CHARS, it is scored as it comes, in pieces that still
    decode to the text."""
    tok = bpe_tokenizer(split)
    text = "日本語のテキスト" * 40
    retok, got = Retokenizer(lambda t: tok.encode(t, add_special_tokens=False)), []
    for end in range(2, len(text) + 1, 2):
        got += retok.add(text[end - 2:end], end // 2)
    assert max(u for _, u in got) >= (len(text) - MAX_HELD_CHARS) // 2 - 1  # all but the tail
    got += retok.flush(len(text) // 2)
    assert tok.decode([t for t, _ in got]) == text
