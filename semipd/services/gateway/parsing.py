"""The bodies of /v1/completions and /v1/chat/completions, read into one `Job`: what to ask the
controller for (a prompt or a chat, and SamplingParams fields) and how to answer (n, stream).

Only shapes are checked here. Values (ranges, a prompt beyond the context) are the controller's to
check, as for every client, and its refusal comes back as a 400 too. A field the engine does not
implement is refused when it asks for anything (logprobs, penalties, tools, ...): ignoring it would
change the answer without saying so. Fields that only label a request (user, ...) are ignored."""

from dataclasses import dataclass

from semipd.services.gateway.errors import bad_request

MAX_N = 64  # answers per HTTP request; each is a request to the engine
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "ignore_eos")
LABELS = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})


@dataclass
class Job:
    model: str | None              # None: the served model
    prompt: str | list[int] | None  # /v1/completions: text or token ids
    messages: list[dict] | None    # /v1/chat/completions: {"role", "content"} with text content
    sampling: dict                 # SamplingParams fields
    n: int
    stream: bool
    include_usage: bool            # stream_options.include_usage: a last chunk with the usage


def completion_job(body: dict) -> Job:
    body = {k: v for k, v in body.items() if v is not None}  # null means "the default"
    return _job(body, _prompt(body.pop("prompt", None)), None, body.pop("max_tokens", None))


def chat_job(body: dict) -> Job:
    body = {k: v for k, v in body.items() if v is not None}
    messages = _messages(body.pop("messages", None))
    newer, older = body.pop("max_completion_tokens", None), body.pop("max_tokens", None)
    return _job(body, None, messages, older if newer is None else newer)


def _job(body: dict, prompt, messages, max_tokens) -> Job:
    model = body.pop("model", None)
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", "model")
    n = body.pop("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise bad_request(f"n must be an integer in [1, {MAX_N}]", "n")
    stream = body.pop("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.pop("stream_options", {})
    if options and not stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    include_usage = options.pop("include_usage", False) if isinstance(options, dict) else None
    if not isinstance(include_usage, bool) or _first_asking(options):
        raise bad_request("stream_options takes include_usage (true or false) only", "stream_options")
    sampling = {name: body.pop(name) for name in SAMPLING if name in body}
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    stop = body.pop("stop", None)
    if stop is not None:
        sampling["stop"] = [stop] if isinstance(stop, str) else stop
    for name in ("logprobs", "top_logprobs"):
        if _asks_for(name, body.pop(name, None)):
            raise bad_request(f"{name} is not supported: the engine does not return log probabilities", name)
    unsupported = _first_asking({k: v for k, v in body.items() if k not in LABELS})
    if unsupported is not None:
        raise bad_request(f"{unsupported} is not supported by this server", unsupported)
    return Job(model, prompt, messages, sampling, n, stream, include_usage)


def _asks_for(name: str, value) -> bool:
    """False for the values that ask for nothing: null, false, 0, empty; best_of 1 (as n)."""
    return value not in (None, False, 0, "", [], {}) and not (name == "best_of" and value == 1)


def _first_asking(fields: dict) -> str | None:
    return next((name for name, value in fields.items() if _asks_for(name, value)), None)


def _prompt(prompt) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request("one prompt per request: send a request per prompt (n asks for several "
                          "answers to one)", "prompt")
    raise bad_request("prompt must be a string or a list of token ids", "prompt")


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    return [_message(m) for m in messages]


def _message(message) -> dict:
    """{"role", "content"} with the content as text (text parts joined by newlines)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise bad_request("a message is an object with a role and a content", "messages")
    extra = _first_asking({k: v for k, v in message.items() if k not in ("role", "content")})
    if extra is not None:
        raise bad_request(f"messages with {extra} are not supported by this server", "messages")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise bad_request("only text content parts are supported", "messages")
        content = "\n".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad_request("a message's content must be text", "messages")
    return {"role": message["role"], "content": content}
