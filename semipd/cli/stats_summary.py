"""`semipd stats` for a person: a few labelled lines from the server's stats object, numbers
rounded to what a reader compares (`--json` prints the object itself, every field)."""


def summary(stats: dict) -> list[str]:
    """The lines to print: model and uptime, mode and SM split, requests and tokens, the KV
    cache and its prefix cache, the workers, then switches, partitioner decisions and the monitor where there are any."""
    part, served = stats["partition"], stats["served"]
    used, total = stats["kv_pages_total"] - stats["kv_pages_free"], stats["kv_pages_total"]
    lines = [
        f"model:      {stats['model']}, up {duration(stats['uptime_s'])}",
        f"mode:       {mode(part)}",
        f"requests:   {stats['running']} running, {stats['waiting']} waiting, {served['requests']:,} ended "
        f"({served['prompt_tokens']:,} prompt and {served['output_tokens']:,} output tokens)",
        f"KV cache:   {used:,} of {total:,} pages used ({percent(used / total if total else 0)}), "
        f"{stats['page_size']} tokens a page; at most {stats['max_model_len']:,} tokens a request",
    ]
    cache = stats["prefix_cache"]
    if cache["enabled"]:
        lines.append(f"prefix:     {cache['cached_pages']:,} pages cached ({cache['held_pages']:,} in use), "
                     f"{percent(cache['hit_rate'])} of {cache['prompt_tokens']:,} prompt tokens from the cache, "
                     f"{cache['evicted_pages']:,} pages evicted")
    else:
        lines.append("prefix:     caching off (--no-prefix-cache)")
    for role, worker in stats["workers"].items():
        lines.append(f"{role + ':':<11} {worker_line(worker)}")
    lines.append(f"restarts:   {stats['worker_restarts']} worker restarts")
    if part["history"]:
        last = part["history"][-1]
        outcome = f"failed: {last['error']}" if last["error"] else "done"
        lines.append(f"switches:   {len(part['history'])}; last: {last['role']} {last['from_sm']}% -> "
                     f"{last['to_sm']}% ({last['reason']}), {outcome}")
    if part["decisions"]:
        last = part["decisions"][-1]
        lines.append(f"decisions:  {len(part['decisions'])}; last: {last['action']} -> prefill "
                     f"{last['next_prefill_sm']}% / decode {last['next_decode_sm']}% ({last['reason']})")
    if stats.get("scm"):
        scm = stats["scm"]
        lines.append(f"monitor:    {scm['address']} {scm['status']}; {scm['monitored']:,} monitored, "
                     f"{scm['flagged']:,} flagged, {scm['failures']:,} failures, {scm['watching']} watched now")
    return lines


def mode(part: dict) -> str:
    if part["mode"] == "unified":
        return "unified (one worker does prefill and decode)"
    split = f"semi-pd, SMs: prefill {part['prefill_sm']}% / decode {part['decode_sm']}%"
    notes = ["dynamic" if part["dynamic"] else "static"]
    if not part["mps"]:
        notes.append("recorded only: no MPS")
    if part["switching"]:
        notes.append(f"switching {', '.join(part['switching'])}")
    return f"{split} ({'; '.join(notes)})"


def worker_line(worker: dict) -> str:
    line = f"pid {worker['pid']}, {worker['state']}"
    steps = worker["steps"]
    if steps is not None:
        gpu = "" if steps["gpu_ms"] is None else f" (GPU {steps['gpu_ms']:.1f} ms)"
        line += (f"; {steps['steps_per_s']:.1f} steps/s of {steps['step_ms']:.1f} ms{gpu}, "
                 f"mean batch {steps['mean_batch']:.1f}, busy {percent(steps['busy'])}")
    if worker["standby"]:
        line += f"; standby pid {worker['standby']['pid']} {worker['standby']['state']}"
    if worker["primed"]:
        primed = worker["primed"]
        line += f"; pid {primed['pid']} {primed['state']} at {primed['sm_percent']}%"
    switch = worker["switch"]
    if switch:
        old = f", old pid {switch['old']['pid']} {switch['old']['state']}" if switch["old"] else ""
        line += f"; switching to {switch['to_sm']}% ({switch['phase']}{old})"
    return line


def duration(seconds: float) -> str:
    """3 s, 5 min 12 s, 2 h 03 min, 4 d 06 h."""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"
