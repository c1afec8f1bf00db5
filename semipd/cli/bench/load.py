"""One run at one rate: send the planned requests at their arrival times and record each one."""

import asyncio
import math
import time

import numpy as np
from tqdm import tqdm

from semipd.cli.bench.metrics import RequestRecord, token_timing
from semipd.cli.bench.workload import (CHARS_PER_TOKEN, INPUT_MEAN, OUTPUT_MEAN, SIGMA, arrival_times, load_sharegpt,
                                   plan_lengths)
from semipd.shared.client import AsyncClient, ServerError
from semipd.shared.errors import UserError


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
