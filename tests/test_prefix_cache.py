"""The prefix cache in the page allocator: keys, the shared index, holds, LRU eviction, and the
counts after real processes die holding cached pages."""

import multiprocessing
import os
import random
import signal

import numpy as np
import pytest

from semipd.shared.page_allocator import CACHED, PageAllocator, releasing
from semipd.shared.prefix_cache import EMPTY, PrefixIndex, extend_keys

PS = 4
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def pool():
    with PageAllocator.create(16, page_size=PS) as allocator:
        yield allocator
        assert allocator.audit() == []


def start(pool, owner, tokens, computed=None):
    """A sequence as the prefill scheduler starts it: its cached prefix and pages for every
    token, its full computed pages cached (computed: how many tokens, default all)."""
    keys = extend_keys([], tokens, PS)
    prefix = pool.match(keys[:(len(tokens) - 1) // PS], tokens)
    need = -(-len(tokens) // PS) - len(prefix)
    table = pool.alloc(need, owner, prefix, keys[:len(prefix)], prompt_tokens=len(tokens))
    if table is not None:
        pool.publish(owner, table, keys[:(computed or len(tokens)) // PS], tokens)
    return table, len(prefix)


def test_keys_chain_over_every_token_before():
    a, b = list(range(10)), list(range(10))
    b[1] = 99
    ka, kb = extend_keys([], a, PS), extend_keys([], b, PS)
    assert len(ka) == 2 and ka[0] != kb[0] and ka[1] != kb[1]  # page 1's tokens agree, not what precedes
    assert extend_keys(extend_keys([], a[:5], PS), a, PS) == ka  # extending equals computing at once
    assert extend_keys([], a[:8] + [7, 7], PS) == ka


def test_index_agrees_with_a_dict_under_collisions():
    rng = random.Random(0)
    keys = np.zeros(64, np.int64)
    index = PrefixIndex(np.full(16, EMPTY, np.int32), keys)
    filed = {}
    for _ in range(3000):
        if filed and (len(filed) == 8 or rng.random() < 0.5):
            page = rng.choice(list(filed))
            index.remove(page)
            del filed[page]
        else:
            page = rng.choice([p for p in range(64) if p not in filed])
            keys[page] = rng.randrange(-40, 40)  # few keys, 16 slots: long probe runs that wrap
            if index.find(int(keys[page])) != EMPTY:
                continue
            index.insert(page)
            filed[page] = int(keys[page])
        for page, key in filed.items():
            assert index.find(key) == page
        assert (index.slots != EMPTY).sum() == len(filed)


def test_shared_prefix_is_held_once_per_sequence(pool):
    prompt = list(range(100, 110))                   # pages [0-3] [4-7] [8-9]
    a, hit = start(pool, 1, prompt)
    assert hit == 0 and pool.cache_stats()["cached_pages"] == 2  # the last page stays a's own
    b, hit = start(pool, 2, prompt[:8] + [7, 7, 7])  # shares both full pages
    assert hit == 2 and b[:2] == a[:2] and b[2] != a[2]
    c, hit = start(pool, 3, prompt[:4] + [7])        # shares the first
    assert hit == 1 and c[0] == a[0]
    assert pool.owners() == {CACHED: 2, 1: 1, 2: 1, 3: 1}
    assert pool._state.refs[a[:2]].tolist() == [3, 2]
    pool.free(a)
    pool.free(b)
    assert pool._state.refs[a[:2]].tolist() == [1, 0] and pool.num_free() == 16 - 2
    pool.free(c)
    stats = pool.cache_stats()
    assert pool.num_free() == 16 and stats["cached_pages"] == 2 and stats["held_pages"] == 0
    assert stats["hit_tokens"] == 12 and stats["prompt_tokens"] == 10 + 11 + 5


def test_last_token_is_always_computed(pool):
    prompt = list(range(8))
    a, _ = start(pool, 1, prompt + [50])
    pool.free(a)
    b, hit = start(pool, 2, prompt)     # the same two full pages, but page 1 holds its last token
    assert hit == 1 and len(b) == 2
    pool.free(b)


def test_a_page_matches_only_its_own_tokens(pool):
    a, _ = start(pool, 1, list(range(9)))
    forged = extend_keys([], list(range(9)), PS)   # a's keys over other tokens: a collision
    assert pool.match(forged[:2], list(range(9))) == a[:2]
    assert pool.match(forged[:2], [0, 1, 2, 3, 9, 9, 9, 9]) == a[:1]
    pool.free(a)


def test_unheld_pages_are_evicted_least_recently_released_first(pool):
    old, _ = start(pool, 1, list(range(100, 109)))   # 2 cached pages, 1 own
    new, _ = start(pool, 2, list(range(200, 209)))
    pool.free(old)
    pool.free(new)
    assert pool.num_free() == 16 and pool.cache_stats()["cached_pages"] == 4
    taken = pool.alloc(13, owner=3)                   # 12 free: one cached page must go
    stats = pool.cache_stats()
    assert stats["evicted_pages"] == 1 and stats["cached_pages"] == 3
    assert old[1] in taken                            # old's tail went first (a chain ends first)
    assert pool.match(extend_keys([], list(range(100, 109)), PS)[:2], list(range(100, 109))) == old[:1]
    pool.free(taken)


def test_held_pages_are_never_evicted(pool):
    a, _ = start(pool, 1, list(range(17)))   # 4 cached pages held by a, 1 own
    assert pool.alloc(12, owner=2) is None and pool.num_free() == 11
    pool.free(a)                      # its own page is free again: 12 free, 4 cached
    taken = pool.alloc(13, owner=2)
    assert pool.cache_stats()["evicted_pages"] == 1
    pool.free(taken)


def test_free_owner_lets_go_of_the_hold_exactly_once(pool):
    prompt = list(range(13))
    a, _ = start(pool, 1, prompt)
    b, _ = start(pool, 2, prompt)
    pool.release_later(b)            # b's worker let go, its step still in flight...
    assert pool._state.refs[a[0]] == 2
    assert pool.free_owner(releasing(os.getpid())) == 1  # ...and died
    assert pool.free_owner(1) == 1 and pool.free_owner(1) == 0
    assert pool._state.refs[a[:3]].tolist() == [0, 0, 0] and pool.num_free() == 16


def test_no_cache_when_off():
    with PageAllocator.create(8, page_size=PS, caching=False) as pool:
        a, hit = start(pool, 1, list(range(9)))
        b, hit = start(pool, 2, list(range(9)))
        assert hit == 0 and pool.cache_stats()["cached_pages"] == 0
        pool.free(a)
        pool.free(b)
        assert pool.num_free() == 8 and pool.audit() == []


def _hold_and_die(name, owner, tokens):
    pool = PageAllocator.attach(name)
    computed = tokens + [0] * 3
    keys = extend_keys([], computed, PS)
    prefix = pool.match(keys[:(len(tokens) - 1) // PS], computed)
    table = pool.alloc(2, owner, prefix, keys[:len(prefix)])
    pool.publish(owner, table, keys, computed)  # caches its first own page too
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_holder_is_reclaimed_with_exact_counts(pool):
    prompt = list(range(13))
    a, _ = start(pool, 1, prompt)
    child = SPAWN.Process(target=_hold_and_die, args=(pool.name, 7, prompt[:12] + [5]), daemon=True)
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    assert pool._state.refs[a[:3]].tolist() == [2, 2, 2]
    assert pool.free_owner(7) == 1   # as the controller does for a dead worker's request
    assert pool.audit() == [] and pool._state.refs[a[:3]].tolist() == [1, 1, 1]
    pool.free(a)
    assert pool.num_free() == 16 and pool.cache_stats()["held_pages"] == 0


def _churn(name, worker, num_ops, results):
    """Random prompts over a few shared prefixes: start, cache, free, die-free by owner tag."""
    rng = random.Random(worker)
    pool = PageAllocator.attach(name)
    held, owner = {}, worker * 10**6
    for _ in range(num_ops):
        if held and rng.random() < 0.5:
            o, table = held.popitem()
            pool.free_owner(o) if rng.random() < 0.2 else pool.free(table)
            continue
        base = rng.randrange(4)
        tokens = [base] * (PS * rng.randrange(4)) + [rng.randrange(9) for _ in range(rng.randint(1, 6))]
        keys = extend_keys([], tokens, PS)
        prefix = pool.match(keys[:(len(tokens) - 1) // PS], tokens)
        need = -(-len(tokens) // PS) - len(prefix)
        table = pool.alloc(need, owner, prefix, keys[:len(prefix)], prompt_tokens=len(tokens))
        if table is not None:
            assert (pool._state.owner[table[len(table) - need:]] == owner).all()
            pool.publish(owner, table, keys, tokens)
            held[owner] = table
        owner += 1
    for o, table in held.items():
        pool.free(table)
    pool.close()
    results.put(worker)


def test_two_processes_share_the_cache_and_leave_counts_exact():
    with PageAllocator.create(24, page_size=PS) as pool:
        results = SPAWN.Queue()
        workers = [SPAWN.Process(target=_churn, args=(pool.name, w, 3000, results), daemon=True)
                   for w in (1, 2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
            assert w.exitcode == 0
        assert pool.audit() == [] and pool.num_free() == 24
        assert pool.cache_stats()["hit_tokens"] > 0 and pool.cache_stats()["held_pages"] == 0
