"""The client SDK for threads, `Client`, and its request streams."""

import select
import threading
import time
import uuid
from collections import deque

import zmq

from semipd.shared.client.common import (ClientError, Result, ServerTimeout, StreamState, connect,
                                         generate_frame, incoming, reply_data)
from semipd.shared.protocol import AbortRequest, Delta, HealthRequest, PartitionRequest, StatsRequest, encode
from semipd.shared.runtime import default_server_address

WAIT_SLICE_S = 0.01  # re-check the socket at least this often (another thread may have read for us)


class Stream(StreamState):
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
            self._sock = connect(self._ctx, self.address)
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
        request_id, frame = generate_frame(prompt, prompt_ids, moderate, sampling)
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
            return reply_data(self._receive(request_id))
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
            msg = incoming(data)
            inbox = self._inbox.get(msg.request_id)
            if inbox is not None:  # else an aborted or abandoned request: drop it
                inbox.append(msg)
