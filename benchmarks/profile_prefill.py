"""Where a prefill step's time goes: torch.profiler over the runner's prefill of one prompt.

    python -m benchmarks.profile_prefill [--model llama3-8b] [--tokens 512,2048] [--trace DIR]

For each prompt length: the wall time of one step, the host's time to issue it, the number of
kernels it launches, and the operators that take the most host time and the most GPU time.
"""

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_engine import decode_and_prompts
from benchmarks.common import cuda_time_ms, host_time_ms
from semipd.shared.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--tokens", default="512,2048")
    ap.add_argument("--trace", default=None, help="write a Chrome trace per length into this folder")
    args = ap.parse_args()
    model = load_model(args.model, torch.device("cuda"), torch.bfloat16)
    for n in [int(t) for t in args.tokens.split(",")]:
        runner, _, [prompt] = decode_and_prompts(model, torch.bfloat16, 1, 16, n)
        step = lambda: runner.prefill_logits([(prompt, n)])  # noqa: E731
        gpu_ms, host_ms = cuda_time_ms(step, warmup=3, repeat=10), host_time_ms(step)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"\n== prefill of {n} tokens: {gpu_ms:.1f} ms per step, host issues it in {host_ms:.1f} ms, "
              f"{kernels} kernels", flush=True)
        print(events.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
        print(events.table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=60))
        if args.trace:
            os.makedirs(args.trace, exist_ok=True)
            prof.export_chrome_trace(os.path.join(args.trace, f"prefill-{n}.json"))


if __name__ == "__main__":
    main()
