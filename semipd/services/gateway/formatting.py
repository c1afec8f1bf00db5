"""The JSON objects of OpenAI's completions and chat completions: a whole answer, and the chunks
of a streamed one (server-sent events)."""

import time
import uuid

import orjson

from semipd.shared.protocol import Final

DONE = b"data: [DONE]\n\n"


def event(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage(finals: list[Final]) -> dict:
    """The n answers share one prompt, counted once."""
    prompt, completion = finals[0].prompt_tokens, sum(f.completion_tokens for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Answer:
    """The objects of one HTTP request's answer, which share an id, a time and a model name."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model

    def whole(self, texts: list[str], finals: list[Final]) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": final.finish_reason} for i, (text, final) in enumerate(zip(texts, finals))]
        else:
            choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": final.finish_reason}
                       for i, (text, final) in enumerate(zip(texts, finals))]
        return self._object("chat.completion" if self.chat else "text_completion", choices,
                            usage=usage(finals))

    def chunk(self, index: int, text: str, finish_reason: str | None, first: bool, with_usage: bool) -> dict:
        """One choice's new text; the first chunk of a chat choice names the role. A chat chunk
        carries content ("" for a token with no text yet) unless it only ends its choice. With
        include_usage, every chunk but the last carries "usage": null, as OpenAI's do."""
        if self.chat:
            has_content = text or first or finish_reason is None
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if has_content else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._chunk([choice], **({"usage": None} if with_usage else {}))

    def usage_chunk(self, finals: list[Final]) -> dict:
        return self._chunk([], usage=usage(finals))

    def _chunk(self, choices: list[dict], **extra) -> dict:
        return self._object("chat.completion.chunk" if self.chat else "text_completion", choices, **extra)

    def _object(self, kind: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}
