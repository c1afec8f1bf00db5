"""What the two moderation end-to-end test files share: served and monitor checkpoints (monitors
that flag everything or nothing are checkpoints whose token head has a large bias), monitor
addresses, prompts, and requests run together with how each ended."""

import asyncio

from semipd.shared.client import AsyncClient, ServerError
from tests.conftest import make_checkpoint
from tests.scm_checkpoints import bpe_tokenizer, save_monitor
from tests.short_folders import short_folder

FLAG_ALL, FLAG_NONE = (0.0, 30.0), (30.0, 0.0)


def prompts(n: int) -> list[list[int]]:
    return [[3 + (7 * i + j) % 290 for j in range(5 + i % 9)] for i in range(n)]


def served_model(tmp_path_factory, arch: str) -> str:
    path = str(tmp_path_factory.mktemp(f"served-{arch}"))
    make_checkpoint(path, arch)
    return path


def monitor_checkpoint(tmp_path_factory, served, bias, same_tokenizer: bool) -> str:
    """A monitor with the served model's tokenizer (transformers loads both as Qwen2's, so
    their fingerprints match and ids are sent) or with a BPE tokenizer of its own (text)."""
    from transformers import AutoTokenizer
    path = tmp_path_factory.mktemp("monitor")
    tokenizer = AutoTokenizer.from_pretrained(served) if same_tokenizer else bpe_tokenizer()
    save_monitor(path, tokenizer, token_bias=bias)
    return str(path)


def socket_address() -> str:
    return f"ipc://{short_folder('semipd-scm-')}/scm.sock"


async def collect(address: str, requests: list[tuple[list[int], bool]], max_tokens: int, after=None):
    """Run requests (prompt ids, moderate) concurrently; per request (token ids received,
    Final or ServerError). after(streams) runs once every stream has shown one token."""
    async with AsyncClient(address) as client:
        streams = [await client.generate(prompt_ids=p, moderate=m, temperature=0, max_tokens=max_tokens,
                                         ignore_eos=True) for p, m in requests]
        tokens = [[] for _ in streams]

        async def read(i, stream):
            try:
                async for delta in stream:
                    tokens[i] += delta.token_ids
                return stream.final
            except ServerError as e:
                return e

        tasks = [asyncio.ensure_future(read(i, s)) for i, s in enumerate(streams)]
        if after is not None:
            while not all(tokens) and not all(t.done() for t in tasks):
                await asyncio.sleep(0.005)
            after()
        finals = await asyncio.gather(*tasks)
    return list(zip(tokens, finals))
