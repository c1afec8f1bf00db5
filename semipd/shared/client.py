"""Client SDK for a running semipd controller, for threads (`Client`) and asyncio (`AsyncClient`).

A client holds one ZeroMQ DEALER socket for all its requests; the controller's answers carry the
request id, so they are sorted into one inbox per open request. A stream yields `Delta`s and keeps
the request's `Final` in `.final`; closing a stream before its Final arrives aborts the request.

Silence is the only failure a client can see from outside, so a stream that hears nothing from the
server (about any request) for `timeout_s` raises `ServerTimeout`: the engine is dead or stuck.
"""

import asyncio
import os
import select
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

import zmq
import zmq.asyncio

from semipd.shared.protocol import (MAX_MESSAGE_BYTES, AbortRequest, Delta, Final, GenerateRequest,
                                    HealthRequest, PartitionRequest, ProtocolError, Reply, StatsRequest, decode,
                                    encode)
from semipd.shared.runtime import default_server_address, ipc_listening

LINGER_MS = 1000     # how long close() waits to hand queued aborts to a live server
WAIT_SLICE_S = 0.01  # re-check the socket at least this often (another thread may have read for us)


class ClientError(Exception):
    pass


class ServerUnavailable(ClientError):
    """Nothing to connect to (an ipc:// socket nobody listens on, a malformed address)."""


class ServerTimeout(ClientError):
    """The server said nothing for timeout_s while a request waited: treat the engine as dead."""


class ServerError(ClientError):
    """The server refused or failed a request; `final` is the request's Final when there is one."""

    def __init__(self, message: str, final: Final | None = None):
        super().__init__(message)
        self.final = final


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    final: Final


def _connect(ctx, address: str):
    # ZeroMQ waits for an ipc:// server to appear, so a missing one would show only as a
    # ServerTimeout after timeout_s; check first and fail at once. Callers that wait for a
    # starting server retry (`semipd complete --wait`).
    if address.startswith("ipc://"):
        path = address.removeprefix("ipc://")
        if not path.startswith("@") and not os.path.exists(path):
            raise ServerUnavailable(f"no server at {address} (no such socket file)")
        if not ipc_listening(address):
            raise ServerUnavailable(f"no server at {address} (nothing listens on that socket; "
                                    "a killed server leaves its file behind)")
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    # No high-water marks: sends never block (a burst of requests, or aborts on close), and the
    # I/O thread keeps pulling answers off the wire however slowly the caller reads them.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    try:
        sock.connect(address)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        raise ServerUnavailable(f"cannot connect to {address!r}: {e}") from None
    return sock


def _generate_frame(prompt, prompt_ids, moderate, sampling) -> tuple[str, bytes]:
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("give exactly one of prompt and prompt_ids")
    request_id = uuid.uuid4().hex
    frame = encode(GenerateRequest(request_id, prompt, prompt_ids, dict(sampling), moderate))
    decode(frame)  # the server's own check: a malformed request fails here, not as a timeout
    return request_id, frame


def _incoming(data: bytes):
    """A message for this client, or ServerError for anything that cannot be routed."""
    try:
        msg = decode(data)
    except ProtocolError as e:
        raise ServerError(f"unreadable message from the server: {e}") from None
    if not isinstance(msg, (Delta, Final, Reply)):
        raise ServerError(f"unexpected {type(msg).__name__} message from the server")
    if isinstance(msg, Reply) and msg.request_id == "":
        raise ServerError(f"the server could not read a request: {msg.error}")
    return msg


def _reply_data(msg) -> dict:
    if not isinstance(msg, Reply):
        raise ServerError(f"expected a Reply, got {type(msg).__name__}")
    if not msg.ok:
        raise ServerError(msg.error or "request failed")
    return msg.data


