"""`semipd bench`: load a running server with Poisson arrivals and report latency percentiles.

Arrivals: exponential gaps with mean 1/--rate (a Gamma process with burstiness 1); --rate inf
sends every request at once. Every request sets ignore_eos and max_tokens to its planned output
length, so outputs are exactly as long as planned.

Lengths come from one of two sources, both clipped to [4, 2048] input and [4, 1024] output tokens:
- --dataset FILE in ShareGPT format: the input is a conversation's first human turn, the output
  its first gpt reply after it. The client has no tokenizer, so each length is len(text) / 4
  tokens, the usual four characters per token of English text under BPE vocabularies.
- otherwise an approximation of ShareGPT: independent lognormal input and output lengths, sigma
  1.0, with means 251 input tokens (ShareGPT as the semi-PD paper, arXiv 2504.19867, reports it)
  and 203 output tokens (vLLM's ShareGPT run in github.com/vllm-project/vllm/pull/18566 generated
  203,068 tokens for 1,000 requests). Not a fit: real ShareGPT lengths are more skewed and
  correlated. The lognormal's location is solved so the means hold after clipping.
Prompts are random token ids in [0, 256) of the planned length, not text, so that no tokenizer
changes their length: ids below 256 exist in every preset's byte vocabulary and in real ones.

Per request, at the client: TTFT (send to first token), E2E (send to Final), TPOT = (E2E - TTFT) /
(output tokens - 1) and ITL, every gap between successive tokens (a message carrying k tokens
splits its wait into k equal gaps). SLO attainment is the fraction of all requests, failed ones
counting as misses, with TTFT <= --ttft-slo and TPOT <= --tpot-slo; goodput is their rate.
Whether the server kept up with the rate, or only absorbed a burst as long as the run, shows in
the backlog trend (`backlog_trend`): a queue that grows for as long as requests arrive can leave
attainment high over a short run.

Sweeps over rates and serving modes, with plots, are in bench_sweep.py; they reuse run_load.
"""

import argparse
import asyncio
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from shared.client import AsyncClient, ClientError, ServerError
from shared.client_cli import add_address_arg
from shared.errors import UserError, first_line

INPUT_RANGE, OUTPUT_RANGE = (4, 2048), (4, 1024)
INPUT_MEAN, OUTPUT_MEAN, SIGMA = 251.0, 203.0, 1.0
CHARS_PER_TOKEN = 4


def arrival_times(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Send times in seconds from the start: the first at 0, then exponential gaps."""
    if math.isinf(rate):
        return np.zeros(n)
    return np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / rate, n - 1))])


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def clipped_lognormal_mean(mu: float, sigma: float, lo: float, hi: float) -> float:
    """E[min(max(X, lo), hi)] for ln X ~ Normal(mu, sigma)."""
    a, b = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
    inside = math.exp(mu + sigma ** 2 / 2) * (_phi(b - sigma) - _phi(a - sigma))
    return lo * _phi(a) + inside + hi * (1.0 - _phi(b))


def lognormal_lengths(mean: float, sigma: float, bounds: tuple[int, int], n: int,
                      rng: np.random.Generator) -> list[int]:
    lo, hi = bounds
    if not lo < mean < hi:
        raise UserError(f"a mean length must lie strictly between {lo} and {hi}, got {mean:g}")
    low, high = math.log(lo) - 10 * sigma, math.log(hi) + 10 * sigma
    for _ in range(100):  # the clipped mean grows with mu: bisect
        mu = (low + high) / 2
        low, high = (mu, high) if clipped_lognormal_mean(mu, sigma, lo, hi) < mean else (low, mu)
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), lo, hi).astype(int).tolist()


def _tokens(text: str, bounds: tuple[int, int]) -> int:
    return min(max(round(len(text) / CHARS_PER_TOKEN), bounds[0]), bounds[1])


def load_sharegpt(path: str) -> list[tuple[int, int]]:
    """(input, output) token estimates of every conversation with a human turn then a gpt reply."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({first_line(e)})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of conversations")
    pairs = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        turns = [t for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)] \
            if isinstance(turns, list) else []
        human = next((i for i, t in enumerate(turns) if t.get("from") == "human"), None)
        reply = next((t for t in turns[human + 1:] if t.get("from") == "gpt"), None) \
            if human is not None else None
        if reply is not None:
            pairs.append((_tokens(turns[human]["value"], INPUT_RANGE), _tokens(reply["value"], OUTPUT_RANGE)))
    if not pairs:
        raise UserError(f"{path}: no conversation has a human turn followed by a gpt reply")
    return pairs


