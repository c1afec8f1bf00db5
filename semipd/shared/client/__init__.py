"""Client SDK for a running semipd controller, for threads (`Client`) and asyncio (`AsyncClient`).

A client holds one ZeroMQ DEALER socket for all its requests; the controller's answers carry the
request id, so they are sorted into one inbox per open request. A stream yields `Delta`s and keeps
the request's `Final` in `.final`; closing a stream before its Final arrives aborts the request.

Silence is the only failure a client can see from outside, so a stream that hears nothing from the
server (about any request) for `timeout_s` raises `ServerTimeout`: the engine is dead or stuck.
"""

from semipd.shared.client.async_client import AsyncClient, AsyncStream
from semipd.shared.client.common import (ClientError, Result, ServerError, ServerTimeout, ServerUnavailable,
                                         check_address)
from semipd.shared.client.thread_client import Client, Stream

__all__ = ["AsyncClient", "AsyncStream", "Client", "ClientError", "Result", "ServerError", "ServerTimeout",
           "ServerUnavailable", "Stream", "check_address"]