class _StreamState:
    """What sync and async streams share: the request's output so far and how it ended."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.final: Final | None = None
        self._done = False  # True once nothing more will arrive (finished, failed or aborted)
        self._text: list[str] = []
        self._ids: list[int] = []

    def _take(self, msg) -> Delta | None:
        """The Delta to hand out, or None when msg ended the stream (raising if it failed)."""
        if isinstance(msg, Delta):
            self._text.append(msg.text)
            self._ids.extend(msg.token_ids)
            return msg
        self._done = True
        if isinstance(msg, Final):
            self.final = msg
            self._text.append(msg.text)
            self._ids.extend(msg.token_ids)
            if msg.finish_reason == "error":
                raise ServerError(msg.error or "request failed", msg)
            return None
        if isinstance(msg, Reply) and not msg.ok:
            raise ServerError(msg.error or "request failed")
        raise ServerError(f"unexpected {type(msg).__name__} in the stream of {self.request_id}")

    def _result(self) -> Result:
        if self.final is None:
            raise ClientError(f"stream {self.request_id} was closed before it finished")
        return Result("".join(self._text), self._ids, self.final.finish_reason, self.final)


class Stream(_StreamState):
    def __init__(self, client: "Client", request_id: str):
        super().__init__(request_id)
        self._client = client

    def __iter__(self):
        return self

    def __next__(self) -> Delta:
        if self._done:
            raise StopIteration
        msg = self._client._receive(self.request_id)
        if not isinstance(msg, Delta):
            self._client._forget(self.request_id)
        delta = self._take(msg)
        if delta is None:
            raise StopIteration
        return delta

    def result(self) -> Result:
        for _ in self:
            pass
        return self._result()

    def close(self) -> None:
        """Abort the request unless it has already ended."""
        if not self._done:
            self._done = True
            self._client._abort(self.request_id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Client:
    """Thread-safe: streams in any thread read the shared socket and park others' messages."""

    def __init__(self, address: str | None = None, timeout_s: float = 60.0):
        self.address = address or default_server_address()
        self.timeout_s = timeout_s
        self._ctx = zmq.Context()
        try:
            self._sock = _connect(self._ctx, self.address)
        except BaseException:
            self._ctx.term()
            raise
        self._fd = self._sock.getsockopt(zmq.FD)  # readable when the socket may have news
        self._lock = threading.Lock()             # zmq sockets are not thread-safe
        self._inbox: dict[str, deque] = {}
        self._last_heard = time.monotonic()
        self._closed = False

    def generate(self, prompt: str | None = None, prompt_ids: list[int] | None = None,
                 moderate: bool = False, **sampling) -> Stream:
        """Start a request; `sampling` holds SamplingParams fields (max_tokens=..., ...)."""
        request_id, frame = _generate_frame(prompt, prompt_ids, moderate, sampling)
        self._send(request_id, frame)
        return Stream(self, request_id)

    def health(self) -> dict:
        return self._call(HealthRequest)

    def stats(self) -> dict:
        return self._call(StatsRequest)

    def partition(self, prefill_sm: int, decode_sm: int) -> dict:
        """Ask for a new SM split; returns the partition state once the switch has started."""
        return self._call(PartitionRequest, prefill_sm=prefill_sm, decode_sm=decode_sm)

    def close(self) -> None:
        """Abort every open request, then close the socket (queued aborts get LINGER_MS)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for request_id in self._inbox:
                self._sock.send(encode(AbortRequest(request_id)))
            self._inbox.clear()
            self._sock.close()
        self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, cls, **fields) -> dict:
        request_id = uuid.uuid4().hex
        self._send(request_id, encode(cls(request_id, **fields)))
        try:
            return _reply_data(self._receive(request_id))
        finally:
            self._forget(request_id)

    def _send(self, request_id: str, frame: bytes) -> None:
        with self._lock:
            if self._closed:
                raise ClientError("the client is closed")
            self._inbox[request_id] = deque()  # before sending, so no answer finds no inbox
            self._sock.send(frame)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._inbox.pop(request_id, None)

    def _abort(self, request_id: str) -> None:
        with self._lock:
            if not self._closed and self._inbox.pop(request_id, None) is not None:
                self._sock.send(encode(AbortRequest(request_id)))

    def _receive(self, request_id: str):
        """The next message for request_id, reading the socket for everyone until it comes."""
        waiting_since = time.monotonic()
        while True:
            with self._lock:
                if self._closed:
                    raise ClientError("the client is closed")
                self._drain()
                inbox = self._inbox.get(request_id)
                if inbox is None:
                    raise ClientError(f"request {request_id} was closed")
                if inbox:
                    return inbox.popleft()
            if time.monotonic() - max(waiting_since, self._last_heard) > self.timeout_s:
                raise ServerTimeout(f"no answer from the server at {self.address} for "
                                    f"{self.timeout_s:g} s (is it running?)")
            # Wait outside the lock so other threads can send; the slice bounds the delay when
            # another thread's socket call consumed the wake-up meant for this one.
            select.select([self._fd], [], [], WAIT_SLICE_S)

    def _drain(self) -> None:
        """Read every waiting message into its request's inbox (caller holds the lock)."""
        while True:
            try:
                data = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            msg = _incoming(data)
            inbox = self._inbox.get(msg.request_id)
            if inbox is not None:  # else an aborted or abandoned request: drop it
                inbox.append(msg)


