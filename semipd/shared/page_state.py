"""The page pool's state and every change to it, over one shared-memory buffer. No locking here:
PageAllocator (page_allocator.py) takes its cross-process lock around each call.

Layout (n pages of page_size tokens, c index slots):

    header  int64[16]        see the H_* indices
    owner   int64[n]         FREE, CACHED, a request id (>= 0) or releasing(pid): let go of by
                             worker pid, whose launched GPU step may still write it
    key     int64[n]         a cached page's chained key (prefix_cache.py)
    stamp   int64[n]         a cached page: when its refs last fell to 0 (LRU clock)
    stack   int32[n]         free page ids in stack[:top]; alloc pops from the top
    parent  int32[n]         a cached page: the cached page before it (-1: the first)
                             a held page: the tail of its sequence's cached prefix (see below)
    refs    int32[n]         a cached page: how many sequences hold it
    tokens  int32[n, ps]     a cached page's tokens, compared on every match
    slots   int32[c]         the key -> page index (prefix_cache.PrefixIndex)

**Holds.** A sequence's block table is a cached prefix (shared, read only) and then its own pages.
Its hold on the prefix is carried by its first own page, whose parent is the prefix's tail: the
sequence holds every page on the parent chain from there, each counted once in refs. So the truth
of refs is the owner and parent arrays: refs[p] = number of held (not FREE or CACHED) pages whose
chain passes p, and whoever frees a sequence's own pages (the worker, or the controller by owner
tag once the worker died) lets go of its hold with them, exactly once. A sequence never holds a
prefix without an own page: the last prompt token is always computed, and publishing keeps the
block table's last page its own. Cached pages nobody holds stay cached until alloc needs their
room (evict: least recently let go first, in batches).
"""

import numpy as np

from semipd.shared.prefix_cache import EMPTY, PrefixIndex, index_capacity

FREE, CACHED = -1, -2
# H_HOLDER: the pid inside a critical section now (0: none) and, next to it, how many critical
# sections have begun: a waiter tells one stuck holder from many short ones
H_NUM_PAGES, H_TOP, H_PAGE_SIZE, H_CACHING, H_SLOTS, H_CLOCK, H_PROMPT, H_HIT, H_EVICTED, H_HOLDER = range(10)
HEADER = 16


def releasing(pid: int) -> int:
    """The owner tag of pages that process pid has let go of but may still write."""
    return -3 - pid


def releaser(owner: int) -> int | None:
    """The pid behind a releasing() tag; None for a request id or a cached page."""
    return -3 - owner if owner <= -3 else None


def segment_size(num_pages: int, page_size: int) -> int:
    return 8 * HEADER + num_pages * (8 + 4 + 8 + 4 + 4 + 8 + 4 * page_size) + 4 * index_capacity(num_pages)


