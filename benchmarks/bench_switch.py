"""Switching cost under load: against a running semi-PD server, keep a Poisson load going and move
the SM split back and forth; then report, from the server's switch history, the time to prepare a
standby and the pause each switch put in the decode token stream (goal: under 50 ms; the floor is
one decode step, which the sequences would have waited anyway: each switch record has the old
worker's mean step as it handed over).

    python -m benchmarks.bench_switch --address ADDR --switches 22 --rate 24 [--splits 50/50,50/40] [--json OUT]

The load is Poisson at --rate throughout: runs of --requests-per-run requests, each starting
when the previous one's arrivals end.
"""

import argparse
import asyncio
import json
import time

import numpy as np

from semipd.cli.bench.load import run_load
from semipd.cli.bench.metrics import distribution
from semipd.shared.client import AsyncClient

# By default the prefill share stays put after the first switch, so each later one moves decode
# alone: the decode token stream is what a switch can pause, and one standby to replace per
# switch keeps the run short.
DEFAULT_SPLITS = "50/50,50/40"


def splits_arg(text: str) -> list[tuple[int, int]]:
    try:
        splits = [tuple(int(x) for x in s.split("/")) for s in text.split(",")]
    except ValueError:
        splits = []
    if not splits or any(len(s) != 2 or not all(1 <= x <= 100 for x in s) for s in splits):
        raise argparse.ArgumentTypeError(f"expected PREFILL/DECODE shares in [1, 100], comma-separated, got {text!r}")
    return splits


async def switch_loop(address: str, switches: int, splits: list[tuple[int, int]], done: asyncio.Event,
                      json_path: str | None) -> None:
    """Go round the splits, each time once the previous switch is over and every role the next
    one moves has a standby up (the first switch finds none: it is cold). The history so far is
    saved before each switch, so a run cut short still leaves its figures."""
    async with AsyncClient(address) as client:
        for i in range(switches):
            target = dict(zip(("prefill", "decode"), splits[i % len(splits)]))
            while True:
                stats = await client.stats()
                moving = [r for r, share in target.items() if stats["partition"][f"{r}_sm"] != share]
                ready = all((stats["workers"][r]["standby"] or {}).get("ready") for r in moving)
                if not stats["partition"]["switching"] and (i == 0 or ready):
                    break
                await asyncio.sleep(0.1)
            save(json_path, stats["partition"])
            await client.partition(target["prefill"], target["decode"])
            print(f"switch {i + 1}/{switches} requested", flush=True)
            await asyncio.sleep(0.5)
    done.set()


async def main_async(args) -> dict:
    done = asyncio.Event()
    switcher = asyncio.ensure_future(switch_loop(args.address, args.switches, args.splits, done, args.json))
    runs = []
    while not done.is_set():  # until the last switch has been asked for, a run starts as the
        n = len(runs)          # previous one's arrivals end (not its responses): the load never pauses
        load = argparse.Namespace(address=args.address, rate=args.rate, num_requests=args.requests_per_run,
                                  dataset=None, input_len_mean=None, output_len_mean=None, seed=n)
        runs.append(asyncio.ensure_future(run_load(load, np.random.default_rng(n), desc=f"load run {n + 1}")))
        try:
            await asyncio.wait_for(done.wait(), args.requests_per_run / args.rate)
        except asyncio.TimeoutError:
            pass
    await switcher
    await asyncio.gather(*runs)
    async with AsyncClient(args.address) as client:
        while (stats := await client.stats())["partition"]["switching"]:
            await asyncio.sleep(0.1)
    return stats["partition"]


def summarize(history: list[dict]) -> dict:
    def dist(values):
        values = [v for v in values if v is not None]
        return {"n": len(values), **distribution(values), "max": max(values, default=None)}
    warm = [h for h in history if not h["cold_start"] and h["error"] is None]
    parts = [h.get("prepare_parts_s") or {} for h in warm]  # as the new workers report them
    return {"switches": len(history), "errors": sum(h["error"] is not None for h in history),
            "prepare_s": dist([h["prepare_s"] for h in warm]),
            **{f"prepare_{part}_s": dist([p.get(part) for p in parts]) for part in sorted(set().union(*parts))},
            "handover_s": dist([h["handover_s"] for h in warm]),
            "decode_gap_s": dist([h["gap_s"] for h in warm if h["role"] == "decode"]),
            **{f"decode_gap_{part}_s": dist([h["gap_parts_s"][part] for h in warm
                                             if h["role"] == "decode" and h["gap_s"] is not None])
               for part in ("hand_over", "first_step")},
            "decode_step_before_s": dist([h.get("old_step_s") for h in warm if h["role"] == "decode"]),
            "prefill_gap_s": dist([h["gap_s"] for h in warm if h["role"] == "prefill"])}


def save(json_path: str | None, partition: dict) -> dict:
    summary = summarize(partition["history"])
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"summary": summary, "partition": partition}, f, indent=1)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", required=True)
    ap.add_argument("--switches", type=int, default=22, help="split changes to ask for")
    ap.add_argument("--rate", type=float, default=24.0, help="load, requests per second")
    ap.add_argument("--requests-per-run", type=int, default=100)
    ap.add_argument("--splits", type=splits_arg, default=splits_arg(DEFAULT_SPLITS),
                    help=f"PREFILL/DECODE SM shares to go round, comma-separated (default {DEFAULT_SPLITS})")
    ap.add_argument("--json", help="write the history and summary here")
    args = ap.parse_args()
    started = time.monotonic()
    partition = asyncio.run(main_async(args))
    summary = save(args.json, partition)
    print(f"\n{summary['switches']} role switches in {time.monotonic() - started:.0f} s, "
          f"{summary['errors']} failed (MPS: {partition['mps']})")
    print("| measure (warm standby) | n | p50 ms | p99 ms | max ms | goal / floor |\n|---|---:|---:|---:|---:|---|")
    for key, goal in (("decode_gap_s", "< 50 ms; floor: one decode step (below)"),
                      ("decode_gap_hand_over_s", "old worker's last output -> new worker has it all"),
                      ("decode_gap_first_step_s", "new worker's first step; floor: one decode step"),
                      ("decode_step_before_s", "the floor: old worker's mean step as it handed over"),
                      ("prefill_gap_s", "none (no stream pauses)"), ("prepare_s", "none"),
                      *[(k, "part of preparing") for k in summary if k.startswith("prepare_") and k != "prepare_s"],
                      ("handover_s", "one step")):
        d = summary[key]
        cells = [f"{d[k] * 1e3:.1f}" if d.get(k) is not None else "-" for k in ("p50", "p99", "max")]
        print(f"| {key} | {d['n']} | " + " | ".join(cells) + f" | {goal} |")


if __name__ == "__main__":
    main()