def plan_lengths(n: int, rng: np.random.Generator, pool: list[tuple[int, int]] | None = None,
                 input_mean: float = INPUT_MEAN, output_mean: float = OUTPUT_MEAN,
                 max_model_len: int | None = None) -> list[tuple[int, int]]:
    """n (input, output) lengths: a dataset's pairs shuffled (repeated when n is larger), or
    lognormal draws; pairs longer than max_model_len in all are left out."""
    def fits(pair):
        return max_model_len is None or sum(pair) <= max_model_len
    if pool is not None:
        pool = [p for p in pool if fits(p)]
        if not pool:
            raise UserError(f"no conversation in the dataset fits max_model_len {max_model_len}")
        order = rng.permutation(len(pool))
        return [pool[order[i % len(pool)]] for i in range(n)]
    planned = []
    for _ in range(100):
        inputs = lognormal_lengths(input_mean, SIGMA, INPUT_RANGE, n, rng)
        outputs = lognormal_lengths(output_mean, SIGMA, OUTPUT_RANGE, n, rng)
        planned += [p for p in zip(inputs, outputs) if fits(p)]
        if len(planned) >= n:
            return planned[:n]
    raise UserError(f"too few sampled lengths fit max_model_len {max_model_len}")


@dataclass
class RequestRecord:
    index: int
    input_len: int
    output_len: int                  # planned: the request's max_tokens
    send_s: float                    # from the start of the run
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