class PageState:
    def __init__(self, buf):
        head = np.ndarray((HEADER,), np.int64, buf)
        n, ps, c = int(head[H_NUM_PAGES]), int(head[H_PAGE_SIZE]), int(head[H_SLOTS])
        self.header, offset = head, 8 * HEADER
        views = []
        for dtype, shape in ((np.int64, (n,)), (np.int64, (n,)), (np.int64, (n,)), (np.int32, (n,)),
                             (np.int32, (n,)), (np.int32, (n,)), (np.int32, (n, ps)), (np.int32, (c,))):
            views.append(np.ndarray(shape, dtype, buf, offset=offset))
            offset += views[-1].nbytes
        self.owner, self.key, self.stamp, self.stack, self.parent, self.refs, self.tokens, slots = views
        self.num_pages, self.page_size = n, ps
        self.index = PrefixIndex(slots, self.key)
        self.evict_batch = max(1, n // 64)  # a scan for victims costs O(n): amortize it

    @staticmethod
    def init(buf, num_pages: int, page_size: int, caching: bool) -> None:
        head = np.ndarray((HEADER,), np.int64, buf)
        head[:] = 0
        head[[H_NUM_PAGES, H_TOP, H_PAGE_SIZE, H_CACHING, H_SLOTS]] = (
            num_pages, num_pages, page_size, caching, index_capacity(num_pages))
        state = PageState(buf)
        state.owner[:], state.parent[:], state.index.slots[:] = FREE, -1, EMPTY
        state.stack[:] = np.arange(num_pages - 1, -1, -1)  # so that pages 0, 1, ... go first

    @property
    def caching(self) -> bool:
        return bool(self.header[H_CACHING])

    # ---- taking and returning pages --------------------------------------------------------

    def alloc(self, n: int, owner: int, prefix: list[int], keys: list[int], prompt_tokens: int) -> list[int] | None:
        """The block table [cached prefix..., n new pages], or None (nothing taken) if the pool,
        its unheld cached pages counted, is short. Of prefix (from match()) only the leading
        pages still cached under keys are taken, should another process have evicted the rest."""
        valid = self._valid_prefix(prefix, keys)
        if valid and n < 1:
            raise ValueError("a cached prefix needs a page of the sequence's own to hold it")
        if valid:
            self._hold(valid[-1], +1)  # before evicting: these pages must stay
        if n > int(self.header[H_TOP]):
            self._evict(n - int(self.header[H_TOP]))
        top = int(self.header[H_TOP])
        if n > top:
            if valid:
                self._hold(valid[-1], -1)
            return None
        pages = self.stack[top - n:top][::-1].copy()
        # Tag, then pop: a holder killed in between leaves the pages on the free stack.
        self.parent[pages] = -1
        if valid:
            self.parent[pages[0]] = valid[-1]
        self.owner[pages] = owner
        self.header[H_TOP] = top - n
        if prompt_tokens:
            self.header[H_PROMPT] += prompt_tokens
            self.header[H_HIT] += len(valid) * self.page_size
        return valid + pages.tolist()

    def free(self, pages: np.ndarray) -> None:
        """Return a sequence's pages; its cached prefix among them is let go of through its hold."""
        own = pages[self.owner[pages] != CACHED]
        already_free = own[self.owner[own] == FREE]
        if already_free.size:
            raise ValueError(f"double free of page(s) {already_free.tolist()}")
        for carrier in own[self.parent[own] >= 0].tolist():
            self._hold(int(self.parent[carrier]), -1)
        top = int(self.header[H_TOP])
        self.stack[top:top + own.size] = own
        self.parent[own] = -1
        self.owner[own] = FREE
        self.header[H_TOP] = top + own.size

    def release_later(self, pages: np.ndarray, pid: int) -> None:
        own = pages[self.owner[pages] != CACHED]
        if (self.owner[own] == FREE).any():
            raise ValueError(f"page(s) {own[self.owner[own] == FREE].tolist()} are free")
        self.owner[own] = releasing(pid)

    def free_owner(self, owner: int) -> int:
        """Free every page tagged owner; returns the count. The owner and parent arrays are the
        truth: the free stack and refs are rebuilt from them, which also restores the pool after
        a process was killed in the middle of a change."""
        held = self.owner == owner
        self.parent[held] = -1
        self.owner[held] = FREE
        free_pages = np.flatnonzero(self.owner == FREE)[::-1]
        self.stack[:free_pages.size] = free_pages
        self.header[H_TOP] = free_pages.size
        refs = self.true_refs()
        for page in np.flatnonzero((refs == 0) & (self.refs > 0)).tolist():
            self.stamp[page] = self._tick()
        self.refs[:] = refs
        return int(held.sum())

    # ---- the cache -------------------------------------------------------------------------

    def match(self, keys: list[int], token_ids: list[int]) -> list[int]:
        """The cached pages of the longest prefix of keys whose pages hold these very tokens."""
        if not self.caching or not keys:
            return []
        ps, pages = self.page_size, []
        tokens = np.asarray(token_ids[:len(keys) * ps], dtype=np.int32).reshape(-1, ps)
        for key, row in zip(keys, tokens):
            page = self.index.find(key)
            if page == EMPTY or int(self.owner[page]) != CACHED or \
                    int(self.parent[page]) != (pages[-1] if pages else -1) or \
                    not np.array_equal(self.tokens[page], row):
                break
            pages.append(page)
        return pages

    def publish(self, owner: int, table: list[int], keys: list[int], token_ids: list[int]) -> int:
        """Cache the computed full pages of a sequence (keys: one per such page) that follow its
        cached prefix, all but the table's last page, which keeps its hold; returns how many.
        Stops at a page whose key another page already has (it was computed twice)."""
        if not self.caching:
            return 0
        limit = min(len(keys), len(table) - 1)
        i, prev = 0, -1
        while i < limit and int(self.owner[table[i]]) == CACHED:
            prev, i = table[i], i + 1
        if i == len(table) or int(self.owner[table[i]]) != owner:
            return 0
        start, ps = i, self.page_size
        while i < limit and int(self.owner[page := table[i]]) == owner:
            found = self.index.find(keys[i])
            if found != EMPTY:
                if int(self.parent[found]) == prev or int(self.refs[found]):
                    break
                self._drop_cached([found])  # an orphan: the page before it was evicted
            self.key[page], self.parent[page], self.refs[page] = keys[i], prev, 1
            self.tokens[page] = token_ids[i * ps:(i + 1) * ps]
            self.owner[page] = CACHED
            self.index.insert(page)
            prev, i = page, i + 1
        self.parent[table[i]] = prev  # the hold moves on to the first page still its own
        return i - start

    def _valid_prefix(self, prefix: list[int], keys: list[int]) -> list[int]:
        valid = []
        for page, key in zip(prefix, keys):
            if int(self.owner[page]) != CACHED or int(self.key[page]) != key or \
                    int(self.parent[page]) != (valid[-1] if valid else -1):
                break
            valid.append(page)
        return valid

    def _hold(self, tail: int, delta: int) -> None:
        """Add delta to the refs of tail and every page before it in its chain."""
        page = tail
        while page >= 0:
            self.refs[page] += delta
            if self.refs[page] == 0:
                self.stamp[page] = self._tick()
            page = int(self.parent[page])

    def _evict(self, need: int) -> None:
        """Free at least need (if there are) cached pages nobody holds, least recently let go of
        first. A page after an evicted one stays until its turn comes: no match reaches it."""
        idle = np.flatnonzero((self.owner == CACHED) & (self.refs == 0))
        take = min(idle.size, max(need, self.evict_batch))
        if take < idle.size:
            idle = idle[np.argpartition(self.stamp[idle], take - 1)[:take]]
        self._drop_cached(idle.tolist())
        self.header[H_EVICTED] += len(idle)

    def _drop_cached(self, pages: list[int]) -> None:
        for page in pages:
            self.index.remove(page)
        top = int(self.header[H_TOP])
        self.stack[top:top + len(pages)] = pages
        self.parent[pages], self.owner[pages] = -1, FREE
        self.header[H_TOP] = top + len(pages)

    def _tick(self) -> int:
        self.header[H_CLOCK] += 1
        return int(self.header[H_CLOCK])

    # ---- reading ---------------------------------------------------------------------------

    def true_refs(self) -> np.ndarray:
        """refs as the holds define them (see the top of this file)."""
        refs = np.zeros(self.num_pages, np.int32)
        held = (self.owner != FREE) & (self.owner != CACHED)
        chain = self.parent[held & (self.parent >= 0)]
        while chain.size:
            np.add.at(refs, chain, 1)
            chain = self.parent[chain]
            chain = chain[chain >= 0]
        return refs

    def num_free(self) -> int:
        """Pages alloc can hand out: free ones and cached ones nobody holds."""
        return int(self.header[H_TOP]) + int(((self.owner == CACHED) & (self.refs == 0)).sum())

    def cache_stats(self) -> dict:
        cached = self.owner == CACHED
        prompt, hit = int(self.header[H_PROMPT]), int(self.header[H_HIT])
        return {"enabled": self.caching, "cached_pages": int(cached.sum()),
                "held_pages": int((cached & (self.refs > 0)).sum()), "prompt_tokens": prompt,
                "hit_tokens": hit, "hit_rate": hit / prompt if prompt else 0.0,
                "evicted_pages": int(self.header[H_EVICTED])}
