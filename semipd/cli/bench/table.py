"""A sweep report as a table: per mode, a row per rate, then each mode's highest rate at the
attainment goal."""

from semipd.cli.bench.metrics import trend

ATTAINMENT_GOAL = 0.9


def max_rate_at_goal(runs: list[dict]) -> float | None:
    """The highest swept rate whose SLO attainment is at least ATTAINMENT_GOAL (None: none)."""
    met = [r["rate"] for r in runs if (r["summary"]["slo_attainment"] or 0) >= ATTAINMENT_GOAL]
    return max(met, default=None)


def format_table(report: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1e3:.1f}"
    def step(run):  # the token-producing worker's mean step: wall / GPU ms
        steps = run.get("steps") or {}
        d = steps.get("decode") or steps.get("unified")
        return "-" if d is None else "/".join("-" if d[k] is None else f"{d[k]:.1f}" for k in ("step_ms", "gpu_ms"))
    head = ("rate req/s", "sent req/s", "done req/s", "failed", "mean E2E ms", "P90 TTFT ms", "P90 TPOT ms",
            "SLO met", "backlog", "step/GPU ms")
    lines = []
    for name, mode in report["modes"].items():
        lines += [f"{name}:", "  " + "".join(f"{h:>13}" for h in head)]
        for run in mode["runs"]:
            s = run["summary"]
            sent = s.get("offered_rate")  # absent from reports made before it was
            cells = (f"{run['rate']:g}", "-" if sent is None else f"{sent:.2f}", f"{s['request_throughput']:.2f}",
                     str(s["failed"]), ms(s["e2e_s"]["mean"]),
                     ms(s["ttft_s"]["p90"]), ms(s["tpot_s"]["p90"]), f"{s['slo_attainment']:.1%}",
                     trend(s.get("backlog_trend")), step(run))
            lines.append("  " + "".join(f"{c:>13}" for c in cells))
    lines.append(f"highest rate with >= {ATTAINMENT_GOAL:.0%} SLO attainment:")
    for name, mode in report["modes"].items():
        best = max_rate_at_goal(mode["runs"])  # from the runs, so a report joined by hand is right too
        backlog = next((r["summary"].get("backlog_trend") for r in mode["runs"] if r["rate"] == best), None)
        lines.append(f"  {name}: " + ("none of the rates swept" if best is None else f"{best:g} req/s"
                                      + ("" if backlog is None else f" (backlog {trend(backlog)})")))
    return "\n".join(lines)
