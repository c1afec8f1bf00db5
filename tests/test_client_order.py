"""The asyncio client hands a request's first message out before the rest of a burst it came
with: a decode step sends one message per running request at once, and a first token queued
behind them waited for every one of those streams to run. What it read before an unreadable
message still reaches its streams, ahead of the failure. A raw ROUTER plays the server, since
only a scripted peer can order messages so."""

import asyncio
import time

import zmq

from semipd.shared import protocol
from semipd.shared.client import AsyncClient, ClientError
from tests.short_folders import short_folder

BURST = 50


async def until(condition) -> None:
    """A deadline on each wait, so that a lost message fails the test rather than hangs it."""
    async def poll():
        while not condition():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), 30)


def scripted_server():
    address = f"ipc://{short_folder('semipd-order-')}/server.sock"
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    sock.bind(address)
    return address, sock


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
        await until(lambda: seen)  # the running request has been heard from
        # The burst, then the fresh request's first token, all in the socket before the client reads.
        for _ in range(BURST):
            sock.send_multipart([peer, protocol.encode(protocol.Delta(running_id, "a", [1]))])
        sock.send_multipart([peer, protocol.encode(protocol.Delta(fresh_id, "b", [2]))])
        time.sleep(0.3)  # blocking: the client's loop does not run meanwhile
        await until(lambda: len(seen) == BURST + 2)
        for task in tasks:
            task.cancel()
    return seen


def test_a_first_token_overtakes_the_burst_it_came_with():
    address, sock = scripted_server()
    try:
        seen = asyncio.run(order_seen(address, sock))
    finally:
        sock.close()
    assert seen == ["running", "fresh"] + ["running"] * BURST


async def before_garbage(address: str, sock: zmq.Socket) -> tuple[list[str], Exception]:
    async with AsyncClient(address) as client:
        stream = await client.generate(prompt_ids=[5], max_tokens=3)
        peer, data = sock.recv_multipart()
        request_id = protocol.decode(data).request_id
        for text in ("a", "b"):  # its first message, then one that waits for the rest of the batch
            sock.send_multipart([peer, protocol.encode(protocol.Delta(request_id, text, [1]))])
        sock.send_multipart([peer, b"not msgpack"])
        time.sleep(0.3)  # blocking: all three are read as one batch
        texts = []
        try:
            async for delta in stream:
                texts.append(delta.text)
        except ClientError as e:
            return texts, e
    raise AssertionError("the stream ended without the failure")


def test_what_came_before_an_unreadable_message_still_arrives():
    address, sock = scripted_server()
    try:
        texts, error = asyncio.run(asyncio.wait_for(before_garbage(address, sock), 30))
    finally:
        sock.close()
    assert texts == ["a", "b"] and "unreadable message" in str(error)
