"""The prefix cache in the schedulers and the single-process engine (the unified worker's loop):
greedy tokens identical with and without it, and the pool's counts exact afterwards."""

import random

import pytest

from semipd.shared.engine import Engine
from semipd.shared.engine_config import EngineConfig
from semipd.shared.page_allocator import PageAllocator
from semipd.shared.sampling_params import SamplingParams
from semipd.shared.scheduler import PrefillScheduler
from semipd.shared.sequence import Sequence
from tests.serving_fixtures import model  # noqa: F401 (a fixture)

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def shared_prompts(seed: int = 0) -> list[list[int]]:
    """Two groups of a 40-token prefix with suffixes of 1 to 30 tokens (page multiples among the
    totals), a prompt repeated, one that is a prefix of another, and one that shares nothing."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 300) for _ in range(40)] for _ in range(2)]
    prompts = [p + [rng.randrange(3, 300) for _ in range(n)] for p in prefixes for n in (1, 8, 24, 30)]
    return prompts + [prompts[0], prefixes[1][:32], [rng.randrange(3, 300) for _ in range(20)]]


def run(path, prompts, **kw):
    engine = Engine(EngineConfig(model=path, device="cpu", dtype="float32", progress=False, **kw))
    try:
        first = [c.token_ids for c in engine.generate(prompts, GREEDY)]
        again = [c.token_ids for c in engine.generate(prompts, GREEDY)]  # now from the cache
        pool = engine.allocator
        assert pool.audit() == [] and pool.num_free() == pool.num_pages
        return first, again, pool.cache_stats()
    finally:
        engine.close()


def test_a_next_turn_finds_the_answer_before_it_cached(model):  # noqa: F811
    """A finished sequence caches its output's full pages too (all but the newest token's)."""
    prompt = shared_prompts()[0][:10]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    results = {}
    for caching in (False, True):
        engine = Engine(EngineConfig(model=model, device="cpu", dtype="float32", progress=False,
                                     page_size=4, prefix_cache=caching))
        try:
            answer = engine.generate([prompt], params)[0].token_ids
            before = engine.allocator.cache_stats()["hit_tokens"]
            turn = engine.generate([prompt + answer + [5, 6]], params)[0].token_ids
            results[caching] = (answer, turn, engine.allocator.cache_stats()["hit_tokens"] - before)
            assert engine.allocator.audit() == [] and engine.allocator.num_free() == engine.allocator.num_pages
        finally:
            engine.close()
    assert results[True][:2] == results[False][:2]
    assert results[True][2] == 20  # 10 prompt tokens and 11 of the answer computed: 5 full pages


@pytest.mark.parametrize("kw", [{}, dict(max_batched_tokens=20), dict(num_pages=9)],
                         ids=["one-batch", "chunked-prefill", "small-pool-preempts"])
def test_greedy_tokens_are_the_same_with_the_cache(model, kw):  # noqa: F811
    prompts = shared_prompts()
    plain, _, off = run(model, prompts, prefix_cache=False, **kw)
    first, again, on = run(model, prompts, **kw)
    assert first == plain and again == plain
    assert off["hit_tokens"] == 0 and off["cached_pages"] == 0
    assert on["hit_tokens"] > 0 and on["held_pages"] == 0


def test_a_prefix_in_prefill_is_computed_once():
    """B shares A's three full pages while A is still being prefilled in chunks: B waits (in
    A's last step it would have found one page cached, computed the others again), then
    computes only its last token."""
    with PageAllocator.create(32, page_size=16) as pool:
        sched = PrefillScheduler(pool, 16, max_batched_tokens=32, max_num_seqs=8)
        shared = list(range(3, 51))                        # 48 tokens: 3 pages
        a = Sequence(0, shared + [60, 61], GREEDY)
        b = Sequence(1, shared + [70], GREEDY)
        sched.add(a)
        sched.add(b)
        computed = {0: 0, 1: 0}
        while sched.waiting:
            batch = sched.schedule()
            assert not (a in sched.waiting and any(s is b for s, _ in batch))  # b waits for a
            for seq, n in batch:
                computed[seq.seq_id] += n
            done = sched.finish_chunks(batch)
            sched.cache_computed()  # as prefill_step does once it has sampled
            for seq in done:
                pool.free(seq.reset_cache())
        assert computed == {0: 50, 1: 1}
        assert pool.cache_stats()["hit_tokens"] == 48 and pool.audit() == [] and pool.num_free() == 32


def test_pages_are_cached_only_once_their_step_has_completed():
    """A unified loop schedules while its last step may still run: that step's pages wait (a
    worker killed mid-step must leave no half-written page in the cache)."""
    with PageAllocator.create(8, page_size=16) as pool:
        sched = PrefillScheduler(pool, 16, max_batched_tokens=64, max_num_seqs=8)
        seq = Sequence(0, list(range(3, 40)), GREEDY)
        sched.add(seq)
        sched.finish_chunks(sched.schedule())
        sched.schedule(settled=False)
        assert pool.cache_stats()["cached_pages"] == 0
        sched.schedule()
        assert pool.cache_stats()["cached_pages"] == 2
        pool.free(seq.reset_cache())
        assert pool.audit() == [] and pool.num_free() == 8
