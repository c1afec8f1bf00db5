"""PNG plots of a `semipd bench` sweep report. matplotlib is imported only here, when plotting, so
client commands start fast and a machine without it can still run sweeps (plot elsewhere)."""

import os
import re

import numpy as np


def _ms(summary: dict, metric: str, stat: str) -> float:
    v = summary[metric][stat]
    return np.nan if v is None else v * 1e3


def plot_report(report: dict, out_dir: str) -> list[str]:
    """latency.png (P90 TTFT, P90 TPOT, mean E2E against rate per mode, with the SLOs),
    attainment.png (SLO attainment against rate, with the 90% goal), split-MODE.png (the SM split
    over time) for every mode that reported one and, for a phased workload, phases-RATE.png (see
    _plot_phases). Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    os.makedirs(out_dir, exist_ok=True)
    modes, config = report["modes"], report.get("config", {})
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("ttft_s", "p90", "P90 TTFT (ms)", config.get("ttft_slo")),
              ("tpot_s", "p90", "P90 TPOT (ms)", config.get("tpot_slo")),
              ("e2e_s", "mean", "mean E2E latency (ms)", None)]
    for ax, (metric, stat, label, slo) in zip(axes, panels):
        for name, mode in modes.items():
            rates = [run["rate"] for run in mode["runs"]]
            ax.plot(rates, [_ms(run["summary"], metric, stat) for run in mode["runs"]], "o-", label=name)
        if slo:
            ax.axhline(slo * 1e3, color="gray", linestyle="--", label=f"SLO {slo * 1e3:g} ms")
        ax.set(xlabel="request rate (req/s)", ylabel=label, yscale="log")  # saturation explodes latency
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, alpha=0.3)
        ax.legend()
    paths.append(_save(fig, out_dir, "latency.png"))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, mode in modes.items():
        attained = [run["summary"]["slo_attainment"] for run in mode["runs"]]
        ax.plot([run["rate"] for run in mode["runs"]], [np.nan if a is None else 100 * a for a in attained],
                "o-", label=name)
    ax.axhline(90, color="gray", linestyle="--", label="90% goal")
    ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment (%)", ylim=(0, 105))
    ax.grid(True, alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out_dir, "attainment.png"))

    for name, mode in modes.items():
        if mode.get("split_samples"):
            paths.append(_plot_split(plt, name, mode, out_dir))
    phased: dict[float, list[tuple[str, dict, dict]]] = {}
    for name, mode in modes.items():
        for run in mode["runs"]:
            if run["summary"].get("phases") and run.get("requests"):
                phased.setdefault(run["rate"], []).append((name, mode, run))
    for rate, rows in phased.items():
        paths.append(_plot_phases(plt, rate, rows, config.get("ttft_slo"), out_dir))
    return paths


def _plot_phases(plt, rate: float, rows: list[tuple[str, dict, dict]], ttft_slo: float | None,
                 out_dir: str) -> str:
    """One run per mode at one rate: each request's TTFT against its send time above the SM split
    over the same seconds, both over the phases (shaded, with their means and rates), so a reader
    sees whether the split followed the shift and what the requests of each phase met."""
    fig, axes = plt.subplots(2 * len(rows), 1, sharex=True, squeeze=False, figsize=(11, 4.5 * len(rows)),
                             gridspec_kw={"height_ratios": [3, 2] * len(rows)})
    for (name, mode, run), ttft_ax, split_ax in zip(rows, axes[0::2, 0], axes[1::2, 0]):
        phases = run["summary"]["phases"]
        for ax in (ttft_ax, split_ax):
            for i, p in enumerate(phases):
                ax.axvspan(p["start_s"], p["end_s"], color="gray", alpha=0.06 if i % 2 else 0.16, linewidth=0)
            ax.grid(True, alpha=0.3)
        for p in phases:
            ttft_ax.text((p["start_s"] + p["end_s"]) / 2, 0.93, f"{p['input_len_mean']:g}/{p['output_len_mean']:g} "
                         f"tokens in/out, {p['rate']:g} req/s", transform=ttft_ax.get_xaxis_transform(), ha="center",
                         va="top", fontsize=8, bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
        done = [r for r in run["requests"] if r["ok"] and r["ttft_s"] is not None]
        ttft_ax.scatter([r["send_s"] for r in done], [r["ttft_s"] * 1e3 for r in done], s=6, label="TTFT")
        failed = [r["send_s"] for r in run["requests"] if not r["ok"]]
        if failed:  # drawn at the top edge: they have no TTFT to place them by
            ttft_ax.scatter(failed, [1.0] * len(failed), marker="x", color="red", clip_on=False,
                            transform=ttft_ax.get_xaxis_transform(), label="failed")
        if ttft_slo:
            ttft_ax.axhline(ttft_slo * 1e3, color="gray", linestyle="--", label=f"SLO {ttft_slo * 1e3:g} ms")
        ttft_ax.set(ylabel="TTFT (ms)", yscale="log", title=f"{name} at {rate:g} req/s")
        ttft_ax.legend(loc="lower right", fontsize=8)
        samples = [s for s in mode.get("split_samples") or [] if s["rate"] == rate]
        times = [s["time_s"] - run["started_s"] for s in samples]
        for key, label, style in (("prefill_sm", "prefill SM %", "-"), ("decode_sm", "decode SM %", "--")):
            split_ax.step(times, [s[key] for s in samples], style, where="post", label=label)
        if samples:
            split_ax.legend(loc="lower right", fontsize=8)
        else:
            split_ax.text(0.5, 0.5, "no SM split reported", transform=split_ax.transAxes, ha="center")
        split_ax.set(ylabel="SM %", ylim=(0, 110))
    end = max(max(p["end_s"], run["summary"]["duration_s"]) for _, _, run in rows for p in run["summary"]["phases"])
    axes[-1, 0].set(xlabel="time since the run began (s)", xlim=(0, end))
    return _save(fig, out_dir, f"phases-{rate:g}.png")


def _plot_split(plt, name: str, mode: dict, out_dir: str) -> str:
    """Prefill and decode SM % against time, each rate's stretch shaded and labelled, the server's
    recorded switches dotted."""
    samples = mode["split_samples"]
    times = [s["time_s"] for s in samples]
    fig, ax = plt.subplots(figsize=(10, 4))
    for key, label, style in (("prefill_sm", "prefill SM %", "-"), ("decode_sm", "decode SM %", "--")):
        ax.step(times, [s[key] for s in samples], style, where="post", label=label)
    for i, rate in enumerate(dict.fromkeys(s["rate"] for s in samples)):
        stretch = [t for t, s in zip(times, samples) if s["rate"] == rate]
        ax.axvspan(min(stretch), max(stretch), color="gray", alpha=0.08 if i % 2 else 0.16)
        ax.text((min(stretch) + max(stretch)) / 2, 102, f"{rate:g} req/s", ha="center", fontsize=8)
    history = (mode.get("partition") or {}).get("history")
    for h in history if isinstance(history, list) else []:  # the server's own switch log, this sweep's part
        if isinstance(h, dict) and isinstance(h.get("time"), (int, float)) and h["time"] >= mode["started_unix"]:
            ax.axvline(h["time"] - mode["started_unix"], color="black", linestyle=":", linewidth=0.8)
    ax.set(xlabel="time since the sweep began (s)", ylabel="SM %", ylim=(0, 110), title=f"{name}: SM split")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, out_dir, f"split-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png")


def _save(fig, out_dir: str, filename: str) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    path = os.path.join(out_dir, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
