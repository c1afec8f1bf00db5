"""`--backend openai`: a bench run against any OpenAI-compatible server, through its streamed
/v1/completions.

The client is part of the measurement: a first token that comes with a decode step's burst of
chunks waits behind the others' in it. So it is aiohttp (C HTTP parser, as vLLM's benchmark
uses) with a plain SSE split and orjson: a third of the CPU per chunk that httpx2 with its SSE
parser took (docs/benchmarks.md, "What the HTTP gateway adds"). Not the openai package either,
which builds a model object for every chunk."""

import time

import aiohttp
import orjson

from semipd.cli.bench.backends import Answer, Refused
from semipd.shared.client import ClientError
from semipd.shared.errors import UserError

TIMEOUT_S = 60.0          # a server silent for this long is down, as the SDK's timeout_s


class OpenAIBackend:
    def __init__(self, base_url: str, model: str | None, api_key: str | None):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key

    async def __aenter__(self):
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        # No connection limit: every request in flight has its own stream, as through the SDK.
        self.http = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0),
                                          timeout=aiohttp.ClientTimeout(sock_connect=TIMEOUT_S, sock_read=TIMEOUT_S))
        return self

    async def __aexit__(self, *exc):
        await self.http.close()

    async def max_model_len(self) -> int | None:
        """The served model's context length where /v1/models tells it (vLLM's and semipd's
        cards do; None: lengths are planned without that bound). Picks the model if not given."""
        try:
            async with self.http.get(self.base_url + "/models") as response:
                status, text = response.status, await response.text(errors="replace")
        except aiohttp.ClientError as e:
            raise ClientError(f"no answer from {self.base_url}: {e}") from None
        if status != 200:
            message = _message(text)
            _stop_on(status, message)
            raise UserError(f"{self.base_url}/models answered {status}: {message}")
        try:
            listing = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise UserError(f"{self.base_url}/models answered with no JSON: {text[:200]!r}") from None
        cards = [c for c in listing.get("data") or [] if isinstance(c, dict)]
        if self.model is None:
            if not cards:
                raise UserError(f"{self.base_url}/models lists no model: give --model")
            self.model = cards[0]["id"]
        card = next((c for c in cards if c.get("id") == self.model), {})
        max_len = card.get("max_model_len")
        return max_len if isinstance(max_len, int) else None

    async def send(self, prompt_ids: list[int], params: dict) -> Answer:
        body = {"model": self.model, "prompt": prompt_ids, **params, "stream": True,
                "stream_options": {"include_usage": True}}
        chunks, ended, finish, usage = [], None, None, None
        try:
            async with self.http.post(self.base_url + "/completions", json=body) as response:
                if response.status != 200:
                    message = _message(await response.text(errors="replace"))
                    _stop_on(response.status, message)
                    raise Refused(f"{response.status}: {message}")
                async for now, data in _events(response):
                    if data == b"[DONE]":
                        continue  # read on to the body's end, so that the connection is kept
                    try:
                        obj = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        obj = None
                    if not isinstance(obj, dict):
                        raise ClientError(f"{self.base_url} sent an event that is not a JSON object: "
                                          f"{data[:200]!r}")
                    if "error" in obj:  # a failure after the headers went out
                        raise Refused(_message(data))
                    usage = obj.get("usage") or usage
                    for choice in obj.get("choices") or []:
                        # A chunk is a token, one without text too (a partial character, a special
                        # token), unless it only carries the finish reason.
                        text, reason = choice.get("text"), choice.get("finish_reason")
                        chunks.append([now, 1 if text or not reason else 0, bool(text)])
                        if reason:
                            ended, finish = now, reason
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ClientError(f"lost the server at {self.base_url}: {str(e) or type(e).__name__}") from None
        if finish is None:
            raise Refused("the stream ended without a finish reason")
        if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
            raise UserError(f"{self.base_url} streams no usage (stream_options.include_usage), which the "
                            "output token counts come from")
        tokens = usage["completion_tokens"]
        excess = sum(k for _, k, _ in chunks) - tokens
        for chunk in chunks:  # more chunks than tokens: the first without text carried none
            if excess > 0 and chunk[1] and not chunk[2]:   # (a leading empty one, as some servers send)
                chunk[1], excess = 0, excess - 1
        chunks[-1][1] += max(0, -excess)  # tokens no chunk showed
        return Answer([(t, k) for t, k, _ in chunks], ended, tokens, finish)


def _stop_on(status: int, message: str) -> None:
    """Stop the run on an answer that every request would get; others fail only their request."""
    if status in (401, 403):
        raise UserError(f"the server refused the API key ({status}: {message}); check --api-key")
    if status == 404:
        raise UserError(f"404: {message} (check --base-url and --model)")
    if status == 503:
        raise ClientError(f"the server is unavailable (503: {message})")


async def _events(response: aiohttp.ClientResponse):
    """(arrival, data) of each server-sent event as it comes: its data lines joined; comments,
    other fields and events without data left out."""
    pending = b""
    async for block in response.content.iter_any():
        now = time.perf_counter()
        *events, pending = (pending + block).replace(b"\r\n", b"\n").split(b"\n\n")
        for lines in events:
            data = [line[5:].removeprefix(b" ") for line in lines.split(b"\n") if line.startswith(b"data:")]
            if data:
                yield now, b"\n".join(data)


def _message(text: str | bytes) -> str:
    """An OpenAI-shaped error's message, else the start of the text itself."""
    try:
        error = orjson.loads(text).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return (text.decode(errors="replace") if isinstance(text, bytes) else text).strip()[:200]
