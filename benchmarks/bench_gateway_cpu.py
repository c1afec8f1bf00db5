"""What the HTTP gateway adds on the CPU: its hop on an idle server, and its CPU time per
streamed token under load, beside what the bench's own clients spend on each path.

    python -m benchmarks.bench_gateway_cpu [--requests 200] [--tokens 200] [--streams 16]

Starts `semipd serve --model tiny --device cpu --http 127.0.0.1:PORT` (bench_controller_cpu's
server). Idle: 50 requests one at a time (2 tokens each, the first 10 left out), the time to the
first message through the ZeroMQ SDK and to the first server-sent event through the gateway, at
the median. Load: `--requests` streamed completions of `--tokens` tokens (ignore_eos), at most
`--streams` at a time, sent through `semipd bench`'s two backends in turn: over HTTP, with the
gateway process's CPU time (user + system, from /proc) and this client's over them; then through
the SDK, with this client's; and each path's P50 TTFT under load (with the server's own, which
the SDK's Final tells). A first token that comes with a decode step's burst waits behind the
others' in each process it passes, so both CPU figures weigh on TTFT under load; on a machine
of few cores the gateway's CPU is also taken from the server's.
"""

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import time

import aiohttp

from benchmarks.bench_controller_cpu import cpu_seconds, start_server
from semipd.cli.bench.backends import SemipdBackend
from semipd.cli.bench.openai_backend import OpenAIBackend
from semipd.shared.client import AsyncClient

PROMPT = list(range(3, 43))  # 40 token ids


def gateway_pid(server_pid: int) -> int:
    """The server's `semipd api` child."""
    with open(f"/proc/{server_pid}/task/{server_pid}/children") as f:
        for pid in map(int, f.read().split()):
            with open(f"/proc/{pid}/cmdline", "rb") as cmd:
                if b"api" in cmd.read().split(b"\0"):
                    return pid
    raise SystemExit("no gateway process under the server")


async def first_message_ms(address: str, http: aiohttp.ClientSession, base_url: str) -> tuple[float, float]:
    sdk, api = [], []
    async with AsyncClient(address) as client:
        for _ in range(50):
            began = time.perf_counter()
            async with await client.generate(prompt_ids=PROMPT, max_tokens=2, ignore_eos=True) as stream:
                await anext(stream)
            sdk.append(time.perf_counter() - began)
    body = {"prompt": PROMPT, "max_tokens": 2, "ignore_eos": True, "stream": True}
    for _ in range(50):
        began = time.perf_counter()
        async with http.post(base_url + "/completions", json=body) as response:
            async for line in response.content:
                if line.startswith(b"data:"):
                    break
        api.append(time.perf_counter() - began)
    return 1e3 * statistics.median(sdk[10:]), 1e3 * statistics.median(api[10:])


async def stream_load(send, requests: int, tokens: int, streams: int) -> str:
    """The median time to the first message (and the server's own TTFT where the backend tells
    it): each request starts while the others stream, so its first token meets their bursts."""
    gate = asyncio.Semaphore(streams)

    async def one() -> tuple[float, float]:
        async with gate:
            began = time.perf_counter()
            answer = await send(PROMPT, {"max_tokens": tokens, "ignore_eos": True})
            return answer.chunks[0][0] - began, answer.server_ttft_s
    firsts, servers = zip(*await asyncio.gather(*(one() for _ in range(requests))))
    server = f" (the server's {1e3 * statistics.median(servers):.2f})" if None not in servers else ""
    return f"P50 TTFT {1e3 * statistics.median(firsts):.2f} ms{server}"


async def measure(address: str, port: int, server_pid: int, args) -> None:
    base_url = f"http://127.0.0.1:{port}/v1"
    async with aiohttp.ClientSession() as http:
        for _ in range(300):  # the gateway starts once the server is ready
            try:
                async with http.get(f"http://127.0.0.1:{port}/health") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        for _ in range(args.streams):  # warm-up
            async with http.post(base_url + "/completions", json={"prompt": PROMPT, "max_tokens": 16}) as response:
                await response.read()
        sdk_ms, api_ms = await first_message_ms(address, http, base_url)
    print(f"idle, first message: SDK {sdk_ms:.2f} ms, through the gateway {api_ms:.2f} ms "
          f"(+{api_ms - sdk_ms:.2f} ms)")
    stat, generated = f"/proc/{gateway_pid(server_pid)}/stat", args.requests * args.tokens
    async with OpenAIBackend(base_url, None, None) as api, SemipdBackend(address, 600) as sdk:
        await api.max_model_len()
        for name, backend in (("HTTP", api), ("SDK", sdk)):
            await stream_load(backend.send, args.streams, 16, args.streams)  # warm-up
            gateway, client, wall = cpu_seconds(stat), time.process_time(), time.monotonic()
            ttft = await stream_load(backend.send, args.requests, args.tokens, args.streams)
            gateway, client = cpu_seconds(stat) - gateway, time.process_time() - client
            through = f", gateway {gateway / generated * 1e6:.1f} us/token" if name == "HTTP" else ""
            print(f"load through {name}: {generated} tokens in {time.monotonic() - wall:.1f} s, "
                  f"bench client {client / generated * 1e6:.1f} us/token{through}; {ttft}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200, help="streamed completions under load")
    p.add_argument("--tokens", type=int, default=200, help="tokens per completion")
    p.add_argument("--streams", type=int, default=16, help="completions in flight")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="semipd-bench-") as folder:
        proc, address = start_server(folder, "--http", f"127.0.0.1:{port}")
        try:
            asyncio.run(measure(address, port, proc.pid, args))
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
