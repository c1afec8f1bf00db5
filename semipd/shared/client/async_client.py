"""The client SDK for asyncio, `AsyncClient`, and its request streams."""

import asyncio
import time
import uuid

import zmq.asyncio

from semipd.shared.client.common import (ClientError, Result, ServerTimeout, StreamState, connect,
                                         generate_frame, incoming, reply_data)
from semipd.shared.protocol import AbortRequest, Delta, HealthRequest, PartitionRequest, StatsRequest, encode
from semipd.shared.runtime import default_server_address

MAX_BATCH = 256  # messages read before the streams get to run


class Inbox(asyncio.Queue):
    """One request's messages as the reader routed them; `heard` once its first has come."""
    heard = False


class AsyncStream(StreamState):
    def __init__(self, client: "AsyncClient", request_id: str):
        super().__init__(request_id)
        self._client = client

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        msg = await self._client._receive(self.request_id)
        if not isinstance(msg, Delta):
            self._client._inbox.pop(self.request_id, None)
        delta = self._take(msg)
        if delta is None:
            raise StopAsyncIteration
        return delta

    async def result(self) -> Result:
        async for _ in self:
            pass
        return self._result()

    async def aclose(self) -> None:
        """Abort the request unless it has already ended."""
        if not self._done:
            self._done = True
            await self._client._abort(self.request_id)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()


class AsyncClient:
    """One reader task routes every incoming message to its request's asyncio queue."""

    def __init__(self, address: str | None = None, timeout_s: float = 60.0):
        self.address = address or default_server_address()
        self.timeout_s = timeout_s
        self._ctx = zmq.asyncio.Context()
        try:
            self._sock = connect(self._ctx, self.address)
        except BaseException:
            self._ctx.term()
            raise
        self._inbox: dict[str, Inbox] = {}
        self._waiting: dict[Inbox, float] = {}  # a stream's inbox -> since when it waits in it
        self._reader: asyncio.Task | None = None
        self._watchdog: asyncio.Task | None = None
        self._failure: ClientError | None = None  # why the reader stopped, for later requests
        self._last_heard = time.monotonic()
        self._closed = False

    async def generate(self, prompt: str | None = None, prompt_ids: list[int] | None = None,
                       moderate: bool = False, **sampling) -> AsyncStream:
        """Start a request; `sampling` holds SamplingParams fields (max_tokens=..., ...)."""
        request_id, frame = generate_frame(prompt, prompt_ids, moderate, sampling)
        await self._send(request_id, frame)
        return AsyncStream(self, request_id)

    async def chat(self, messages: list[dict], moderate: bool = False, **sampling) -> AsyncStream:
        """Start a chat request: messages ({"role": ..., "content": ...}) are rendered with the
        model's chat template by the server, whose end-of-turn token ends the answer with `stop`.
        Without max_tokens the answer may run until the context is full."""
        request_id, frame = generate_frame(None, None, moderate, sampling, messages)
        await self._send(request_id, frame)
        return AsyncStream(self, request_id)

    async def health(self) -> dict:
        return await self._call(HealthRequest)

    async def stats(self) -> dict:
        return await self._call(StatsRequest)

    async def partition(self, prefill_sm: int, decode_sm: int) -> dict:
        return await self._call(PartitionRequest, prefill_sm=prefill_sm, decode_sm=decode_sm)

    async def close(self) -> None:
        """Abort every open request, then close the socket (queued aborts get LINGER_MS)."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._reader, self._watchdog) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        closed = ClientError("the client is closed")
        for inbox in {*self._inbox.values(), *self._waiting}:  # streams still waiting end with it
            inbox.put_nowait(closed)
        for request_id in self._inbox:
            await self._sock.send(encode(AbortRequest(request_id)))
        self._inbox.clear()
        self._sock.close()
        self._ctx.term()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _call(self, cls, **fields) -> dict:
        request_id = uuid.uuid4().hex
        await self._send(request_id, encode(cls(request_id, **fields)))
        try:
            return reply_data(await self._receive(request_id))
        finally:
            self._inbox.pop(request_id, None)

    async def _send(self, request_id: str, frame: bytes) -> None:
        if self._closed:
            raise ClientError("the client is closed")
        if self._failure is not None:
            raise self._failure
        if self._reader is None:
            loop = asyncio.get_running_loop()
            self._reader, self._watchdog = loop.create_task(self._read_loop()), loop.create_task(self._watch())
        self._inbox[request_id] = Inbox()
        try:
            await self._sock.send(frame)
        except BaseException:
            self._inbox.pop(request_id, None)
            raise

    async def _abort(self, request_id: str) -> None:
        inbox = None if self._closed else self._inbox.pop(request_id, None)
        if inbox is not None:
            inbox.put_nowait(ClientError(f"request {request_id} was aborted"))  # for another reader of it
            await self._sock.send(encode(AbortRequest(request_id)))

    async def _receive(self, request_id: str):
        inbox = self._inbox.get(request_id)
        if inbox is None:
            raise ClientError(f"request {request_id} was closed")
        if inbox.empty():
            # No timer per message (it cost more than the message): _watch() ends long waits.
            self._waiting[inbox] = time.monotonic()
            try:
                msg = await inbox.get()
            finally:
                self._waiting.pop(inbox, None)
        else:
            msg = inbox.get_nowait()
        if isinstance(msg, ClientError):
            raise msg
        return msg

    async def _watch(self) -> None:
        """Fail a stream's wait once the server has said nothing for timeout_s, to it or to any
        other request, since the wait began; checked a few times per timeout."""
        while True:
            await asyncio.sleep(min(1.0, self.timeout_s / 4))
            now = time.monotonic()
            for inbox, since in list(self._waiting.items()):
                if max(since, self._last_heard) + self.timeout_s <= now:
                    del self._waiting[inbox]
                    inbox.put_nowait(ServerTimeout(
                        f"no answer from the server at {self.address} for {self.timeout_s:g} s (is it running?)"))

    def _route(self, batch: list[bytes]) -> None:
        """Each message to its request's inbox, a request's first message before the rest: a first
        token that came with a decode step's burst would wait for every stream of the burst to run;
        the others' tokens wait the same either way. A request's own messages keep their order, and
        those read before an unreadable one still go in ahead of the failure."""
        later = []
        try:
            for data in batch:
                msg = incoming(data)
                inbox = self._inbox.get(msg.request_id)
                if inbox is None:  # an aborted or abandoned request: drop it
                    continue
                if inbox.heard:
                    later.append((inbox, msg))
                else:
                    inbox.heard = True
                    inbox.put_nowait(msg)
        finally:
            for inbox, msg in later:
                inbox.put_nowait(msg)

    async def _read_loop(self) -> None:
        try:
            while True:
                batch = [await self._sock.recv()]
                # Then what else has come, without a future each: a decode step sends one message per
                # running request at once, and a future per message was a third of its cost here.
                while len(batch) < MAX_BATCH and self._sock.get(zmq.EVENTS) & zmq.POLLIN:
                    batch.append(zmq.Socket.recv(self._sock, zmq.NOBLOCK))
                self._last_heard = time.monotonic()
                self._route(batch)
                # recv() of a waiting message completes without yielding: yield here, or a busy
                # socket starves the streams (and their timestamps) until it runs dry.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a broken connection or server: fail every waiting request
            self._failure = e if isinstance(e, ClientError) else ClientError(f"connection failed: {e}")
            for inbox in self._inbox.values():
                inbox.put_nowait(self._failure)
