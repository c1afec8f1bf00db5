"""The ROUTER socket every semipd server binds: the controller (for clients and for its workers)
and the content monitor (for controllers)."""

import os

import zmq

from semipd.shared.protocol import MAX_MESSAGE_BYTES

# Messages queued for one peer (some 6 s of a busy server's tokens to one client): past them a
# peer that stopped reading counts as gone. The SDK's clients always read (no receive bound).
MAX_UNREAD = 1 << 16


def bind_router(ctx: zmq.Context, address: str, max_bytes: int = MAX_MESSAGE_BYTES,
                max_unread: int = MAX_UNREAD) -> zmq.Socket:
    """A ROUTER on which a send with NOBLOCK raises for a vanished peer and for one with
    max_unread messages queued (0: no bound)."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, max_unread)
    sock.setsockopt(zmq.LINGER, 0)
    if address.startswith("ipc://"):
        os.makedirs(os.path.dirname(address[len("ipc://"):]), mode=0o700, exist_ok=True)
    sock.bind(address)
    return sock
