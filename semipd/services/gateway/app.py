"""The gateway's HTTP application (Starlette): OpenAI's completions, chat completions and models
endpoints, /health and /metrics. Every answer, errors included, is JSON in OpenAI's shapes."""

import asyncio
import contextlib
import hmac
import time

import anyio
import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from semipd.services.gateway.errors import APIError, JSONResponse, bad_request
from semipd.services.gateway.formatting import DONE, Answer, event
from semipd.services.gateway.link import UpstreamController
from semipd.services.gateway.metrics import GatewayMetrics
from semipd.services.gateway.parsing import Job, chat_job, completion_job
from semipd.services.gateway.runs import Run
from semipd.shared.protocol import MAX_MESSAGE_BYTES

# The controller takes no larger message, and a request's JSON is no smaller than its msgpack.
MAX_BODY_BYTES = MAX_MESSAGE_BYTES
CLIENT_CLOSED_REQUEST = 499  # the status of an answer nobody is left to read (nginx's)


class Gateway:
    """The endpoints, over one link to the controller and this gateway's metrics."""

    def __init__(self, address: str, api_key: str | None = None, served_model_name: str | None = None):
        self.api_key = api_key
        self.link = UpstreamController(address, served_model_name)
        self.metrics = GatewayMetrics()
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models), Route("/health", self.health),
                  Route("/metrics", self.metrics_text)]
        handlers = {APIError: api_error, HTTPException: http_error, Exception: internal_error}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app):
        watcher = asyncio.get_running_loop().create_task(self.link.watch())
        try:
            yield
        finally:
            watcher.cancel()
            await self.link.close()  # aborts whatever is still open

    # ---- endpoints ------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, completion_job, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat_job, chat=True)

    async def models(self, request: Request) -> Response:
        """The served model; its context length as vLLM's card has it, so that clients (`semipd
        bench --backend openai`) can size their requests."""
        self._authorize(request)
        if self.link.model_name is None:
            await self.link.health()
        card = {"id": self.link.model_name, "object": "model", "created": self.created, "owned_by": "semipd",
                "max_model_len": (await self.link.stats())["max_model_len"]}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, _request: Request) -> Response:
        """200 with the controller's health while it serves; 503 while it starts or is away."""
        health = await self.link.health()
        if health["status"] != "ok":
            raise APIError(503, f"the server is {health['status']}", code="service_unavailable")
        return JSONResponse(health)

    async def metrics_text(self, _request: Request) -> Response:
        try:
            stats = await self.link.stats()
        except APIError:
            stats = None  # the gateway's own metrics still count, and semipd_server_up says 0
        return Response(self.metrics.render(stats), media_type=CONTENT_TYPE_LATEST)

    # ---- generating -----------------------------------------------------------------------

    async def _generate(self, request: Request, parse, chat: bool) -> Response:
        started = time.monotonic()
        self._authorize(request)
        job = parse(await read_json(request))
        await self.link.client()  # a 503 first: the served model's name may come from the controller
        if job.model is not None and job.model != self.link.model_name:
            raise APIError(404, f"the model {job.model!r} does not exist; this server serves "
                                f"{self.link.model_name!r}", "model", "model_not_found")
        answer = Answer(chat, self.link.model_name)
        if job.stream:
            return await until_disconnected(request, self._stream(job, answer, started))
        return await until_disconnected(request, self._whole(job, answer, started))

    async def _whole(self, job: Job, answer: Answer, started: float) -> Response:
        run = await Run.start(self.link, self.metrics, job, started)
        try:
            async for _ in run.events():
                pass
        finally:
            await run.close()
        choices = run.choices
        return JSONResponse(answer.whole(["".join(c.texts) for c in choices], [c.final for c in choices]))

    async def _stream(self, job: Job, answer: Answer, started: float) -> Response:
        """Headers go out with the first event, so that a refusal is still a 4xx answer."""
        run = await Run.start(self.link, self.metrics, job, started)
        events = run.events()
        try:
            first = await anext(events)
        except BaseException:
            await run.close()
            raise
        return EventStream(self._events(run, events, first, job, answer), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache"})

    async def _events(self, run: Run, events, first, job: Job, answer: Answer):
        """One event per engine message, each choice's last with its finish reason, then the
        usage if asked, then [DONE]. A token with no text yet (part of a character, a special
        token) still gets its event, as vLLM's do: the client sees each token when the engine
        sends it. A client that leaves cancels this: its requests are aborted."""
        begun = set()  # choices whose first chunk went out
        try:
            item = first
            while item is not None:
                index, text, final = item
                yield event(answer.chunk(index, text, final and final.finish_reason, index not in begun,
                                         job.include_usage))
                begun.add(index)
                item = await anext(events, None)
            if job.include_usage:
                yield event(answer.usage_chunk([c.final for c in run.choices]))
        except APIError as e:  # the headers are out: the error goes as an event, as OpenAI's do
            yield event(e.body())
        finally:
            await events.aclose()
            await run.close()
        yield DONE

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), self.api_key.encode()):
            raise APIError(401, "a valid API key is needed: send the header Authorization: Bearer KEY",
                           code="invalid_api_key")


class EventStream(StreamingResponse):
    """Closes its events however the response ends: Starlette cancels a response whose client
    left, which may be while the events wait at a yield, where no cancellation reaches them."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def read_json(request: Request) -> dict:
    """The body as a JSON object, read up to MAX_BODY_BYTES (a 413 past them)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"the body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise bad_request("the body must be a JSON object")
    return obj


async def until_disconnected(request: Request, work) -> Response:
    """The response work makes, unless the client disconnects first: then work is cancelled (its
    cleanup aborts the requests it started) and nobody reads the answer."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return task.result() if not task.cancelled() else Response(status_code=CLIENT_CLOSED_REQUEST)


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# Exception handlers are coroutines: Starlette runs plain functions on a thread.

async def api_error(_request: Request, error: APIError) -> Response:
    return error.response()


async def http_error(_request: Request, error: HTTPException) -> Response:
    """Starlette's own: an unknown path, a wrong method."""
    return APIError(error.status_code, error.detail).response()


async def internal_error(_request: Request, error: Exception) -> Response:
    """A bug: answered in OpenAI's shape; Starlette raises it on to uvicorn, which logs it."""
    return APIError(500, f"internal error: {type(error).__name__}").response()
