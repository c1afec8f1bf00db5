"""The page allocator's host work per request, with and without the prefix cache, where no prompt
shares a page (the case where the cache can only cost).

    python -m benchmarks.bench_page_allocator [--pages 27000] [--requests 4000]

Each request does what the workers ask of the allocator: match its prompt's pages, allocate
them, grow one page at a time while it decodes, publish its full pages and, once `--live`
later requests have started, give its pages back. Lengths are ShareGPT-like (uniform 100-600
prompt and 50-400 output tokens), page size 16. The pool fills with cached pages, so later
requests evict. CPU only: no model, one process.
"""

import argparse
import random
import time

from semipd.shared.page_allocator import PageAllocator
from semipd.shared.prefix_cache import extend_keys

PAGE_SIZE = 16


def run(caching: bool, num_pages: int, requests: int, live: int) -> dict:
    allocator = PageAllocator.create(num_pages, PAGE_SIZE, caching=caching)
    rng, tables, spent = random.Random(0), [], {"alloc": 0.0, "publish": 0.0, "free": 0.0}
    try:
        for r in range(requests):
            prompt_len, output_len = rng.randint(100, 600), rng.randint(50, 400)
            tokens = [rng.randrange(50_000) for _ in range(prompt_len + output_len)]
            keys = extend_keys([], tokens[:prompt_len], PAGE_SIZE)
            began = time.perf_counter()
            prefix = allocator.match(keys[:(prompt_len - 1) // PAGE_SIZE], tokens)
            table = allocator.alloc(-(-prompt_len // PAGE_SIZE) - len(prefix), r, prefix, keys[:len(prefix)],
                                    prompt_tokens=prompt_len)
            while len(table) * PAGE_SIZE < prompt_len + output_len:
                table += allocator.alloc(1, r)
            published = time.perf_counter()
            spent["alloc"] += published - began
            allocator.publish(r, table, extend_keys(keys, tokens, PAGE_SIZE)[:(len(tokens) - 1) // PAGE_SIZE], tokens)
            spent["publish"] += time.perf_counter() - published
            tables.append(table)
            if len(tables) > live:
                began = time.perf_counter()
                allocator.free(tables.pop(0))
                spent["free"] += time.perf_counter() - began
        return {part: 1e6 * s / requests for part, s in spent.items()} | {
            "evicted": allocator.cache_stats()["evicted_pages"]}
    finally:
        allocator.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=27_000)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--live", type=int, default=300, help="requests holding pages at once")
    args = parser.parse_args()
    print(f"{'prefix cache':<14} {'alloc us':>9} {'publish us':>11} {'free us':>8} {'total us':>9} {'evicted pages':>14}")
    for caching in (False, True):
        r = run(caching, args.pages, args.requests, args.live)
        total = r["alloc"] + r["publish"] + r["free"]
        print(f"{'on' if caching else 'off':<14} {r['alloc']:>9.0f} {r['publish']:>11.0f} {r['free']:>8.0f} "
              f"{total:>9.0f} {r['evicted']:>14}")


if __name__ == "__main__":
    main()
