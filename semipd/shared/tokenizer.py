"""Tokenizers and incremental detokenization.

A model directory brings its own tokenizer files (loaded with transformers); presets, which have
no files, use ByteTokenizer: ids 0-255 are the bytes of UTF-8 text, then BOS and EOS.
"""

import hashlib
import json
import os

from semipd.shared.errors import UserError, first_line


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
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            raise UserError(f"{path}: no tokenizer files (tokenizer.json or tokenizer_config.json)")
        try:
            self._tok = AutoTokenizer.from_pretrained(path)
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
    return HFTokenizer(model) if os.path.isdir(model) else ByteTokenizer()


class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding a token alone can split a multi-byte character or drop a leading space, so each
    delta is the difference between decoding a short window with and without the new tokens;
    a window ending in an incomplete character waits for the next token. Text that could be the
    start of a stop string is held back until it is known not to be one.
    """

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.stop = [s for s in stop if s]
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self._prefix = 0   # decoding window start
        self._read = 0     # tokens already turned into text
        self._emitted = 0  # characters of text already returned

    def add(self, token_ids: list[int]) -> tuple[str, bool]:
        """Append tokens; return (text safe to show now, whether a stop string was reached).

        On a stop string the text is cut just before it, as OpenAI-style servers do."""
        self.ids += token_ids
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        window = self.tokenizer.decode(self.ids[self._prefix:])
        if window.endswith("\ufffd"):
            return "", False
        searched_from = max(0, len(self.text) - self._holdback)
        self.text += window[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        hits = [h for h in (self.text.find(s, searched_from) for s in self.stop) if h >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self._take(len(self.text)), True
        return self._take(len(self.text) - self._holdback), False

    def flush(self) -> str:
        """Everything not yet returned, a trailing incomplete character included (call when
        the sequence finishes)."""
        if self._read < len(self.ids):
            prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
            self.text += self.tokenizer.decode(self.ids[self._prefix:])[len(prefix_text):]
            self._read = len(self.ids)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        end = max(end, self._emitted)
        delta, self._emitted = self.text[self._emitted:end], end
        return delta
