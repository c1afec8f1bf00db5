"""The asyncio client hands a request's first message out before the rest of a burst it came
with: a decode step sends one message per running request at once, and a first token queued
behind them waited for every one of those streams to run. A raw ROUTER plays the server, since
only a scripted peer can place a first token at the end of a burst."""

import asyncio
import time

import zmq

from semipd.shared import protocol
from semipd.shared.client import AsyncClient
from tests.scm_moderation import socket_address

BURST = 50


async def order_seen(address: str, sock: zmq.Socket) -> list[str]:
    seen = []

    async def consume(name: str, stream) -> None:
        async for _ in stream:
            seen.append(name)

    async with AsyncClient(address) as client:
        running = await client.generate(prompt_ids=[5], max_tokens=BURST + 1)
        fresh = await client.generate(prompt_ids=[6], max_tokens=1)
        (peer, first), (_, second) = sock.recv_multipart(), sock.recv_multipart()
        running_id, fresh_id = protocol.decode(first).request_id, protocol.decode(second).request_id
        sock.send_multipart([peer, protocol.encode(protocol.Delta(running_id, "a", [1]))])
        tasks = [asyncio.create_task(consume("running", running)), asyncio.create_task(consume("fresh", fresh))]
        while not seen:  # the running request has been heard from
            await asyncio.sleep(0.01)
        # The burst, then the fresh request's first token, all in the socket before the client reads.
        for _ in range(BURST):
            sock.send_multipart([peer, protocol.encode(protocol.Delta(running_id, "a", [1]))])
        sock.send_multipart([peer, protocol.encode(protocol.Delta(fresh_id, "b", [2]))])
        time.sleep(0.3)  # blocking: the client's loop does not run meanwhile
        while len(seen) < BURST + 2:
            await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
    return seen


def test_a_first_token_overtakes_the_burst_it_came_with():
    address = socket_address()
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    try:
        seen = asyncio.run(order_seen(address, sock))
    finally:
        sock.close()
    assert seen == ["running", "fresh"] + ["running"] * BURST
