"""A job's n requests to the controller (`Run`): their messages merged into one sequence of
events, each request timed for the metrics, and what is still running aborted on close."""

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass, field

import anyio

from semipd.services.gateway.errors import APIError, bad_request
from semipd.services.gateway.link import UpstreamController
from semipd.services.gateway.metrics import GatewayMetrics
from semipd.services.gateway.parsing import Job
from semipd.shared.client import AsyncStream, ClientError, ServerError
from semipd.shared.protocol import Delta, Final


@dataclass
class Choice:
    """One of a job's requests to the engine."""
    stream: AsyncStream
    first_token_at: float | None = None
    final: Final | None = None
    aborted: bool = False
    texts: list[str] = field(default_factory=list)


class Run:
    def __init__(self, link: UpstreamController, metrics: GatewayMetrics, started: float):
        self.link = link
        self.metrics = metrics
        self.started = started  # when the HTTP request came in (time.monotonic())
        self.choices: list[Choice] = []
        self._events: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []

    @classmethod
    async def start(cls, link: UpstreamController, metrics: GatewayMetrics, job: Job, started: float) -> "Run":
        client = await link.client()
        run = cls(link, metrics, started)
        try:
            for i in range(job.n):
                sampling = dict(job.sampling)
                if i and isinstance(sampling.get("seed"), int):  # n seeded answers, not n equal ones
                    sampling["seed"] += i
                if job.messages is not None:
                    stream = await client.chat(job.messages, **sampling)
                elif isinstance(job.prompt, str):
                    stream = await client.generate(prompt=job.prompt, **sampling)
                else:
                    stream = await client.generate(prompt_ids=job.prompt, **sampling)
                run.choices.append(Choice(stream))
        except (ValueError, OverflowError) as e:  # what msgpack or the protocol refuses to send
            await run.close()
            raise bad_request(f"cannot send this request: {e}") from None
        except ClientError as e:  # the connection broke
            await run.close()
            raise await run._failure(e) from None
        except BaseException:
            await run.close()
            raise
        return run

    async def _items(self):
        """(choice index, Delta, Final or ClientError) as they come. One choice is read directly:
        a task and a queue between it and the answer cost a task switch per token; several are
        merged through a queue, a task each."""
        if len(self.choices) == 1:
            async with aclosing(_read(self.choices[0].stream)) as items:
                async for item in items:
                    yield 0, item
            return
        loop = asyncio.get_running_loop()
        self._pumps = [loop.create_task(self._pump(i, c.stream)) for i, c in enumerate(self.choices)]
        while True:
            yield await self._events.get()

    async def _pump(self, index: int, stream: AsyncStream) -> None:
        async for item in _read(stream):
            self._events.put_nowait((index, item))

    async def events(self):
        """(choice index, new text, its Final or None) as they come, until every choice has its
        Final; an APIError if one fails (a refusal comes before any text: a 400)."""
        left = len(self.choices)
        async with aclosing(self._items()) as items:  # closed here, not left to the loop's finalizer
            while left:
                index, item = await anext(items)
                choice = self.choices[index]
                now = time.monotonic()
                if isinstance(item, Delta):
                    choice.first_token_at = choice.first_token_at or now
                    choice.texts.append(item.text)
                    yield index, item.text, None
                    continue
                if isinstance(item, ClientError):
                    if isinstance(item, ServerError) and item.final is not None:
                        self._finished(choice, item.final, now)
                    raise await self._failure(item)
                self._finished(choice, item, now)
                left -= 1
                yield index, "", item

    def _finished(self, choice: Choice, final: Final, now: float) -> None:
        choice.final = final
        first = choice.first_token_at or (now if final.completion_tokens else None)  # a one-token answer
        self.metrics.finished(final, self.started, first, now)

    async def _failure(self, error: ClientError) -> APIError:
        if isinstance(error, ServerError) and error.final is not None:
            kind = error.final.error_kind
            if kind == "unavailable":  # stopping, or its content monitor is away: try again later
                return APIError(503, str(error), code="service_unavailable")
            return APIError(400 if kind == "invalid" else 500, str(error))
        await self.link.lost(error)
        return APIError(503, f"lost the server: {error}", code="service_unavailable")

    async def close(self) -> None:
        """Abort the requests still running (the client left, or one of them failed). Shielded:
        this runs when the HTTP request is cancelled, and the aborts must still go out."""
        with anyio.CancelScope(shield=True):
            for pump in self._pumps:
                pump.cancel()
            for choice in self.choices:
                if choice.final is None and not choice.aborted:
                    choice.aborted = True
                    self.metrics.aborted()
                    await choice.stream.aclose()


async def _read(stream: AsyncStream):
    """A stream's Deltas, then its Final, or the ClientError that ended it."""
    try:
        async for delta in stream:
            yield delta
        yield stream.final
    except ClientError as e:
        yield e
