"""A sweep report as a table: per mode, a row per rate (and, for a phased workload, a row per
phase under it, so each phase's attainment can be compared across modes), then each mode's
highest rate at the attainment goal."""

from semipd.cli.bench.metrics import latency_cells, trend

ATTAINMENT_GOAL = 0.9


def max_rate_at_goal(runs: list[dict]) -> float | None:
    """The highest swept rate whose SLO attainment is at least ATTAINMENT_GOAL (None: none)."""
    met = [r["rate"] for r in runs if (r["summary"]["slo_attainment"] or 0) >= ATTAINMENT_GOAL]
    return max(met, default=None)


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _step(run: dict) -> str:
    """The token-producing worker's mean step: wall / GPU ms."""
    steps = run.get("steps") or {}
    d = steps.get("decode") or steps.get("unified")
    return "-" if d is None else "/".join("-" if d[k] is None else f"{d[k]:.1f}" for k in ("step_ms", "gpu_ms"))


def format_table(report: dict) -> str:
    head = ("rate req/s", "sent req/s", "done req/s", "failed", "mean E2E ms", "P90 TTFT ms", "P90 TPOT ms",
            "SLO met", "backlog", "step/GPU ms")
    lines = []
    if any(run["summary"].get("phases") for mode in report["modes"].values() for run in mode["runs"]):
        lines.append("rows 'N: IN/OUT' are the phases of the rate above them (mean input/output tokens); "
                     "that rate is the first phase's, the others' scaled alike")
    for name, mode in report["modes"].items():
        lines += [f"{name}:", "  " + "".join(f"{h:>13}" for h in head)]
        for run in mode["runs"]:
            s = run["summary"]
            # offered_rate is absent from reports made before it was
            cells = [f"{run['rate']:g}", _rate(s.get("offered_rate")), f"{s['request_throughput']:.2f}",
                     *latency_cells(s), trend(s.get("backlog_trend")), _step(run)]
            lines.append("  " + "".join(f"{c:>13}" for c in cells))
            for i, p in enumerate(s.get("phases") or [], 1):
                cells = [f"{i}: {p['input_len_mean']:g}/{p['output_len_mean']:g}", _rate(p["offered_rate"]), "-",
                         *latency_cells(p), trend(p["backlog_trend"]), "-"]
                lines.append("  " + "".join(f"{c:>13}" for c in cells))
    lines.append(f"highest rate with >= {ATTAINMENT_GOAL:.0%} SLO attainment:")
    for name, mode in report["modes"].items():
        best = max_rate_at_goal(mode["runs"])  # from the runs, so a report joined by hand is right too
        backlog = next((r["summary"].get("backlog_trend") for r in mode["runs"] if r["rate"] == best), None)
        lines.append(f"  {name}: " + ("none of the rates swept" if best is None else f"{best:g} req/s"
                                      + ("" if backlog is None else f" (backlog {trend(backlog)})")))
    return "\n".join(lines)
