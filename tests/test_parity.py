"""The engine against transformers on the same weights: same greedy tokens, same logits."""

import os

import pytest
import torch

from semipd.shared.engine import Engine
from semipd.shared.engine_config import EngineConfig
from semipd.shared.sampling_params import SamplingParams

# Lengths 1 and exact multiples of the page size (16) included.
PROMPT_LENS = [1, 16, 7, 32, 23, 50]
MAX_TOKENS = 12


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in PROMPT_LENS]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(prompt)))
    return out[0, len(prompt):].tolist()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def engine_for(path, device="cpu", **kw) -> Engine:
    dtype = "float32"
    return Engine(EngineConfig(model=path, device=device, dtype=dtype, progress=False, **kw))


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def expected(checkpoint):
    path, hf = checkpoint
    return [hf_greedy(hf, p, MAX_TOKENS) for p in prompts()]


def test_greedy_matches_transformers(checkpoint, expected):
    engine = engine_for(checkpoint[0])
    try:
        got = [c.token_ids for c in engine.generate(prompts(), GREEDY)]
    finally:
        engine.close()
    assert got == expected


@pytest.mark.parametrize("kw", [dict(num_pages=5), dict(max_batched_tokens=20), dict(page_size=1),
                                dict(page_size=64, num_pages=3)],
                         ids=["tiny-pool-preempts", "chunked-prefill", "page-1", "page-64"])
def test_greedy_unchanged_by_paging_and_scheduling(checkpoint, expected, kw):
    """A pool too small for the batch (preemption and recomputation), prompts split into chunks,
    and other page sizes all give the same tokens."""
    engine = engine_for(checkpoint[0], **kw)
    try:
        got = [c.token_ids for c in engine.generate(prompts(), GREEDY)]
        assert engine.allocator.num_free() == engine.allocator.num_pages
    finally:
        engine.close()
    assert got == expected


def test_logits_match_transformers(checkpoint, expected):
    """Prefill and every decode step's logits, against a full forward pass of transformers."""
    path, hf = checkpoint
    engine = engine_for(path)
    try:
        from semipd.shared.sequence import Sequence
        seqs = [Sequence(i, p, GREEDY) for i, p in enumerate(prompts())]
        for s in seqs:
            engine.sched.prefill.add(s)
        chunks = engine.sched.prefill.schedule()
        logits = [engine.runner.prefill_logits(chunks)]
        engine.sched.prefill.finish_chunks(chunks)
        for s in seqs:
            engine.sched.decode.add(s)
        for step in range(3):
            for s in seqs:
                s.append(expected[s.seq_id][step])
            batch, preempted = engine.sched.decode.schedule()
            assert batch == seqs and not preempted
            logits.append(engine.runner.decode(batch))
            for s in seqs:
                s.num_cached += 1
    finally:
        engine.close()
    for step, got in enumerate(logits):
        for s, row in zip(seqs, got):
            ids = s.token_ids[: len(prompts()[s.seq_id]) + step]
            with torch.no_grad():
                ref = hf(torch.tensor([ids])).logits[0, -1]
            assert rel_err(row, ref) < 1e-4, (step, s.seq_id, rel_err(row, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_greedy_matches_transformers_on_gpu(checkpoint, expected, cuda_graphs):
    engine = engine_for(checkpoint[0], device="cuda", cuda_graphs=cuda_graphs, max_num_seqs=8)
    try:
        got = [c.token_ids for c in engine.generate(prompts(), GREEDY)]
    finally:
        engine.close()
    assert got == expected


def test_checkpoint_is_sharded_for_llama(checkpoint):
    files = os.listdir(checkpoint[0])
    if "llama" in checkpoint[0]:
        assert "model.safetensors.index.json" in files
