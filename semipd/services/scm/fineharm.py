"""FineHarm-format data: reading and checking records, and turning word labels into token labels.

A record is a JSON object with `prompt` and `response` (strings), `sentences` (the response split
into sentences) with `sentence_labels` (0/1 each), and `words` with `word_labels` (0/1 each): the
response's words in order, flat or one list per sentence. A file is a JSON array of records or
JSON Lines. The response is harmful when any sentence is.

The model reads `prompt + "\\n\\n"` then the sentences, one per line (scm_text). Word labels reach
tokens through character offsets: each word is found in the response text after the previous
one, its characters take its label, and a token's label is the largest label of the characters
it covers (a token that straddles a harmful word is harmful). Prompt tokens get IGNORE, so the
token loss covers response tokens only. This works with any fast tokenizer, whatever way it
splits words.
"""

import json
import os
from dataclasses import dataclass

from semipd.shared.errors import UserError, first_line

IGNORE = -100  # label of tokens that take no part in the token loss (torch's CE default)
PROMPT_SEPARATOR = "\n\n"
FIELDS = {"prompt": str, "response": str, "sentences": list, "sentence_labels": list,
          "words": list, "word_labels": list}


@dataclass
class Example:
    input_ids: list[int]
    token_labels: list[int]  # IGNORE on prompt tokens, else 0/1
    response_start: int      # index of the first response token
    label: int               # 1 if the response is harmful


def scm_text(prompt: str, sentences: list[str]) -> tuple[str, int]:
    """The model's input text and the character where the response starts."""
    head = prompt + PROMPT_SEPARATOR
    return head + "\n".join(sentences), len(head)


def load_records(path: str) -> list[dict]:
    """The checked records of a FineHarm-format file; UserError naming the first bad one."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such data file")
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({first_line(e)})") from None
    try:
        records = json.loads(text)
    except ValueError:
        records = _json_lines(path, text)
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not records:
        raise UserError(f"{path}: expected a non-empty JSON array of records or JSON Lines")
    for i, record in enumerate(records):
        _check(record, f"{path}: record {i}")
    return records


def _json_lines(path: str, text: str) -> list:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise UserError(f"{path}: line {n}: malformed JSON ({first_line(e)})") from None
    return records


def _check(record, where: str) -> None:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, kind in FIELDS.items():
        if name not in record:
            raise UserError(f"{where}: missing field {name!r}")
        if not isinstance(record[name], kind):
            raise UserError(f"{where}: field {name!r} must be a {kind.__name__}, "
                            f"got {type(record[name]).__name__}")
    words, word_labels = _flat(record["words"]), _flat(record["word_labels"])
    checks = [(record["sentences"], str, "sentences", "strings"),
              (words, str, "words", "strings"),
              (record["sentence_labels"], int, "sentence_labels", "0/1"),
              (word_labels, int, "word_labels", "0/1")]
    for values, kind, name, what in checks:
        if not all(isinstance(v, kind) and (kind is str or v in (0, 1)) for v in values):
            raise UserError(f"{where}: field {name!r} must hold {what} only")
    if len(record["sentences"]) != len(record["sentence_labels"]) or not record["sentences"]:
        raise UserError(f"{where}: 'sentences' must be non-empty and as long as 'sentence_labels'")
    if len(words) != len(word_labels):
        raise UserError(f"{where}: 'words' and 'word_labels' differ in length")


def _flat(values: list) -> list:
    return [v for sub in values for v in sub] if values and all(isinstance(v, list) for v in values) else values


def encode(record: dict, tokenizer, max_len: int) -> Example:
    """Token ids and labels of a checked record, cut to max_len tokens (the response's end is
    what goes; the response label stays)."""
    text, start = scm_text(record["prompt"], record["sentences"])
    char_labels = bytearray(len(text))
    cursor = start
    for word, label in zip(_flat(record["words"]), _flat(record["word_labels"])):
        at = text.find(word, cursor)
        if at < 0:
            raise UserError(f"word {word!r} of the record starting {record['prompt'][:40]!r} is "
                            "not in its sentences (words must follow the sentences in order)")
        char_labels[at:at + len(word)] = bytes([label]) * len(word)
        cursor = at + len(word)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = enc["input_ids"][:max_len], enc["offset_mapping"][:max_len]
    labels = [IGNORE if s < start else max(char_labels[s:e], default=0) for s, e in offsets]
    response_start = next((i for i, (s, _) in enumerate(offsets) if s >= start), len(ids))
    if response_start >= len(ids):
        raise UserError(f"record starting {record['prompt'][:40]!r}: no response tokens "
                        f"within {max_len} tokens")
    return Example(ids, labels, response_start, int(any(record["sentence_labels"])))


def load_examples(path: str, tokenizer, max_len: int) -> list[Example]:
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("the SCM needs a fast tokenizer (tokenizer.json) for character offsets")
    return [encode(r, tokenizer, max_len) for r in load_records(path)]
