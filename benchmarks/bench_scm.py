"""Streaming content monitor: scoring time per new response token as responses grow.

    python -m benchmarks.bench_scm [--model scm-qwen2.5-0.5b] [--device auto] [--streams 1,32]
        [--lengths 64,256,1024,4096] [--prompt-len 64] [--json out.json]
    python -m benchmarks.bench_scm --model scm-tiny --device cpu      # a quick CPU run

B streams are opened with random prompts (token ids, as when both sides share a tokenizer). At
each response length L every stream is brought to L tokens (one untimed catch-up step), then
STEPS steps each add one token to every stream and are timed whole (host work and the sync that
reads the scores included): ms/step, and ms/token = ms/step / B. Flat ms/token across L is the
point of the KV cache. Beside it, "one pass": scoring the whole text of one stream from scratch,
what a monitor without a cache pays per new token. On a GPU the floor of a step is the bytes it
must read (the backbone's layer weights once, plus every stream's cached K/V) / the measured
copy bandwidth.
"""

import argparse
import json
import time

import torch

from semipd.services.scm.model import load_monitor
from semipd.services.scm.monitor import StreamMonitor
from semipd.shared.engine_config import EngineConfig
from semipd.shared.kv_cache import page_bytes, pages_for

PAGE = 16
STEPS = 8


def step_ms(sm: StreamMonitor, keys: list, uptos: dict, rng: torch.Generator) -> float:
    """Add one random token to each stream and time the step that scores them."""
    for key in keys:
        uptos[key] += 1
        sm.append(key, uptos[key], "", [int(torch.randint(0, 256, (1,), generator=rng))], last=False)
    start = time.perf_counter()
    sm.step()
    return (time.perf_counter() - start) * 1e3


def catch_up(sm: StreamMonitor, keys: list, uptos: dict, length: int, rng: torch.Generator) -> None:
    for key in keys:
        n = length - uptos[key]
        if n > 0:
            uptos[key] = length
            sm.append(key, length, "", torch.randint(0, 256, (n,), generator=rng).tolist(), last=False)
    while sm.has_work():
        sm.step()


def one_pass_ms(sm: StreamMonitor, prompt_len: int, length: int, rng: torch.Generator) -> float:
    key = ("one-pass",)
    sm.open(key, None, torch.randint(0, 256, (prompt_len,), generator=rng).tolist())
    sm.append(key, length, "", torch.randint(0, 256, (length,), generator=rng).tolist(), last=True)
    start = time.perf_counter()
    while sm.has_work():
        sm.step()
    return (time.perf_counter() - start) * 1e3


def weight_bytes(monitor) -> int:
    """The backbone's layer weights and final norm (the embedding is read only at the token ids)."""
    return sum(p.numel() * p.element_size() for name, p in monitor.backbone.named_parameters()
               if not name.startswith(("embed_tokens", "lm_head")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="scm-qwen2.5-0.5b")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--streams", default="1,32", help="comma-separated stream counts")
    ap.add_argument("--lengths", default="64,256,1024,4096", help="comma-separated response lengths")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype)
    device = config.torch_device()
    dtype = config.torch_dtype(device)
    streams = [int(x) for x in args.streams.split(",")]
    lengths = sorted(int(x) for x in args.lengths.split(","))
    monitor = load_monitor(args.model, device, dtype)
    max_len = args.prompt_len + lengths[-1] + STEPS + 16  # 16: room for the separator's tokens
    copy_tbps = None
    if device.type == "cuda":
        from benchmarks.common import measure_ceilings
        copy_tbps = measure_ceilings()["copy_tbps"]
    per_token_kv = page_bytes(monitor.cfg, PAGE, dtype) / PAGE
    print(f"{args.model} on {device} ({dtype}); {STEPS} timed steps per row")
    print(f"{'streams':>7} {'length':>7} {'ms/step':>9} {'ms/token':>9} {'one pass':>9} {'floor ms':>9} {'ratio':>6}")
    rows = []
    for b in streams:
        sm = StreamMonitor(monitor, threshold=2.0, k=1, max_streams=b + 1, page_size=PAGE, max_model_len=max_len,
                           num_pages=(b + 1) * pages_for(max_len, PAGE), max_batched_tokens=max(8192, max_len))
        rng = torch.Generator().manual_seed(0)
        keys = [("bench", i) for i in range(b)]
        uptos = dict.fromkeys(keys, 0)
        for key in keys:
            sm.open(key, None, torch.randint(0, 256, (args.prompt_len,), generator=rng).tolist())
        for length in lengths:
            catch_up(sm, keys, uptos, length, rng)
            step = sorted(step_ms(sm, keys, uptos, rng) for _ in range(STEPS))[STEPS // 2]
            one = one_pass_ms(sm, args.prompt_len, length, rng)
            floor = None
            if copy_tbps:
                read = weight_bytes(monitor) + b * (args.prompt_len + length) * per_token_kv
                floor = read / copy_tbps / 1e9
            rows.append({"streams": b, "length": length, "ms_per_step": step, "ms_per_token": step / b,
                         "one_pass_ms": one, "floor_ms": floor})
            print(f"{b:>7} {length:>7} {step:>9.3f} {step / b:>9.4f} {one:>9.2f} "
                  f"{'-' if floor is None else f'{floor:.3f}':>9} {'-' if floor is None else f'{step / floor:.1f}':>6}")
        first, last = rows[-len(lengths)], rows[-1]
        print(f"  {b} streams: ms/token at length {lengths[-1]} is {last['ms_per_token'] / first['ms_per_token']:.2f}x "
              f"that at {lengths[0]}; one pass grows {last['one_pass_ms'] / first['one_pass_ms']:.1f}x")
        sm.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "device": str(device), "dtype": str(dtype), "rows": rows}, f)


if __name__ == "__main__":
    main()