def summarize(records: list[RequestRecord], duration_s: float, ttft_slo: float | None = None,
              tpot_slo: float | None = None) -> dict:
    done = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    summary = {
        "requests": len(records), "completed": len(done), "failed": len(records) - len(done),
        "duration_s": duration_s, "input_tokens": sum(r.input_len for r in done),
        "output_tokens": output_tokens,
        "offered_rate": offered_rate(records),
        "request_throughput": len(done) / duration_s,
        "output_token_throughput": output_tokens / duration_s,
        "ttft_s": distribution([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_s": distribution([r.tpot_s for r in done if r.tpot_s is not None]),
        "itl_s": distribution([gap for r in done for gap in r.itl_s]),
        "e2e_s": distribution([r.e2e_s for r in done]),
        "server_ttft_s": distribution([r.server_ttft_s for r in done if r.server_ttft_s is not None]),
        "server_tpot_s": distribution([r.server_tpot_s for r in done if r.server_tpot_s is not None]),
        "backlog_trend": backlog_trend(done),
        "ttft_slo_s": ttft_slo, "tpot_slo_s": tpot_slo, "slo_attainment": None, "goodput": None,
    }
    if records and (ttft_slo is not None or tpot_slo is not None):
        met = sum(meets_slo(r, ttft_slo, tpot_slo) for r in records)
        summary["slo_attainment"] = met / len(records)
        summary["goodput"] = met / duration_s
    return summary


def build_report(config: dict, records: list[RequestRecord], summary: dict) -> dict:
    return {"config": config, "summary": summary,
            "requests": [asdict(r) | {"tpot_s": r.tpot_s} for r in records]}


def trend(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_summary(s: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1e3:.1f}"
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
    return "\n".join(lines)


async def _measure(client: AsyncClient, index: int, prompt_ids: list[int], params: dict,
                   start: float) -> RequestRecord:
    sent = time.perf_counter()
    record = RequestRecord(index, len(prompt_ids), params["max_tokens"], sent - start)
    chunks = []
    try:
        async with await client.generate(prompt_ids=prompt_ids, **params) as stream:
            async for delta in stream:
                chunks.append((time.perf_counter() - sent, len(delta.token_ids)))
    except ServerError as e:
        if e.final is None:  # not a rejected request but a broken server: stop the run
            raise
        record.finish_reason, record.error = "error", str(e)
        return record
    record.e2e_s = time.perf_counter() - sent
    chunks.append((record.e2e_s, len(stream.final.token_ids)))
    record.ttft_s, record.itl_s = token_timing(chunks)
    record.output_tokens = sum(k for _, k in chunks)
    final = stream.final
    record.finish_reason, record.server_ttft_s = final.finish_reason, final.ttft_s
    record.server_tpot_s = sum(final.itl_s) / len(final.itl_s) if final.itl_s else None
    return record


async def run_load(args, rng: np.random.Generator,
                   desc: str = "requests") -> tuple[dict, list[RequestRecord], float]:
    """One run at args.rate against args.address: (config, per-request records, seconds)."""
    pool = load_sharegpt(args.dataset) if args.dataset else None
    async with AsyncClient(args.address) as client:
        status = (await client.health()).get("status", "ok")  # fails fast when nobody answers
        if status != "ok":
            raise UserError(f"the server is not ready yet (status {status!r}); try again shortly")
        # Plan only requests the server can take: its context length bounds prompt + output.
        max_len = (await client.stats()).get("max_model_len")
        if not isinstance(max_len, int):
            raise UserError("the server's stats do not report max_model_len")
        lengths = plan_lengths(args.num_requests, rng, pool, args.input_len_mean or INPUT_MEAN,
                               args.output_len_mean or OUTPUT_MEAN, max_len)
        requests = [(rng.integers(0, 256, n_in).tolist(),
                     {"max_tokens": n_out, "ignore_eos": True, "seed": int(rng.integers(2 ** 31))})
                    for n_in, n_out in lengths]
        arrivals = arrival_times(args.rate, args.num_requests, rng)
        bar = tqdm(total=len(requests), desc=desc, unit="req")
        start = time.perf_counter()

        async def one(i: int) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            record = await _measure(client, i, *requests[i], start)
            bar.update(1)
            return record

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(requests))]
        try:
            records = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()  # after a failure, the others' streams close and abort
            await asyncio.gather(*tasks, return_exceptions=True)
            bar.close()
        duration = time.perf_counter() - start
    config = {k: v for k, v in vars(args).items() if k != "func"} | {
        "rate": "inf" if math.isinf(args.rate) else args.rate, "max_model_len": max_len,
        "lengths": "dataset" if pool else f"lognormal sigma {SIGMA}", "chars_per_token": CHARS_PER_TOKEN}
    return config, records, duration


def check_load_args(args) -> None:
    if args.num_requests is None or args.num_requests < 1:
        raise UserError(f"--num-requests must be at least 1, got {args.num_requests}")
    if args.dataset and (args.input_len_mean or args.output_len_mean):
        raise UserError("--dataset sets the lengths: leave out --input-len-mean and --output-len-mean")


def cmd_bench(args) -> None:
    from shared import bench_sweep
    if bench_sweep.wanted(args):
        return bench_sweep.cmd_sweep(args)
    if args.rate is None:
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
        config, records, duration = asyncio.run(run_load(args, np.random.default_rng(args.seed)))
    except ClientError as e:
        raise UserError(first_line(e)) from None
    summary = summarize(records, duration, args.ttft_slo, args.tpot_slo)
    print(format_summary(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(build_report(config, records, summary), f)
        print(f"report: {args.out}")


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_parser(sub) -> None:
    from shared import bench_sweep
    p = sub.add_parser("bench", help="load a running server with Poisson arrivals; report TTFT, TPOT, "
                                     "ITL, E2E, SLO attainment and goodput; sweep rates over modes",
                       description=bench_sweep.USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_address_arg(p)
    p.add_argument("--rate", type=_positive, help="requests per second (inf: all at once)")
    p.add_argument("--num-requests", type=int, help="requests per run (per rate in a sweep)")
    p.add_argument("--dataset", help="ShareGPT-format JSON file to take the lengths from")
    p.add_argument("--input-len-mean", type=_positive, help=f"mean prompt tokens (default {INPUT_MEAN:g})")
    p.add_argument("--output-len-mean", type=_positive, help=f"mean output tokens (default {OUTPUT_MEAN:g})")
    p.add_argument("--seed", type=int, default=0, help="seed for lengths, arrivals and prompts")
    p.add_argument("--ttft-slo", type=_positive, help="TTFT objective in seconds")
    p.add_argument("--tpot-slo", type=_positive, help="TPOT objective in seconds")
    p.add_argument("--out", help="one rate: write the JSON report (config, per-request records, summary) "
                                 "to this file; a sweep or --plot: the folder for report.json and the plots")
    bench_sweep.add_args(p)
    p.set_defaults(func=cmd_bench)
