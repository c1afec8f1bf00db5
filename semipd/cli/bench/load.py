"""One run: send the planned requests of a workload's phases at their arrival times and record each one."""

import asyncio
import math
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from semipd.cli.bench import phases as workloads
from semipd.cli.bench.backends import Refused, SemipdBackend, check_args as check_backend_args
from semipd.cli.bench.metrics import RequestRecord, token_timing
from semipd.cli.bench.prompts import make_prompts, next_turn
from semipd.cli.bench.workload import CHARS_PER_TOKEN, SIGMA, load_sharegpt
from semipd.shared.errors import UserError


@dataclass
class LoadRun:
    """One run's outcome: what was asked, each request's record and the phases as they were sent."""
    config: dict
    records: list[RequestRecord]
    duration_s: float
    phases: list[dict]      # each phase's spec, rate, means and span in the run (phases.plan)
    started: float          # time.perf_counter() at the run's time 0, which every send_s counts from


async def _measure(backend, index: int, phase: int, prompt_ids: list[int], params: dict,
                   start: float) -> tuple[RequestRecord, list[int] | None]:
    """The request's record and its answer's token ids (None: the backend streams text; none
    for a refused request)."""
    sent = time.perf_counter()
    record = RequestRecord(index, len(prompt_ids), params["max_tokens"], sent - start, phase)
    try:
        answer = await backend.send(prompt_ids, params)
    except Refused as e:
        record.finish_reason, record.error = "error", str(e)
        return record, []
    record.e2e_s = answer.ended - sent
    record.ttft_s, record.itl_s = token_timing([(t - sent, k) for t, k in answer.chunks])
    record.output_tokens, record.finish_reason = answer.output_tokens, answer.finish_reason
    record.server_ttft_s, record.server_tpot_s = answer.server_ttft_s, answer.server_tpot_s
    return record, answer.token_ids


async def run_load(args, phases: list[workloads.Phase], rng: np.random.Generator,
                   desc: str = "requests") -> LoadRun:
    """One run of the phases against args' server (backends.target)."""
    pool = load_sharegpt(args.dataset) if args.dataset else None
    async with open_backend(args) as backend:
        # Plan only requests the server can take: its context length bounds prompt + output.
        max_len = await backend.max_model_len()
        planned, sent = workloads.plan(phases, rng, max_len, pool)
        # Fresh ids every run, whatever the seed: a server's prefix cache must not find the prompts
        # of an earlier run (a sweep's rates send the same lengths, arrivals and sharing, from rng).
        prompts, after = make_prompts(planned, phases, rng, np.random.default_rng(), max_len)
        requests = [(p.phase, ids, {"max_tokens": p.output_len, "ignore_eos": True, "seed": int(rng.integers(2 ** 31))})
                    for p, ids in zip(planned, prompts)]
        bar = tqdm(total=len(requests), desc=desc, unit="req")
        start = time.perf_counter()

        sent_ids, answers = {}, {}  # what each request sent, and its answer's ids

        async def one(i: int) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + planned[i].send_s - time.perf_counter()))
            phase, ids, params = requests[i]
            j = after[i]
            if j is not None:  # a conversation's next turn follows the answer before it
                await tasks[j]
                ids = next_turn(ids, prompts[j], sent_ids[j], planned[j].output_len, answers[j])
            sent_ids[i] = ids
            record, answers[i] = await _measure(backend, i, phase, ids, params, start)
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
    rate = args.rate if args.rate is None or math.isfinite(args.rate) else "inf"
    config = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")} | {
        "rate": rate, "phases": [p.spec() for p in phases], "max_model_len": max_len,
        "lengths": "dataset" if pool else f"lognormal sigma {SIGMA}", "chars_per_token": CHARS_PER_TOKEN}
    return LoadRun(config, records, duration, sent, start)


def open_backend(args):
    if args.backend == "openai":
        from semipd.cli.bench.openai_backend import OpenAIBackend  # aiohttp: only when it is used
        return OpenAIBackend(args.base_url, args.model, args.api_key)
    return SemipdBackend(args.address, args.timeout)


def workload_phases(args, rate: float | None) -> list[workloads.Phase]:
    """The phases that args' --workload and its flags send at a rate."""
    return workloads.resolve(args.workload, rate, args.num_requests, args.input_len_mean, args.output_len_mean)


def check_load_args(args) -> None:
    check_backend_args(args)
    if workloads.is_phased(args.workload):
        try:
            workloads.resolve(args.workload, None)
        except UserError as e:
            raise UserError(f"--workload {args.workload}: {e}") from None
        for flag in ("num_requests", "input_len_mean", "output_len_mean", "dataset"):
            if getattr(args, flag) is not None:
                raise UserError(f"--workload {args.workload} sets how many requests and how long: "
                                f"leave out --{flag.replace('_', '-')}")
        if args.rate is not None and math.isinf(args.rate):
            raise UserError("a phased workload keeps its phases' durations: give a finite --rate")
        return
    if args.num_requests is None or args.num_requests < 1:
        raise UserError(f"--num-requests must be at least 1, got {args.num_requests}")
    if args.dataset and (args.input_len_mean or args.output_len_mean):
        raise UserError("--dataset sets the lengths: leave out --input-len-mean and --output-len-mean")
    if args.dataset and args.workload:
        raise UserError("--dataset sets the lengths: leave out --workload")