class AsyncStream(_StreamState):
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
            self._sock = _connect(self._ctx, self.address)
        except BaseException:
            self._ctx.term()
            raise
        self._inbox: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self._failure: ClientError | None = None  # why the reader stopped, for later requests
        self._last_heard = time.monotonic()
        self._closed = False

    async def generate(self, prompt: str | None = None, prompt_ids: list[int] | None = None,
                       moderate: bool = False, **sampling) -> AsyncStream:
        """Start a request; `sampling` holds SamplingParams fields (max_tokens=..., ...)."""
        request_id, frame = _generate_frame(prompt, prompt_ids, moderate, sampling)
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
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
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
            return _reply_data(await self._receive(request_id))
        finally:
            self._inbox.pop(request_id, None)

    async def _send(self, request_id: str, frame: bytes) -> None:
        if self._closed:
            raise ClientError("the client is closed")
        if self._failure is not None:
            raise self._failure
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        self._inbox[request_id] = asyncio.Queue()
        try:
            await self._sock.send(frame)
        except BaseException:
            self._inbox.pop(request_id, None)
            raise

    async def _abort(self, request_id: str) -> None:
        if not self._closed and self._inbox.pop(request_id, None) is not None:
            await self._sock.send(encode(AbortRequest(request_id)))

    async def _receive(self, request_id: str):
        inbox = self._inbox.get(request_id)
        if inbox is None:
            raise ClientError(f"request {request_id} was closed")
        waiting_since = time.monotonic()
        while True:
            if not inbox.empty():
                msg = inbox.get_nowait()
                break
            left = max(waiting_since, self._last_heard) + self.timeout_s - time.monotonic()
            if left <= 0:
                raise ServerTimeout(f"no answer from the server at {self.address} for "
                                    f"{self.timeout_s:g} s (is it running?)")
            try:  # a timed-out get leaves its item queued, so nothing is lost
                msg = await asyncio.wait_for(inbox.get(), left)
                break
            except asyncio.TimeoutError:
                pass  # the deadline moved if the server spoke to other requests meanwhile
        if isinstance(msg, ClientError):
            raise msg
        return msg

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._sock.recv()
                self._last_heard = time.monotonic()
                msg = _incoming(data)
                inbox = self._inbox.get(msg.request_id)
                if inbox is not None:  # else an aborted or abandoned request: drop it
                    inbox.put_nowait(msg)
                # recv() of a waiting message completes without yielding: yield here, or a busy
                # socket starves the streams (and their timestamps) until it runs dry.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a broken connection or server: fail every waiting request
            self._failure = e if isinstance(e, ClientError) else ClientError(f"connection failed: {e}")
            for inbox in self._inbox.values():
                inbox.put_nowait(self._failure)

