"""What the thread and asyncio clients share: their errors, a request's Result, the connection
to the server, the frames they send and read, and a stream's bookkeeping."""

import os
import uuid
from dataclasses import dataclass

import zmq

from semipd.shared.protocol import (MAX_MESSAGE_BYTES, Delta, Final, GenerateRequest, ProtocolError, Reply,
                                    decode, encode)
from semipd.shared.runtime import ipc_listening

LINGER_MS = 1000     # how long close() waits to hand queued aborts to a live server
ADDRESS_FORMS = "ipc:///path/to/socket (ipc://@name: an abstract socket) or tcp://HOST:PORT"


class ClientError(Exception):
    pass


class ServerUnavailable(ClientError):
    """Nothing to connect to (an ipc:// socket nobody listens on, a malformed address)."""


def check_address(address: str) -> None:
    """ServerUnavailable unless address has the form of an endpoint semipd serves on: checked
    before anything connects, binds or loads, since ZeroMQ's own word is "Invalid argument"."""
    if address.startswith("ipc://"):
        valid = len(address) > len("ipc://")
    else:
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        valid = address.startswith("tcp://") and bool(host) and (port.isdigit() or port == "*")
    if not valid:
        raise ServerUnavailable(f"{address!r} is not an address: addresses look like {ADDRESS_FORMS}")


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


def connect(ctx, address: str):
    # ZeroMQ waits for an ipc:// server to appear, so a missing one would show only as a
    # ServerTimeout after timeout_s; check first and fail at once. Callers that wait for a
    # starting server retry (`semipd complete --wait`).
    check_address(address)
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


def generate_frame(prompt, prompt_ids, moderate, sampling, messages=None) -> tuple[str, bytes]:
    if [prompt, prompt_ids, messages].count(None) != 2:
        raise ValueError("give exactly one of prompt, prompt_ids and messages")
    request_id = uuid.uuid4().hex
    try:
        frame = encode(GenerateRequest(request_id, prompt, prompt_ids, dict(sampling), moderate, messages))
        decode(frame)  # the server's own check: a malformed request fails here, not as a timeout
    except UnicodeEncodeError as e:  # a lone surrogate: bytes that were not UTF-8, decoded leniently
        raise ClientError(f"the request's text is not valid Unicode: {e.object[e.start:e.end]!r} at "
                          f"character {e.start} of {e.object[:40]!r} (input that was not UTF-8?)") from None
    except ProtocolError as e:
        raise ClientError(f"invalid request: {e}") from None
    return request_id, frame


def incoming(data: bytes):
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


def reply_data(msg) -> dict:
    if not isinstance(msg, Reply):
        raise ServerError(f"expected a Reply, got {type(msg).__name__}")
    if not msg.ok:
        raise ServerError(msg.error or "request failed")
    return msg.data


class StreamState:
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
