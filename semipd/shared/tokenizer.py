"""Tokenizers and incremental detokenization.

A model directory brings its own tokenizer files and a GGUF file its tokenizer in its metadata (both
loaded with transformers); presets, which have no files, use ByteTokenizer: ids 0-255 are the bytes of UTF-8 text, then BOS and EOS.
"""

import hashlib
import json
import os

from semipd.shared.errors import UserError, first_line
from semipd.shared.gguf_file import is_gguf, transformers_source


class ByteTokenizer:
    bos_token_id, eos_token_id = 256, 257

    def encode(self, text: str, special: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def fingerprint(self) -> str:
        return "byte"

    def decode(self, ids: list[int]) -> str:
        # Ids past EOS exist in preset vocabularies but mean nothing: show them as markers.
        out = bytearray()
        for i in ids:
            if i < 256:
                out.append(i)
            elif i > self.eos_token_id:
                out += f"<|{i}|>".encode()
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: str):
        from transformers import AutoTokenizer
        if is_gguf(path):
            source, kwargs = transformers_source(path)
        elif any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            source, kwargs = path, {}
        else:
            raise UserError(f"{path}: no tokenizer files (tokenizer.json or tokenizer_config.json)")
        try:
            self._tok = AutoTokenizer.from_pretrained(source, **kwargs)
        except Exception as e:  # missing or broken files raise assorted exception types
            raise UserError(f"{path}: cannot load tokenizer ({first_line(e)})") from None
        self.eos_token_id = self._tok.eos_token_id

    def encode(self, text: str, special: bool = True) -> list[int]:
        """special=False leaves out BOS and the like: for pieces of a longer text."""
        return self._tok.encode(text, add_special_tokens=special)

    def fingerprint(self) -> str:
        """Equal for tokenizers that turn every text into the same ids."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        spec = backend.to_str() if backend is not None else json.dumps(sorted(self._tok.get_vocab().items()))
        return hashlib.sha256(spec.encode()).hexdigest()

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(model: str):
    return HFTokenizer(model) if os.path.isdir(model) or is_gguf(model) else ByteTokenizer()


# A window still ending in an incomplete character after this many unread tokens holds bytes
# that no later token completes (a character is at most 4 bytes): it is shown as it decodes,
# with U+FFFD, so that the window stays short.
MAX_WAIT_TOKENS = 16


class Detokenizer:
    """Turns a growing list of token ids into text deltas, at a cost per token that does not
    grow with the output.

    Decoding a token alone can split a multi-byte character or drop a leading space, so each
    delta is the difference between decoding a short window (the tokens of the last delta, then
    the new ones) with and without the new tokens; a window ending in an incomplete character
    waits for the next token. Text that could be the start of a stop string is held back until
    it is known not to be one, so a stop string can only begin in that hold-back or the new
    text: only they are searched.
    """

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self._window: list[int] = []  # the last delta's tokens, then those not yet turned into text
        self._read = 0                # of the window, the tokens already turned into text
        self._held = ""               # text made but not yet returned
        self._returned: list[str] = []  # text returned so far, in pieces (joined only when read)

    @property
    def text(self) -> str:
        """The text so far (cut before a stop string once one is found)."""
        return "".join(self._returned) + self._held

    def add(self, token_ids: list[int]) -> tuple[str, bool]:
        """Append tokens; return (text safe to show now, whether a stop string was reached).

        On a stop string the text is cut just before it, as OpenAI-style servers do."""
        self._window += token_ids
        window, new = self._decode()
        if window.endswith("\ufffd") and len(self._window) - self._read <= MAX_WAIT_TOKENS:
            return "", False
        self._advance()
        held = self._held + new
        hits = [h for h in (held.find(s) for s in self.stop) if h >= 0]
        if hits:
            self._held = held[:min(hits)]
            return self._take(len(self._held)), True
        self._held = held
        return self._take(len(held) - self._holdback), False

    def flush(self) -> str:
        """Everything not yet returned, a trailing incomplete character included (call when
        the sequence finishes)."""
        if self._read < len(self._window):
            self._held += self._decode()[1]
            self._advance()
        return self._take(len(self._held))

    def _decode(self) -> tuple[str, str]:
        """(the window's text, the text its unread tokens add)"""
        known = self.tokenizer.decode(self._window[:self._read])
        window = self.tokenizer.decode(self._window)
        return window, window[len(known):]

    def _advance(self) -> None:
        """The unread tokens are text now: they become the next window's known start."""
        del self._window[:self._read]
        self._read = len(self._window)

    def _take(self, end: int) -> str:
        """Return the held text before end (none if end is not past its start)."""
        delta, self._held = self._held[:max(end, 0)], self._held[max(end, 0):]
        if delta:
            self._returned.append(delta)
        return delta
