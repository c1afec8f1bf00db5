"""What a bench run talks to: a semipd server through the SDK (`--backend semipd`, the default), or
any OpenAI-compatible server over HTTP (`--backend openai`, openai_backend.py). Each sends one
request's token ids and reports what its client saw: when each message came and how many tokens
it carried, when the answer ended, and how many tokens it had."""

import time
from dataclasses import dataclass

from semipd.shared.client import AsyncClient, ServerError
from semipd.shared.errors import UserError

BACKEND_HELP = """\
--backend openai drives any OpenAI-compatible server instead (`semipd api` or `semipd serve --http`,
vLLM, SGLang) over HTTP, with the same workloads and report: streamed completions whose prompts are
token ids, with max_tokens and ignore_eos (an extension that vLLM, SGLang and semipd accept; a server
without it may end answers early) and stream_options.include_usage. TTFT and ITL come from the
arrival of the chunks (each counts as one token, one without text too, but not a last one that only
ends the stream; the last also counts those the usage has beyond, and where the chunks outnumber
the usage the first without text count none), output token counts from the usage; the server's
own clock (server_ttft_s) is not reported:
  semipd bench --backend openai --base-url http://127.0.0.1:8000/v1 --rate 8 --num-requests 200
"""


@dataclass
class Answer:
    """One request as its client saw it; times are time.perf_counter() readings."""
    chunks: list[tuple[float, int]]     # (arrival, tokens) of each message
    ended: float
    output_tokens: int
    finish_reason: str
    server_ttft_s: float | None = None
    server_tpot_s: float | None = None
    token_ids: list[int] | None = None  # the answer's tokens, where the backend streams ids


class Refused(Exception):
    """The server refused or failed this one request: it counts as failed and the run goes on."""


def add_args(p) -> None:
    p.add_argument("--backend", choices=["semipd", "openai"], default="semipd",
                   help="semipd: the server at --address through the SDK (default); openai: the "
                        "OpenAI-compatible server at --base-url over HTTP (below)")
    p.add_argument("--base-url", metavar="URL", help="with --backend openai: the API's base URL, up to /v1")
    p.add_argument("--api-key", help="with --backend openai: sent as Authorization: Bearer KEY")


def check_args(args) -> None:
    if args.backend == "openai":
        if not args.base_url:
            raise UserError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        if args.launch:
            raise UserError("--launch starts semipd servers for the SDK: leave out --backend openai")
    else:
        if args.base_url or args.api_key:
            raise UserError("--base-url and --api-key are for --backend openai")
        if bool(args.launch) != bool(args.model):
            raise UserError("--launch needs --model, and --model is only for --launch or --backend openai")


def target(args) -> str:
    """Where this run sends: the SDK's address or the API's base URL."""
    return args.base_url if args.backend == "openai" else args.address


def with_target(args, where: str) -> dict:
    """args' fields with the target moved to where (a sweep's --servers entry)."""
    return vars(args) | {"base_url" if args.backend == "openai" else "address": where}


class SemipdBackend:
    """A semipd server through the AsyncClient; its Finals also carry the server's own timings."""

    def __init__(self, address: str, timeout_s: float):
        self.address, self.timeout_s = address, timeout_s

    async def __aenter__(self):
        self.client = AsyncClient(self.address, self.timeout_s)
        return self

    async def __aexit__(self, *exc):
        await self.client.close()

    async def max_model_len(self) -> int:
        status = (await self.client.health()).get("status", "ok")  # fails fast when nobody answers
        if status != "ok":
            raise UserError(f"the server is not ready yet (status {status!r}); try again shortly")
        max_len = (await self.client.stats()).get("max_model_len")
        if not isinstance(max_len, int):
            raise UserError("the server's stats do not report max_model_len")
        return max_len

    async def send(self, prompt_ids: list[int], params: dict) -> Answer:
        chunks, ids = [], []
        try:
            async with await self.client.generate(prompt_ids=prompt_ids, **params) as stream:
                async for delta in stream:
                    chunks.append((time.perf_counter(), len(delta.token_ids)))
                    ids += delta.token_ids
        except ServerError as e:
            if e.final is None:  # not a rejected request but a broken server: stop the run
                raise
            raise Refused(str(e)) from None
        final = stream.final
        return Answer(chunks, time.perf_counter(), len(ids), final.finish_reason, final.ttft_s,
                      sum(final.itl_s) / len(final.itl_s) if final.itl_s else None, ids)
