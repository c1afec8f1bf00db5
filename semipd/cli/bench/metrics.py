"""Per-request records and what a run reports from them: latency distributions, SLO attainment,
goodput and the backlog trend."""

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    index: int
    input_len: int
    output_len: int                  # planned: the request's max_tokens
    send_s: float                    # from the start of the run
    phase: int = 0                   # index into the run's phases
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    server_ttft_s: float | None = None  # the server's own clock (arrival to first token sent)
    server_tpot_s: float | None = None  # and mean gap between its tokens: what the client adds shows

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason in ("stop", "length")

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def token_timing(chunks: list[tuple[float, int]]) -> tuple[float | None, list[float]]:
    """TTFT and inter-token gaps from (arrival time, token count) of a request's messages."""
    chunks = [(t, k) for t, k in chunks if k > 0]
    if not chunks:
        return None, []
    itl = [0.0] * (chunks[0][1] - 1)  # tokens that came with the first one
    for (before, _), (t, k) in zip(chunks, chunks[1:]):
        itl += [(t - before) / k] * k
    return chunks[0][0], itl


def distribution(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), **{f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}}


def backlog_trend(records: list[RequestRecord]) -> float | None:
    """Mean number of requests in the server (sent, not yet ended) over the last quarter of the
    arrivals, over that mean in their second quarter: about 1 where the server keeps up with the
    rate (Little's law: rate x E2E), near 2 where a queue grows for as long as requests arrive.
    The server fills up over about one E2E latency (the first arrivals'), so this reads true
    once the arrivals last four or more of them; None when they do not (or are too few)."""
    spans = [(r.send_s, r.send_s + r.e2e_s) for r in records if r.e2e_s is not None]
    if len(spans) < 8:
        return None
    sends = np.array([a for a, _ in spans])
    ends = np.array([b for _, b in spans])
    window = sends.max() - sends.min()
    first = sends <= sends.min() + window / 4
    if window < 4 * np.median(ends[first] - sends[first]):
        return None
    def in_flight(q0: float, q1: float) -> float:  # sampled on a fine grid over that span of arrivals
        ts = sends.min() + window * np.linspace(q0, q1, 100)
        return float(((sends[None, :] <= ts[:, None]) & (ts[:, None] < ends[None, :])).sum(1).mean())
    second = in_flight(0.25, 0.5)
    return in_flight(0.75, 1.0) / second if second else None


def offered_rate(records: list[RequestRecord]) -> float | None:
    """Requests per second as actually sent (the schedule's draw and any lateness), which the
    nominal rate only approximates; None for a burst (all sent within a millisecond each)."""
    sends = [r.send_s for r in records]
    span = max(sends) - min(sends) if sends else 0.0
    return (len(sends) - 1) / span if span > 1e-3 * (len(sends) - 1) else None


def meets_slo(r: RequestRecord, ttft_slo: float | None, tpot_slo: float | None) -> bool:
    return r.ok and (ttft_slo is None or (r.ttft_s is not None and r.ttft_s <= ttft_slo)) \
        and (tpot_slo is None or r.tpot_s is None or r.tpot_s <= tpot_slo)


