"""The controller process's CPU time per generated token, for short and long outputs: what the
controller does per token (routing, detokenizing, streaming) should not grow with the length of
the output.

    python -m benchmarks.bench_controller_cpu [--lengths 64,2000] [--tokens 32000] [--streams 16]
                                              [--context TOKENS]

Starts `semipd serve --model tiny --device cpu` (random weights, the byte tokenizer) on a private
address. For each output length it keeps `--streams` requests in flight (ignore_eos) until about
`--tokens` tokens are generated, and reads the controller's CPU time (user + system, from /proc)
before and after: the server's own pid, not its workers', all its threads and its main thread
(the loop) alone. A longer context makes a step slower; `--context` pads each prompt so that
every length's sequences hold about that many tokens on average while they decode, so that the
lengths differ in their output alone. The server runs the semipd this script imports: to measure another checkout,
run this file by its path with PYTHONPATH pointing there (`-m` puts the current folder first).
"""

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

import semipd
from semipd.shared.client import AsyncClient, Client, ClientError

PROMPT = "Once upon a time"  # 16 byte tokens: with 2000 more, within the 2048 of `tiny`


def cpu_seconds(stat: str) -> float:
    """User + system CPU seconds from a /proc stat file."""
    with open(stat) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def controller_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of the controller process (all its threads) and of its main thread (the loop)."""
    return cpu_seconds(f"/proc/{pid}/stat"), cpu_seconds(f"/proc/{pid}/task/{pid}/stat")


def start_server(folder: str, *flags: str) -> tuple[subprocess.Popen, str]:
    """`semipd serve --model tiny --device cpu` with these flags, once it is healthy."""
    address = f"ipc://{folder}/front.sock"
    root = os.path.dirname(os.path.dirname(os.path.abspath(semipd.__file__)))  # `-m` imports from cwd
    proc = subprocess.Popen([sys.executable, "-m", "semipd", "serve", "--model", "tiny", "--device", "cpu",
                             "--address", address, *flags], cwd=root, env=dict(os.environ, XDG_RUNTIME_DIR=folder),
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited")
        try:
            with Client(address, timeout_s=10) as client:
                if client.health()["status"] == "ok":
                    return proc, address
        except ClientError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become ready")


async def load(address: str, length: int, requests: int, streams: int, context: int = 0) -> int:
    """Run the requests, at most `streams` at a time; the tokens generated. With a context, the
    prompt is that many token ids less half the output (at least 16)."""
    gate = asyncio.Semaphore(streams)
    prompt = {"prompt_ids": [3 + i % 250 for i in range(max(16, context - length // 2))]} if context else {"prompt": PROMPT}

    async def one(client) -> int:
        async with gate:
            stream = await client.generate(**prompt, max_tokens=length, ignore_eos=True, seed=1)
            return len((await stream.result()).token_ids)
    async with AsyncClient(address, timeout_s=600) as client:
        return sum(await asyncio.gather(*(one(client) for _ in range(requests))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="64,2000", help="output lengths, comma-separated")
    p.add_argument("--tokens", type=int, default=32000, help="tokens to generate per length")
    p.add_argument("--streams", type=int, default=16, help="requests in flight")
    p.add_argument("--context", type=int, default=0,
                   help="mean tokens a sequence holds while it decodes, the same for every length "
                        "(0: a 16-token prompt for all)")
    args = p.parse_args()
    print(f"semipd from {os.path.dirname(semipd.__file__)}")
    with tempfile.TemporaryDirectory(prefix="semipd-bench-") as folder:
        proc, address = start_server(folder)
        try:
            asyncio.run(load(address, 16, args.streams, args.streams))  # warm-up
            print(f"{'output tokens':>13} {'requests':>8} {'generated':>9} {'wall s':>7} "
                  f"{'controller CPU s':>16} {'CPU us/token':>12} {'loop thread us/token':>20}")
            for length in map(int, args.lengths.split(",")):
                requests = max(args.streams, args.tokens // length)
                (cpu, loop), wall = controller_cpu(proc.pid), time.monotonic()
                generated = asyncio.run(load(address, length, requests, args.streams, args.context))
                (cpu_end, loop_end), wall = controller_cpu(proc.pid), time.monotonic() - wall
                cpu, loop = cpu_end - cpu, loop_end - loop
                print(f"{length:>13} {requests:>8} {generated:>9} {wall:>7.1f} {cpu:>16.2f} "
                      f"{cpu / generated * 1e6:>12.1f} {loop / generated * 1e6:>20.1f}", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main()
