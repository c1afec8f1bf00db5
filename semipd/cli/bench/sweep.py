"""`semipd bench` sweeps: load.py's run repeated over --rates (a phased workload's rates scaled
so its first phase runs at each) against one running server, several, or servers launched here
one mode at a time; then a JSON report, PNG plots (plots.py) and a table (table.py) with each
mode's highest rate at >= 90% SLO attainment. The table's backlog column
(metrics.backlog_trend) says which rates the server kept up with; a rate above ~1 was met only
for as long as the run lasted.

While a run goes, the server's stats are polled every POLL_S seconds for its SM split
(`partition.prefill_sm` / `decode_sm`; absent on servers that do not partition), so a dynamic
mode's split can be plotted over time, and for each worker's last step times (`workers.*.steps`:
wall and GPU ms per step, mean batch); its `partition` object (switch history included) is kept
as the mode ends.
"""

import argparse
import asyncio
import json
import math
import os
import shlex
import sys
import time

import numpy as np

from semipd.cli.bench import backends, plots
from semipd.cli.bench.launched import Launched
from semipd.cli.bench.load import check_load_args, run_load, workload_phases
from semipd.cli.bench.metrics import summarize
from semipd.cli.bench.phases import warmup
from semipd.cli.bench.table import format_table, max_rate_at_goal
from semipd.shared.client import AsyncClient, ClientError
from semipd.shared.errors import UserError, first_line

POLL_S = 0.5
WARMUP_REQUESTS = 32     # first requests compile kernels for new shapes: not measured

USAGE = """\
A sweep writes report.json, latency.png, attainment.png, split-MODE.png (modes that report an
SM split) and, for phased workloads, phases-RATE.png (per mode, each request's TTFT and the SM
split over the run's phases) to --out FOLDER (default bench-YYYYmmdd-HHMMSS), then prints a table
with a row per rate (and per phase under it):
  semipd bench --rates 2,4,8 --num-requests 200 --ttft-slo 0.3 --tpot-slo 0.05 [--address ADDR]
  semipd bench --rates ... --servers unified=ipc:///run/a.sock,static=tcp://127.0.0.1:5557
  semipd bench --rates ... --model M --launch NAME="SERVE FLAGS" [--launch ...]
    starts `semipd serve --model M --address ipc://... SERVE FLAGS` per mode in
    turn, waits until it is healthy, sweeps it and stops it (SIGTERM); its log is NAME.log. E.g.
      --launch unified="--mode unified"
      --launch static="--mode semi-pd --prefill-sm 50 --decode-sm 50"
      --launch dynamic="--mode semi-pd --dynamic --ttft-slo 0.3 --tpot-slo 0.05"
  semipd bench --plot REPORT.json [--out FOLDER]    plot a report again (default: its folder)
"""


def add_args(p) -> None:
    p.add_argument("--rates", type=rates_arg, help="sweep these request rates (comma-separated req/s)")
    p.add_argument("--servers", type=servers_arg, help="sweep these running servers: NAME=ADDR,NAME=ADDR "
                                                             "(with --backend openai: NAME=BASE_URL,...)")
    p.add_argument("--launch", action="append", type=launch_arg, default=[], metavar='NAME="FLAGS"',
                   help="start a server with these serve flags and sweep it (repeatable; needs --model)")
    p.add_argument("--model", help="the model --launch serves; with --backend openai, the model to ask for "
                                   "(default: the first that /v1/models lists)")
    p.add_argument("--plot", metavar="REPORT", help="plot a sweep's report.json again and print its table")


def rates_arg(text: str) -> list[float]:
    try:
        rates = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        rates = []
    if not rates or not all(0 < r < math.inf for r in rates):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive finite rates, got {text!r}")
    return sorted(set(rates))


