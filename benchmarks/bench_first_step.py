"""What a decode worker called up by a switch pays on its first steps, beside a warm step.

A fresh ModelRunner, warmed and with its CUDA graphs captured as a standby has it, is handed
batches of sequences with cached context, as a hand-over brings them, and runs them through the
decode worker's launch-ahead loop (semipd/shared/pipeline.py). Each batch size runs twice: first while
this process has never stepped that size, then once warm. Printed per run: the host's time in the
first launch; the time from the first launch until the first tokens are read, the part of a
switch's gap that the new worker's first step takes (less its messages); and the steady step, the
median launch-to-launch time once running, which is one step's GPU time where the GPU sets the
pace. A first-tokens time well above one steady step is first-use work in a fresh process; the
time Python's garbage collector took during those steps is printed beside it.

Usage: python -m benchmarks.bench_first_step [--model llama3-8b] [--batches 85,40,120]
(run it under an MPS quota to see a share: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=40 ...).
"""

import argparse
import gc
import time

import torch

from benchmarks.bench_engine import PAGE, fake_sequences
from semipd.shared.kv_cache import allocate_kv_pool, pages_for
from semipd.shared.loader import load_model
from semipd.shared.model_runner import ModelRunner
from semipd.shared.pipeline import StepPipeline

STEPS = 12
CONTEXT = 500  # tokens per sequence: 32 pages of 16, room for STEPS more


class GcClock:
    """Milliseconds Python's garbage collector has run since `reset` (through gc.callbacks)."""

    def __init__(self):
        self.ms, self._start = 0.0, 0.0
        gc.callbacks.append(self._tick)

    def _tick(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._start) * 1e3

    def reset(self) -> None:
        self.ms = 0.0


class KeepPages:
    """The benchmark's sequences never end, so no page goes back to a pool."""

    def free(self, pages: list[int]) -> None:
        pass

    release_later = free


def first_steps(runner: ModelRunner, batch: int, gc_clock: GcClock) -> dict:
    seqs = fake_sequences(batch, CONTEXT)
    pipeline = StepPipeline(runner, KeepPages(), lambda: seqs)
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else lambda: None
    sync()
    gc_clock.reset()
    began, launched, first_host, first_tokens = time.perf_counter(), [], None, None
    for _ in range(STEPS):
        start = time.perf_counter()
        read = pipeline.launch(seqs, runner.decode(seqs, pipeline.feed(seqs)))
        launched.append(time.perf_counter())
        first_host = first_host or launched[-1] - start
        if read and first_tokens is None:  # the first step's tokens, read by the second launch
            first_tokens = launched[-1] - began
    pipeline.drain()
    gaps = sorted(b - a for a, b in zip(launched[3:], launched[4:]))
    return {"batch": batch, "first_launch_host_ms": first_host * 1e3, "first_tokens_ms": first_tokens * 1e3,
            "steady_step_ms": gaps[len(gaps) // 2] * 1e3, "gc_ms": gc_clock.ms}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--batches", default="85,40,120", help="batch sizes, comma-separated (at most 128)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(args.model, device, dtype)
    k, v = allocate_kv_pool(model.cfg, max(batches) * pages_for(CONTEXT, PAGE), PAGE, dtype, device)
    model.bind_kv_cache(k.normal_(), v.normal_())  # random, never zeros
    runner = ModelRunner(model, PAGE, max_model_len=model.cfg.max_position, max_num_seqs=128)
    gc_clock = GcClock()
    print("| batch | run | first launch, host ms | first tokens read, ms | steady step ms | first tokens / step "
          "| GC ms in the steps |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for run in ("new size", "warm"):
        for batch in batches:
            r = first_steps(runner, batch, gc_clock)
            print(f"| {batch} | {run} | {r['first_launch_host_ms']:.2f} | {r['first_tokens_ms']:.2f} | "
                  f"{r['steady_step_ms']:.2f} | {r['first_tokens_ms'] / r['steady_step_ms']:.2f} | {r['gc_ms']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
