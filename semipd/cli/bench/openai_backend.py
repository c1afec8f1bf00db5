"""`--backend openai`: a bench run against any OpenAI-compatible server, through its streamed
/v1/completions.

It reads the server-sent events with httpx2 (which transformers' huggingface_hub already brings)
rather than the openai package, which is no runtime dependency and builds a model object for
every chunk: client time that would show up in ITL as if the server had spent it."""

import json
import time

import httpx2

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
        self.http = httpx2.AsyncClient(base_url=self.base_url + "/", headers=headers, timeout=TIMEOUT_S,
                                       limits=httpx2.Limits(max_connections=None, max_keepalive_connections=None))
        return self

    async def __aexit__(self, *exc):
        await self.http.aclose()

    async def max_model_len(self) -> int | None:
        """The served model's context length where /v1/models tells it (vLLM's and semipd's
        cards do; None: lengths are planned without that bound). Picks the model if not given."""
        try:
            response = await self.http.get("models")
        except httpx2.HTTPError as e:
            raise ClientError(f"no answer from {self.base_url}: {e}") from None
        if response.status_code != 200:
            message = _message(response.text)
            _stop_on(response.status_code, message)
            raise UserError(f"{self.base_url}/models answered {response.status_code}: {message}")
        cards = [c for c in response.json().get("data") or [] if isinstance(c, dict)]
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
            async with self.http.stream("POST", "completions", json=body) as response:
                if response.status_code != 200:
                    message = _message((await response.aread()).decode(errors="replace"))
                    _stop_on(response.status_code, message)
                    raise Refused(f"{response.status_code}: {message}")
                async for event in httpx2.EventSource(response):
                    now = time.perf_counter()
                    if event.data == "[DONE]":
                        break
                    try:
                        obj = json.loads(event.data)
                    except ValueError:
                        raise ClientError(f"{self.base_url} sent an event that is not JSON: "
                                          f"{event.data[:200]!r}") from None
                    if "error" in obj:  # a failure after the headers went out
                        raise Refused(_message(event.data))
                    usage = obj.get("usage") or usage
                    for choice in obj.get("choices") or []:
                        # A chunk is a token, one without text too (a partial character, a special
                        # token), unless it only carries the finish reason.
                        text, reason = choice.get("text"), choice.get("finish_reason")
                        chunks.append([now, 1 if text or not reason else 0])
                        if reason:
                            ended, finish = now, reason
        except httpx2.HTTPError as e:
            raise ClientError(f"lost the server at {self.base_url}: {e}") from None
        if finish is None:
            raise Refused("the stream ended without a finish reason")
        if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
            raise UserError(f"{self.base_url} streams no usage (stream_options.include_usage), which the "
                            "output token counts come from")
        tokens = usage["completion_tokens"]
        chunks[-1][1] += max(0, tokens - sum(k for _, k in chunks))  # tokens no chunk showed
        return Answer([tuple(c) for c in chunks], ended, tokens, finish)


def _stop_on(status: int, message: str) -> None:
    """Stop the run on an answer that every request would get; others fail only their request."""
    if status in (401, 403):
        raise UserError(f"the server refused the API key ({status}: {message}); check --api-key")
    if status == 404:
        raise UserError(f"404: {message} (check --base-url and --model)")
    if status == 503:
        raise ClientError(f"the server is unavailable (503: {message})")


def _message(text: str) -> str:
    """An OpenAI-shaped error's message, else the start of the text itself."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return text.strip()[:200]