def _named(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not (sep and name.strip() and value.strip()):
        raise argparse.ArgumentTypeError(f"expected NAME={what}, got {text!r}")
    return name.strip(), value.strip()


def servers_arg(text: str) -> list[tuple[str, str]]:
    return [_named(item, "ADDR") for item in text.split(",") if item.strip()]


def launch_arg(text: str) -> tuple[str, list[str]]:
    name, flags = _named(text, '"SERVE FLAGS"')
    return name, shlex.split(flags)


def wanted(args) -> bool:
    return bool(args.rates or args.servers or args.launch or args.plot)


async def _poll_split(address: str, started: float, rate: float, samples: list, done: asyncio.Event) -> None:
    """Every POLL_S: the server's split, if it reports one, with its workers' step times."""
    async with AsyncClient(address, timeout_s=10) as client:
        while not done.is_set():
            try:
                stats = await client.stats()
            except ClientError:
                return  # the run itself reports a dead server
            part, workers = stats.get("partition"), stats.get("workers")
            if isinstance(part, dict) and all(isinstance(part.get(k), (int, float))
                                              for k in ("prefill_sm", "decode_sm")):
                steps = {role: w.get("steps") for role, w in workers.items()} if isinstance(workers, dict) else None
                samples.append({"time_s": time.perf_counter() - started, "rate": rate,
                                "prefill_sm": part["prefill_sm"], "decode_sm": part["decode_sm"], "steps": steps})
            try:
                await asyncio.wait_for(done.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass


async def sweep_server(args, name: str, address: str) -> dict:
    """Every rate in turn against one server: per-rate summaries, the split over time, the goal rate.
    Each run also keeps every request's phase, send time and TTFT (the client's and the server's):
    a phased run's plot draws them, and a spike in any run can be traced to its requests."""
    args = argparse.Namespace(**backends.with_target(args, address))
    polled = args.backend == "semipd"  # the SM split is semipd's, and only its SDK reads the stats
    await run_load(args, warmup(workload_phases(args, max(args.rates)), WARMUP_REQUESTS),
                   np.random.default_rng(args.seed + 1), desc=f"{name} warm-up")
    started, started_unix, runs, samples = time.perf_counter(), time.time(), [], []
    for rate in args.rates:
        began = time.perf_counter() - started
        done = asyncio.Event()
        poller = asyncio.ensure_future(_poll_split(address, started, rate, samples, done)) if polled else None
        try:
            run = await run_load(args, workload_phases(args, rate), np.random.default_rng(args.seed),
                                 desc=f"{name} @ {rate:g} req/s")
        finally:
            done.set()
            if poller is not None:
                await poller
        summary = summarize(run.records, run.duration_s, args.ttft_slo, args.tpot_slo, run.phases)
        runs.append({"rate": rate, "summary": summary, "started_s": run.started - started,
                     "steps": step_means([x for x in samples if x["rate"] == rate], began)})
        runs[-1]["requests"] = [{"phase": r.phase, "send_s": r.send_s, "ttft_s": r.ttft_s,
                                 "server_ttft_s": r.server_ttft_s, "ok": r.ok} for r in run.records]
    partition = None
    if polled:
        async with AsyncClient(address) as client:
            partition = (await client.stats()).get("partition")
    return {"address": address, "runs": runs, "max_rate_at_goal": max_rate_at_goal(runs),
            "started_unix": started_unix, "split_samples": samples,
            "partition": partition if isinstance(partition, dict) else None}


def step_means(samples: list[dict], began_s: float) -> dict:
    """Per worker role, the means over one run of the step reports that arrived during it (a
    worker reports about once a second while busy): each report once, however often it was
    polled, none from before the run, and per-step figures weighted by each report's steps."""
    reports: dict[str, dict[tuple, dict]] = {}
    for sample in samples:
        for role, steps in (sample.get("steps") or {}).items():
            if steps and sample["time_s"] - steps["age_s"] >= began_s:
                reports.setdefault(role, {})[tuple(v for k, v in sorted(steps.items()) if k != "age_s")] = steps

    def mean(rs: list[dict], key: str, weighted: bool) -> float | None:
        rs = [r for r in rs if r[key] is not None]
        return float(np.average([r[key] for r in rs], weights=[r["steps_per_s"] if weighted else 1 for r in rs])) \
            if rs else None
    return {role: {"step_ms": mean(rs, "step_ms", True), "gpu_ms": mean(rs, "gpu_ms", True),
                   "mean_batch": mean(rs, "mean_batch", True), "busy": mean(rs, "busy", False)}
            for role, rs in ((role, list(by_key.values())) for role, by_key in reports.items())}


def _write_plots(report: dict, out: str, required: bool) -> None:
    try:
        paths = plots.plot_report(report, out)
    except ImportError:
        if required:
            raise UserError("plotting needs matplotlib: pip install 'matplotlib>=3.7'") from None
        print("semipd: no plots: matplotlib is not installed here; run `semipd bench --plot "
              f"{os.path.join(out, 'report.json')}` where it is", file=sys.stderr)
        return
    print("plots: " + ", ".join(paths))


def _replot(args) -> None:
    try:
        with open(args.plot) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{args.plot}: cannot read it as JSON ({first_line(e)})") from None
    if not isinstance(report, dict) or not isinstance(report.get("modes"), dict):
        raise UserError(f"{args.plot}: not a sweep report (no \"modes\")")
    _write_plots(report, args.out or os.path.dirname(os.path.abspath(args.plot)), required=True)
    print(format_table(report))


def _targets(args) -> list[tuple[str, str | list[str]]]:
    """(mode name, address to sweep or serve flags to launch with) in sweep order."""
    if args.servers and args.launch:
        raise UserError("give --servers or --launch, not both")
    targets = args.servers or args.launch or [("server", backends.target(args))]
    names = [name for name, _ in targets]
    if len(set(names)) < len(names):
        raise UserError(f"mode names must differ, got {', '.join(names)}")
    return targets


def cmd_sweep(args) -> None:
    if args.plot:
        return _replot(args)
    if not args.rates or args.rate is not None:
        raise UserError("a sweep needs --rates (and no --rate)")
    if args.ttft_slo is None and args.tpot_slo is None:
        raise UserError("a sweep needs --ttft-slo and/or --tpot-slo: it reports SLO attainment")
    check_load_args(args)
    targets = _targets(args)
    out = args.out or time.strftime("bench-%Y%m%d-%H%M%S")
    os.makedirs(out, exist_ok=True)
    config = {k: v for k, v in vars(args).items()
              if k not in ("func", "rate", "plot", "launch", "servers", "address", "base_url", "api_key")}
    report = {"config": config, "modes": {}}
    for name, target in targets:
        log = os.path.join(out, f"{name}.log")
        server = Launched(name, args.model, target, log) if args.launch else None
        try:
            if server:
                server.wait_ready()
            result = asyncio.run(sweep_server(args, name, server.address if server else target))
        except ClientError as e:
            raise UserError(f"{name}: {first_line(e)}") from None
        finally:
            if server:
                server.stop()
        report["modes"][name] = result | {"launch": shlex.join(target) if server else None}
        with open(os.path.join(out, "report.json"), "w") as f:  # after each mode: a failure keeps the rest
            json.dump(report, f, indent=1)
    print(f"report: {os.path.join(out, 'report.json')}")
    _write_plots(report, out, required=False)
    print(format_table(report))