def request_figures(records: list[RequestRecord], ttft_slo: float | None = None,
                    tpot_slo: float | None = None) -> dict:
    """What a set of requests shows on its own, without the run's duration: counts, the rate they
    were sent at, latency distributions, the backlog trend and SLO attainment."""
    done = [r for r in records if r.ok]
    figures = {
        "requests": len(records), "completed": len(done), "failed": len(records) - len(done),
        "offered_rate": offered_rate(records),
        "ttft_s": distribution([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_s": distribution([r.tpot_s for r in done if r.tpot_s is not None]),
        "itl_s": distribution([gap for r in done for gap in r.itl_s]),
        "e2e_s": distribution([r.e2e_s for r in done]),
        "server_ttft_s": distribution([r.server_ttft_s for r in done if r.server_ttft_s is not None]),
        "server_tpot_s": distribution([r.server_tpot_s for r in done if r.server_tpot_s is not None]),
        "backlog_trend": backlog_trend(done), "slo_attainment": None,
    }
    if records and (ttft_slo is not None or tpot_slo is not None):
        figures["slo_attainment"] = sum(meets_slo(r, ttft_slo, tpot_slo) for r in records) / len(records)
    return figures


def summarize(records: list[RequestRecord], duration_s: float, ttft_slo: float | None = None,
              tpot_slo: float | None = None, phases: list[dict] | None = None) -> dict:
    """The run's figures; with more than one phase (phases.plan's), each phase's under "phases"."""
    done = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    summary = request_figures(records, ttft_slo, tpot_slo) | {
        "duration_s": duration_s, "input_tokens": sum(r.input_len for r in done),
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_token_throughput": output_tokens / duration_s,
        "ttft_slo_s": ttft_slo, "tpot_slo_s": tpot_slo, "goodput": None,
    }
    if summary["slo_attainment"] is not None:
        summary["goodput"] = summary["slo_attainment"] * len(records) / duration_s
    if phases and len(phases) > 1:
        summary["phases"] = [phase | request_figures([r for r in records if r.phase == i], ttft_slo, tpot_slo)
                             for i, phase in enumerate(phases)]
    return summary


def build_report(config: dict, records: list[RequestRecord], summary: dict) -> dict:
    return {"config": config, "summary": summary,
            "requests": [asdict(r) | {"tpot_s": r.tpot_s} for r in records]}


def trend(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def latency_cells(f: dict) -> list[str]:
    """Failed, mean E2E, P90 TTFT, P90 TPOT and SLO attainment of request_figures: the columns that
    a run's phase table and a sweep's table share."""
    attained = f["slo_attainment"]
    return [str(f["failed"]), ms(f["e2e_s"]["mean"]), ms(f["ttft_s"]["p90"]), ms(f["tpot_s"]["p90"]),
            "-" if attained is None else f"{attained:.1%}"]


def format_phases(phases: list[dict]) -> list[str]:
    head = ("sent req/s", "done", "failed", "mean E2E ms", "P90 TTFT ms", "P90 TPOT ms", "SLO met", "backlog")
    lines = [f"{'phase':<20}" + "".join(f"{h:>12}" for h in head)]
    for i, p in enumerate(phases, 1):
        sent = "-" if p["offered_rate"] is None else f"{p['offered_rate']:.2f}"
        cells = [sent, str(p["completed"]), *latency_cells(p), trend(p["backlog_trend"])]
        label = f"{i}: {p['spec']}"
        lines.append(f"{label:<20}" + "".join(f"{c:>12}" for c in cells))
    return lines


def format_summary(s: dict) -> str:
    offered = s.get("offered_rate")
    lines = [f"requests: {s['completed']} completed, {s['failed']} failed in {s['duration_s']:.2f} s"
             + ("" if offered is None else f", sent at {offered:.2f} req/s"),
             f"throughput: {s['request_throughput']:.2f} req/s, {s['output_token_throughput']:.1f} output tok/s",
             f"backlog trend: {trend(s.get('backlog_trend'))} (requests in the server, last quarter of the "
             f"arrivals over the second; ~1: kept up)",
             f"{'(ms)':<6}" + "".join(f"{h:>10}" for h in ("mean", "p50", "p90", "p99"))]
    for name in ("ttft", "tpot", "itl", "e2e"):
        d = s[f"{name}_s"]
        lines.append(f"{name.upper():<6}" + "".join(f"{ms(d[k]):>10}" for k in ("mean", "p50", "p90", "p99")))
    if s["slo_attainment"] is not None:
        slos = [f"{n} <= {ms(s[f'{n.lower()}_slo_s'])} ms" for n in ("TTFT", "TPOT") if s[f"{n.lower()}_slo_s"]]
        lines.append(f"SLO attainment ({', '.join(slos)}): {s['slo_attainment']:.1%}, "
                     f"goodput {s['goodput']:.2f} req/s")
    if s.get("phases"):
        lines += format_phases(s["phases"])
    return "\n".join(lines)
