"""The `semipd bench` command: one rate, or a sweep over rates and servers (sweep.py)."""

import argparse
import asyncio
import json
import os

import numpy as np

from semipd.cli.args import add_client_args
from semipd.cli.bench import backends, sweep
from semipd.cli.bench.load import check_load_args, run_load, workload_phases
from semipd.cli.bench.metrics import build_report, format_summary, summarize
from semipd.cli.bench.phases import SCHEDULES, SHAPES, SPEC_HELP, USAGE, is_phased
from semipd.shared.client import ClientError
from semipd.shared.errors import UserError, first_line


def cmd_bench(args) -> None:
    if sweep.wanted(args):
        return sweep.cmd_sweep(args)
    if args.rate is None and not is_phased(args.workload):
        raise UserError("give --rate, or --rates for a sweep, or --plot REPORT")
    check_load_args(args)
    if args.out:  # before the run, so that a bad path does not cost its results
        if os.path.isdir(args.out) or not os.path.basename(args.out):
            raise UserError(f"--out {args.out} is a folder; one rate writes its report to a file")
        try:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {args.out}: cannot create its folder ({first_line(e)})") from None
    try:
        run = asyncio.run(run_load(args, workload_phases(args, args.rate), np.random.default_rng(args.seed)))
    except ClientError as e:
        raise UserError(first_line(e)) from None
    summary = summarize(run.records, run.duration_s, args.ttft_slo, args.tpot_slo, run.phases)
    print(format_summary(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(build_report(run.config, run.records, summary), f)
        print(f"report: {args.out}")


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="load a running server with Poisson arrivals; report TTFT, TPOT, "
                                     "ITL, E2E, SLO attainment and goodput; sweep rates over modes",
                       description=USAGE + sweep.USAGE + backends.BACKEND_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_client_args(p)
    backends.add_args(p)
    p.add_argument("--rate", type=_positive, help="requests per second (inf: all at once); with phases, the "
                                                  "first phase's rate, the others scaled alike")
    p.add_argument("--num-requests", type=int, help="requests per run (per rate in a sweep)")
    p.add_argument("--workload", metavar="NAME|PHASES",
                   help=f"{', '.join([*SHAPES, *SCHEDULES])} or phases {SPEC_HELP} (above)")
    p.add_argument("--dataset", help="ShareGPT-format JSON file to take the lengths from")
    p.add_argument("--input-len-mean", type=_positive, help="mean prompt tokens (default: the workload's)")
    p.add_argument("--output-len-mean", type=_positive, help="mean output tokens (default: the workload's)")
    p.add_argument("--seed", type=int, default=0, help="seed for lengths, arrivals and sampling (prompt ids are fresh every run)")
    p.add_argument("--ttft-slo", type=_positive, help="TTFT objective in seconds")
    p.add_argument("--tpot-slo", type=_positive, help="TPOT objective in seconds")
    p.add_argument("--out", help="one rate: write the JSON report (config, per-request records, summary) "
                                 "to this file; a sweep or --plot: the folder for report.json and the plots")
    sweep.add_args(p)
    p.set_defaults(func=cmd_bench)
