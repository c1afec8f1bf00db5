"""How `semipd serve` runs the two phases: unified (one worker does both, the baseline) or
semi-PD (a prefill and a decode worker with their own SM shares, fixed or moved by the
SLO-aware partitioner). Torch-free: the CLI parses these flags without loading the engine."""

from dataclasses import dataclass

from semipd.shared.errors import UserError

# The default split. MPS shares are caps: prefill's 60% leaves decode at least 40% of the SMs
# while both run, and decode may use them all while prefill is idle, as it often is. Decode,
# bound by memory bandwidth, gains more from the idle SMs than from a fixed larger share, so
# these overlapping caps serve faster than a disjoint split. Prefill keeps the larger guaranteed
# share because its SLO (TTFT) is the one a burst of arrivals breaks first: a lower cap was a
# little faster but left TTFT at its SLO under a heavier load. Figures: docs/benchmarks.md, "Why
# the default split is 60/100".
DEFAULT_PREFILL_SM, DEFAULT_DECODE_SM = 60, 100


@dataclass
class ServingMode:
    shares: dict[str, int]          # SM percent per worker role
    partition: object | None = None  # partitioner.PartitionConfig when --dynamic
    mps: bool = False               # whether the shares take effect (an MPS daemon serves us)
    switch_timeout_s: float = 120.0  # well over what preparing a cold standby takes (docs/benchmarks.md)

    @property
    def unified(self) -> bool:
        return "unified" in self.shares


def add_mode_args(p) -> None:
    g = p.add_argument_group("prefill/decode split")
    g.add_argument("--mode", choices=["semi-pd", "unified"], default="semi-pd",
                   help="semi-pd: separate prefill and decode workers (default); unified: one worker "
                        "batches both with chunked prefill (the vLLM/SGLang baseline)")
    g.add_argument("--prefill-sm", type=int, default=DEFAULT_PREFILL_SM, help="prefill's SM percent (MPS quota, a cap)")
    g.add_argument("--decode-sm", type=int, default=DEFAULT_DECODE_SM,
                   help="decode's SM percent (MPS quota, a cap: the two may add up to over 100)")
    g.add_argument("--dynamic", action="store_true",
                   help="move the split at run time to meet --ttft-slo and --tpot-slo")
    g.add_argument("--ttft-slo", type=float, default=None, help="seconds (with --dynamic)")
    g.add_argument("--tpot-slo", type=float, default=None, help="seconds (with --dynamic)")
    g.add_argument("--slo-percentile", type=float, default=90.0)
    g.add_argument("--window", type=int, default=50,
                   help="finished requests per partitioning decision, at the latest")
    g.add_argument("--decision-interval", type=float, default=2.0, metavar="SECONDS",
                   help="least time before a partitioning decision on a miss that requests in flight already show")
    g.add_argument("--sm-step", type=int, default=10, help="SM percent per partitioning step (a divisor of 100)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="most steps one decision moves a share (default: as many as the prediction says)")
    g.add_argument("--switch-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="stop a new worker not ready, or an old one not handed over, this long into a switch")
    g.add_argument("--start-mps", action="store_true",
                   help="start an MPS control daemon for this server (and stop it on exit)")


def mode_from_args(args) -> ServingMode:
    if not args.switch_timeout > 0:
        raise UserError(f"--switch-timeout must be positive, got {args.switch_timeout:g}")
    if args.mode == "unified":
        if args.dynamic:
            raise UserError("--dynamic needs --mode semi-pd")
        return ServingMode({"unified": 100})
    for name, share in (("--prefill-sm", args.prefill_sm), ("--decode-sm", args.decode_sm)):
        if not 1 <= share <= 100:
            raise UserError(f"{name} is a percentage in [1, 100], got {share}")
    shares = {"prefill": args.prefill_sm, "decode": args.decode_sm}
    if not args.dynamic:
        return ServingMode(shares, switch_timeout_s=args.switch_timeout)
    if args.ttft_slo is None or args.tpot_slo is None:
        raise UserError("--dynamic needs --ttft-slo and --tpot-slo")
    from semipd.services.controller.partition_config import PartitionConfig
    config = PartitionConfig(ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo, percentile=args.slo_percentile,
                             window=args.window, interval=args.decision_interval, step=args.sm_step,
                             max_steps=args.max_steps, min_share=args.sm_step)
    for name, share in shares.items():
        if share % config.step:
            raise UserError(f"with --dynamic the {name} share ({share}) must be a multiple of --sm-step ({config.step})")
    return ServingMode(shares, config, switch_timeout_s=args.switch_timeout)
