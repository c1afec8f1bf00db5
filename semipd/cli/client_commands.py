"""`semipd complete` and `semipd stats`: talk to a running server through the client SDK."""

import asyncio
import json
import sys
import time
from dataclasses import asdict

from semipd.cli.args import (add_client_args, add_json_arg, add_prompt_args, add_sampling_args, at_least,
                             print_completions, prompts, sampling_params)
from semipd.cli.stats_summary import summary
from semipd.shared.client import AsyncClient, Client, ClientError, ServerError
from semipd.shared.errors import UserError, first_line


def add_parser(sub) -> None:
    comp = sub.add_parser("complete", help="send prompts to a running server and print the outputs")
    add_client_args(comp)
    add_prompt_args(comp)
    add_sampling_args(comp)
    add_json_arg(comp)
    comp.add_argument("--moderate", action="store_true",
                      help="have the content monitor watch the outputs and stop harmful ones")
    comp.add_argument("--wait", type=at_least(float, 0, "a number of seconds, 0 or more"), default=0,
                      metavar="SECONDS",
                      help="wait up to this long for the server to be ready (it may still be loading)")
    comp.set_defaults(func=cmd_complete)
    stats = sub.add_parser("stats", help="print a running server's model, split, requests, KV cache and workers")
    add_client_args(stats)
    stats.add_argument("--json", action="store_true", help="print the whole stats object as JSON")
    stats.set_defaults(func=cmd_stats)
    part = sub.add_parser("partition", help="move a running server's prefill/decode SM split")
    add_client_args(part)
    part.add_argument("--prefill-sm", type=int, required=True, help="prefill's SM percent")
    part.add_argument("--decode-sm", type=int, required=True, help="decode's SM percent")
    part.add_argument("--wait", type=at_least(float, 0, "a number of seconds, 0 or more"), default=180,
                      metavar="SECONDS",
                      help="wait up to this long for the switch (the server ends one held up past its --switch-timeout)")
    part.set_defaults(func=cmd_partition)


def cmd_complete(args) -> None:
    requests = [{kind: value} for kind, value in prompts(args)]
    params = asdict(sampling_params(args))
    try:
        if args.wait:
            wait_ready(args.address, args.wait)
        asyncio.run(_complete(args, requests, params))
    except ClientError as e:
        raise UserError(first_line(e)) from None


async def _complete(args, requests: list[dict], params: dict) -> None:
    async with AsyncClient(args.address, args.timeout) as client:
        if len(requests) == 1 and not args.json:
            await _stream_one(client, requests[0], params, args.moderate)
            return
        # All requests are in flight before any is read, so they run concurrently on the server.
        streams = [await client.generate(**p, moderate=args.moderate, **params) for p in requests]
        results = []
        for i, stream in enumerate(streams):
            try:
                results.append(await stream.result())
            except ServerError as e:
                raise ServerError(f"prompt {i}: {e}") from None
    extra = [{"ttft_s": r.final.ttft_s, "itl_s": r.final.itl_s} for r in results]
    print_completions(results, args, extra)


async def _stream_one(client: AsyncClient, prompt: dict, params: dict, moderate: bool) -> None:
    async with await client.generate(**prompt, moderate=moderate, **params) as stream:
        async for delta in stream:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if stream.final.finish_reason in ("abort", "content_filter"):
        print(f"semipd: output ended early ({stream.final.finish_reason})", file=sys.stderr)


def wait_ready(address: str, timeout_s: float) -> None:
    """Poll health until the server says ok: a server that is not up yet, or still loading its
    weights and starting workers, is not an error within the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with Client(address, timeout_s=max(0.1, min(2.0, deadline - time.monotonic()))) as client:
                if client.health()["status"] == "ok":
                    return
        except ClientError:
            pass
        if time.monotonic() > deadline:
            raise UserError(f"the server at {address} was not ready within {timeout_s:g} s")
        time.sleep(0.2)


def cmd_partition(args) -> None:
    """Ask for the split, wait until the workers have switched, print each switch's timings."""
    try:
        with Client(args.address, args.timeout) as client:
            before = len(client.partition(args.prefill_sm, args.decode_sm)["history"])
            deadline = time.monotonic() + args.wait
            while (part := client.stats()["partition"])["switching"]:
                if time.monotonic() > deadline:
                    raise UserError(f"the switch did not finish within {args.wait:g} s")
                time.sleep(0.1)
    except ClientError as e:
        raise UserError(first_line(e)) from None
    records = part["history"][before:]
    for record in records:
        print(json.dumps(record))
    print(f"split: prefill {part['prefill_sm']}%, decode {part['decode_sm']}%"
          + ("" if part["mps"] else " (recorded only: no MPS)"))
    failed = [r for r in records if r["error"]]
    if failed:
        raise UserError("; ".join(f"the {r['role']} switch failed: {r['error']}" for r in failed))


def cmd_stats(args) -> None:
    try:
        with Client(args.address, args.timeout) as client:
            data = client.stats()
    except ClientError as e:
        raise UserError(first_line(e)) from None
    if args.json:
        print(json.dumps(data))
    else:
        print("\n".join(summary(data)))
