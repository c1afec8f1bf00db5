r"""A text stream turned into the monitor's tokens piece by piece, never changing a token once
handed out (it may already be scored).

Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2) split text into pre-tokens with a regular
expression and never merge across them. In both families' expressions a new pre-token starts at
a space followed by a non-space character, and at a non-space character after a newline that
follows a non-space character (after a longer run of white space GPT-2's `\s+(?!\S)` splits the
run depending on what comes next); text cut at such a point tokenizes the same in two pieces as
whole. So the retokenizer keeps back the text after the last
such point (the word still being written) and hands out the tokens of the text before it. The
price is latency: a word is scored once the next one begins, or when the stream ends. Text with
no such point for long (a run of CJK, a URL, base64) is cut anyway after MAX_HELD_CHARS: its
tokens there may differ from the whole text's, but scoring goes on (the controller gives up on
a monitor that leaves sent tokens unscored for seconds).
"""

import re

CUT = re.compile(r" (?=\S)|(?<=\S\n)\S")
MAX_HELD_CHARS = 64


def last_cut(text: str) -> int:
    """The last offset > 0 where a pre-token must begin whatever follows; 0 if none."""
    return max((m.start() for m in CUT.finditer(text)), default=0)


class Retokenizer:
    def __init__(self, encode):
        self._encode = encode                  # text -> ids, no special tokens
        self._text = ""                        # received, not yet tokenized
        self._marks: list[tuple[int, int]] = []  # (end offset in _text, served tokens covered)

    def add(self, text: str, upto: int) -> list[tuple[int, int]]:
        """Take text that completes the served response up to token `upto`; return
        (token id, served tokens covered once that token's text was complete) for each token
        that can be scored now."""
        self._text += text
        self._marks.append((len(self._text), upto))
        cut = last_cut(self._text)
        return self._commit(len(self._text) if len(self._text) - cut > MAX_HELD_CHARS else cut)

    def flush(self, upto: int) -> list[tuple[int, int]]:
        """The stream has ended: the tokens of everything kept back."""
        self._marks.append((len(self._text), upto))
        return self._commit(len(self._text))

    def _commit(self, cut: int) -> list[tuple[int, int]]:
        if cut == 0:
            return []
        head, self._text = self._text[:cut], self._text[cut:]
        covered = next(u for end, u in self._marks if end >= cut)
        self._marks = [(end - cut, u) for end, u in self._marks if end > cut]
        return [(t, covered) for t in self._encode(head)]
