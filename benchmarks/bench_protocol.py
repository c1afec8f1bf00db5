"""The wire format's cost on the hot path: encode and decode of the messages that carry tokens,
beside raw msgpack on the same payload (the floor: what checking and building dataclasses add).

    python -m benchmarks.bench_protocol

Messages: a Delta (one token to one client), a DecodeStep of 300 sequences (one decode step),
and a HandedOver of 28 sequences of 1000 tokens (an SM switch's hand-over). CPU only.
"""

import time

import msgpack

from semipd.shared import protocol


def per_call_us(fn, seconds: float = 0.5) -> float:
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    params = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "max_tokens": 700, "stop": []}
    messages = {
        "Delta (1 token)": protocol.Delta("req-1", " word", [1234]),
        "DecodeStep (300 seqs)": protocol.DecodeStep(list(range(300)), list(range(1000, 1300)), [None] * 300),
        "HandedOver (28 x 1000 tokens)": protocol.HandedOver([
            protocol.SeqState(i, list(range(100_000, 101_000)), 300, params, 0, list(range(63)), 999)
            for i in range(28)]),
    }
    print(f"{'message':<30} {'bytes':>8} {'encode us':>10} {'msgpack':>8} {'decode us':>10} {'msgpack':>8}")
    for name, msg in messages.items():
        data = protocol.encode(msg)
        plain = msgpack.unpackb(data)
        print(f"{name:<30} {len(data):>8} {per_call_us(lambda: protocol.encode(msg)):>10.1f} "
              f"{per_call_us(lambda: msgpack.packb(plain)):>8.1f} {per_call_us(lambda: protocol.decode(data)):>10.1f} "
              f"{per_call_us(lambda: msgpack.unpackb(data)):>8.1f}")


if __name__ == "__main__":
    main()
